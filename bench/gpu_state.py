"""What the cell's GPUs did while its timed blocks ran: SM and memory clocks, temperature, power
draw and the reasons the driver gave for holding the clocks down, read through NVML while each
block runs; and the energy the GPUs used in the blocks, from their energy counters at each
block's start and end, so that the pauses between blocks (the statistics) are not counted.

Valid Python 3.6 and standard library only (pynvml is passed in where there is one), like the
rest of the bench outside frameworks/.
"""
import statistics
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterable, List, Optional, Tuple

from .memory import SAMPLE_INTERVAL_S, NvmlDevices
from .result import GpuState, Metrics

# The clock-event ("throttle") reasons NVML reports, by the names results give them, with the
# pynvml constant of each bit (read with getattr: an older module may lack some).
CLOCK_EVENT_REASONS = (
    ("gpu_idle", "nvmlClocksThrottleReasonGpuIdle"),
    ("applications_clocks_setting", "nvmlClocksThrottleReasonApplicationsClocksSetting"),
    ("sw_power_cap", "nvmlClocksThrottleReasonSwPowerCap"),
    ("hw_slowdown", "nvmlClocksThrottleReasonHwSlowdown"),
    ("sync_boost", "nvmlClocksThrottleReasonSyncBoost"),
    ("sw_thermal_slowdown", "nvmlClocksThrottleReasonSwThermalSlowdown"),
    ("hw_thermal_slowdown", "nvmlClocksThrottleReasonHwThermalSlowdown"),
    ("hw_power_brake_slowdown", "nvmlClocksThrottleReasonHwPowerBrakeSlowdown"),
    ("display_clock_setting", "nvmlClocksThrottleReasonDisplayClockSetting"),
)
# The reasons that slow a busy GPU below the clocks it is set to (power, heat, the board's own
# slowdown signals): a result that saw one was throttled. The others say the GPU idled or runs
# at clocks chosen for it.
SLOWDOWNS = ("sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown")
# Newer drivers' name for the bitmask first, then the name older drivers and modules know.
REASON_QUERIES = ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons")


@dataclass
class Reading:
    """One GPU at one moment; None where it does not report a figure."""

    sm_clock_mhz: Optional[int]
    memory_clock_mhz: Optional[int]
    temperature_c: Optional[int]
    power_mw: Optional[int]
    reasons: Optional[int]  # the clock-event bitmask


class GpuStateSampler(NvmlDevices):
    """The monitor of the timed blocks on a GPU: bench/protocol.py calls ``block_started()``
    before each block and ``block_ended(examples)`` after it. While a block runs a background
    thread reads every visible GPU each ``interval_s`` (and once more at the block's end); the
    energy counters are read at both ends. ``record(metrics)`` puts the figures in a result."""

    def __init__(self, nvml: Optional[ModuleType], visible_devices: Optional[str],
                 interval_s: float = SAMPLE_INTERVAL_S):
        super().__init__(nvml, visible_devices)
        self.interval_s = interval_s
        self.readings = []  # type: List[Reading]
        self.examples = 0  # of the blocks ended
        self.energy_mj = 0  # type: Optional[int]  # None once a block's energy could not be read
        self.max_sm_clock_mhz = None  # type: Optional[int]
        self.power_limit_w = None  # type: Optional[float]
        self._reasons = None  # type: Optional[Callable]
        self._bits = []  # type: List[Tuple[str, int]]
        self._energy_at_start = None  # type: Optional[List[int]]
        self._stop = threading.Event()
        self._thread = None  # type: Optional[threading.Thread]

    def __enter__(self) -> "GpuStateSampler":
        super().__enter__()
        if not self.handles:
            return self
        nvml = self.nvml
        self.max_sm_clock_mhz = _lowest(self._ask(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_SM)
                                        for handle in self.handles)
        limit_mw = _lowest(self._ask(nvml.nvmlDeviceGetEnforcedPowerLimit, handle) for handle in self.handles)
        self.power_limit_w = None if limit_mw is None else limit_mw / 1000
        # The first query the module has and the driver answers.
        self._reasons = next((query for query in (getattr(nvml, name, None) for name in REASON_QUERIES)
                              if query is not None and self._ask(query, self.handles[0]) is not None), None)
        self._bits = [(name, getattr(nvml, constant)) for name, constant in CLOCK_EVENT_REASONS
                      if hasattr(nvml, constant)]
        return self

    def block_started(self) -> None:
        if not self.handles:
            return
        self._energy_at_start = self._energy()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="gpu-state-sampler", daemon=True)
        self._thread.start()

    def block_ended(self, examples: int) -> None:
        if self._thread is None:
            return
        self._stop_thread()
        self._read()  # the state at the end, should the block have been shorter than an interval
        at_end = self._energy()
        if self._energy_at_start is None or at_end is None:
            self.energy_mj = None  # the energy of every block, or none: it is per example
        else:
            self.energy_mj += sum(end - start for start, end in zip(self._energy_at_start, at_end))
        self.examples += examples

    def __exit__(self, *exc_info) -> None:
        self._stop_thread()  # a block a failure ended
        super().__exit__(*exc_info)

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._read()

    def _read(self) -> None:
        nvml = self.nvml
        for handle in self.handles:
            self.readings.append(Reading(
                sm_clock_mhz=self._ask(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM),
                memory_clock_mhz=self._ask(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_MEM),
                temperature_c=self._ask(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
                power_mw=self._ask(nvml.nvmlDeviceGetPowerUsage, handle),
                reasons=self._ask(self._reasons, handle) if self._reasons else None))

    def _energy(self) -> Optional[List[int]]:
        """Each GPU's energy counter (mJ since the driver loaded), or None where one is not read."""
        query = getattr(self.nvml, "nvmlDeviceGetTotalEnergyConsumption", None)  # Volta on
        if query is None or self.energy_mj is None:
            return None
        counters = [self._ask(query, handle) for handle in self.handles]
        return None if None in counters else counters

    def _ask(self, query: Callable, *args: object) -> Optional[int]:
        try:
            return int(query(*args))
        except self.nvml.NVMLError:  # not supported by this GPU or driver
            return None

    def state(self) -> Optional[GpuState]:
        """The figures of the readings; None where none were taken (no GPU, no block)."""
        if not self.readings:
            return None
        sm_clocks = _spread(self._values("sm_clock_mhz"))
        temperatures = _spread(self._values("temperature_c"))
        power = _spread([mw / 1000 for mw in self._values("power_mw")])
        masks = self._values("reasons")
        reasons = None
        if masks:
            fractions = ((name, sum(1 for mask in masks if mask & bit) / len(masks)) for name, bit in self._bits)
            reasons = {name: fraction for name, fraction in fractions if fraction}
        return GpuState(
            samples=len(self.readings),
            sm_clock_mhz_min=sm_clocks[0], sm_clock_mhz_median=sm_clocks[1], sm_clock_mhz_max=sm_clocks[2],
            max_sm_clock_mhz=self.max_sm_clock_mhz,
            memory_clock_mhz_median=_spread(self._values("memory_clock_mhz"))[1],
            temperature_c_min=temperatures[0], temperature_c_median=temperatures[1],
            temperature_c_max=temperatures[2],
            power_w_median=power[1], power_w_max=power[2], power_limit_w=self.power_limit_w,
            energy_j=self.energy_mj / 1000 if self.energy_mj is not None else None,
            throttle_reasons=reasons)

    def _values(self, name: str) -> List[int]:
        return [getattr(reading, name) for reading in self.readings if getattr(reading, name) is not None]

    def record(self, metrics: Metrics) -> None:
        """Puts the timed blocks' figures into ``metrics``: the GPUs' state and, where their
        energy was read, the energy per example and examples per joule (examples/s per watt)."""
        metrics.gpu_state = self.state()
        energy_j = metrics.gpu_state.energy_j if metrics.gpu_state else None
        if energy_j and self.examples:  # a counter that did not move gives no figure
            metrics.energy_j_per_example = energy_j / self.examples
            metrics.examples_per_joule = self.examples / energy_j


def _lowest(values: Iterable[Optional[int]]) -> Optional[int]:
    known = [value for value in values if value is not None]
    return min(known) if known else None


def _spread(values: List[float]) -> Tuple[Optional[float], Optional[float], Optional[float]]:
    """Min, median and max; None each without values."""
    if not values:
        return None, None, None
    return min(values), statistics.median(values), max(values)
