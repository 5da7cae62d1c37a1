"""Everything about where a cell ran, collected in one place inside the cell's process."""
import ctypes
import json
import os
import platform
import subprocess
import sys
from types import ModuleType
from typing import Any, Dict, List, Optional, Union

import numpy as np

from .host import host_facts
from .result import BENCH_DIR, bench_code_hash


# What the thread pools under the frameworks (OpenMP, MKL, OpenBLAS, Eigen/XLA) read at start-up.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def limit_threads(threads: int) -> None:
    """Size every thread pool a framework may start; call before importing it."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    _add_xla_flags("--xla_cpu_multi_thread_eigen=false",
                   "intra_op_parallelism_threads={}".format(threads))


def expose_cpu_devices(devices: int) -> None:
    """Let XLA (JAX, Keras on JAX) split the host CPU into ``devices`` devices for a
    data-parallel CPU cell; call before importing the framework. Frameworks without such a
    flag make their CPU devices in ``configure``."""
    _add_xla_flags("--xla_force_host_platform_device_count={}".format(devices))


def _add_xla_flags(*flags: str) -> None:
    tokens = (os.environ.get("XLA_FLAGS") or "").split() + list(flags)
    # XLA reads no --flag after a bare token (intra_op_parallelism_threads=N): flags go first.
    ordered = [t for t in tokens if t.startswith("--")] + [t for t in tokens if not t.startswith("--")]
    os.environ["XLA_FLAGS"] = " ".join(ordered)


# The variables an MPI launcher sets to each process's rank: Open MPI, then PMIx and MPICH/Hydra.
MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")


# ... and to the number of processes it started.
MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def mpi_workers(environ: Optional[Dict[str, str]] = None) -> int:
    """How many processes the MPI launcher that started this one started in all; 1 without one."""
    environ = os.environ if environ is None else environ
    for name in MPI_SIZE_VARIABLES:
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return 1


def mpi_rank(environ: Optional[Dict[str, str]] = None) -> int:
    """This process's rank when an MPI launcher started it (CNTK's data-parallel cells run one
    process per device under mpiexec), 0 otherwise. Rank 0 alone writes the cell's result."""
    environ = os.environ if environ is None else environ
    for name in MPI_RANK_VARIABLES:
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return 0


def bench_commit() -> Optional[str]:
    """The git commit of the bench code, with "-dirty" when bench/ has uncommitted changes:
    baked into images as DLBENCH_GIT_COMMIT, else asked of git."""
    if os.environ.get("DLBENCH_GIT_COMMIT"):
        return os.environ["DLBENCH_GIT_COMMIT"]
    try:
        head = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "") if head else None


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(BENCH_DIR)] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=10,
                          check=True).stdout.strip()


def gpu_info(nvml: Optional[ModuleType], visible_devices: Optional[str]) -> Optional[Dict[str, Any]]:
    """Name, driver, memory and UUID of the cell's GPU through NVML (nvidia-ml-py), or None
    when NVML is missing or finds no GPU. ``nvml`` is the pynvml module, passed in so the
    logic can be exercised without a GPU. NVML ignores CUDA_VISIBLE_DEVICES, so the cell's
    GPU is looked up by the first entry of that list (an index or a UUID)."""
    if nvml is None:
        return None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return None
    try:
        first = (visible_devices or "0").split(",")[0].strip()
        if first.isdigit():
            handle = nvml.nvmlDeviceGetHandleByIndex(int(first))
        else:
            handle = nvml.nvmlDeviceGetHandleByUUID(first)
        facts = {
            "name": _text(nvml.nvmlDeviceGetName(handle)),
            "driver": _text(nvml.nvmlSystemGetDriverVersion()),
            "memory_total_bytes": int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
            "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
        }
    except nvml.NVMLError:
        return None
    try:
        facts.update(_gpu_settings(nvml, handle))
        return facts
    finally:
        nvml.nvmlShutdown()


def _gpu_settings(nvml: ModuleType, handle: object) -> Dict[str, Any]:
    """What the GPU was set to when the cell ran: clocks (MHz, now and at most), power limit,
    ECC and persistence mode, compute capability. A query the GPU does not support is None."""
    def ask(query, *args):
        try:
            return query(handle, *args)
        except nvml.NVMLError:
            return None

    limit = ask(nvml.nvmlDeviceGetPowerManagementLimit)  # milliwatts
    ecc = ask(nvml.nvmlDeviceGetEccMode)  # (current, pending)
    capability = ask(nvml.nvmlDeviceGetCudaComputeCapability)  # (major, minor)
    persistence = ask(nvml.nvmlDeviceGetPersistenceMode)
    return {
        "sm_clock_mhz": ask(nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM),
        "sm_clock_max_mhz": ask(nvml.nvmlDeviceGetMaxClockInfo, nvml.NVML_CLOCK_SM),
        "memory_clock_mhz": ask(nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_MEM),
        "memory_clock_max_mhz": ask(nvml.nvmlDeviceGetMaxClockInfo, nvml.NVML_CLOCK_MEM),
        "power_limit_w": None if limit is None else limit / 1000,
        "ecc": None if ecc is None else bool(ecc[0]),
        "persistence_mode": None if persistence is None else bool(persistence),
        "compute_capability": None if capability is None else "{}.{}".format(*capability),
    }


def installed_packages() -> Optional[List[str]]:
    """Every distribution in the environment, as "name==version", sorted: what a local
    environment froze (an image is named by its id as well). None before Python 3.8."""
    try:
        from importlib import metadata
    except ImportError:  # CNTK's Python 3.6: its image id pins the packages
        return None
    found = {"{}=={}".format(dist.metadata["Name"], dist.version) for dist in metadata.distributions()
             if dist.metadata["Name"]}
    return sorted(found, key=str.lower)


def image_facts(described: Optional[str]) -> Optional[Dict[str, Any]]:
    """The image this cell runs in, as the docker backend describes it in DLBENCH_IMAGE (JSON:
    tag, id, base, base_digest; an image cannot know its own id); None outside a container."""
    return json.loads(described) if described else None


def _text(value: Union[str, bytes]) -> str:
    return value.decode() if isinstance(value, bytes) else value


def import_nvml() -> Optional[ModuleType]:
    try:
        import pynvml  # nvidia-ml-py: installed in GPU environments only
    except ImportError:
        return None
    return pynvml


# The libraries whose versions the process reports once they are loaded, and how each says it.
_LOADED_LIBRARIES = (("cudart", "libcudart.so", "cudaRuntimeGetVersion"), ("cudnn", "libcudnn.so", "cudnnGetVersion"))


def loaded_cuda_libraries(maps: str = "/proc/self/maps") -> Optional[Dict[str, Dict[str, str]]]:
    """The CUDA runtime and cuDNN this process has actually loaded (what a framework's wheel,
    the base image or the host brought, which its build-time numbers need not match): each
    library's file and the version it reports; None when it has loaded neither."""
    try:
        with open(maps) as mapped:
            paths = {line.split(None, 5)[5].strip() for line in mapped if len(line.split(None, 5)) == 6}
    except OSError:  # not Linux
        return None
    found = {}  # type: Dict[str, Dict[str, str]]
    for name, prefix, call in _LOADED_LIBRARIES:
        path = next((p for p in sorted(paths) if os.path.basename(p).startswith(prefix)), None)
        if path is None:
            continue
        try:
            library = ctypes.CDLL(path)  # already loaded: the same handle, nothing new runs
            if name == "cudart":
                number = ctypes.c_int()
                code = library.cudaRuntimeGetVersion(ctypes.byref(number))
                version = None if code else "{}.{}".format(number.value // 1000, number.value % 1000 // 10)
            else:
                library.cudnnGetVersion.restype = ctypes.c_size_t
                version = _cudnn_version_text(library.cudnnGetVersion())
        except (OSError, AttributeError):
            version = None
        found[name] = {"path": path, "version": version}
    return found or None


def _cudnn_version_text(number: int) -> str:
    # cuDNN 9 numbers its versions major*10000 + minor*100 + patch; cuDNN 8 and older major*1000 + ...
    major, rest = divmod(number, 10000 if number >= 90000 else 1000)
    return "{}.{}.{}".format(major, rest // 100, rest % 100)


def collect(device: str, framework_facts: Dict[str, Any]) -> Dict[str, Any]:
    """The ``env`` block of a result (timestamps and backend are added by the caller)."""
    return {
        **host_facts(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        **framework_facts,
        "bench_commit": bench_commit(),
        "bench_hash": bench_code_hash(),
        "image": image_facts(os.environ.get("DLBENCH_IMAGE")),
        "gpu": gpu_info(import_nvml(), os.environ.get("CUDA_VISIBLE_DEVICES")) if device == "gpu" else None,
        "cuda_loaded": loaded_cuda_libraries() if device == "gpu" else None,
        "packages": installed_packages(),
        "argv": sys.argv[1:],
    }
