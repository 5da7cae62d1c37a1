"""The precision axis inside the bench: which cells run, which are skipped and why, the switch
that keeps cuBLAS and cuDNN out of TF32, and the math modes every framework records."""
from __future__ import annotations

import ast
import json
import types

import pytest

from bench import __main__ as bench_main
from bench import environment
from bench.precision import PRECISIONS, check, math_modes, set_tf32_override
from bench.result import SCHEMA_PATH
from bench.specs import Unsupported
from conftest import REPO

EVERYTHING = {"cpu": ("fp32", "bf16"), "gpu": PRECISIONS}


@pytest.mark.parametrize("precision, device, capability, reason", [
    ("tf32", "cpu", None, "does not run tf32 on cpu: TF32 is a tensor-core format of NVIDIA GPUs (it runs fp32, bf16 there)"),
    ("fp16", "cpu", None, "does not run fp16 on cpu: float16 arithmetic is a GPU format; CPUs take bf16"),
    ("tf32", "gpu", "7.0", "tf32 needs the tensor cores of compute capability 8.0 (Ampere) or newer; this GPU's is 7.0"),
    ("bf16", "gpu", "7.5", "bf16 needs the tensor cores of compute capability 8.0 (Ampere) or newer; this GPU's is 7.5"),
])
def test_a_precision_the_device_or_framework_lacks_is_skipped_saying_why(precision, device, capability, reason):
    with pytest.raises(Unsupported, match=reason.replace("(", r"\(").replace(")", r"\)")):
        check("somefw", EVERYTHING, precision, device, capability)


@pytest.mark.parametrize("precision, device, capability", [
    ("fp32", "cpu", None), ("bf16", "cpu", None), ("fp16", "gpu", "6.0"), ("fp32", "gpu", "3.7"),
    ("tf32", "gpu", "8.0"), ("bf16", "gpu", "9.0"), ("bf16", "gpu", "10.0"), ("tf32", "gpu", None),
])
def test_supported_precisions_pass(precision, device, capability):
    check("somefw", EVERYTHING, precision, device, capability)


def test_a_framework_without_a_precision_says_what_it_runs():
    with pytest.raises(Unsupported, match=r"^chainer does not run bf16 on gpu \(it runs fp32, tf32, fp16 there\)$"):
        check("chainer", {"cpu": ("fp32",), "gpu": ("fp32", "tf32", "fp16")}, "bf16", "gpu", "9.0")


def test_tf32_is_kept_out_of_cublas_and_cudnn_for_every_precision_but_tf32():
    environ = {"NVIDIA_TF32_OVERRIDE": "1"}
    for precision in ("fp32", "fp16", "bf16"):
        set_tf32_override(precision, environ)
        assert environ == {"NVIDIA_TF32_OVERRIDE": "0"}
    set_tf32_override("tf32", environ)
    assert environ == {}  # an inherited value cannot turn it off unseen


def test_math_modes_have_the_schemas_keys():
    schema = json.loads(SCHEMA_PATH.read_text())["properties"]["env"]["properties"]["math_modes"]
    modes = math_modes("fp16", tf32_matmul=False, tf32_convolutions=False, loss_scaling="dynamic",
                       autotuner=True, xla=False)
    assert sorted(modes) == sorted(schema["required"]) == sorted(schema["properties"])
    assert modes["compute_dtype"] == "float16" and modes["weights_dtype"] == "float32"


def _module_constant(path, name):
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path.name} has no {name}")


@pytest.mark.parametrize("module", sorted(p.name for p in (REPO / "bench" / "frameworks").glob("*.py")
                                          if p.name != "__init__.py"))
def test_every_framework_says_what_it_runs_and_records_its_math_modes(module):
    path = REPO / "bench" / "frameworks" / module
    supported = _module_constant(path, "PRECISIONS")
    assert set(supported) == {"cpu", "gpu"}
    for device, precisions in supported.items():
        assert precisions[0] == "fp32" and list(precisions) == [p for p in PRECISIONS if p in precisions]
    assert "tf32" not in supported["cpu"]
    assert "precision.math_modes(" in path.read_text()


def fake_framework(configured):
    return types.SimpleNamespace(PRECISIONS={"cpu": ("fp32",), "gpu": ("fp32", "tf32", "fp16", "bf16")},
                                 configure=configured.append)


def test_the_bench_records_a_skipped_cell_before_configuring_the_framework(tmp_path, monkeypatch):
    configured = []
    monkeypatch.setattr(bench_main.frameworks, "load", lambda name: fake_framework(configured))
    out = tmp_path / "cell.json"
    assert bench_main.main(["--framework", "pytorch", "--task", "cnn_cifar10", "--synthetic",
                            "--precision", "bf16", "--out", str(out)]) == 1
    result = json.loads(out.read_text())
    assert result["status"] == "skipped" and result["cell"]["precision"] == "bf16"
    assert result["cell"]["id"] == "cnn_cifar10-pytorch-cpu-bf16"
    assert result["error"] == "pytorch does not run bf16 on cpu (it runs fp32 there)"
    assert configured == []


def test_a_gpu_cell_sets_the_tf32_override_before_loading_and_checks_the_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "1")
    seen = {}

    def load(name):
        seen["override"] = environment.os.environ.get("NVIDIA_TF32_OVERRIDE")
        return fake_framework([])

    monkeypatch.setattr(bench_main.frameworks, "load", load)
    monkeypatch.setattr(bench_main.environment, "gpu_info",
                        lambda nvml, visible: {"name": "Tesla V100-SXM2-16GB", "compute_capability": "7.0"})
    out = tmp_path / "cell.json"
    bench_main.main(["--framework", "pytorch", "--task", "cnn_cifar10", "--synthetic", "--device", "gpu",
                     "--precision", "bf16", "--out", str(out)])
    assert seen["override"] == "0"
    result = json.loads(out.read_text())
    assert result["status"] == "skipped" and "compute capability 8.0" in result["error"]
