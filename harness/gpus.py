"""The host's GPUs, through NVML (nvidia-ml-py). No NVML or no driver means no GPUs."""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    memory_total_bytes: int
    compute_capability: str | None = None  # "9.0"; None where NVML does not say
    # The CPU cores nearest the GPU (its NUMA node), as NVML gives them; empty where it does not say.
    near_cpus: tuple[int, ...] = ()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


@contextmanager
def _nvml_session(nvml: ModuleType | None) -> Iterator[ModuleType | None]:
    """NVML initialised for the block (``nvml`` defaults to pynvml; tests pass a stand-in),
    or None where there is no NVML or no driver."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            yield None
            return
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        yield None
        return
    try:
        yield nvml
    finally:
        nvml.nvmlShutdown()


def detect_gpus(nvml: ModuleType | None = None) -> list[Gpu]:
    """Every GPU NVML sees."""
    with _nvml_session(nvml) as nvml:
        if nvml is None:
            return []
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            gpus.append(Gpu(index=index, uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                            name=_text(nvml.nvmlDeviceGetName(handle)),
                            memory_total_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                            compute_capability=_compute_capability(nvml, handle),
                            near_cpus=_near_cpus(nvml, handle)))
        return gpus


@dataclass(frozen=True)
class Driver:
    version: str  # "535.104.05"
    cuda: str | None  # the newest CUDA it supports, "12.2"; None where NVML does not say


def detect_driver(nvml: ModuleType | None = None) -> Driver | None:
    """The host's NVIDIA driver, or None without one."""
    with _nvml_session(nvml) as nvml:
        if nvml is None:
            return None
        try:
            number = int(nvml.nvmlSystemGetCudaDriverVersion())  # 12020 for CUDA 12.2
            cuda = f"{number // 1000}.{number % 1000 // 10}"
        except nvml.NVMLError:
            cuda = None
        return Driver(_text(nvml.nvmlSystemGetDriverVersion()), cuda)


def _compute_capability(nvml: ModuleType, handle: object) -> str | None:
    try:
        return "{}.{}".format(*nvml.nvmlDeviceGetCudaComputeCapability(handle))
    except nvml.NVMLError:  # drivers before CUDA 11's NVML
        return None


def _near_cpus(nvml: ModuleType, handle: object) -> tuple[int, ...]:
    """The cores of NVML's ideal CPU affinity for the GPU: a bit mask in 64-bit words."""
    words = ((os.cpu_count() or 1) + 63) // 64
    try:
        mask = nvml.nvmlDeviceGetCpuAffinity(handle, words)
    except nvml.NVMLError:  # not supported on this platform or driver
        return ()
    return tuple(word_index * 64 + bit for word_index, word in enumerate(mask)
                 for bit in range(64) if int(word) >> bit & 1)


def _words(name: str) -> list[str]:
    return [word for word in re.split(r"[^a-z0-9]+", name.lower()) if word and word != "nvidia"]


def names_model(requested: str, model: str) -> bool:
    """True when a model name from matrix.yml ("H100", "a100-80gb", "Tesla V100") names a GPU
    model ("NVIDIA H100 80GB HBM3", a cluster's GRES type "h100"): its words appear in order in
    the model's name, ignoring case and the vendor."""
    wanted, have = _words(requested), iter(_words(model))
    return bool(wanted) and all(word in have for word in wanted)  # `in` advances the iterator
