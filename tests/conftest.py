"""Shared fixtures: data sets in the official on-disk formats, small matrices, a results
folder, and the framework environments the integration tests run in."""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from harness.cifar_format import write_batches

REPO = Path(__file__).resolve().parents[1]


def write_cifar10_batches(folder: Path, per_batch: int = 100, seed: int = 0) -> Path:
    """A cifar-10-batches-py folder in the official format: Python pickles (protocol 2) of
    dicts with byte-string keys, ``data`` uint8 (N, 3072) channel-major, ``labels`` a list."""
    rng = np.random.default_rng(seed)

    def batch():
        labels = rng.integers(0, 10, size=per_batch)
        # Images whose mean brightness depends on the label: a model can learn them.
        base = (labels[:, None] * 20 + 30).astype(np.int16)
        return np.clip(base + rng.integers(-30, 30, size=(per_batch, 3072)), 0, 255).astype(np.uint8), labels

    return write_batches(folder, [batch() for _ in range(5)], batch())


def write_cifar10_archive(path: Path, per_batch: int = 20) -> Path:
    """cifar-10-python.tar.gz with the official folder inside."""
    source = write_cifar10_batches(path.parent / "source" / "cifar-10-batches-py", per_batch)
    with tarfile.open(path, "w:gz") as archive:
        archive.add(source, arcname="cifar-10-batches-py")
    return path


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    """A data dir holding cifar-10-batches-py: 500 training and 100 test images."""
    write_cifar10_batches(tmp_path / "data" / "cifar-10-batches-py")
    return tmp_path / "data"


def write_matrix(path: Path, text: str) -> Path:
    path.write_text(text.lstrip("\n"), encoding="utf-8")
    return path


def result_payload(framework: str = "pytorch", status: str = "ok", error: str | None = None,
                   device: str = "cpu", step_times=(0.30, 0.31, 0.29), parameters: int = 3_441_592,
                   mode: str = "throughput", cpu_model: str = "Test CPU", cuda: str | None = None,
                   cudnn: str | None = None, gpu_name: str | None = None, finished: str = "2026-11-25T10:00:00+00:00",
                   cell_id: str | None = None) -> dict:
    """A schema-valid result as the bench writes it (the harness's view of a cell)."""
    from bench.result import Cell, Metrics, Model, Result, Settings, Summary

    cell = Cell(id=cell_id or f"cnn_cifar10.{framework}.{device}", framework=framework, task="cnn_cifar10",
                device=device, gpu=gpu_name if device == "gpu" else None,
                cuda="auto" if device == "gpu" else None, threads=None, precision="fp32", batch_size=64, mode=mode,
                data="synthetic")
    result = Result(cell=cell, status=status, error=error)
    result.env = {"hostname": "host", "os": "Linux", "cpu_model": cpu_model, "cpu_cores": 2,
                  "started_utc": "2026-11-25T09:59:00+00:00", "finished_utc": finished, "backend": "local"}
    if status == "ok":
        result.settings = Settings(warmup_steps=5, steps=20, repeats=len(step_times), epochs=10, seed=0)
        summary = Summary.of(list(step_times))
        if mode == "throughput":
            result.metrics = Metrics(step_time_s=summary, throughput_per_s=64 / summary.median,
                                     loss_first=2.30, loss_last=2.25)
        else:
            result.metrics = Metrics(train_time_s=summary, epoch_time_s=summary, throughput_per_s=1000.0,
                                     test_accuracy=Summary.of([0.77]), loss_last=0.6)
        result.model = Model(parameters=parameters, expected_parameters=3_441_592, layout="NHWC")
        result.env.update({"python": "3.11.7", "numpy": "2.4.6", "framework": framework,
                           "framework_version": "1.0", "threads": 2, "cuda": cuda, "cudnn": cudnn,
                           "bench_commit": None, "bench_hash": "0" * 64,
                           "gpu": {"name": gpu_name} if gpu_name else None})
    return result.to_dict()


@pytest.fixture
def make_result():
    return result_payload
