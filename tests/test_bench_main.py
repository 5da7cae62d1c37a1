"""The bench's entry point, run in the harness's Python (no framework installed there): a cell
whose framework cannot start is still recorded, once, by MPI rank 0 only."""
from __future__ import annotations

import json
import os
import time
import types

import numpy as np
import pytest

from bench import __main__ as bench_main
from bench import environment, precision
from bench.environment import mpi_rank
from conftest import StandInNvml
from harness.results import read_result


@pytest.mark.parametrize("environ, rank", [
    ({}, 0),
    ({"OMPI_COMM_WORLD_RANK": "1"}, 1),
    ({"PMI_RANK": "3"}, 3),
    ({"PMIX_RANK": "0", "PMI_RANK": "2"}, 0),
    ({"OMPI_COMM_WORLD_RANK": ""}, 0),
])
def test_the_mpi_rank_comes_from_the_launchers_variables(environ, rank):
    assert mpi_rank(environ) == rank


def arguments(out):
    return ["--framework", "cntk", "--task", "cnn_cifar10", "--steps", "1",
            "--repeats", "1", "--warmup-steps", "1", "--out", str(out)]


def test_rank_zero_records_a_cell_whose_framework_cannot_start(tmp_path, monkeypatch):
    monkeypatch.delenv("OMPI_COMM_WORLD_RANK", raising=False)
    out = tmp_path / "cell.json"
    assert bench_main.main(arguments(out)) == 1
    result = json.loads(out.read_text())
    assert result["status"] == "failed" and "cntk" in result["error"]


def test_other_mpi_ranks_write_no_result(tmp_path, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    out = tmp_path / "cell.json"
    assert bench_main.main(arguments(out)) == 1
    assert not out.exists()


def test_xla_flags_come_before_the_bare_thread_count_xla_stops_reading_at(monkeypatch):
    for name in environment.THREAD_VARIABLES:
        monkeypatch.setenv(name, "0")  # restored after the test, as XLA_FLAGS is
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    environment.limit_threads(2)
    environment.expose_cpu_devices(2)
    assert os.environ["XLA_FLAGS"] == ("--xla_dump_to=/tmp/x --xla_cpu_multi_thread_eigen=false "
                                       "--xla_force_host_platform_device_count=2 intra_op_parallelism_threads=2")


class FakeGru:
    """A numpy stand-in for a framework's GRU model: building takes 50 ms, the first step 100 ms
    (as if compiling), every later step 1 ms."""

    layout = "NTC"

    def __init__(self, spec, run):
        time.sleep(0.05)
        self.steps = 0

    def parameter_count(self) -> int:
        return 3_818_302

    def train_step(self, ids, labels) -> None:
        time.sleep(0.1 if self.steps == 0 else 0.001)
        self.steps += 1

    def loss(self) -> float:
        return 0.69

    def predict(self, ids):
        return np.zeros((len(ids), 2), np.float32)


def fake_framework() -> types.SimpleNamespace:
    def gemm(size, run):
        a = np.ones((size, size), np.float32)
        return lambda: float((a @ a)[0, 0])

    modes = precision.math_modes("fp32", None, None, None, None, xla=False, compiler=None)
    return types.SimpleNamespace(configure=lambda run: None, device_memory_peak=lambda run: None,
                                 describe=lambda run: {"framework_version": "0", "threads": 2, "cuda": None,
                                                       "cudnn": None, "math_modes": modes},
                                 TASKS={"gru_imdb": FakeGru}, gemm=gemm)


def test_the_time_to_the_first_step_is_measured_apart_from_the_timed_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_main.frameworks, "load", lambda name: fake_framework())
    out = tmp_path / "cell.json"
    assert bench_main.main(["--framework", "pytorch", "--task", "gru_imdb", "--min-block-s", "0.02",
                            "--max-repeats", "6", "--out", str(out)]) == 0
    result = read_result(out)  # valid against the schema
    metrics, timing = result.metrics, result.settings.timing
    assert metrics.build_s >= 0.05 and metrics.first_step_s >= 0.1
    assert metrics.time_to_first_step_s == pytest.approx(metrics.import_s + metrics.build_s + metrics.first_step_s)
    assert max(metrics.step_time_s.values) < 0.05  # the first step is in no block
    assert timing.steps_calibrated and result.settings.steps >= 10  # 1 ms steps fill 20 ms blocks
    assert 5 <= result.settings.repeats <= 6 and timing.stopped_by in ("target", "max_repeats")


def test_full_mode_takes_the_first_step_on_a_model_of_its_own_and_gives_the_first_epochs(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_main.frameworks, "load", lambda name: fake_framework())
    out = tmp_path / "cell.json"
    assert bench_main.main(["--framework", "pytorch", "--task", "gru_imdb", "--mode", "full", "--repeats", "2",
                            "--epochs", "2", "--out", str(out)]) == 0
    metrics = read_result(out).metrics
    assert metrics.first_step_s >= 0.1
    # Each run's model is fresh: its first step (100 ms here) is in its first epoch, which says so.
    assert len(metrics.first_epoch_s.values) == 2 and min(metrics.first_epoch_s.values) >= 0.1
    assert len(metrics.epoch_time_s.values) == 4


def test_the_ceiling_cell_times_the_frameworks_matrix_multiply(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_main.frameworks, "load", lambda name: fake_framework())
    out = tmp_path / "cell.json"
    assert bench_main.main(["--framework", "pytorch", "--task", "gemm_ceiling", "--image-size", "256",
                            "--out", str(out)]) == 0
    result = read_result(out)
    assert result.cell.input_shape == [256, 256] and result.settings.timing is None
    assert sorted(result.metrics.gemm_tflops_per_s, key=int) == ["128", "192", "256"]
    assert result.metrics.tflops_per_s == pytest.approx(max(result.metrics.gemm_tflops_per_s.values()))


class BusyNvml(StandInNvml):
    """GPUs whose energy counters advance by half a joule between any two reads."""

    def _counter(self, handle):
        self.energy_mj[handle] += 500
        return self.energy_mj[handle]


@pytest.mark.parametrize("mode", ["throughput", "full"])
def test_a_gpu_cell_records_its_gpus_state_and_energy_over_its_timed_blocks(tmp_path, monkeypatch, mode):
    monkeypatch.setattr(bench_main.environment, "import_nvml", BusyNvml)
    monkeypatch.setattr(bench_main.environment, "gpu_info", lambda nvml, visible: {"name": "Stand-in GPU"})
    monkeypatch.setattr(bench_main.frameworks, "load", lambda name: fake_framework())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")  # restored after the test: the cell sets it
    monkeypatch.delenv("DLBENCH_GPU_STAND_IN", raising=False)
    out = tmp_path / "cell.json"
    assert bench_main.main(["--framework", "pytorch", "--task", "gru_imdb", "--device", "gpu", "--mode", mode,
                            "--steps", "2", "--repeats", "2", "--max-repeats", "2", "--epochs", "1",
                            "--out", str(out)]) == 0
    result = read_result(out)  # valid against the schema
    state = result.metrics.gpu_state
    assert state.samples >= 2 * 2 and state.power_limit_w == 700 and state.throttle_reasons == {}
    # Two blocks (or runs of one epoch), each 0.5 J on each of the two GPUs.
    examples = 2 * 2 * 64 if mode == "throughput" else 2 * (result.settings.train_examples // 64) * 64
    assert state.energy_j == 2.0 and result.metrics.examples_per_joule == pytest.approx(examples / 2.0)
