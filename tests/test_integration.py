"""The frameworks for real, through harness/run_matrix.py and the local backend (their
environments are built from images/<framework>/ on first use and cached)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import numpy as np

from bench import weights as canonical
from bench.specs import TASKS
from conftest import REPO, write_chestxray14, write_imdb_npz, write_matrix
from harness.parity import LOCAL_FRAMEWORKS
from harness.results import load_results, read_result

pytestmark = pytest.mark.integration

QUICK = "  warmup_steps: 1\n  steps: 2\n  repeats: 2\n  max_repeats: 2\n"


def run_matrix(matrix: Path, results: Path, *extra: str, env=None, timeout=1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "harness" / "run_matrix.py"), str(matrix),
                           "--results", str(results), "--backend", "local", "--no-ceiling", *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


def matrix_text(settings: str) -> str:
    return f"matrix:\n  framework: [pytorch, tensorflow]\n  task: [cnn_cifar10]\n  gpu: [cpu]\nsettings:\n{settings}"


def by_framework(results_dir: Path, **cell_fields) -> dict:
    loaded = load_results(results_dir / "cells")
    assert not loaded.problems
    return {r.cell.framework: r for _, r in loaded.results if r.cell.task != "gemm_ceiling"
            and all(getattr(r.cell, k) == v for k, v in cell_fields.items())}


def test_real_data_that_is_missing_fails_the_cell_with_a_clear_message(tmp_path):
    settings = f"  data: real\n  data_dir: {tmp_path / 'empty'}\n" + QUICK
    matrix = write_matrix(tmp_path / "m.yml", matrix_text(settings).replace("pytorch, tensorflow", "pytorch"))
    env = {**os.environ, "DLBENCH_MIRROR": (tmp_path / "no-mirror").as_uri()}
    done = run_matrix(matrix, tmp_path / "results", env=env)
    assert done.returncode == 1
    (result,) = by_framework(tmp_path / "results").values()
    assert result.status == "failed"
    assert result.error.startswith("DataUnavailable: cifar-10-batches-py is not in ")
    assert "--data synthetic" in result.error
    assert "failed" in done.stdout and "DataUnavailable" in done.stderr


# Every framework that runs in a local environment (CNTK needs its own image).
ALL = LOCAL_FRAMEWORKS
# Their data-parallel CPU cells spend one to two minutes each building and compiling DenseNet-121
# for two devices (MirroredStrategy, XLA): CI runs their real-data input pipelines on one device,
# and `-m slow` runs the two-device cells.
GRAPH_BUILDING = ("tensorflow", "keras-tensorflow", "keras-jax", "jax")
TINY = ("  warmup_steps: 1\n  steps: 1\n  repeats: 1\n  max_repeats: 1\n  image_size: 32\n  batch_size: 4\n")


def every_task_matrix(settings: str, tasks=tuple(TASKS), devices=(1, 2)) -> str:
    exclude = "".join(f"    - {{framework: {f}, task: densenet121_xray}}\n" for f in GRAPH_BUILDING)
    return (f"matrix:\n  framework: [{', '.join(ALL)}]\n  task: [{', '.join(tasks)}]\n  gpu: [cpu]\n"
            f"  devices: [{', '.join(map(str, devices))}]\n  exclude:\n{exclude}settings:\n{settings}")


@pytest.mark.timeout(3000)
def test_every_framework_runs_every_task(tmp_path):
    """Synthetic data, throughput mode, tiny sizes, one device (the real-data test below runs
    the data-parallel task on two); ResNet-50 with one shared weights file, so every framework
    must compute the same features. DenseNet-121 of the graph-building frameworks trains in the
    real-data test only: a minute of graph building each, for the same model."""
    weights_file = tmp_path / "resnet50.npz"
    np.savez(weights_file, **canonical.random_weights(canonical.resnet50_shapes(), seed=0))
    matrix = write_matrix(tmp_path / "m.yml", every_task_matrix(TINY + f"  weights: {weights_file}\n", devices=(1,)))
    done = run_matrix(matrix, tmp_path / "results", timeout=2400)
    assert done.returncode == 0, done.stderr
    loaded = load_results(tmp_path / "results" / "cells")
    assert not loaded.problems
    results = {(r.cell.framework, r.cell.task, r.cell.devices): r for _, r in loaded.results}
    assert set(results) == {(f, task, 1) for f in ALL for task in TASKS
                            if not (f in GRAPH_BUILDING and task == "densenet121_xray")}
    for (framework, task, devices), result in results.items():
        where = f"{framework} {task}"
        assert result.status == "ok", f"{where}: {result.error}"
        assert result.env["framework"] == framework and result.env["framework_version"], where
        assert result.env["launcher"] == "local" and result.env["bench_hash"] and result.env["gpu"] is None, where
        assert result.env["cells_at_once"] == 1, where  # no GPUs: one cell at a time
        assert result.env["math_modes"]["compute_dtype"] == "float32" and result.cell.precision == "fp32", where
        step = result.metrics.step_time_s
        assert step.min <= step.median <= step.max, where
        assert result.metrics.throughput_per_s == pytest.approx(4 / step.median), where
        spec = TASKS[task]
        # The same network everywhere, to the parameter (CNTK, which alone may footnote a
        # difference, runs in its own image only).
        assert result.model.parameters == spec.expected_parameters and result.model.note is None, where
        assert result.cell.input_shape == list(spec.input_shape_at(32) if spec.resizable else spec.input_shape), where
        if spec.kind == "classify":
            assert abs(result.metrics.loss_first - math.log(spec.num_classes)) < 0.5, where
    # The same weights and the same seeded images give the same features in every framework.
    features = {f: results[(f, "resnet50_inference", 1)] for f in ALL}
    reference = features["pytorch"].metrics
    for framework, result in features.items():
        assert result.model.weights == features["pytorch"].model.weights, framework
        assert result.metrics.output_mean == pytest.approx(reference.output_mean, rel=1e-3), framework
        assert result.metrics.output_std == pytest.approx(reference.output_std, rel=1e-3), framework

    tables = (tmp_path / "results" / "tables" / "README.md").read_text()
    for task in TASKS:
        assert f"### {task}" in tables
    assert "Seconds per 1,000 images" in tables
    assert "inputs 3×32×32" in tables and "inputs 150" in tables




# The frameworks with bfloat16 mixed precision on CPUs: their real-data cells train and score
# in bf16 (the fp32 code paths run in the test above), the others in fp32.
BF16_ON_CPU = ("pytorch", "tensorflow", "keras-tensorflow", "keras-jax", "keras-torch", "jax")


def precision_of(framework: str) -> str:
    return "bf16" if framework in BF16_ON_CPU else "fp32"


def real_data_matrix(tmp_path, frameworks, devices_of, without_densenet=()) -> Path:
    """Full mode, one epoch, on small files in the official formats: Keras's imdb.npz, and a
    ChestX-ray14 folder read by each framework's own input pipeline (real CIFAR-10 batches:
    the parity test). ``devices_of(framework)``: DenseNet-121's devices; ``without_densenet``:
    frameworks that train the GRU only."""
    data_dir = tmp_path / "data"
    write_imdb_npz(data_dir / "imdb.npz")
    write_chestxray14(data_dir / "chestxray14", train=16, test=8, size=40)
    exclude = "".join(f"    - {{framework: {f}, task: densenet121_xray, devices: {3 - devices_of(f)}}}\n"
                      f"    - {{framework: {f}, precision: {'fp32' if precision_of(f) == 'bf16' else 'bf16'}}}\n"
                      for f in frameworks)
    exclude += "".join(f"    - {{framework: {f}, task: densenet121_xray}}\n" for f in without_densenet)
    return write_matrix(tmp_path / "m.yml", (
        f"matrix:\n  framework: [{', '.join(frameworks)}]\n  task: [gru_imdb, densenet121_xray]\n"
        f"  gpu: [cpu]\n  devices: [1, 2]\n  precision: [fp32, bf16]\n  exclude:\n{exclude}"
        f"settings:\n  mode: full\n  data: real\n  data_dir: {data_dir}\n  epochs: 1\n  repeats: 1\n"
        f"  image_size: 32\n  batch_size: 4\n  loader_workers: 2\n"))


def check_real_data_results(tmp_path, frameworks, devices_of, without_densenet=()) -> None:
    loaded = load_results(tmp_path / "results" / "cells")
    results = {(r.cell.framework, r.cell.task): r for _, r in loaded.results}
    assert set(results) == {(f, t) for f in frameworks for t in ("gru_imdb", "densenet121_xray")
                            if not (f in without_densenet and t == "densenet121_xray")}
    for (framework, task), result in results.items():
        if result.status == "skipped":  # Keras on PyTorch has no data-parallel mechanism, and says so
            assert (framework, task) == ("keras-torch", "densenet121_xray"), result.error
            assert "no data-parallel mechanism" in result.error
            continue
        assert result.status == "ok", f"{framework} {task}: {result.error}"
        assert result.cell.data == "real" and result.cell.mode == "full"
        assert result.cell.precision == precision_of(framework)
        assert result.env["math_modes"]["compute_dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[precision_of(framework)]
        assert math.isfinite(result.metrics.loss_last)
        if task == "densenet121_xray":
            assert result.cell.devices == devices_of(framework) and result.settings.train_examples == 16
            assert result.settings.loader_workers == 2  # the matrix's, in every framework's pipeline
            assert 0.0 <= result.metrics.test_roc_auc.median <= 1.0
        else:
            assert result.settings.loader_workers is None  # arrays in memory: no loader
            assert 0.0 <= result.metrics.test_accuracy.median <= 1.0


@pytest.mark.timeout(3000)
def test_every_framework_trains_on_real_data_formats(tmp_path):
    """Every framework's own input pipeline on real formats; DenseNet-121 data-parallel on 2 CPU
    devices where that takes seconds (the others: test_graph_building_frameworks_train_data_parallel).
    XLA takes minutes to build DenseNet-121 on a CPU, twice per cell (the first step's model and
    the run's): JAX's and Keras-on-JAX's DenseNet-121 trains in that slow test only."""
    def devices_of(framework):
        return 1 if framework in GRAPH_BUILDING else 2

    xla = ("jax", "keras-jax")
    done = run_matrix(real_data_matrix(tmp_path, ALL, devices_of, xla), tmp_path / "results", timeout=2400)
    assert done.returncode == 0, done.stderr
    check_real_data_results(tmp_path, ALL, devices_of, xla)
    tables = (tmp_path / "results" / "tables" / "README.md").read_text()
    assert "ROC-AUC" in tables and "real data" in tables and "split in 2 devices" in tables


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_graph_building_frameworks_train_data_parallel_on_real_data(tmp_path):
    frameworks = list(GRAPH_BUILDING)
    done = run_matrix(real_data_matrix(tmp_path, frameworks, lambda f: 2), tmp_path / "results", timeout=2400)
    assert done.returncode == 0, done.stderr
    check_real_data_results(tmp_path, frameworks, lambda f: 2)
    # tf.distribute cannot run Keras's step under XLA: Keras on TensorFlow trains DenseNet-121
    # without it at every device count, so that one and two devices compare.
    for _, result in load_results(tmp_path / "results" / "cells").results:
        if result.cell.task == "densenet121_xray" and result.cell.framework.startswith("keras"):
            assert result.env["math_modes"]["xla"] is (result.cell.framework == "keras-jax")


def _bench_processes(cell_marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and cell_marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_run_resumes_without_redoing_finished_cells(tmp_path, sig):
    matrix = write_matrix(tmp_path / "m.yml", matrix_text(QUICK + "  seed: 7\n"))
    results = tmp_path / "results"
    harness = subprocess.Popen([sys.executable, str(REPO / "harness" / "run_matrix.py"), str(matrix),
                                "--results", str(results), "--backend", "local", "--no-ceiling"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cells = results / "cells"
    deadline = time.monotonic() + 600
    while not (cells.is_dir() and list(cells.glob("*.json"))):
        assert harness.poll() is None and time.monotonic() < deadline, "no cell finished"
        time.sleep(0.2)
    harness.send_signal(sig)  # the second cell is running now
    harness.wait(timeout=60)
    (finished,) = cells.glob("*.json")
    before = finished.read_bytes()
    assert read_result(finished).status == "ok"
    # The running cell was stopped with the harness; no half-written result is in place.
    deadline = time.monotonic() + 30
    while _bench_processes(str(results)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _bench_processes(str(results))
    assert [p.name for p in cells.iterdir()] == [finished.name]

    again = run_matrix(matrix, results)
    assert again.returncode == 0, again.stderr
    assert "2 ok (1 kept from an earlier run)" in again.stderr
    assert finished.read_bytes() == before
    assert sorted(r.status for _, r in load_results(cells).results) == ["ok", "ok"]
    assert json.loads(before)["cell"]["id"] in again.stderr
