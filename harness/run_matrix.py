#!/usr/bin/env python
"""Run a benchmark matrix: expand matrix.yml, run every cell in its framework's environment,
write one JSON result per cell, then print and write the comparison tables, their charts and
an HTML report.

    python harness/run_matrix.py matrix.yml [--dry-run] [--backend auto|docker|local|current|slurm]
                                            [--results DIR] [--force] [--serial] [backend options]

On a host with several GPUs, GPU cells run side by side, one per GPU (--serial: one at a time);
on a Slurm cluster every cell is a job, placed by Slurm. A results folder is used by one
harness at a time.

Exit status: 0 when every cell ran (or was skipped with a reason, or is a cluster job still
running after --detach), 1 when a cell failed or timed out, 2 for bad input or a results folder
in use (nothing is run then).
"""
from __future__ import annotations

import argparse
import signal
import socket
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tabulate import tabulate  # noqa: E402

from bench.specs import GEMM_CEILING  # noqa: E402
from harness import backends  # noqa: E402
from harness.backends.base import REPO_ROOT  # noqa: E402
from harness.matrix import AXES, Cell, MatrixError, load, only, with_ceilings  # noqa: E402
from harness.report import report  # noqa: E402
from harness.results import FolderInUse, RunFolder  # noqa: E402
from harness.runner import is_done, run_cells  # noqa: E402


def default_results_dir(matrix_path: Path) -> Path:
    """results/<matrix name>-<host>: running the same matrix again on the same host resumes
    it; a changed cell has a new id (its settings are hashed into it) and runs afresh."""
    return REPO_ROOT / "results" / f"{matrix_path.stem}-{socket.gethostname()}"


def print_plan(cells: list[Cell], folder: RunFolder, backend: backends.Backend, expanded: int) -> None:
    rows, environments = [], {}
    for cell in cells:
        reason = backend.skip_reason(cell)
        plan = f"skip: {reason}" if reason else ("done" if is_done(folder.result_path(cell.id)) else "run")
        environment = None if reason else backend.environment_of(cell)
        if environment:
            environments[f"{cell.framework} on {cell.gpu}, cuda {cell.cuda}"] = environment
            plan += f" ({environment.split(':')[0]})"
        s = cell.settings
        rows.append([getattr(cell, axis) for axis in AXES]
                    + [s.mode, s.data, cell.batch_size, "×".join(map(str, cell.input_shape)), plan])
    print(tabulate(rows, headers=[*AXES, "mode", "data", "batch", "input", "plan"]))
    if environments:
        print("\nwhere the GPU cells run:")
        for cells_of, environment in environments.items():
            print(f"  {cells_of}: {environment}")
    ceilings = sum(cell.task == GEMM_CEILING.name for cell in cells)
    selected = f" (of {expanded}, chosen by --only)" if expanded != len(cells) - ceilings else ""
    with_ceilings = f" and {ceilings} matrix-multiply ceiling{'s' if ceilings > 1 else ''}" if ceilings else ""
    print(f"\n{len(cells) - ceilings} cells{selected}{with_ceilings} on {backend.inventory().describe()}; "
          f"{backend.name} runs up to {backend.placement(serial=False).at_once} at once; results go to {folder.root}")


def _stop_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the runner, which stops the running cell


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python harness/run_matrix.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("matrix", type=Path, help="the matrix file, e.g. matrix.yml")
    parser.add_argument("--dry-run", action="store_true", help="list the expanded cells and exit")
    parser.add_argument("--only", nargs="+", default=[], metavar="AXIS=VALUES",
                        help="run only the cells whose axes have these values, e.g. --only framework=pytorch,jax "
                             "task=cnn_cifar10 (every expression must hold; applied after expansion)")
    parser.add_argument("--results", type=Path, default=None,
                        help="results folder (default: results/<matrix name>-<host>)")
    parser.add_argument("--force", action="store_true", help="rerun cells that already have a successful result")
    parser.add_argument("--serial", action="store_true",
                        help="run one cell at a time, also on a host with several GPUs (by default GPU cells "
                             "run side by side, one per GPU, and share the host's CPUs)")
    parser.add_argument("--no-ceiling", action="store_true",
                        help="leave out the matrix-multiply ceiling cells (the tables then show no fraction of it)")
    backends.add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a cluster job makes the same backend from it

    try:
        matrix = load(args.matrix)
        backend = backends.select(args, matrix)
        expanded = matrix.cells(backend.inventory())
        cells = only(expanded, args.only)
        if not args.no_ceiling:
            cells = with_ceilings(cells, lambda cell: backend.skip_reason(cell) is None)
    except (MatrixError, backends.BackendError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    folder = RunFolder(args.results or default_results_dir(args.matrix))
    if folder.root.exists() and not folder.root.is_dir():
        print(f"error: --results {folder.root}: exists and is not a folder; pass a folder path", file=sys.stderr)
        return 2
    if args.dry_run:
        print_plan(cells, folder, backend, len(expanded))
        return 0
    try:
        with folder.lock():
            return run(args, cells, folder, backend)
    except FolderInUse as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, cells: list[Cell], folder: RunFolder, backend: backends.Backend) -> int:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    at_once = backend.placement(args.serial).at_once
    print(f"{len(cells)} cells, backend {backend.name}, {at_once} at a time, results in {folder.root}",
          file=sys.stderr)
    try:
        outcomes = run_cells(cells, folder, backend, args.matrix.resolve().parent,
                             force=args.force, serial=args.serial)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished cells are kept in {folder.cells}; run the same command to go on",
              file=sys.stderr)
        return 130
    finally:
        backend.release()
    page = report([folder.cells], folder.root)  # tables/, charts/ and report.html
    print(folder.tables.joinpath("README.md").read_text(encoding="utf-8"))
    print(f"report: {page}", file=sys.stderr)
    counts = Counter(outcome.status for outcome in outcomes)
    kept = sum(outcome.reused for outcome in outcomes)
    pending = len(cells) - len(outcomes)
    print(", ".join(f"{counts[s]} {s}" for s in ("ok", "failed", "timeout", "skipped") if counts[s])
          + (f" ({kept} kept from an earlier run)" if kept else "")
          + (f", {pending} still running as cluster jobs (run the same command to collect them)" if pending else "")
          + f"; results and tables in {folder.root}", file=sys.stderr)
    return 1 if counts["failed"] or counts["timeout"] else 0


if __name__ == "__main__":
    sys.exit(main())
