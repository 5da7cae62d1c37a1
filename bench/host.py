"""Facts about the machine a cell ran on. Standard library only: the harness records the
same facts in the results it writes itself (skipped, crashed and timed-out cells)."""
import datetime
import os
import platform
import socket
from typing import Optional


# Set to "cpu" by tests of the harness's GPU paths on hosts without a GPU: GPU cells then
# compute on the CPU, in the CPU environment, and their results say so; everything around
# the bench (placement, GPU requests, CUDA_VISIBLE_DEVICES, collection) is the real path.
GPU_STAND_IN = "DLBENCH_GPU_STAND_IN"


def compute_device(device: str) -> str:
    """Where a cell of ``device`` computes: the device itself, or the CPU standing in for a GPU."""
    return "cpu" if device == "gpu" and os.environ.get(GPU_STAND_IN) == "cpu" else device


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    """Cores this process may run on (affinity and container limits included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_governor() -> Optional[str]:
    """The first CPU's frequency governor ("performance", "powersave", ...), None where the
    kernel exposes none (most VMs and containers)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor", encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def host_facts() -> dict:
    return {"hostname": socket.gethostname(), "os": platform.platform(),
            "cpu_model": cpu_model(), "cpu_cores": cpu_cores(), "cpu_governor": cpu_governor()}
