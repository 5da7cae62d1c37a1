#!/usr/bin/env python
"""Run a benchmark matrix: expand matrix.yml, run every cell in its framework's environment,
write one JSON result per cell, then print and write the comparison tables, their charts and
an HTML report.

    python harness/run_matrix.py matrix.yml [--dry-run] [--backend auto|docker|local|current|slurm]
                                            [--results DIR] [--force] [--serial] [--ab AXIS [--rounds N]]
                                            [backend options]

On a host with several GPUs, GPU cells run side by side, one per GPU (--serial: one at a time);
on a Slurm cluster every cell is a job, placed by Slurm. A results folder is used by one
harness at a time.

--ab AXIS (or the matrix's ``ab:`` block) runs the matrix as an interleaved A/B: the cells that
differ in AXIS alone run in pairs, round by round, A B then B A..., each turn a fresh process,
one at a time; then the two sides are compared (harness/compare.py). --ab same runs each cell
against itself (A/A): this host's noise floor per cell.

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
from harness.ab import SAME, AbPlan, plan, round_folder, run_ab  # noqa: E402
from harness.compare import ab_side_names, compare_ab, render  # noqa: E402
from harness.compare import write as write_comparison  # noqa: E402
from harness.matrix import AXES, Cell, Matrix, MatrixError, load, only, with_ceilings  # noqa: E402
from harness.report import report  # noqa: E402
from harness.results import FolderInUse, RunFolder  # noqa: E402
from harness.runner import is_done, run_cells  # noqa: E402


def default_results_dir(matrix_path: Path, ab: AbPlan | None = None) -> Path:
    """results/<matrix name>-<host>[-ab-<axis>|-aa]: running the same matrix again on the same
    host resumes it; a changed cell has a new id (its settings are hashed into it) and runs afresh."""
    kind = "" if ab is None else "-aa" if ab.axis == SAME else f"-ab-{ab.axis}"
    return REPO_ROOT / "results" / f"{matrix_path.stem}-{socket.gethostname()}{kind}"


def ab_plan(args: argparse.Namespace, matrix: Matrix, cells: list[Cell]) -> AbPlan | None:
    """The A/B the command line or the matrix's ``ab:`` block asks for, or None."""
    block = matrix.spec.ab
    if args.ab is None and block is None:
        if args.rounds is not None:
            raise MatrixError(f"--rounds {args.rounds}: only an A/B has rounds; add --ab AXIS")
        return None
    axis = args.ab or block.axis
    rounds = args.rounds or (block.rounds if block else 8)
    return plan(cells, axis, rounds, "--ab" if args.ab else f"{matrix.place('ab', 'axis')}: ab.axis")


def print_ab_plan(ab: AbPlan) -> None:
    sides = "each cell against itself (A/A)" if ab.axis == SAME else f"{ab.axis} {ab.values[0]} (A) against {ab.values[1]} (B)"
    print(f"\nA/B: {sides}; {len(ab.pairs)} pairs, {ab.rounds} rounds, {len(ab.schedule())} turns one at a time, "
          f"the order A B, then B A, ...")
    for cell, why in ab.left_out:
        print(f"  left out: {cell.id}: {why}")


def print_plan(cells: list[Cell], folder: RunFolder, backend: backends.Backend, expanded: int,
               ab: AbPlan | None = None) -> None:
    rows, environments = [], {}
    for cell in cells:
        reason = backend.skip_reason(cell)
        if ab:  # its turns, round by round
            done = sum(is_done(round_folder(folder, t.round, t.side).result_path(cell.id))
                       for t in ab.schedule() if t.cell.id == cell.id)
            plan = f"skip: {reason}" if reason else f"{done} of {2 * ab.rounds if ab.axis == SAME else ab.rounds} turns done"
        else:
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
    parser.add_argument("--ab", default=None, metavar="AXIS",
                        help="run an interleaved A/B between the two values of this axis (e.g. cuda, threads, "
                             "precision, compile), or 'same' for an A/A (the host's noise floor); overrides the "
                             "matrix's ab block")
    parser.add_argument("--rounds", type=int, default=None, metavar="N",
                        help="rounds of an A/B, each a fresh run a side (default: the matrix's ab.rounds, or 8)")
    backends.add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a cluster job makes the same backend from it

    try:
        matrix = load(args.matrix)
        backend = backends.select(args, matrix)
        expanded = matrix.cells(backend.inventory())
        cells = only(expanded, args.only)
        ab = ab_plan(args, matrix, cells)
        if ab is not None and args.detach:
            raise MatrixError("--ab with --detach: an A/B runs its turns in order, each after the last has ended; "
                              "leave out --detach")
        if not args.no_ceiling and ab is None:  # an A/B compares its pairs, nothing else
            cells = with_ceilings(cells, lambda cell: backend.skip_reason(cell) is None)
    except (MatrixError, backends.BackendError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    folder = RunFolder(args.results or default_results_dir(args.matrix, ab))
    if folder.root.exists() and not folder.root.is_dir():
        print(f"error: --results {folder.root}: exists and is not a folder; pass a folder path", file=sys.stderr)
        return 2
    if args.dry_run:
        if ab:  # its pairs, counted as chosen by --only only when it was given
            print_plan(ab.cells(), folder, backend, len(expanded) if args.only else len(ab.cells()), ab)
            print_ab_plan(ab)
        else:
            print_plan(cells, folder, backend, len(expanded))
        return 0
    try:
        with folder.lock():
            return run_ab_matrix(args, ab, folder, backend) if ab else run(args, cells, folder, backend)
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


def run_ab_matrix(args: argparse.Namespace, ab: AbPlan, folder: RunFolder, backend: backends.Backend) -> int:
    """Every round of the A/B, then the comparison of its two sides (printed, and written into
    comparison/), and the tables and report of its last round."""
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    print(f"A/B of {len(ab.pairs)} pairs, {ab.rounds} rounds, backend {backend.name}, one turn at a time, "
          f"results in {folder.root}", file=sys.stderr)
    try:
        outcomes = run_ab(ab, folder, backend, args.matrix.resolve().parent, force=args.force)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished turns are kept in {folder.root / 'rounds'}; run the same command to go on",
              file=sys.stderr)
        return 130
    finally:
        backend.release()
    last = ab.rounds - 1
    comparison, _ = compare_ab(folder.root)
    compared = (comparison, *ab_side_names(folder.root)) if comparison.pairs else None
    sides = ("A",) if ab.axis == SAME else ("A", "B")  # an A/A's two sides are the same cells
    page = report([round_folder(folder, last, side).cells for side in sides], folder.root, compared=compared)
    if compared:
        print(render(*compared))
        write_comparison(*compared, folder.root / "comparison")
        print(f"comparison: {folder.root / 'comparison' / 'comparison.md'}", file=sys.stderr)
    print(f"report (tables of the last round): {page}", file=sys.stderr)
    counts = Counter(outcome.status for outcome in outcomes)
    print(", ".join(f"{counts[s]} {s}" for s in ("ok", "failed", "timeout", "skipped") if counts[s])
          + f" of {len(outcomes)} turns; results in {folder.root}", file=sys.stderr)
    return 1 if counts["failed"] or counts["timeout"] else 0


if __name__ == "__main__":
    sys.exit(main())
