"""The same timed work in every framework: checks on the framework modules' source, for the
GPU paths this host cannot run."""
from __future__ import annotations

import ast

from conftest import REPO


def _calls_to(tree: ast.AST, method: str) -> list[ast.Call]:
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == method]


def test_pytorch_copies_every_batch_to_the_device_asynchronously():
    """A batch copied from pageable memory waits for the GPU's queued work: every batch goes
    through _host_to_device (pinned memory, non_blocking); .to(device) elsewhere moves models."""
    tree = ast.parse((REPO / "bench" / "frameworks" / "pytorch.py").read_text())
    helper = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == "_host_to_device")
    inside_helper = {id(call) for call in _calls_to(helper, "to")}
    for call in _calls_to(tree, "to"):
        if id(call) in inside_helper:
            assert any(k.arg == "non_blocking" and k.value.value is True for k in call.keywords)
            continue
        moved = ast.unparse(call.func.value)
        assert moved in ("model", "self.model") or moved.startswith("DenseNet121("), (
            f"line {call.lineno}: {ast.unparse(call)} copies without _host_to_device")
    assert len(_calls_to(tree, "pin_memory")) == 1  # in the helper
