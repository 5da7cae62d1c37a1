"""Running cells: every way a cell can end is recorded, and the matrix goes on."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import textwrap
import threading
import time

import pytest

from bench.result import bench_code_hash
from conftest import result_payload
from harness.backends import BackendError, base, quiet
from harness.backends.base import GpuSlots, HostBackend, cell_environment, run_process
from harness.backends.local import CurrentInterpreterBackend
from harness.gpus import Gpu
from harness.matrix import Cell, Settings
from harness.results import RunFolder, read_result
from harness.runner import run_cell, run_cells


class ScriptBackend(HostBackend):
    """Runs a Python snippet in place of the bench; the snippet gets the result path as argv[1].
    Its host has the ``gpus`` it is given."""

    name = "script"

    def __init__(self, script: str, broken: bool = False, gpus=()):
        self.script, self.broken, self.runs = textwrap.dedent(script), broken, 0
        self.gpus = list(gpus)

    def prepare(self, cell, progress=quiet):
        if self.broken:
            raise BackendError("building pytorch-cpu failed at 'pip install' (exit 1); see build.log")

    def run(self, launch):
        self.runs += 1
        argv = [sys.executable, "-c", self.script, str(launch.result_path), launch.cell.id]
        return run_process(argv, cell_environment(launch), launch.log_path, launch.timeout_s, launch.interrupted)


WRITE_OK = f"""
    import json, sys
    sys.path.insert(0, {str(base.REPO_ROOT)!r}); sys.path.insert(0, {str(base.REPO_ROOT / 'tests')!r})
    from conftest import result_payload
    payload = result_payload(cell_id=sys.argv[2])
    payload["env"]["bench_hash"] = {bench_code_hash()!r}
    open(sys.argv[1], "w").write(json.dumps(payload))
"""


def cell(steps=20, timeout_s=60.0):
    return Cell("pytorch", "cnn_cifar10", "cpu", "auto", "auto", 1, "fp32", Settings(steps=steps, timeout_s=timeout_s))


def run_one(tmp_path, script, **kwargs):
    folder = RunFolder(tmp_path / "run")
    outcome = run_cell(cell(**kwargs), folder, ScriptBackend(script), tmp_path)
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
    outcomes = run_cells(cells[:1], folder, ok, tmp_path)
    assert [o.status for o in outcomes] == ["ok"]
    first = folder.result_path(cells[0].id).read_bytes()

    crashing = ScriptBackend("raise SystemExit(1)")
    outcomes = run_cells(cells, folder, crashing, tmp_path)
    assert [(o.status, o.reused) for o in outcomes] == [("ok", True), ("failed", False), ("failed", False)]
    assert folder.result_path(cells[0].id).read_bytes() == first
    assert crashing.runs == 2

    # A failed cell is run again; --force reruns successful ones too.
    outcomes = run_cells(cells, folder, ok, tmp_path)
    assert [(o.status, o.reused) for o in outcomes] == [("ok", True), ("ok", False), ("ok", False)]
    run_cells(cells, folder, ok, tmp_path, force=True)
    assert ok.runs == 1 + 2 + 3


def test_results_of_other_bench_code_are_not_kept(tmp_path):
    folder = RunFolder(tmp_path / "run")
    stale = result_payload(cell_id=cell().id)  # bench_hash of some other bench version
    folder.cells.mkdir(parents=True)
    folder.result_path(cell().id).write_text(json.dumps(stale))
    backend = ScriptBackend(WRITE_OK)
    assert run_cells([cell()], folder, backend, tmp_path)[0].reused is False
    assert backend.runs == 1


def test_an_environment_that_cannot_be_built_fails_its_cells_only(tmp_path):
    folder = RunFolder(tmp_path / "run")
    outcome = run_cell(cell(), folder, ScriptBackend(WRITE_OK, broken=True), tmp_path)
    assert outcome.status == "failed"
    assert read_result(folder.result_path(cell().id)).error.startswith("environment not ready: building")


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="needs an interpreter without torch")
def test_a_framework_that_does_not_import_is_recorded_by_the_bench(tmp_path):
    folder = RunFolder(tmp_path / "run")
    outcome = run_cell(cell(), folder, CurrentInterpreterBackend(), tmp_path)
    result = read_result(folder.result_path(cell().id))
    assert outcome.status == result.status == "failed"
    assert result.error == "ModuleNotFoundError: No module named 'torch'"
    assert result.env["python"] and result.env["bench_hash"] == bench_code_hash()


# Side by side on several GPUs: each cell on its own GPUs, CPU cells alone.

H100S = [Gpu(0, "GPU-aaaa", "NVIDIA H100 80GB HBM3", 80 << 30), Gpu(1, "GPU-bbbb", "NVIDIA H100 80GB HBM3", 80 << 30)]


def gpu_cell(task="cnn_cifar10", devices=1, steps=1, gpu="H100"):
    return Cell("pytorch", task, gpu, "auto", "auto", devices, "fp32", Settings(steps=steps, timeout_s=60.0))


def test_the_scheduler_gives_each_cell_its_own_gpus_and_a_cpu_cell_the_host():
    a, b = gpu_cell(steps=1), gpu_cell(steps=2)
    pair = gpu_cell("densenet121_xray", devices=2)
    on_cpu, last = cell(steps=4), gpu_cell(steps=5)
    waiting = [a, b, pair, on_cpu, last]
    scheduler = GpuSlots(H100S, at_once=2)

    def start():
        started = scheduler.start_now(waiting)
        for c, _ in started:
            waiting.remove(c)
        return [(c, [g.index for g in gpus]) for c, gpus in started]

    assert start() == [(a, [0]), (b, [1])]
    scheduler.finished(a)
    assert start() == []  # the 2-GPU cell waits for both; nothing passes the CPU cell
    scheduler.finished(b)
    assert start() == [(pair, [0, 1])]
    scheduler.finished(pair)
    assert start() == [(on_cpu, [])]
    assert start() == []  # the CPU cell runs alone
    scheduler.finished(on_cpu)
    assert start() == [(last, [0])]


def test_one_at_a_time_when_asked_or_without_gpus():
    assert ScriptBackend("", gpus=H100S).placement(serial=False).at_once == 2
    assert ScriptBackend("", gpus=H100S).placement(serial=True).at_once == 1
    assert ScriptBackend("").placement(serial=False).at_once == 1
    scheduler = GpuSlots(H100S, at_once=1)
    assert len(scheduler.start_now([gpu_cell(steps=1), gpu_cell(steps=2)])) == 1


# Each cell notes when it ran, on which GPUs, and how many cells the harness said run at once.
NOTE_AND_WRITE = WRITE_OK + """
    import os, time
    start = time.time(); time.sleep(1.5)
    with open(sys.argv[4], "w") as note:
        note.write(json.dumps([start, time.time(), os.environ["CUDA_VISIBLE_DEVICES"], sys.argv[3]]))
"""


class NotingBackend(ScriptBackend):
    def run(self, launch):
        self.runs += 1
        argv = [sys.executable, "-c", self.script, str(launch.result_path), launch.cell.id,
                str(json.loads(launch.request_path.read_text())["cells_at_once"]),
                str(launch.folder.root / f"{launch.cell.id}.ran")]  # the staging folder goes with the cell
        return run_process(argv, cell_environment(launch), launch.log_path, launch.timeout_s, launch.interrupted)


def notes(folder):
    return sorted(json.loads(path.read_text()) for path in folder.root.glob("*.ran"))


@pytest.mark.parametrize("serial", [False, True])
def test_gpu_cells_run_side_by_side_one_per_gpu_unless_serial(tmp_path, serial):
    folder = RunFolder(tmp_path / "run")
    cells = [gpu_cell(steps=1), gpu_cell(steps=2)]
    outcomes = run_cells(cells, folder, NotingBackend(NOTE_AND_WRITE, gpus=H100S), tmp_path, serial=serial)
    assert [o.status for o in outcomes] == ["ok", "ok"]
    (start_1, end_1, gpus_1, at_once_1), (start_2, end_2, gpus_2, at_once_2) = notes(folder)
    overlapped = start_2 < end_1
    assert overlapped is not serial
    assert {gpus_1, gpus_2} == ({"GPU-aaaa", "GPU-bbbb"} if not serial else {"GPU-aaaa"})
    assert at_once_1 == at_once_2 == ("1" if serial else "2")


def test_an_interrupted_run_stops_its_cells_and_records_none_of_them(tmp_path):
    folder = RunFolder(tmp_path / "run")
    cells = [gpu_cell(steps=1), gpu_cell(steps=2)]
    backend = ScriptBackend("import time; time.sleep(60)", gpus=H100S)
    # Python's own Ctrl-C handler, whatever this process inherited (a shell's background job
    # starts with SIGINT ignored).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupt = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT))
    interrupt.start()
    began = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_cells(cells, folder, backend, tmp_path)
    finally:
        interrupt.cancel()
        signal.signal(signal.SIGINT, inherited)
    assert time.monotonic() - began < 2 + base.TERMINATE_GRACE_S
    assert backend.runs == 2
    assert not folder.cells.exists() or not list(folder.cells.iterdir())
    assert not list(folder.staging.glob("*.json"))


def test_a_backend_error_fails_its_cell_and_the_matrix_goes_on(tmp_path):
    class FlakyEngine(ScriptBackend):
        def run(self, launch):
            if launch.cell.settings.steps == 1:
                raise ConnectionError("the engine closed the connection")
            return super().run(launch)

    folder = RunFolder(tmp_path / "run")
    outcomes = run_cells([gpu_cell(steps=1), gpu_cell(steps=2)], folder, FlakyEngine(WRITE_OK, gpus=H100S), tmp_path)
    assert [o.status for o in outcomes] == ["failed", "ok"]
    assert outcomes[0].error == ("the script backend could not run the cell: "
                                 "ConnectionError: the engine closed the connection")


class BuildingBackend(ScriptBackend):
    """Takes a while to prepare each environment the first time, counting builds at once."""

    prepare_at_once = 3

    def __init__(self):
        super().__init__(WRITE_OK)
        self.lock, self.building, self.most_at_once, self.built = threading.Lock(), 0, 0, []

    def prepare(self, cell, progress=quiet):
        if cell.framework in self.built:
            return
        with self.lock:
            self.building += 1
            self.most_at_once = max(self.most_at_once, self.building)
        progress(f"{cell.framework}: step 1/2")
        time.sleep(0.3)
        with self.lock:
            self.building -= 1
            self.built.append(cell.framework)


def test_environments_are_prepared_side_by_side_once_each_saying_what_they_do(tmp_path, capsys):
    cells = [Cell(framework, task, "cpu", "auto", "auto", 1, "fp32", Settings(steps=1))
             for task in ("cnn_cifar10", "gru_imdb") for framework in ("pytorch", "jax", "mxnet")]
    backend = BuildingBackend()
    outcomes = run_cells(cells, RunFolder(tmp_path / "run"), backend, tmp_path)
    assert [o.status for o in outcomes] == ["ok"] * 6 and backend.runs == 6
    assert sorted(backend.built) == ["jax", "mxnet", "pytorch"]
    assert backend.most_at_once == 3
    # The progress line names each environment's own step while it is prepared.
    assert "preparing jax: step 1/2; mxnet: step 1/2; pytorch: step 1/2" in capsys.readouterr().err


def test_a_results_folder_is_used_by_one_harness_at_a_time(tmp_path, capsys):
    from conftest import write_matrix
    from harness import run_matrix

    matrix = write_matrix(tmp_path / "m.yml", "matrix: {framework: [pytorch], task: [cnn_cifar10]}\n")
    folder = RunFolder(tmp_path / "run")
    with folder.lock():
        assert run_matrix.main([str(matrix), "--results", str(folder.root), "--backend", "current"]) == 2
    assert capsys.readouterr().err == (f"error: {folder.root}: another harness is using this results folder "
                                       f"(pid {os.getpid()} on {os.uname().nodename}); wait for it to end, "
                                       f"or pass another --results\n")
    assert not folder.cells.exists()  # nothing ran, nothing was written
    with folder.lock():  # let go of when the block ends
        pass
