"""What a backend is: something that prepares a framework's environment and runs one cell
of the bench in it. Local virtual environments now; Docker images and Slurm plug in here."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from ..gpus import Gpu
from ..images import IMAGES_DIR, REPO_ROOT  # noqa: F401  (REPO_ROOT: the cells' working directory)
from ..matrix import Cell
# After a timeout the cell gets this long to exit on SIGTERM before SIGKILL.
TERMINATE_GRACE_S = 10
# How often a waiting backend looks whether the run was interrupted.
POLL_S = 0.5


class BackendError(Exception):
    """An environment could not be prepared; the message says why and where the log is."""


@dataclass
class Launch:
    """One cell, ready to start: ``python -m bench`` + ``bench_args`` + the path options
    (``--out result_path``, ``--weights``, ``--data-dir``, as the backend sees those files)."""

    cell: Cell
    bench_args: list[str]
    result_path: Path
    log_path: Path
    timeout_s: float
    gpus: list[Gpu] = field(default_factory=list)  # the GPUs this cell may use; none for CPU cells
    weights: Path | None = None
    data_dir: Path | None = None
    # Set when the harness is interrupted: the backend stops the cell and returns at once.
    interrupted: threading.Event = field(default_factory=threading.Event)

    def path_args(self, out: Path, weights: Path | None, data_dir: Path | None) -> list[str]:
        args = ["--out", str(out)]
        if weights:
            args += ["--weights", str(weights)]
        if data_dir:
            args += ["--data-dir", str(data_dir)]
        return args

    def host_argv(self) -> list[str]:
        """The bench's arguments for a process on this host, which sees the files where they are."""
        return self.bench_args + self.path_args(self.result_path, self.weights, self.data_dir)


@dataclass
class Exit:
    returncode: int | None
    timed_out: bool
    out_of_memory: bool = False  # a container's memory limit was hit (the engine says so)
    interrupted: bool = False  # stopped because the harness was interrupted: nothing to record

    def describe(self) -> str:
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


class Backend(ABC):
    name: str
    # How many environments prepare() may make at once, from as many threads.
    prepare_at_once: int = 1

    def cannot_run(self, cell: Cell) -> str | None:
        """Why this backend cannot run ``cell`` at all (the cell is then skipped), or None."""
        return None

    @abstractmethod
    def prepare(self, cell: Cell) -> None:
        """Make the cell's environment ready (build or reuse it)."""

    @abstractmethod
    def run(self, launch: Launch) -> Exit:
        """Run one cell to its end or its timeout; its output goes to ``launch.log_path``."""


def requirements_file(framework: str, device: str) -> Path:
    """The pinned requirements of a framework's environment: images/<framework>/requirements-<cpu|gpu>.txt
    (the Docker images install the same files)."""
    return IMAGES_DIR / framework / f"requirements-{device}.txt"


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
