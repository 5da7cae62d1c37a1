"""Local backends: one cached virtual environment per framework (``local``), or the
interpreter running the harness (``current``)."""
from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from bench.host import compute_device
from bench.specs import FRAMEWORK_SPECS

from ..matrix import Cell
from .base import (BackendError, Exit, HostBackend, Launch, Progress, build_constraints_file, cell_environment,
                   quiet, register, requirements_file, run_process)


def local_skip_reason(cell: Cell, backend: str) -> str | None:
    """What the host's own Python cannot run: image-only frameworks, a pinned CUDA version."""
    image_only = FRAMEWORK_SPECS[cell.framework].image_only
    if image_only:
        return f"{image_only}; use --backend docker, not a {backend} environment"
    if cell.device == "gpu" and cell.cuda != "auto":
        return (f"the {backend} backend runs the CUDA its framework build brings and cannot "
                f"pick CUDA {cell.cuda}; use cuda: auto, or --backend docker (one image per CUDA version)")
    return None


def default_cache_dir() -> Path:
    return Path(os.environ.get("DLBENCH_CACHE", Path.home() / ".cache" / "dlbench"))


@register
class VirtualenvBackend(HostBackend):
    """One virtual environment per framework and device kind, built from the locks under
    images/<framework>/ (hash-checked; the images install the same) and kept under the cache
    folder, named by a hash of its inputs: a second run reuses it, a changed pin builds a new one."""

    name = "local"
    summary = "a cached virtual environment per framework"
    # Three virtual environments build side by side: pip mostly waits on downloads and disk.
    prepare_at_once = 3

    def __init__(self, cache_dir: Path | None = None, python: str = sys.executable):
        self.envs_dir = (cache_dir or default_cache_dir()) / "envs"
        self.python = python
        self._ready: dict[tuple[str, str], Path] = {}

    @classmethod
    def from_args(cls, args, matrix=None) -> "VirtualenvBackend":
        return cls(args.cache_dir)

    def environment_path(self, framework: str, device: str) -> Path:
        requirements = requirements_file(framework, device)
        if not requirements.is_file():
            raise BackendError(f"{requirements} is missing: {framework} has no {device} environment")
        digest = hashlib.sha256()
        digest.update(f"{platform.python_version()} {platform.machine()}\n".encode())
        digest.update(requirements.read_bytes())
        constraints = build_constraints_file(framework)
        if constraints:
            digest.update(constraints.read_bytes())
        return self.envs_dir / f"{framework}-{device}-{digest.hexdigest()[:12]}"

    def cannot_run(self, cell: Cell) -> str | None:
        return local_skip_reason(cell, self.name)

    def prepare(self, cell: Cell, progress: Progress = quiet) -> None:
        self.prepare_environment(cell.framework, compute_device(cell.device), progress)

    def prepare_environment(self, framework: str, device: str, progress: Progress = quiet) -> None:
        if (framework, device) in self._ready:
            return
        path = self.environment_path(framework, device)
        complete = path / ".complete"
        self.envs_dir.mkdir(parents=True, exist_ok=True)
        # A lock file, so two harnesses sharing a cache never build the same environment twice.
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not complete.is_file():
                self._build(path, requirements_file(framework, device), build_constraints_file(framework), progress)
                complete.touch()
        self._ready[(framework, device)] = path

    def _build(self, path: Path, requirements: Path, build_constraints: Path | None, progress: Progress) -> None:
        # A half-built environment (a killed earlier build) has no .complete marker: start over.
        shutil.rmtree(path, ignore_errors=True)
        log_path = path.with_suffix(".log")
        steps = [
            [self.python, "-m", "venv", str(path)],
            [str(path / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
             *(["--require-hashes"] if requirements.suffix == ".lock" else []), "-r", str(requirements)],
        ]
        env = dict(os.environ)
        if build_constraints:
            # The venv's pip (the one Python bundles, < 25.3) applies PIP_CONSTRAINT to
            # isolated builds too; a requirements file has no way to say this.
            env["PIP_CONSTRAINT"] = str(build_constraints)
        with open(log_path, "w") as log:
            for step in steps:
                progress(f"building {path.name}: {' '.join(step[-3:])} (log: {log_path})")
                log.write(f"$ {' '.join(step)}\n")
                log.flush()
                done = subprocess.run(step, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
                if done.returncode != 0:
                    raise BackendError(f"building {path.name} failed at '{' '.join(step[-3:])}' "
                                       f"(exit {done.returncode}); see {log_path}")

    def run(self, launch: Launch) -> Exit:
        path = self._ready[(launch.cell.framework, compute_device(launch.cell.device))]
        argv = launch.bench_command(str(path / "bin" / "python"), launch.host_argv())
        return run_process(argv, cell_environment(launch), launch.log_path, launch.timeout_s, launch.interrupted)


@register
class CurrentInterpreterBackend(HostBackend):
    """The harness's own interpreter, as it is: for a machine where the frameworks are
    already installed (a prepared GPU box, a notebook server)."""

    name = "current"
    summary = "this interpreter, as it is"

    def cannot_run(self, cell: Cell) -> str | None:
        return local_skip_reason(cell, self.name)

    def prepare(self, cell: Cell, progress: Progress = quiet) -> None:
        pass

    def run(self, launch: Launch) -> Exit:
        argv = launch.bench_command(sys.executable, launch.host_argv())
        return run_process(argv, cell_environment(launch), launch.log_path, launch.timeout_s, launch.interrupted)
