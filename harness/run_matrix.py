#!/usr/bin/env python
"""Run a benchmark matrix: expand matrix.yml, run every cell in its framework's environment,
write one JSON result per cell, then print and write the comparison tables, their charts and
an HTML report.

    python harness/run_matrix.py matrix.yml [--dry-run] [--backend auto|docker|local|current]
                                            [--results DIR] [--force] [--serial] [docker options]

On a host with several GPUs, GPU cells run side by side, one per GPU (--serial: one at a time).

Exit status: 0 when every cell ran (or was skipped with a reason), 1 when a cell failed or
timed out, 2 for bad input (nothing is run then).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tabulate import tabulate  # noqa: E402

from harness import backends  # noqa: E402
from harness.backends.base import REPO_ROOT  # noqa: E402
from harness.backends.local import default_cache_dir  # noqa: E402
from harness.gpus import detect_gpus  # noqa: E402
from harness.images import DEFAULT_CPU_BASE_IMAGE, BuildOptions  # noqa: E402
from harness.matrix import Cell, MatrixError, load  # noqa: E402
from harness.report import report  # noqa: E402
from harness.results import RunFolder  # noqa: E402
from harness.runner import cells_at_once, is_done, run_cells, skip_reason  # noqa: E402


def default_results_dir(matrix_path: Path) -> Path:
    """results/<matrix name>-<host>: running the same matrix again on the same host resumes
    it; a changed cell has a new id (its settings are hashed into it) and runs afresh."""
    return REPO_ROOT / "results" / f"{matrix_path.stem}-{socket.gethostname()}"


def print_plan(cells: list[Cell], folder: RunFolder, backend: backends.Backend, host_gpus) -> None:
    rows = []
    for cell in cells:
        reason = skip_reason(cell, host_gpus, backend)
        plan = f"skip: {reason}" if reason else ("done" if is_done(folder.result_path(cell.id)) else "run")
        s = cell.settings
        rows.append([cell.framework, cell.task, cell.gpu, cell.cuda, cell.devices, s.mode, s.data,
                     cell.batch_size, "×".join(map(str, cell.input_shape)), plan])
    print(tabulate(rows, headers=["framework", "task", "gpu", "cuda", "devices", "mode", "data", "batch",
                                  "input", "plan"]))
    print(f"\n{len(cells)} cells; results go to {folder.root}")


def _docker_option_problem(args: argparse.Namespace) -> str | None:
    for certificate in args.ca_cert:
        if not certificate.is_file() or b"-----BEGIN CERTIFICATE-----" not in certificate.read_bytes():
            return f"--ca-cert {certificate}: not a PEM certificate file; pass a .crt/.pem file"
    if args.wheelhouse and not args.wheelhouse.is_dir():
        return f"--wheelhouse {args.wheelhouse}: no such folder; pass a folder of wheels"
    if args.offline and not args.wheelhouse:
        return "--offline: builds would have nothing to install; pass --wheelhouse DIR as well"
    if args.cpus is not None and args.cpus <= 0:
        return f"--cpus {args.cpus:g}: must be more than 0"
    return None


def _build_options(args: argparse.Namespace) -> BuildOptions:
    return BuildOptions(cpu_base=args.base_image, ca_certificates=tuple(args.ca_cert),
                        wheelhouse=args.wheelhouse, offline=args.offline)


def _stop_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the runner, which stops the running cell


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python harness/run_matrix.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("matrix", type=Path, help="the matrix file, e.g. matrix.yml")
    parser.add_argument("--dry-run", action="store_true", help="list the expanded cells and exit")
    parser.add_argument("--backend", choices=backends.CHOICES, default="auto",
                        help="where cells run: auto (Docker when an engine answers, else local), docker "
                             "(one image per framework variant of images/catalog.yml), local (a cached "
                             "virtual environment per framework), current (this interpreter)")
    parser.add_argument("--results", type=Path, default=None,
                        help="results folder (default: results/<matrix name>-<host>)")
    parser.add_argument("--force", action="store_true", help="rerun cells that already have a successful result")
    parser.add_argument("--serial", action="store_true",
                        help="run one cell at a time, also on a host with several GPUs (by default GPU cells "
                             "run side by side, one per GPU, and share the host's CPUs)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"framework environments and downloads (default: {default_cache_dir()})")
    docker = parser.add_argument_group("docker backend")
    docker.add_argument("--base-image", default=os.environ.get("DLBENCH_BASE_IMAGE", DEFAULT_CPU_BASE_IMAGE),
                        help="base of the CPU images (default: $DLBENCH_BASE_IMAGE or %(default)s)")
    docker.add_argument("--ca-cert", type=Path, action="append", default=[], metavar="FILE",
                        help="a PEM CA certificate every image trusts, for builds behind a TLS-intercepting "
                             "proxy (repeatable)")
    docker.add_argument("--wheelhouse", type=Path, default=None, metavar="DIR",
                        help="wheels that builds install before asking a package index")
    docker.add_argument("--offline", action="store_true",
                        help="build with no network: every wheel from --wheelhouse (air-gapped hosts)")
    docker.add_argument("--memory", default=None, help="memory limit of each cell's container, e.g. 16g")
    docker.add_argument("--cpus", type=float, default=None, help="CPU limit of each cell's container")
    args = parser.parse_args(argv)

    try:
        matrix = load(args.matrix)
        host_gpus = detect_gpus()
        cells = matrix.cells(host_gpus)
    except MatrixError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    folder = RunFolder(args.results or default_results_dir(args.matrix))
    if folder.root.exists() and not folder.root.is_dir():
        print(f"error: --results {folder.root}: exists and is not a folder; pass a folder path", file=sys.stderr)
        return 2
    problem = _docker_option_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        backend = backends.select(args.backend, args.cache_dir, _build_options(args),
                                  backends.ContainerLimits(memory=args.memory, cpus=args.cpus))
    except (backends.BackendError, MatrixError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        print_plan(cells, folder, backend, host_gpus)
        return 0

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    at_once = cells_at_once(host_gpus, args.serial)
    print(f"{len(cells)} cells, backend {backend.name}, {at_once} at a time, results in {folder.root}",
          file=sys.stderr)
    try:
        outcomes = run_cells(cells, folder, backend, host_gpus, args.matrix.resolve().parent,
                             force=args.force, serial=args.serial)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished cells are kept in {folder.cells}; run the same command to go on",
              file=sys.stderr)
        return 130
    page = report([folder.cells], folder.root)  # tables/, charts/ and report.html
    print(folder.tables.joinpath("README.md").read_text(encoding="utf-8"))
    print(f"report: {page}", file=sys.stderr)
    counts = Counter(outcome.status for outcome in outcomes)
    kept = sum(outcome.reused for outcome in outcomes)
    print(", ".join(f"{counts[s]} {s}" for s in ("ok", "failed", "timeout", "skipped") if counts[s])
          + (f" ({kept} kept from an earlier run)" if kept else "")
          + f"; results and tables in {folder.root}", file=sys.stderr)
    return 1 if counts["failed"] or counts["timeout"] else 0


if __name__ == "__main__":
    sys.exit(main())
