"""Running cells: every way a cell can end is recorded, and the matrix goes on."""
from __future__ import annotations

import importlib.util
import json
import sys
import textwrap

import pytest

from bench.result import bench_code_hash
from conftest import result_payload
from harness.backends import Backend, BackendError, select
from harness.backends import base
from harness.backends.base import cell_environment, run_process
from harness.matrix import Cell, Settings
from harness.results import RunFolder, read_result
from harness.runner import run_cell, run_cells


class ScriptBackend(Backend):
    """Runs a Python snippet in place of the bench; the snippet gets the result path as argv[1]."""

    name = "script"

    def __init__(self, script: str, broken: bool = False):
        self.script, self.broken, self.runs = textwrap.dedent(script), broken, 0

    def prepare(self, cell):
        if self.broken:
            raise BackendError("building pytorch-cpu failed at 'pip install' (exit 1); see build.log")

    def run(self, launch):
        self.runs += 1
        argv = [sys.executable, "-c", self.script, str(launch.result_path), launch.cell.id]
        return run_process(argv, cell_environment(launch), launch.log_path, launch.timeout_s)


WRITE_OK = f"""
    import json, sys
    sys.path.insert(0, {str(base.REPO_ROOT)!r}); sys.path.insert(0, {str(base.REPO_ROOT / 'tests')!r})
    from conftest import result_payload
    payload = result_payload(cell_id=sys.argv[2])
    payload["env"]["bench_hash"] = {bench_code_hash()!r}
    open(sys.argv[1], "w").write(json.dumps(payload))
"""


def cell(steps=20, timeout_s=60.0):
    return Cell("pytorch", "cnn_cifar10", "cpu", "auto", "auto", 1, Settings(steps=steps, timeout_s=timeout_s))


def run_one(tmp_path, script, **kwargs):
    folder = RunFolder(tmp_path / "run")
    outcome = run_cell(cell(**kwargs), folder, ScriptBackend(script), [], tmp_path)
    return outcome, read_result(folder.result_path(cell(**kwargs).id)), folder


def test_a_result_the_cell_wrote_is_checked_and_moved_into_place(tmp_path):
    outcome, result, folder = run_one(tmp_path, WRITE_OK)
    assert outcome.status == result.status == "ok"
    assert not list(folder.staging.iterdir())


def test_a_crash_is_recorded_with_the_end_of_its_output(tmp_path):
    outcome, result, _ = run_one(tmp_path, "print('CUDA error: out of memory'); raise SystemExit(3)")
    assert result.status == "failed"
    assert result.error.startswith("the cell process exited with status 3; see ")
    assert "CUDA error: out of memory" in result.error
    assert result.cell.framework == "pytorch" and result.env["hostname"]


def test_a_killed_cell_is_recorded_as_probably_out_of_memory(tmp_path):
    _, result, _ = run_one(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert result.status == "failed"
    assert "killed by SIGKILL, most often the kernel's out-of-memory killer" in result.error


def test_a_hanging_cell_is_stopped_at_its_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "TERMINATE_GRACE_S", 0.5)
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('stuck', flush=True); time.sleep(120)"
    outcome, result, _ = run_one(tmp_path, script, timeout_s=2.0)
    assert result.status == outcome.status == "timeout"
    assert "timed out and was stopped after 2 s" in result.error and "stuck" in result.error


def test_a_half_written_result_counts_as_a_failure(tmp_path):
    _, result, folder = run_one(tmp_path, "import sys; open(sys.argv[1], 'w').write('{\"schema_')")
    assert result.status == "failed" and "exited with status 0" in result.error


def test_the_matrix_goes_on_and_finished_cells_are_kept(tmp_path):
    folder = RunFolder(tmp_path / "run")
    cells = [cell(steps=1), cell(steps=2), cell(steps=3)]
    ok = ScriptBackend(WRITE_OK)
    outcomes = run_cells(cells[:1], folder, ok, [], tmp_path)
    assert [o.status for o in outcomes] == ["ok"]
    first = folder.result_path(cells[0].id).read_bytes()

    crashing = ScriptBackend("raise SystemExit(1)")
    outcomes = run_cells(cells, folder, crashing, [], tmp_path)
    assert [(o.status, o.reused) for o in outcomes] == [("ok", True), ("failed", False), ("failed", False)]
    assert folder.result_path(cells[0].id).read_bytes() == first
    assert crashing.runs == 2

    # A failed cell is run again; --force reruns successful ones too.
    outcomes = run_cells(cells, folder, ok, [], tmp_path)
    assert [(o.status, o.reused) for o in outcomes] == [("ok", True), ("ok", False), ("ok", False)]
    run_cells(cells, folder, ok, [], tmp_path, force=True)
    assert ok.runs == 1 + 2 + 3


def test_results_of_other_bench_code_are_not_kept(tmp_path):
    folder = RunFolder(tmp_path / "run")
    stale = result_payload(cell_id=cell().id)  # bench_hash of some other bench version
    folder.cells.mkdir(parents=True)
    folder.result_path(cell().id).write_text(json.dumps(stale))
    backend = ScriptBackend(WRITE_OK)
    assert run_cells([cell()], folder, backend, [], tmp_path)[0].reused is False
    assert backend.runs == 1


def test_an_environment_that_cannot_be_built_fails_its_cells_only(tmp_path):
    folder = RunFolder(tmp_path / "run")
    outcome = run_cell(cell(), folder, ScriptBackend(WRITE_OK, broken=True), [], tmp_path)
    assert outcome.status == "failed"
    assert read_result(folder.result_path(cell().id)).error.startswith("environment not ready: building")


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="needs an interpreter without torch")
def test_a_framework_that_does_not_import_is_recorded_by_the_bench(tmp_path):
    folder = RunFolder(tmp_path / "run")
    outcome = run_cell(cell(), folder, select("current"), [], tmp_path)
    result = read_result(folder.result_path(cell().id))
    assert outcome.status == result.status == "failed"
    assert result.error == "ModuleNotFoundError: No module named 'torch'"
    assert result.env["python"] and result.env["bench_hash"] == bench_code_hash()
