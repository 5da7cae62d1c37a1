"""Peak memory: the host's from the kernel, the GPU's from NVML sampled while a cell runs
(exercised with a stand-in for pynvml whose used memory rises and falls)."""
from __future__ import annotations

import time
import types

from bench.memory import NvmlPeakSampler, host_peak_rss


class RisingNvml(types.SimpleNamespace):
    """Two GPUs; the second's used memory steps through ``used`` (bytes), one value per read."""

    class NVMLError(Exception):
        pass

    def __init__(self, used, fail_init=False):
        super().__init__(used=list(used), fail_init=fail_init, shutdowns=0, asked=[])

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("driver not loaded")

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.asked.append(uuid)
        return uuid

    def nvmlDeviceGetHandleByIndex(self, index):
        self.asked.append(index)
        return index

    def nvmlDeviceGetMemoryInfo(self, handle):
        if handle in ("GPU-b", 1) and len(self.used) > 1:
            return types.SimpleNamespace(used=self.used.pop(0))
        return types.SimpleNamespace(used=self.used[0] if handle in ("GPU-b", 1) else 500)


def test_the_peak_is_the_most_used_above_the_start_on_the_busiest_gpu():
    nvml = RisingNvml([1_000, 3_000, 9_000, 4_000, 2_000])
    with NvmlPeakSampler(nvml, "GPU-a,GPU-b", interval_s=0.01) as sampler:
        time.sleep(0.2)
    assert sampler.peak == 8_000 and nvml.asked == ["GPU-a", "GPU-b"] and nvml.shutdowns == 1


def test_a_cell_shorter_than_one_interval_is_still_read_once_at_the_end():
    nvml = RisingNvml([1_000, 5_000])
    with NvmlPeakSampler(nvml, "0,1", interval_s=60) as sampler:
        pass
    assert sampler.peak == 4_000


def test_without_nvml_or_a_driver_there_is_no_figure():
    with NvmlPeakSampler(None, "0") as sampler:
        pass
    assert sampler.peak is None
    broken = RisingNvml([0], fail_init=True)
    with NvmlPeakSampler(broken, "0") as sampler:
        pass
    assert sampler.peak is None and broken.shutdowns == 0


def test_host_peak_rss_is_this_processes_and_its_largest_childs():
    peaks = host_peak_rss()
    assert peaks["process"] > 10 * 2**20 and peaks["largest_child"] >= 0
