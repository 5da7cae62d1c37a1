"""Backends by name. ``auto`` picks Docker when an engine answers, else ``local``."""
from __future__ import annotations

from pathlib import Path

from ..images import BuildOptions
from .base import Backend, BackendError, Exit, Launch
from .docker import ContainerLimits, DockerBackend, engine_answers
from .local import CurrentInterpreterBackend, VirtualenvBackend, default_cache_dir

CHOICES = ("auto", "docker", "local", "current")


def select(name: str, cache_dir: Path | None = None, build: BuildOptions = BuildOptions(),
           limits: ContainerLimits = ContainerLimits()) -> Backend:
    """The backend called ``name``."""
    cache_dir = cache_dir or default_cache_dir()
    if name == "current":
        return CurrentInterpreterBackend()
    if name == "local":
        return VirtualenvBackend(cache_dir)
    if name not in ("auto", "docker"):
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(CHOICES)}")
    if engine_answers():
        return DockerBackend(cache_dir, build, limits)
    if name == "docker":
        raise BackendError("no Docker engine answers at DOCKER_HOST (or the default socket); "
                           "start one (scripts/docker-engine.sh start) or use --backend local")
    return VirtualenvBackend(cache_dir)

__all__ = ["Backend", "BackendError", "ContainerLimits", "Exit", "Launch", "CHOICES", "select"]
