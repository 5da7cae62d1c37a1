"""What a backend is: a place where cells run. It says what it can offer them (its inventory
of GPU models), how many run at once and on which GPUs (its placement), prepares a
framework's environment and runs one cell of the bench in it. Each backend is one module of
this package that registers itself with its own command-line options (``register``)."""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Mapping

from bench.precision import check_tensor_cores
from bench.specs import FRAMEWORK_SPECS, Unsupported

from ..gpus import Driver, Gpu, detect_driver, detect_gpus, names_model
from ..images import (IMAGES_DIR, REPO_ROOT, GpuHost,  # noqa: F401  (REPO_ROOT: the cells' working directory)
                      installed_requirements)
from ..matrix import Cell

if TYPE_CHECKING:
    from ..matrix import Matrix
    from ..results import RunFolder

# After a timeout the cell gets this long to exit on SIGTERM before SIGKILL.
TERMINATE_GRACE_S = 10
# How often a waiting backend looks whether the run was interrupted.
POLL_S = 0.5


# Told, while an environment is prepared, what is being done now (one short line for people).
Progress = Callable[[str], None]


def quiet(text: str) -> None:
    """A Progress that tells nobody."""


class BackendError(Exception):
    """A backend or an environment could not be prepared; the message says why and where the log is."""


@dataclass(frozen=True)
class GpuModel:
    name: str  # as the backend knows it: NVML's name ("NVIDIA H100 80GB HBM3"), a GRES type ("h100")
    most_per_cell: int  # the most of them one cell can get: on this host, or on one node
    compute_capability: str | None = None  # "9.0"; None where the backend cannot tell (a cluster's GRES)


@dataclass(frozen=True)
class Inventory:
    """What a backend can offer cells: where that is, its GPU models, and the names the matrix
    may use for them beyond the words of their own (``slurm.gres_types``)."""

    where: str  # "this host", "the cluster"
    gpu_models: tuple[GpuModel, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)  # matrix GPU name -> model name
    cpu_cores: int = 0  # this host's cores, or the most of one node
    driver: Driver | None = None  # this host's NVIDIA driver; None where unknown (a cluster's nodes)

    def describe(self) -> str:
        """One line for people: "the cluster: h100 ×2, a100 ×4 (the most on one node); 64 CPU cores"."""
        gpus = ", ".join(f"{model.name} ×{model.most_per_cell}" for model in self.gpu_models) or "no GPU"
        most = " (the most on one node)" if self.where == "the cluster" and self.gpu_models else ""
        return f"{self.where}: {gpus}{most}; {self.cpu_cores} CPU cores"

    def names(self) -> list[str]:
        """What ``gpu: auto`` expands to: every model, or ``cpu`` when there is none."""
        return sorted(model.name for model in self.gpu_models) or ["cpu"]

    def model_for(self, requested: str) -> GpuModel | None:
        alias = self.aliases.get(requested)
        for model in self.gpu_models:
            named = model.name == alias if alias else names_model(requested, model.name)
            if named or model.name == requested:
                return model
        return None

    def gpu_host(self, cell: Cell) -> GpuHost:
        """What decides which GPU image can run ``cell``: the driver, its GPU's compute capability."""
        model = self.model_for(cell.gpu) if cell.device == "gpu" else None
        return GpuHost(self.driver.version if self.driver else None, self.driver.cuda if self.driver else None,
                       model.compute_capability if model else None)

    def gpu_problem(self, cell: Cell) -> str | None:
        """Why the GPUs a cell asks for are not here, or None."""
        model = self.model_for(cell.gpu)
        if model is None:
            present = ", ".join(model.name for model in sorted(self.gpu_models, key=lambda m: m.name)) or "no GPU"
            return f"{self.where} has no {cell.gpu} GPU (it has {present})"
        if model.most_per_cell < cell.devices:
            return (f"the cell asks for {cell.devices} {cell.gpu} GPUs and {self.where} has "
                    f"{model.most_per_cell} {'on one node' if self.where == 'the cluster' else ''}".rstrip())
        return None


def host_inventory(gpus: list[Gpu], driver: Driver | None = None) -> Inventory:
    counts: dict[str, int] = {}
    capabilities: dict[str, str | None] = {}
    for gpu in gpus:
        counts[gpu.name] = counts.get(gpu.name, 0) + 1
        capabilities[gpu.name] = gpu.compute_capability
    return Inventory("this host", tuple(GpuModel(name, count, capabilities[name])
                                        for name, count in sorted(counts.items())),
                     cpu_cores=os.cpu_count() or 1, driver=driver)


@dataclass
class Launch:
    """One cell, ready to start: ``python -m bench --request R --out O`` with the paths as the
    backend sees them (``bench_args``), the request file written by the harness beside the
    result file it asks for."""

    cell: Cell
    request_path: Path
    result_path: Path
    log_path: Path
    timeout_s: float
    gpus: list[Gpu] = field(default_factory=list)  # the GPUs this cell may use; none for CPU cells
    weights: Path | None = None
    data_dir: Path | None = None
    # Set when the harness is interrupted: the backend stops the cell and returns at once.
    interrupted: threading.Event = field(default_factory=threading.Event)
    folder: RunFolder | None = None  # the run's folder, for backends that keep state there (jobs/)

    def __post_init__(self) -> None:
        assert self.request_path.parent == self.result_path.parent, "a container mounts one folder for both"

    def bench_args(self, out: Path, weights: Path | None, data_dir: Path | None) -> list[str]:
        """The bench's arguments where ``out`` is the result file (the request file is beside
        it) and the weights and data are at ``weights`` and ``data_dir``."""
        args = ["--request", str(out.with_name(self.request_path.name)), "--out", str(out)]
        if weights:
            args += ["--weights", str(weights)]
        if data_dir:
            args += ["--data-dir", str(data_dir)]
        return args

    def host_argv(self) -> list[str]:
        """The bench's arguments for a process on this host, which sees the files where they are."""
        return self.bench_args(self.result_path, self.weights, self.data_dir)

    def bench_command(self, python: str, bench_args: list[str]) -> list[str]:
        """``python -m bench`` with its arguments; for a framework whose data parallelism runs
        one process per device (CNTK), under ``mpiexec -n <devices>``, which starts them all."""
        command = [python, "-m", "bench", *bench_args]
        processes = mpi_processes(self.cell)
        return ["mpiexec", "-n", str(processes), *command] if processes > 1 else command


def mpi_processes(cell: Cell) -> int:
    """The processes an MPI launcher starts for ``cell``: one per device where the framework's
    data parallelism runs under MPI, else 1 (no launcher)."""
    return cell.devices if FRAMEWORK_SPECS[cell.framework].data_parallel_under_mpi else 1


@dataclass
class Exit:
    returncode: int | None
    timed_out: bool
    out_of_memory: bool = False  # a container's or a job's memory limit was hit (the engine says so)
    interrupted: bool = False  # stopped because the harness was interrupted: nothing to record
    pending: bool = False  # still running outside the harness (a detached Slurm job): nothing to record yet
    detail: str | None = None  # the backend's own account of the end, when it has more to say
    env: dict = field(default_factory=dict)  # what the backend knows of where the cell ran (into env)

    def describe(self) -> str:
        """How the cell's process ended, in words (``detail`` says more, where a backend has it)."""
        if self.timed_out:
            return "timed out and was stopped"
        if self.out_of_memory:
            return f"ran out of memory (exit {self.returncode}: killed at the container's memory limit)"
        if self.returncode is not None and self.returncode < 0:
            number = -self.returncode
            name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else str(number)
            cause = ", most often the kernel's out-of-memory killer" if number == signal.SIGKILL else ""
            return f"was killed by {name}{cause}"
        if self.returncode == 137:
            return "exited with 137 (SIGKILL, most often out of memory)"
        return f"exited with status {self.returncode}"


class Placement(ABC):
    """Which prepared cells may start now, and on which GPUs."""

    at_once: int  # the most cells running at once

    def most_on_host(self, cell: Cell) -> int:
        """The most cells that may run at once on the host ``cell`` runs on (its result says so)."""
        return self.at_once

    @abstractmethod
    def start_now(self, waiting: list[Cell]) -> list[tuple[Cell, list[Gpu]]]:
        """The waiting cells (in order) that may start now, each with its GPUs; marks them running."""

    @abstractmethod
    def finished(self, cell: Cell) -> None:
        """A cell that start_now gave out has ended."""


class GpuSlots(Placement):
    """This host's GPUs: GPU cells run side by side, each on GPUs no other running cell has;
    a CPU cell runs alone (it uses every core), after the cells started before it and before
    those after it; with ``at_once`` 1, every cell runs alone."""

    def __init__(self, gpus: list[Gpu], at_once: int):
        self.gpus = gpus
        self.free = {gpu.uuid for gpu in gpus}
        self.at_once = at_once
        self.running: dict[str, tuple[Cell, list[Gpu]]] = {}  # by cell id

    def start_now(self, waiting: list[Cell]) -> list[tuple[Cell, list[Gpu]]]:
        started = []
        for cell in waiting:
            if len(self.running) >= self.at_once or any(c.device == "cpu" for c, _ in self.running.values()):
                break
            if cell.device == "cpu":
                if not self.running:
                    self._start(cell, [], started)
                break  # nothing passes a CPU cell: it would wait forever for the host to be free
            gpus = [gpu for gpu in self.gpus_for(cell) if gpu.uuid in self.free][:cell.devices]
            if len(gpus) == cell.devices:
                self._start(cell, gpus, started)
        return started

    def gpus_for(self, cell: Cell) -> list[Gpu]:
        """The host GPUs that can run ``cell`` (none for CPU cells)."""
        return [gpu for gpu in self.gpus if cell.device == "gpu" and names_model(cell.gpu, gpu.name)]

    def _start(self, cell: Cell, gpus: list[Gpu], started: list) -> None:
        self.free -= {gpu.uuid for gpu in gpus}
        self.running[cell.id] = (cell, gpus)
        started.append((cell, gpus))

    def finished(self, cell: Cell) -> None:
        _, gpus = self.running.pop(cell.id)
        self.free |= {gpu.uuid for gpu in gpus}


class Backend(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --help: where its cells run
    # How many environments prepare() may make at once, from as many threads.
    prepare_at_once: ClassVar[int] = 1

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """This backend's own command-line options (an argument group named after it)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, matrix: Matrix | None = None) -> Backend:
        """The backend as the command line (and the matrix file) configure it; BackendError
        (one line: the option, what is wrong, the fix) for bad options."""
        return cls()

    @abstractmethod
    def inventory(self) -> Inventory:
        """The GPU models this backend can give cells."""

    @abstractmethod
    def placement(self, serial: bool) -> Placement:
        """Which cells run at once, and where; ``serial``: one at a time."""

    def skip_reason(self, cell: Cell) -> str | None:
        """Why this backend cannot run ``cell`` (the cell is then skipped), or None."""
        if cell.device == "cpu" and cell.cuda != "auto":
            return f"a CPU cell has no CUDA version (cuda: {cell.cuda}); use cuda: auto with gpu: cpu"
        refused = cell.request().cannot_run(mpi_processes(cell))  # what the bench would skip
        if refused:
            return refused
        if cell.device == "gpu":
            problem = self.inventory().gpu_problem(cell)
            if problem:
                return problem
            try:  # what the bench would find on the GPU itself
                check_tensor_cores(cell.precision, self.inventory().model_for(cell.gpu).compute_capability)
            except Unsupported as error:
                return str(error)
        return self.cannot_run(cell)

    def cannot_run(self, cell: Cell) -> str | None:
        """What this backend lacks for ``cell`` beyond its GPUs (a framework, a CUDA build), or None."""
        return None

    def environment_of(self, cell: Cell) -> str | None:
        """For the plan: which environment a runnable ``cell`` gets and why, where there is a choice."""
        return None

    @abstractmethod
    def prepare(self, cell: Cell, progress: Progress = quiet) -> None:
        """Make the cell's environment ready (build or reuse it), telling ``progress`` what it does."""

    @abstractmethod
    def run(self, launch: Launch) -> Exit:
        """Run one cell to its end or its timeout; its output goes to ``launch.log_path``."""

    def release(self) -> None:
        """The run is over (or interrupted): let go of what the backend holds."""


class HostBackend(Backend):
    """A backend whose cells run on this host: the GPUs NVML sees, one cell per GPU at once."""

    @cached_property
    def gpus(self) -> list[Gpu]:
        return detect_gpus()

    @cached_property
    def driver(self) -> Driver | None:
        return detect_driver() if self.gpus else None

    def inventory(self) -> Inventory:
        return host_inventory(self.gpus, self.driver)

    def placement(self, serial: bool) -> Placement:
        return GpuSlots(self.gpus, 1 if serial else max(1, len(self.gpus)))


BACKENDS: dict[str, type[Backend]] = {}


def register(backend: type[Backend]) -> type[Backend]:
    """Class decorator: make a backend selectable by its name (``--backend NAME``)."""
    BACKENDS[backend.name] = backend
    return backend


def requirements_file(framework: str, device: str) -> Path:
    """What a framework's environment installs: the lock of images/<framework>/requirements-<cpu|gpu>.txt
    (hash-checked; the Docker images install the same files), or those pins where it has none."""
    return installed_requirements(IMAGES_DIR / framework, f"requirements-{device}.txt")


def build_constraints_file(framework: str) -> Path | None:
    """Pins for building a framework's source-only packages (images/<framework>/build-constraints.txt),
    when it has any: Chainer's setup.py needs an old setuptools inside pip's isolated build."""
    path = IMAGES_DIR / framework / "build-constraints.txt"
    return path if path.is_file() else None


def cell_environment(launch: Launch) -> dict[str, str]:
    """Process environment of a cell: only its own GPUs are visible (none for CPU cells)."""
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu.uuid for gpu in launch.gpus)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def run_process(argv: list[str], env: dict[str, str], log_path: Path, timeout_s: float,
                interrupted: threading.Event | None = None) -> Exit:
    """Run a process in its own session with a timeout; on timeout or interrupt, stop the
    whole process group so no framework worker outlives its cell."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(argv, env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_die_with_parent if _LIBC else None)
        try:
            while True:
                try:
                    return Exit(process.wait(timeout=max(0.0, min(POLL_S, deadline - time.monotonic()))),
                                timed_out=False)
                except subprocess.TimeoutExpired:
                    if interrupted is not None and interrupted.is_set():
                        _stop(process)
                        return Exit(process.returncode, timed_out=False, interrupted=True)
                    if time.monotonic() >= deadline:
                        _stop(process)
                        return Exit(process.returncode, timed_out=True)
        except BaseException:
            _stop(process)
            raise


# Loaded once here: the child runs _die_with_parent between fork and exec, where it should do
# no more than one foreign call (the harness may have other threads waiting on other cells).
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Linux: the cell gets SIGKILL when the thread that started it ends, even by SIGKILL of
    the harness, so no orphaned cell keeps running (and competing for the CPU) when the matrix
    is run again. The runner's threads live until their cells have ended."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _stop(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, TERMINATE_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
