"""Shared fixtures: data sets in the official on-disk formats, small matrices, a results
folder, a history of run folders, and the framework environments the integration tests run in."""
from __future__ import annotations

import importlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import types
import zipfile
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from harness.cifar_format import write_batches

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("DLBENCH_CACHE", Path.home() / ".cache" / "dlbench"))
# The Docker tests' base image, made without a registry (scripts/make-base-image.sh).
BASE_IMAGE = "dlbench/debian:bookworm"


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


def write_imdb_npz(path: Path, train: int = 64, test: int = 32, seed: int = 0) -> Path:
    """Keras's imdb.npz: object arrays of word-index lists (indices from 1, frequent words
    small, lengths varying around the padding length) and 0/1 labels. Reviews of label 1 use
    other words than those of label 0, so a model can learn them."""
    rng = np.random.default_rng(seed)

    def split(n: int):
        labels = rng.integers(0, 2, size=n)
        reviews = np.empty(n, dtype=object)
        for i, label in enumerate(labels):
            length = int(rng.integers(20, 200))
            words = rng.integers(1, 500, size=length) * 2 + int(label)  # odd or even words
            words[rng.random(length) < 0.05] = 40000  # rare words, beyond a 30,000 vocabulary
            reviews[i] = [int(w) for w in words]
        return reviews, labels.astype(np.int64)

    (x_train, y_train), (x_test, y_test) = split(train), split(test)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in (("x_train", x_train), ("y_train", y_train), ("x_test", x_test), ("y_test", y_test)):
            archive.writestr(f"{name}.npy", _npy_bytes(array))
    return path


def _npy_bytes(array: np.ndarray) -> bytes:
    """One .npy member as this numpy's np.save writes it (object arrays pickled by numpy 2
    name numpy._core, which the numpy 1 environments must read as well)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """An 8-bit PNG, grayscale (H, W) or RGBA (H, W, 4), written with the standard library."""
    color_type = {2: 0, 3: 6}[pixels.ndim]
    height, width = pixels.shape[:2]
    rows = b"".join(b"\0" + row.tobytes() for row in pixels.astype(np.uint8))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def write_chestxray14(folder: Path, train: int = 16, test: int = 8, size: int = 40, seed: int = 0) -> Path:
    """A ChestX-ray14 folder: images/*.png (grayscale, one RGBA as in the real set),
    Data_Entry_2017.csv and the official split lists. Images with a finding are brighter in
    their upper half, so the labels are learnable."""
    from bench.specs import CHESTXRAY14_LABELS

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    entries, names = [], {"train_val_list.txt": [], "test_list.txt": []}
    for index in range(train + test):
        name = f"{index:08d}_000.png"
        findings = [label for label in CHESTXRAY14_LABELS if rng.random() < 0.3]
        pixels = rng.integers(0, 120, size=(size, size))
        if findings:
            pixels[: size // 2] += 120
        if index == 1:
            pixels = np.dstack([pixels, pixels, pixels, np.full_like(pixels, 255)])
        write_png(folder / "images" / name, pixels)
        entries.append(f"{name},{'|'.join(findings) or 'No Finding'},0,{index},60,M,PA,{size},{size},0.14,0.14,")
        names["train_val_list.txt" if index < train else "test_list.txt"].append(name)
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
    (folder / "Data_Entry_2017.csv").write_text("\n".join([header] + entries) + "\n")
    for split, listed in names.items():
        (folder / split).write_text("\n".join(listed) + "\n")
    return folder


def framework_python(framework: str) -> Path:
    """The python of the framework's CPU environment, built on first use (cached afterwards)."""
    from harness.backends.local import VirtualenvBackend

    backend = VirtualenvBackend()
    backend.prepare_environment(framework, "cpu")
    return backend.environment_path(framework, "cpu") / "bin" / "python"


def write_matrix(path: Path, text: str) -> Path:
    path.write_text(text.lstrip("\n"), encoding="utf-8")
    return path


# A GPU's state over the timed blocks of one result (bench/gpu_state.py), for result_payload.
GPU_STATE = dict(samples=40, sm_clock_mhz_min=1980, sm_clock_mhz_median=1980, sm_clock_mhz_max=1980,
                 max_sm_clock_mhz=1980, memory_clock_mhz_median=3201, temperature_c_min=41, temperature_c_median=48,
                 temperature_c_max=52, power_w_median=412.5, power_w_max=455.0, power_limit_w=700.0, energy_j=250.0,
                 throttle_reasons={})


def result_payload(framework: str = "pytorch", status: str = "ok", error: str | None = None,
                   device: str = "cpu", step_times=(0.30, 0.31, 0.29), parameters: int = 3_441_592,
                   mode: str = "throughput", cpu_model: str = "Test CPU", cuda: str | None = None,
                   cudnn: str | None = None, gpu_name: str | None = None, finished: str = "2026-11-25T10:00:00+00:00",
                   cell_id: str | None = None, precision: str = "fp32", gpu_state: dict | None = None,
                   examples_per_joule: float | None = None) -> dict:
    """A schema-valid result as the bench writes it (the harness's view of a cell); ``gpu_state``
    (GpuState's fields, as GPU_STATE) and ``examples_per_joule`` for a GPU cell's timed blocks."""
    from bench.precision import math_modes
    from bench.result import GpuState, Metrics, Model, Result, ResultCell, ResultSettings, Summary

    cell = ResultCell(id=cell_id or f"cnn_cifar10.{framework}.{device}", framework=framework, task="cnn_cifar10",
                device=device, gpu=gpu_name if device == "gpu" else None,
                cuda="auto" if device == "gpu" else None, threads=None, precision=precision, batch_size=64,
                devices=1, input_shape=[3, 32, 32], mode=mode, data="synthetic")
    result = Result(cell=cell, status=status, error=error)
    result.env = {"hostname": "host", "os": "Linux", "cpu_model": cpu_model, "cpu_cores": 2,
                  "started_utc": "2026-11-25T09:59:00+00:00", "finished_utc": finished, "launcher": "local"}
    if status == "ok":
        result.settings = ResultSettings(warmup_steps=5, steps=20, repeats=len(step_times), epochs=10, seed=0)
        summary = Summary.of(list(step_times))
        if mode == "throughput":
            result.metrics = Metrics(step_time_s=summary, throughput_per_s=64 / summary.median,
                                     loss_first=2.30, loss_last=2.25)
        else:
            result.metrics = Metrics(train_time_s=summary, epoch_time_s=summary, throughput_per_s=1000.0,
                                     test_accuracy=Summary.of([0.77]), loss_last=0.6)
        result.metrics.gpu_state = GpuState(**gpu_state) if gpu_state else None
        if examples_per_joule:
            result.metrics.examples_per_joule, result.metrics.energy_j_per_example = (examples_per_joule,
                                                                                      1 / examples_per_joule)
        result.model = Model(parameters=parameters, expected_parameters=3_441_592, layout="NHWC")
        result.env.update({"python": "3.11.7", "numpy": "2.4.6", "framework": framework,
                           "framework_version": "1.0", "threads": 2, "cuda": cuda, "cudnn": cudnn,
                           "bench_commit": None, "bench_hash": "0" * 64,
                           "gpu": {"name": gpu_name} if gpu_name else None,
                           "math_modes": math_modes(precision, tf32_matmul=None, tf32_convolutions=None,
                                                    loss_scaling="dynamic" if precision == "fp16" else None,
                                                    autotuner=None, xla=False, compiler=None)})
    return result.to_dict()


class StandInNvml:
    """pynvml for two GPUs (handles 0 and 1) whose state the test sets: SM clock, temperature,
    power draw (mW), the clock-event bitmask, and each GPU's energy counter (mJ), which ``spend``
    advances. ``energy``: "counter", "unsupported" (a GPU before Volta) or "missing" (a module
    without the call); ``event_reasons``: the module has the bitmask's newer call, which this
    driver does not answer. The reasons' bits are the instance's own: a test can delete one."""

    class NVMLError(Exception):
        pass

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0
    REASON_BITS = {"nvmlClocksThrottleReasonGpuIdle": 0x1, "nvmlClocksThrottleReasonApplicationsClocksSetting": 0x2,
                   "nvmlClocksThrottleReasonSwPowerCap": 0x4, "nvmlClocksThrottleReasonHwSlowdown": 0x8,
                   "nvmlClocksThrottleReasonSyncBoost": 0x10, "nvmlClocksThrottleReasonSwThermalSlowdown": 0x20,
                   "nvmlClocksThrottleReasonHwThermalSlowdown": 0x40,
                   "nvmlClocksThrottleReasonHwPowerBrakeSlowdown": 0x80,
                   "nvmlClocksThrottleReasonDisplayClockSetting": 0x100}

    def __init__(self, energy: str = "counter", event_reasons: bool = False):
        vars(self).update(self.REASON_BITS)
        self.sm_clock, self.temperature, self.power_mw, self.reasons = 1980, 60, 400_000, 0
        self.energy_mj = [1_000_000, 2_000_000]
        self.shutdowns = 0
        if energy != "missing":
            self.nvmlDeviceGetTotalEnergyConsumption = self._counter if energy == "counter" else self._unanswered
        if event_reasons:
            self.nvmlDeviceGetCurrentClocksEventReasons = self._unanswered

    def spend(self, mj_each: int) -> None:
        self.energy_mj = [counter + mj_each for counter in self.energy_mj]

    def _counter(self, handle):
        return self.energy_mj[handle]

    def _unanswered(self, handle):
        raise self.NVMLError("function not found")

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return self.sm_clock if clock == self.NVML_CLOCK_SM else 3201

    def nvmlDeviceGetMaxClockInfo(self, handle, clock):
        return 1980

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return self.temperature

    def nvmlDeviceGetPowerUsage(self, handle):
        return self.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=2**30)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle):
        return self.reasons


SLOWER = (1,) * 5 + (1.10,) * 5  # a history's PyTorch times, run by run: 10% slower from the sixth on


def write_run_history(root: Path, factors=SLOWER, step_at: int = 5, seed: int = 0) -> Path:
    """A run folder a day for each factor (run-00/cells/, run-01/cells/...), each holding PyTorch's
    and JAX's CNN on an H100, their times varying by 1%; from run ``step_at`` on with CUDA 13.0 and
    framework 2.0, and PyTorch's time times each run's factor. Run 02 holds PyTorch twice (a repeat)."""
    rng = np.random.default_rng(seed)
    for run, factor in enumerate(factors):
        cells = root / f"run-{run:02d}" / "cells"
        cells.mkdir(parents=True)
        stepped = run >= step_at
        for framework, times, copies in (("pytorch", factor, 2 if run == 2 else 1), ("jax", 1, 1)):
            for copy in range(copies):
                median = 0.010 * times * (1 + rng.normal(0, 0.01))
                payload = result_payload(framework, device="gpu", gpu_name="NVIDIA H100 80GB HBM3",
                                         cuda="13.0" if stepped else "12.8", cudnn="9",
                                         step_times=(median * 0.99, median, median * 1.01),
                                         finished=f"2026-11-{run + 1:02d}T10:00:00+00:00",
                                         cell_id=f"cnn_cifar10.{framework}.{copy}")
                payload["env"]["framework_version"] = "2.0" if stepped else "1.0"
                (cells / f"cnn_cifar10.{framework}.{copy}.json").write_text(json.dumps(payload))
    return root


@pytest.fixture
def cntk_module(monkeypatch):
    """CNTK installs only in its own image: its module with the cntk package stubbed out."""
    monkeypatch.setitem(sys.modules, "cntk", mock.MagicMock())
    monkeypatch.delitem(sys.modules, "bench.frameworks.cntk", raising=False)
    yield importlib.import_module("bench.frameworks.cntk")
    sys.modules.pop("bench.frameworks.cntk", None)


@pytest.fixture
def make_result():
    return result_payload


# A Docker engine and what an offline image build needs, shared by every test that builds the
# PyTorch image (the docker backend's, and the slurm backend's docker runtime): the same
# options make the same image tag, so it is built once.

@pytest.fixture(scope="session")
def engine():
    import docker
    from harness.backends import engine_answers
    if not engine_answers():
        message = ("no Docker engine answers at DOCKER_HOST; start one with "
                   "`eval \"$(scripts/docker-engine.sh start)\"`")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    subprocess.run(["bash", str(REPO / "scripts" / "make-base-image.sh"), BASE_IMAGE], check=True)
    return docker.from_env()


@pytest.fixture(scope="session")
def base_image(engine) -> str:
    """The CPU images' base, pinned by digest: the base made here, pushed to the private registry
    beside the engine (DLBENCH_REGISTRY; scripts/docker-engine.sh starts both), as an
    air-gapped site's mirror holds its pinned bases. Without a registry, the base by its tag."""
    registry = os.environ.get("DLBENCH_REGISTRY")
    if not registry:
        if os.environ.get("CI") == "true":
            pytest.fail("no registry beside the engine (DLBENCH_REGISTRY); start both with "
                        "`eval \"$(scripts/docker-engine.sh start)\"`")
        return BASE_IMAGE
    repository = f"{registry}/{BASE_IMAGE.split(':')[0]}"
    image = engine.images.get(BASE_IMAGE)
    image.tag(repository, "bookworm")
    for line in engine.images.push(repository, "bookworm", stream=True, decode=True):
        assert "error" not in line, line["error"]
    digests = [d for d in engine.images.get(f"{repository}:bookworm").attrs["RepoDigests"] if d.startswith(repository)]
    return f"{repository}:bookworm@{digests[0].split('@')[1]}"


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """Every wheel the PyTorch image installs, by its lock, fetched by the host's pip (its index,
    or a local copy) and checked against the lock's hashes: the builds then run with no network."""
    folder = CACHE / "wheelhouse"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                    "--only-binary=:all:", "--require-hashes", "--dest", str(folder),
                    "-r", str(REPO / "images" / "pytorch" / "requirements-cpu.lock")], check=True)
    return folder


@pytest.fixture(scope="session")
def certificate(tmp_path_factory) -> Path:
    """A self-signed CA certificate, as a TLS-intercepting proxy would bring."""
    folder = tmp_path_factory.mktemp("ca")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=dlbench test proxy CA", "-keyout", str(folder / "proxy.key"),
                    "-out", str(folder / "proxy.crt")], check=True, capture_output=True)
    return folder / "proxy.crt"


def docker_options(base_image: str, wheelhouse: Path, certificate: Path) -> list[str]:
    return ["--base-image", base_image, "--wheelhouse", str(wheelhouse), "--offline", "--ca-cert", str(certificate)]
