"""Backends by name: every module of this package that defines one registers it (and its
command-line options) with ``register``; adding a backend is adding a module. ``auto`` picks
Docker when an engine answers, else ``local``."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
from pathlib import Path

from .base import (BACKENDS, Backend, BackendError, Exit, GpuModel, Inventory, Launch, Placement, Progress,
                   quiet, register)
from .docker import engine_answers

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

CHOICES = ("auto", *BACKENDS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--backend, --cache-dir and every backend's own options."""
    parser.add_argument("--backend", choices=CHOICES, default="auto",
                        help="where cells run: auto (docker when an engine answers, else local); "
                             + "; ".join(f"{name}: {backend.summary}" for name, backend in BACKENDS.items()))
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="framework environments, image build logs and downloads "
                             "(default: $DLBENCH_CACHE or ~/.cache/dlbench)")
    for backend in BACKENDS.values():
        backend.add_arguments(parser)


def select(args: argparse.Namespace, matrix=None) -> Backend:
    """The backend the parsed command line names, configured by it (and by the matrix file)."""
    name = args.backend
    if name == "auto":
        name = "docker" if engine_answers() else "local"
    return BACKENDS[name].from_args(args, matrix)


def options(argv: list[str]) -> argparse.Namespace:
    """Every backend's options as ``argv`` (a whole harness command line, say) gives them, the
    rest at their defaults: for a cluster job that makes the same backend as its harness, and
    for tools and tests without a command line of their own."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_known_args(argv)[0]


__all__ = ["Backend", "BackendError", "Exit", "GpuModel", "Inventory", "Launch", "Placement", "Progress", "CHOICES",
           "add_arguments", "options", "quiet", "register", "select"]
