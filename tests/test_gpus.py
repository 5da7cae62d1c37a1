"""GPU discovery and selection through NVML, exercised with a stand-in for pynvml."""
from __future__ import annotations

import dataclasses
import types

import pytest

from bench.environment import gpu_info
from harness.backends.local import VirtualenvBackend
from harness.gpus import Driver, Gpu, detect_driver, detect_gpus, names_model
from harness.matrix import Cell, Settings


class FakeNvml(types.SimpleNamespace):
    """The few pynvml calls we use, over a list of (name, uuid, memory)."""

    class NVMLError(Exception):
        pass

    def __init__(self, devices, fail_init=False):
        super().__init__(devices=devices, fail_init=fail_init, shutdowns=0)

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("driver not loaded")

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        return self.devices[index]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return next(d for d in self.devices if d[1] == uuid)

    def nvmlDeviceGetName(self, handle):
        return handle[0].encode()  # older bindings return bytes

    def nvmlDeviceGetUUID(self, handle):
        return handle[1]

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(total=handle[2])

    def nvmlSystemGetDriverVersion(self):
        return "580.65.06"

    def nvmlSystemGetCudaDriverVersion(self):
        return 13000

    NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return {1: 1980, 2: 2619}[clock]

    def nvmlDeviceGetMaxClockInfo(self, handle, clock):
        return {1: 1980, 2: 2619}[clock]

    def nvmlDeviceGetPowerManagementLimit(self, handle):
        return 700_000

    def nvmlDeviceGetEccMode(self, handle):
        if handle[1] == "GPU-2":
            raise self.NVMLError("not supported")
        return (1, 1)

    def nvmlDeviceGetPersistenceMode(self, handle):
        return 1

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return (9, 0)

    def nvmlDeviceGetCpuAffinity(self, handle, words):
        if handle[1] == "GPU-2":
            raise self.NVMLError("not supported")
        return [0b1111_0000_0011] + [0] * (words - 1)  # cores 0, 1 and 8-11


DEVICES = [("NVIDIA H100 80GB HBM3", "GPU-1", 80 << 30), ("NVIDIA A100-SXM4-40GB", "GPU-2", 40 << 30)]


def test_detect_gpus_lists_every_device():
    nvml = FakeNvml(DEVICES)
    gpus = detect_gpus(nvml)
    assert gpus == [Gpu(0, "GPU-1", "NVIDIA H100 80GB HBM3", 80 << 30, "9.0", near_cpus=(0, 1, 8, 9, 10, 11)),
                    Gpu(1, "GPU-2", "NVIDIA A100-SXM4-40GB", 40 << 30, "9.0")]
    assert nvml.shutdowns == 1


def test_no_driver_means_no_gpus():
    assert detect_gpus(FakeNvml(DEVICES, fail_init=True)) == []
    assert detect_driver(FakeNvml(DEVICES, fail_init=True)) is None


def test_the_driver_says_its_version_and_the_newest_cuda_it_runs():
    nvml = FakeNvml(DEVICES)
    assert detect_driver(nvml) == Driver("580.65.06", "13.0") and nvml.shutdowns == 1


@pytest.mark.parametrize("requested, expected", [
    ("H100", True), ("h100", True), ("NVIDIA H100", True), ("H100 80GB", True), ("a100-40gb", False),
    ("A100", False), ("H10", False), ("", False),
])
def test_model_names_match_words_of_the_gpu_name(requested, expected):
    assert names_model(requested, "NVIDIA H100 80GB HBM3") is expected


def test_model_names_may_skip_words():
    assert names_model("A100 40GB", "NVIDIA A100-SXM4-40GB")


def test_cell_gpu_info_follows_cuda_visible_devices():
    nvml = FakeNvml(DEVICES)
    assert gpu_info(nvml, "1")["name"] == "NVIDIA A100-SXM4-40GB"
    assert gpu_info(nvml, "GPU-1,GPU-2") == {
        "name": "NVIDIA H100 80GB HBM3", "driver": "580.65.06", "memory_total_bytes": 80 << 30, "uuid": "GPU-1",
        "sm_clock_mhz": 1980, "sm_clock_max_mhz": 1980, "memory_clock_mhz": 2619, "memory_clock_max_mhz": 2619,
        "power_limit_w": 700.0, "ecc": True, "persistence_mode": True, "compute_capability": "9.0"}
    assert gpu_info(nvml, "1")["ecc"] is None  # a query the GPU does not support
    assert gpu_info(None, "0") is None
    assert gpu_info(FakeNvml(DEVICES, fail_init=True), "0") is None


def _cell(gpu, cuda="auto"):
    return Cell("pytorch", "cnn_cifar10", gpu, cuda, "auto", 1, "fp32", Settings())


def local_backend(gpus):
    backend = VirtualenvBackend()
    backend.gpus = gpus  # what NVML would have found
    return backend


def test_cells_this_host_cannot_run_are_skipped_with_the_reason():
    local = local_backend(detect_gpus(FakeNvml(DEVICES)))
    assert local.skip_reason(_cell("H100")) is None
    assert local.skip_reason(_cell("V100")) == (
        "this host has no V100 GPU (it has NVIDIA A100-SXM4-40GB, NVIDIA H100 80GB HBM3)")
    assert "no V100 GPU (it has no GPU)" in local_backend([]).skip_reason(_cell("V100"))
    assert "cannot pick CUDA 12.4" in local.skip_reason(_cell("H100", "12.4"))
    assert "a CPU cell has no CUDA version" in local.skip_reason(_cell("cpu", "11.8"))
    assert local.skip_reason(dataclasses.replace(_cell("H100"), devices=2)) == (
        "the cell asks for 2 H100 GPUs and this host has 1")


def test_gpu_auto_expands_to_the_models_of_the_inventory():
    assert local_backend(detect_gpus(FakeNvml(DEVICES))).inventory().names() == [
        "NVIDIA A100-SXM4-40GB", "NVIDIA H100 80GB HBM3"]
    assert local_backend([]).inventory().names() == ["cpu"]


def test_a_gpu_older_than_ampere_is_skipped_for_tf32_and_bf16_before_anything_runs():
    v100 = Gpu(0, "GPU-v", "Tesla V100-SXM2-16GB", 16 << 30, "7.0")
    local = local_backend([v100])
    bf16 = dataclasses.replace(_cell("V100"), precision="bf16")
    assert local.skip_reason(bf16) == ("bf16 needs the tensor cores of compute capability 8.0 (Ampere) or newer; "
                                       "this GPU's is 7.0")
    assert local.skip_reason(dataclasses.replace(_cell("V100"), precision="fp16")) is None
    unknown = local_backend([dataclasses.replace(v100, compute_capability=None)])
    assert unknown.skip_reason(bf16) is None  # the bench checks on the GPU itself


def test_a_driver_without_compute_capability_leaves_it_unknown():
    class OldNvml(FakeNvml):
        def nvmlDeviceGetCudaComputeCapability(self, handle):
            raise self.NVMLError("function not found")

    assert [gpu.compute_capability for gpu in detect_gpus(OldNvml(DEVICES))] == [None, None]
