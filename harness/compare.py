#!/usr/bin/env python
"""Compare two result sets cell by cell: is B faster or slower than A, and is it more than noise?

    python harness/compare.py A B [--fail-above PCT]

A and B are results folders or the names of runs under results/. Cells are matched on what
was measured (framework, task, mode, data, batch size, input, devices) and on every axis the
two sets do not differ in; the axes they do differ in (GPU, CUDA, cuDNN, driver, framework
version, precision, compile profile, math modes, launcher, threads, image, bench code, host) are what is being
compared, and are named at the top. For each pair: the medians, the ratio B/A of the times with its 95%
bootstrap interval, and a verdict: slower or faster when the interval excludes 1, else no
significant difference.

Exit status: 0, or 1 with --fail-above PCT when a pair is significantly slower by more than
PCT percent (a regression guard for a team's own images), 2 for bad input.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tabulate import tabulate  # noqa: E402

from harness.backends.base import REPO_ROOT  # noqa: E402
from harness.results import load_results  # noqa: E402
from harness.rows import ResultRow, rows_of  # noqa: E402

RESAMPLES = 10_000
SEED = 0


# The axes two result sets may differ in, each read off a result's row.
AXES: dict[str, Callable[[ResultRow], object]] = {
    "device": lambda r: r.device,
    "cuda": lambda r: r.cuda,
    "cudnn": lambda r: r.cudnn,
    "driver": lambda r: r.gpu_driver,
    "framework version": lambda r: r.framework_version,
    "precision": lambda r: r.cell.precision,
    "compile": lambda r: r.cell.compile,
    "math modes": lambda r: r.math_modes or None,
    "launcher": lambda r: r.launcher,
    "threads": lambda r: r.cell.threads,
    "image": lambda r: r.image,
    "bench code": lambda r: (r.bench_hash or "")[:12] or None,
    "host": lambda r: r.host,
}


def measured(row: ResultRow) -> tuple:
    """What a cell measured, whatever it ran on."""
    cell = row.cell
    return (cell.task, cell.framework, cell.mode, cell.data, cell.batch_size, tuple(cell.input_shape),
            cell.devices)


@dataclass
class Pair:
    a: ResultRow
    b: ResultRow
    ratio: float  # median time of B / median time of A
    interval: tuple[float, float] | None  # 95% bootstrap interval of the ratio; None with one run a side

    @property
    def significant(self) -> bool:
        return self.interval is not None and (self.interval[0] > 1 or self.interval[1] < 1)

    def verdict(self) -> str:
        change = abs(self.ratio - 1)
        if self.interval is None:
            return "one run a side: no interval, cannot tell change from noise"
        if not self.significant:
            return "no significant difference"
        return f"{'slower' if self.ratio > 1 else 'faster'} by {change:.1%}"


@dataclass
class Comparison:
    differing: dict[str, tuple[list, list]]  # axis -> (values in A, values in B)
    pairs: list[Pair]
    only_a: int
    only_b: int


def ratio_interval(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of median(b) / median(a), each side resampled on its own."""
    if len(a) < 2 or len(b) < 2:
        return None
    rng = np.random.default_rng(SEED)
    a_medians = np.median(rng.choice(a, size=(RESAMPLES, len(a))), axis=1)
    b_medians = np.median(rng.choice(b, size=(RESAMPLES, len(b))), axis=1)
    return _percentiles(b_medians / a_medians, level)


def paired_ratio_interval(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the median of b[i] / a[i], the pairs resampled whole: for
    measurements taken side by side, each pair under the same conditions."""
    if len(a) != len(b):
        raise ValueError(f"paired measurements of unequal lengths: {len(a)} and {len(b)}")
    if len(a) < 2:
        return None
    ratios = np.asarray(b) / np.asarray(a)
    rng = np.random.default_rng(SEED)
    return _percentiles(np.median(rng.choice(ratios, size=(RESAMPLES, len(ratios))), axis=1), level)


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _newest_ok(rows: list[ResultRow], key: Callable[[ResultRow], tuple]) -> dict[tuple, ResultRow]:
    chosen: dict[tuple, ResultRow] = {}
    for row in sorted(rows, key=lambda r: r.finished_utc):
        if row.ok and row.headline:
            chosen[key(row)] = row  # the newest of reruns wins
    return chosen


def compare(a: list[ResultRow], b: list[ResultRow]) -> Comparison:
    differing = {}
    for axis, read in AXES.items():
        in_a = sorted({str(read(r)) for r in a})
        in_b = sorted({str(read(r)) for r in b})
        if in_a != in_b:
            differing[axis] = (in_a, in_b)
    same_axes = [read for axis, read in AXES.items() if axis not in differing]

    def key(row: ResultRow) -> tuple:
        return measured(row) + tuple(str(read(row)) for read in same_axes)

    chosen_a, chosen_b = _newest_ok(a, key), _newest_ok(b, key)
    pairs = []
    for matched in sorted(chosen_a.keys() & chosen_b.keys(), key=str):
        first, second = chosen_a[matched], chosen_b[matched]
        pairs.append(Pair(first, second, second.headline.median / first.headline.median,
                          ratio_interval(first.headline.values, second.headline.values)))
    return Comparison(differing, pairs, len(chosen_a.keys() - chosen_b.keys()), len(chosen_b.keys() - chosen_a.keys()))


def render(comparison: Comparison, a_name: str, b_name: str) -> str:
    lines = []
    if comparison.differing:
        lines.append("A and B differ in: " + "; ".join(
            f"{axis} {', '.join(in_a)} → {', '.join(in_b)}" for axis, (in_a, in_b) in comparison.differing.items()))
    else:
        lines.append("A and B differ in none of the recorded axes: a repeat of the same measurement")
    rows = []
    for pair in comparison.pairs:
        interval = f" [{pair.interval[0]:.3f}–{pair.interval[1]:.3f}]" if pair.interval else ""
        rows.append([pair.a.cell.task, pair.a.cell.framework, pair.a.cell.mode, pair.a.device,
                     pair.a.headline_text(), pair.b.headline_text(), f"{pair.ratio:.3f}{interval}",
                     pair.verdict()])
    lines += ["", tabulate(rows, headers=["task", "framework", "mode", "device (A)", f"A: {a_name}",
                                         f"B: {b_name}", "B/A time [95% CI]", "verdict"])]
    if comparison.only_a or comparison.only_b:
        lines.append(f"\nnot compared: {comparison.only_a} cell(s) only in A, {comparison.only_b} only in B")
    return "\n".join(lines)


def regressions(comparison: Comparison, fail_above_pct: float) -> list[Pair]:
    """Pairs significantly slower in B by more than the threshold."""
    return [p for p in comparison.pairs if p.significant and p.ratio > 1 + fail_above_pct / 100]


def _folder(name: str) -> Path | None:
    for candidate in (Path(name), REPO_ROOT / "results" / name):
        if candidate.is_dir():
            return candidate
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python harness/compare.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="the baseline: a results folder or a run name under results/")
    parser.add_argument("b", help="the results to compare with it")
    parser.add_argument("--fail-above", type=float, default=None, metavar="PCT",
                        help="exit 1 when a cell of B is significantly slower than A by more than PCT percent")
    args = parser.parse_args(argv)
    if args.fail_above is not None and args.fail_above < 0:
        print(f"error: --fail-above {args.fail_above:g}: must be 0 or more (a percentage)", file=sys.stderr)
        return 2
    folders = [_folder(name) for name in (args.a, args.b)]
    for name, folder in zip((args.a, args.b), folders):
        if folder is None:
            print(f"error: {name}: no such results folder; pass a folder of cell results or the name of "
                  "a run under results/", file=sys.stderr)
            return 2
    sets = []
    for folder in folders:
        loaded = load_results(folder)
        for problem in loaded.problems:
            print(f"note: {problem}", file=sys.stderr)
        sets.append(rows_of([result for _, result in loaded.results]))
    comparison = compare(*sets)
    if not comparison.pairs:
        print(f"error: {args.a} and {args.b} have no successful cell in common (same task, framework, mode, "
              "data, batch, input, devices and precision); compare result sets of the same matrix",
              file=sys.stderr)
        return 2
    print(render(comparison, args.a, args.b))
    if args.fail_above is not None:
        failed = regressions(comparison, args.fail_above)
        for pair in failed:
            print(f"regression: {pair.a.cell.task} {pair.a.cell.framework}: B/A {pair.ratio:.3f}, "
                  f"above {1 + args.fail_above / 100:.3f}", file=sys.stderr)
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
