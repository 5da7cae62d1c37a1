"""Backends by name. ``auto`` picks Docker when an engine answers, else ``local``."""
from __future__ import annotations

from pathlib import Path

from .base import Backend, BackendError, Exit, Launch
from .local import CurrentInterpreterBackend, VirtualenvBackend

CHOICES = ("auto", "local", "current")


def select(name: str, cache_dir: Path | None = None) -> Backend:
    if name in ("auto", "local"):
        # Docker joins the choice for ``auto`` once its backend exists.
        return VirtualenvBackend(cache_dir)
    if name == "current":
        return CurrentInterpreterBackend()
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(CHOICES)}")


__all__ = ["Backend", "BackendError", "Exit", "Launch", "CHOICES", "select"]
