"""Peak memory of a cell: the host's (resident set size of this process and of its largest
child: data-loader workers, data-parallel replicas) and the GPU's, from the framework's own
allocator where it keeps a peak, else from NVML, sampled while the cell runs.

Valid Python 3.6 and standard library only (pynvml is passed in where there is one), like the
rest of the bench outside frameworks/.
"""
import resource
import threading
from types import ModuleType
from typing import Dict, List, Optional

# How often the NVML samplers read the GPUs: their used memory while a cell runs, their state
# while a timed block runs (bench/gpu_state.py).
SAMPLE_INTERVAL_S = 0.05


def host_peak_rss() -> Dict[str, int]:
    """Peak resident set size in bytes, of this process and of its largest finished child
    (ru_maxrss is in kilobytes on Linux)."""
    return {
        "process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "largest_child": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }


class NvmlDevices:
    """The cell's GPUs through NVML for a with block: NVML initialised and a handle per entry of
    CUDA_VISIBLE_DEVICES (an index or a UUID; NVML itself ignores the variable). No handles
    where there is no nvml module, no driver or no such GPU: the samplers then read nothing."""

    def __init__(self, nvml: Optional[ModuleType], visible_devices: Optional[str]):
        self.nvml = nvml
        self.handles = []  # type: List[object]
        self._visible = [entry.strip() for entry in (visible_devices or "0").split(",") if entry.strip()]

    def __enter__(self) -> "NvmlDevices":
        if self.nvml is None:
            return self
        try:
            self.nvml.nvmlInit()
        except self.nvml.NVMLError:
            self.nvml = None
            return self
        try:
            self.handles = [self.nvml.nvmlDeviceGetHandleByIndex(int(entry)) if entry.isdigit()
                            else self.nvml.nvmlDeviceGetHandleByUUID(entry) for entry in self._visible]
        except self.nvml.NVMLError:
            self.handles = []
        return self

    def __exit__(self, *exc_info) -> None:
        if self.nvml is not None:
            self.nvml.nvmlShutdown()


class NvmlPeakSampler(NvmlDevices):
    """The most GPU memory in use on the cell's GPUs above what was in use when it started,
    read through NVML in a background thread. With one cell per GPU (the harness's rule) that
    is the cell's own use, context included, for frameworks whose allocator keeps no peak and
    for processes the cell starts (data-parallel replicas)."""

    def __init__(self, nvml: Optional[ModuleType], visible_devices: Optional[str],
                 interval_s: float = SAMPLE_INTERVAL_S):
        super().__init__(nvml, visible_devices)
        self.interval_s = interval_s
        self.baseline = []  # type: List[int]
        self.peak = None  # type: Optional[int]
        self._stop = threading.Event()
        self._thread = None  # type: Optional[threading.Thread]

    def __enter__(self) -> "NvmlPeakSampler":
        super().__enter__()
        if not self.handles:
            return self
        try:
            self.baseline = self._used()
        except self.nvml.NVMLError:
            self.handles = []
            return self
        self.peak = 0
        self._thread = threading.Thread(target=self._sample, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def _used(self) -> List[int]:
        return [int(self.nvml.nvmlDeviceGetMemoryInfo(handle).used) for handle in self.handles]

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._record()

    def _record(self) -> None:
        try:
            above = max(used - base for used, base in zip(self._used(), self.baseline))
        except self.nvml.NVMLError:
            return
        self.peak = max(self.peak or 0, above)

    def __exit__(self, *exc_info) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._record()  # the last state, should the cell have been shorter than an interval
        super().__exit__(*exc_info)
