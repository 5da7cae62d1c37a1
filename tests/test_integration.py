"""PyTorch and TensorFlow for real, through harness/run_matrix.py and the local backend
(their environments are built from images/<framework>/ on first use and cached)."""
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

from bench.specs import CNN_CIFAR10
from conftest import REPO, write_matrix
from harness.results import load_results, read_result

pytestmark = pytest.mark.integration

FRAMEWORKS = ("pytorch", "tensorflow")
QUICK = "  warmup_steps: 1\n  steps: 2\n  repeats: 2\n"


def run_matrix(matrix: Path, results: Path, *extra: str, env=None, timeout=1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "harness" / "run_matrix.py"), str(matrix),
                           "--results", str(results), "--backend", "local", *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


def matrix_text(settings: str) -> str:
    return f"matrix:\n  framework: [pytorch, tensorflow]\n  task: [cnn_cifar10]\n  gpu: [cpu]\nsettings:\n{settings}"


def by_framework(results_dir: Path, **cell_fields) -> dict:
    loaded = load_results(results_dir / "cells")
    assert not loaded.problems
    return {r.cell.framework: r for _, r in loaded.results
            if all(getattr(r.cell, k) == v for k, v in cell_fields.items())}


def test_both_frameworks_train_the_seed_cnn_on_synthetic_and_real_data(tmp_path, cifar10_dir):
    results = tmp_path / "results"
    synthetic = run_matrix(write_matrix(tmp_path / "synthetic.yml", matrix_text(QUICK)), results)
    assert synthetic.returncode == 0, synthetic.stderr
    real_settings = f"  mode: full\n  data: real\n  data_dir: {cifar10_dir}\n  epochs: 2\n  repeats: 1\n"
    real = run_matrix(write_matrix(tmp_path / "real.yml", matrix_text(real_settings)), results)
    assert real.returncode == 0, real.stderr

    for data in ("synthetic", "real"):
        cells = by_framework(results, data=data)
        assert sorted(cells) == list(FRAMEWORKS)
        for framework, result in cells.items():
            assert result.status == "ok", result.error
            assert result.model.parameters == CNN_CIFAR10.expected_parameters == 3_441_592
            assert result.model.layout == "NHWC"  # each framework's fastest CPU layout
            assert result.env["framework"] == framework and result.env["framework_version"]
            assert result.env["backend"] == "local" and result.env["bench_hash"]
            assert result.env["cpu_model"] and result.env["cpu_cores"] >= 1 and result.env["gpu"] is None
    for result in by_framework(results, data="synthetic").values():
        step = result.metrics.step_time_s
        assert len(step.values) == 2 and step.min <= step.median <= step.max
        assert result.metrics.throughput_per_s == pytest.approx(64 / step.median)
        assert abs(result.metrics.loss_first - math.log(10)) < 0.5  # a fresh 10-class model guesses
    for result in by_framework(results, data="real").values():
        assert result.cell.mode == "full" and len(result.metrics.epoch_time_s.values) == 2
        assert 0.0 <= result.metrics.test_accuracy.median <= 1.0

    tables = (results / "tables" / "README.md").read_text()
    assert "(throughput mode)" in tables and "(full mode)" in tables and "real data" in tables
    for framework in FRAMEWORKS:
        assert f"| {framework}" in tables
    assert "### cnn_cifar10" in real.stdout  # printed at the end of the run


def test_real_data_that_is_missing_fails_the_cell_with_a_clear_message(tmp_path):
    settings = f"  data: real\n  data_dir: {tmp_path / 'empty'}\n" + QUICK
    matrix = write_matrix(tmp_path / "m.yml", matrix_text(settings).replace("pytorch, tensorflow", "pytorch"))
    env = {**os.environ, "DLBENCH_MIRROR": (tmp_path / "no-mirror").as_uri()}
    done = run_matrix(matrix, tmp_path / "results", env=env)
    assert done.returncode == 1
    (result,) = by_framework(tmp_path / "results").values()
    assert result.status == "failed"
    assert result.error.startswith("DataUnavailable: cifar-10-batches-py is not in ")
    assert "--synthetic" in result.error
    assert "failed" in done.stdout and "DataUnavailable" in done.stderr


def test_every_framework_trains_the_seed_cnn(tmp_path):
    frameworks = ", ".join(CNN_CIFAR10.frameworks)
    text = matrix_text(QUICK).replace("[pytorch, tensorflow]", f"[{frameworks}]")
    done = run_matrix(write_matrix(tmp_path / "m.yml", text), tmp_path / "results")
    assert done.returncode == 0, done.stderr
    cells = by_framework(tmp_path / "results")
    assert sorted(cells) == sorted(CNN_CIFAR10.frameworks)
    for framework, result in cells.items():
        assert result.status == "ok", f"{framework}: {result.error}"
        assert result.model.parameters == 3_441_592, framework
        assert abs(result.metrics.loss_first - math.log(10)) < 0.5, framework
        assert result.env["framework_version"], framework
    tables = (tmp_path / "results" / "tables" / "README.md").read_text()
    assert all(f"| {framework}" in tables for framework in CNN_CIFAR10.frameworks)


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
                                "--results", str(results), "--backend", "local"],
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
