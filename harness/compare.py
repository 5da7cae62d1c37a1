#!/usr/bin/env python
"""Compare B's times with A's, cell by cell, and judge every pair together: faster, slower, or
no difference beyond noise.

    python harness/compare.py A B [--floor AA_RUN ...] [--out DIR] [--fail-above PCT]
    python harness/compare.py AB_RUN [--floor AA_RUN ...] [--out DIR] [--fail-above PCT]

A and B are results folders or the names of runs under results/: two sets measured apart.
Cells are matched on what was measured (framework, task, mode, data, batch size, input,
devices) and on every axis the two sets do not differ in; the axes they do differ in (GPU,
CUDA, cuDNN, driver, framework version, precision, compile profile, math modes, launcher,
threads, image, bench code, host) are what is being compared, and are named first. AB_RUN is
the folder of an interleaved A/B (run_matrix.py --ab AXIS): its sides are compared round by
round, each round's two runs side by side in time; an A/A run (--ab same) gives the host's
noise floor per cell, which --floor applies to any comparison on that host.

Every pair gets the ratio of B's time to A's, a rank test's p-value and a bootstrap interval;
the p-values are corrected together (Benjamini–Hochberg, harness/significance.py). A one-screen
summary comes first: how many pairs are faster, slower or no different, and the geometric mean
of the ratios per framework and per task; then every pair. --out writes it as comparison.md,
comparison.json and a chart, comparison.png.

Exit status: 0, or 1 with --fail-above PCT when a pair is significantly slower by more than
PCT percent (a regression guard for a team's own images), 2 for bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tabulate import tabulate  # noqa: E402

from bench.result import write_json_atomic, write_text_atomic  # noqa: E402
from harness import significance  # noqa: E402
from harness.ab import MANIFEST, SAME  # noqa: E402
from harness.backends.base import REPO_ROOT  # noqa: E402
from harness.charts import plt, save  # noqa: E402
from harness.results import load_results  # noqa: E402
from harness.rows import ResultRow, rows_of  # noqa: E402

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


def floor_key(row: ResultRow) -> tuple:
    """A noise floor holds for one cell on one host: what it measured, where and how."""
    return measured(row) + (row.host, row.device, row.cell.threads, row.cell.precision, row.cell.compile)


@dataclass
class Pair:
    a: ResultRow  # A's result (in an A/B, the last round's)
    b: ResultRow
    a_time: float  # the time compared: the median (in an A/B, the median of the rounds' medians)
    b_time: float
    judged: significance.Judged
    rounds: int | None = None  # an A/B's rounds with both sides measured; None: measured apart
    throttled: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # the slowdowns NVML saw, A's and B's

    @property
    def ratio(self) -> float:
        return self.judged.ratio.value

    @property
    def interval(self) -> tuple[float, float] | None:
        return self.judged.interval

    @property
    def significant(self) -> bool:
        return self.judged.significant

    @property
    def label(self) -> str:
        cell = self.a.cell
        return f"{cell.task} {cell.framework} ({cell.mode}, {self.a.device_label(threads=True)})"

    @property
    def change(self) -> str | None:
        """"slower" or "faster" when B's time differs from A's beyond noise; else None."""
        if not self.significant:
            return None
        return "slower" if self.ratio > 1 else "faster"

    def verdict(self) -> str:
        if self.judged.ratio.p is None:
            return "one value a side: cannot tell change from noise"
        if self.judged.within_floor:
            return f"within this host's noise floor (±{self.judged.floor:.1%})"
        if self.change is None:
            return "no significant difference"
        return f"{self.change} by {abs(self.ratio - 1):.1%}"

    def warning(self) -> str | None:
        """One side ran with its clocks held down and the other did not: the ratio measures that too."""
        throttled_a, throttled_b = self.throttled
        if bool(throttled_a) == bool(throttled_b):
            return None
        side, reasons = ("A", throttled_a) if throttled_a else ("B", throttled_b)
        return (f"{self.label}: only {side} was throttled ({', '.join(reasons)}); its time measures the "
                "GPU's cooling or power limit as well")


@dataclass
class Comparison:
    differing: dict[str, tuple[list, list]]  # axis -> (values in A, values in B)
    pairs: list[Pair]
    only_a: int
    only_b: int
    design: str  # how the pairs were measured: apart, or an interleaved A/B of so many rounds
    floors: dict[tuple, float] = field(default_factory=dict)  # an A/A's noise floor per cell (floor_key)
    unmeasured: int = 0  # an A/B's pairs with no round in which both sides ran

    def counts(self) -> dict[str, int]:
        changes = [pair.change for pair in self.pairs]
        return {"faster": changes.count("faster"), "slower": changes.count("slower"),
                "no difference": changes.count(None),
                "within the noise floor": sum(pair.judged.within_floor for pair in self.pairs)}

    def means(self, by: Callable[[Pair], str]) -> dict[str, significance.GroupMean]:
        groups: dict[str, list[Pair]] = {}
        for pair in self.pairs:
            groups.setdefault(by(pair), []).append(pair)
        return {name: significance.geometric_mean([p.judged.ratio for p in pairs]) for name, pairs in sorted(groups.items())}


def _newest_ok(rows: list[ResultRow], key: Callable[[ResultRow], tuple]) -> dict[tuple, ResultRow]:
    chosen: dict[tuple, ResultRow] = {}
    for row in sorted(rows, key=lambda r: r.finished_utc):
        if row.ok and row.headline:
            chosen[key(row)] = row  # the newest of reruns wins
    return chosen


def _throttled(rows: Iterable[ResultRow]) -> tuple[str, ...]:
    return tuple(sorted({reason for row in rows for reason in row.throttled}))


def compare(a: list[ResultRow], b: list[ResultRow], floors: dict[tuple, float] | None = None) -> Comparison:
    """Two sets measured apart: each pair's timed blocks, side against side."""
    floors = floors or {}
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
    matched = sorted(chosen_a.keys() & chosen_b.keys(), key=str)
    ratios = [significance.unpaired(chosen_a[k].headline.values, chosen_b[k].headline.values) for k in matched]
    judged = significance.judge(ratios, [_floor(floors, chosen_a[k], chosen_b[k]) for k in matched])
    pairs = [Pair(chosen_a[k], chosen_b[k], chosen_a[k].headline.median, chosen_b[k].headline.median, j,
                  throttled=(_throttled([chosen_a[k]]), _throttled([chosen_b[k]])))
             for k, j in zip(matched, judged)]
    return Comparison(differing, pairs, len(chosen_a.keys() - chosen_b.keys()), len(chosen_b.keys() - chosen_a.keys()),
                      "measured apart: each side's timed blocks", floors)


def _floor(floors: dict[tuple, float], a: ResultRow, b: ResultRow) -> float | None:
    """The larger of the two sides' floors: either side's host may be the noisier."""
    known = [floors[floor_key(row)] for row in (a, b) if floor_key(row) in floors]
    return max(known) if known else None


def is_ab_run(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def compare_ab(folder: Path, floors: dict[tuple, float] | None = None) -> tuple[Comparison, list[str]]:
    """An interleaved A/B (or A/A) run: each round's two runs, side by side in time, paired.
    Returns the comparison and the files that were not valid results."""
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    loaded = load_results(folder / "rounds")
    by_turn: dict[tuple[str, int, str], ResultRow] = {}
    for row in rows_of([result for _, result in loaded.results]):
        if row.ab and row.ok and row.headline:
            by_turn[(row.cell.id, row.ab.round, row.ab.side)] = row
    same = manifest["axis"] == SAME
    floors = dict(floors or {})
    measured_pairs, missing = [], 0
    for listed in manifest["pairs"]:
        rounds = [n for n in range(manifest["rounds"])
                  if (listed["a"], n, "A") in by_turn and (listed["b"], n, "B") in by_turn]
        if not rounds:
            missing += 1
            continue
        a_rows = [by_turn[(listed["a"], n, "A")] for n in rounds]
        b_rows = [by_turn[(listed["b"], n, "B")] for n in rounds]
        measured_pairs.append((a_rows, b_rows))
        if same and len(rounds) >= 2:
            floors[floor_key(a_rows[-1])] = significance.noise_floor(
                [b.headline.median / a.headline.median for a, b in zip(a_rows, b_rows)])
    ratios = [significance.paired([r.headline.median for r in a_rows], [r.headline.median for r in b_rows])
              for a_rows, b_rows in measured_pairs]
    # An A/A's own floor is what it measures, not a filter on it.
    judged = significance.judge(ratios, None if same else [_floor(floors, a[-1], b[-1]) for a, b in measured_pairs])
    pairs = [Pair(a_rows[-1], b_rows[-1], float(np.median([r.headline.median for r in a_rows])),
                  float(np.median([r.headline.median for r in b_rows])), verdict, rounds=len(a_rows),
                  throttled=(_throttled(a_rows), _throttled(b_rows)))
             for (a_rows, b_rows), verdict in zip(measured_pairs, judged)]
    values = manifest["values"]
    differing = {} if same else {manifest["axis"]: ([values[0]], [values[1]])}
    design = (f"interleaved {'A/A' if same else 'A/B'} in one run, {manifest['rounds']} rounds, each a fresh "
              f"process a side, paired round by round")
    return Comparison(differing, pairs, 0, 0, design, floors, missing), loaded.problems


def ab_side_names(folder: Path) -> tuple[str, str]:
    """What an A/B run's sides are called: "cuda 12.8" and "cuda 12.6"; an A/A's, its two runs."""
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    if manifest["axis"] == SAME:
        return "first run", "second run"
    return tuple(f"{manifest['axis']} {value}" for value in manifest["values"])


def floors_of(folders: Iterable[Path]) -> dict[tuple, float]:
    """The noise floors the A/A runs in ``folders`` measured, per cell."""
    floors: dict[tuple, float] = {}
    for folder in folders:
        floors.update(compare_ab(folder)[0].floors)
    return floors


# Rendering: the one-screen summary, then every pair; as text, Markdown and JSON.

def _interval_text(interval: tuple[float, float] | None) -> str:
    return f" [{interval[0]:.3f}–{interval[1]:.3f}]" if interval else ""


def summary_lines(comparison: Comparison, a_name: str, b_name: str) -> list[str]:
    if comparison.differing:
        differ = "; ".join(f"{axis} {', '.join(in_a)} → {', '.join(in_b)}"
                           for axis, (in_a, in_b) in comparison.differing.items())
        lines = [f"B ({b_name}) against A ({a_name}); they differ in: {differ}"]
    else:
        lines = [f"B ({b_name}) against A ({a_name}): they differ in none of the recorded axes, a repeat of the "
                 "same measurement"]
    counts = comparison.counts()
    count = len(comparison.pairs)
    lines.append(f"{comparison.design}. {count} pair{'s' if count != 1 else ''} judged together "
                 f"({significance.METHOD} at {significance.ALPHA:.0%}): {counts['faster']} faster, "
                 f"{counts['slower']} slower, {counts['no difference']} no significant difference"
                 + (f" ({counts['within the noise floor']} within the host's noise floor)"
                    if counts["within the noise floor"] else ""))
    floors = [pair.judged.floor for pair in comparison.pairs if pair.judged.floor is not None]
    if not comparison.differing and comparison.floors:
        values = sorted(comparison.floors.values())
        lines.append(f"this host's noise floor (95% of A/A rounds differ by less): median ±{np.median(values):.1%}, "
                     f"largest ±{values[-1]:.1%} over {len(values)} cells")
    elif floors:
        lines.append(f"noise floors applied (from A/A runs): ±{min(floors):.1%} to ±{max(floors):.1%}")
    lines.append("geometric mean of B/A time [95% interval], < 1: B is faster")
    for title, by in (("per framework", lambda p: p.a.cell.framework), ("per task", lambda p: p.a.cell.task)):
        lines.append(f"  {title}: " + "; ".join(
            f"{name} {mean.value:.3f}{_interval_text(mean.interval)} ({mean.pairs} pair{'s' if mean.pairs > 1 else ''})"
            for name, mean in comparison.means(by).items()))
    few = sorted({pair.rounds for pair in comparison.pairs if pair.rounds and pair.rounds < significance.SIGN_TEST_ROUNDS})
    if few:
        lines.append(f"note: with {' or '.join(map(str, few))} rounds the sign test can call no pair different "
                     f"({significance.SIGN_TEST_ROUNDS} rounds at least, all agreeing); the ratios are still measured")
    lines += [f"warning: {w}" for w in (pair.warning() for pair in comparison.pairs) if w]
    if comparison.only_a or comparison.only_b:
        lines.append(f"not compared: {comparison.only_a} cell(s) only in A, {comparison.only_b} only in B")
    if comparison.unmeasured:
        lines.append(f"not compared: {comparison.unmeasured} pair(s) with no round in which both sides ran")
    return lines


def detail_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    headers = ["task", "framework", "mode", "device (A)", "A", "B", "B/A time [interval]", "q", "noise floor",
               "verdict"]
    rows = []
    for pair in comparison.pairs:
        judged = pair.judged
        floor = comparison.floors.get(floor_key(pair.a), judged.floor)
        level = f" ({judged.level:.1%})" if judged.interval and abs(judged.level - 0.95) > 1e-9 else ""
        rows.append([pair.a.cell.task, pair.a.cell.framework, pair.a.cell.mode, pair.a.device_label(threads=True),
                     pair.a.headline_text(pair.a_time), pair.b.headline_text(pair.b_time),
                     f"{pair.ratio:.3f}{_interval_text(judged.interval)}{level}",
                     "" if judged.q is None else f"{judged.q:.2g}", "" if floor is None else f"±{floor:.1%}",
                     pair.verdict()])
    return headers, rows


def render(comparison: Comparison, a_name: str, b_name: str) -> str:
    headers, rows = detail_rows(comparison)
    return "\n".join(summary_lines(comparison, a_name, b_name) + ["", tabulate(rows, headers=headers)])


def markdown(comparison: Comparison, a_name: str, b_name: str) -> str:
    headers, rows = detail_rows(comparison)
    summary = summary_lines(comparison, a_name, b_name)
    bullets = [f"  - {line.strip()}" if line.startswith("  ") else f"- {line}" for line in summary[1:]]
    return "\n".join([f"## {summary[0]}", "", *bullets, "",
                      tabulate(rows, headers=headers, tablefmt="github"), "",
                      "Intervals are percentile bootstrap intervals of the ratio (95%; pairs the correction selects "
                      "get the level that keeps the false-coverage rate at 5%); q is the p-value adjusted for the "
                      "number of pairs.", ""])


def _listed(interval: tuple[float, float] | None) -> list[float] | None:
    return list(interval) if interval else None


def as_json(comparison: Comparison, a_name: str, b_name: str) -> dict:
    """The comparison for CI systems (documented in docs/comparing.md)."""
    def mean(group: significance.GroupMean) -> dict:
        return {"pairs": group.pairs, "ratio": group.value, "interval": _listed(group.interval)}

    return {
        "a": a_name, "b": b_name, "design": comparison.design,
        "differing": {axis: {"a": in_a, "b": in_b} for axis, (in_a, in_b) in comparison.differing.items()},
        "method": significance.METHOD, "alpha": significance.ALPHA, "counts": comparison.counts(),
        "geometric_mean": {"framework": {k: mean(v) for k, v in comparison.means(lambda p: p.a.cell.framework).items()},
                           "task": {k: mean(v) for k, v in comparison.means(lambda p: p.a.cell.task).items()}},
        "pairs": [{"task": p.a.cell.task, "framework": p.a.cell.framework, "mode": p.a.cell.mode,
                   "device": p.a.device_label(threads=True), "a_cell": p.a.cell.id, "b_cell": p.b.cell.id,
                   "a_time": p.a_time, "b_time": p.b_time, "ratio": p.ratio, "interval": _listed(p.interval),
                   "level": p.judged.level, "p": p.judged.ratio.p, "q": p.judged.q, "rounds": p.rounds,
                   "noise_floor": p.judged.floor, "significant": p.significant, "verdict": p.verdict(),
                   "warning": p.warning()} for p in comparison.pairs],
        "noise_floors": [{"cell": list(map(str, key)), "floor": value} for key, value in comparison.floors.items()],
        "only_a": comparison.only_a, "only_b": comparison.only_b, "unmeasured": comparison.unmeasured,
    }


def chart(comparison: Comparison, path: Path, a_name: str, b_name: str) -> Path:
    """One row per pair: the ratio with its interval on a log scale, 1 marked, the host's noise
    floor shaded; slower pairs red, faster green, the rest grey."""
    pairs = comparison.pairs
    figure, axes = plt.subplots(figsize=(9, 1.4 + 0.32 * len(pairs)))
    colours = {"slower": "#c0392b", "faster": "#27ae60"}
    for row, pair in enumerate(pairs):
        colour = colours.get(pair.change, "#7f8c8d")
        low, high = pair.interval or (pair.ratio, pair.ratio)
        axes.errorbar([pair.ratio], [row], xerr=[[pair.ratio - low], [high - pair.ratio]], fmt="o", color=colour,
                      capsize=3)
        if pair.judged.floor is not None:
            axes.fill_betweenx([row - 0.4, row + 0.4], 1 - pair.judged.floor, 1 + pair.judged.floor,
                               color="#f1c40f", alpha=0.25, linewidth=0)
    axes.axvline(1, color="black", linewidth=0.8)
    axes.set_yticks(range(len(pairs)), [pair.label for pair in pairs], fontsize=7)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.set_xlabel(f"time of B ({b_name}) / time of A ({a_name}); < 1: B is faster; shaded: the host's noise floor")
    axes.set_title(f"B against A: {comparison.design}", fontsize=9)
    return save(figure, path)


def write(comparison: Comparison, a_name: str, b_name: str, out: Path) -> None:
    write_text_atomic(out / "comparison.md", markdown(comparison, a_name, b_name))
    write_json_atomic(out / "comparison.json", as_json(comparison, a_name, b_name))
    chart(comparison, out / "comparison.png", a_name, b_name)


def regressions(comparison: Comparison, fail_above_pct: float) -> list[Pair]:
    """Pairs significantly slower in B by more than the threshold."""
    return [p for p in comparison.pairs if p.significant and p.ratio > 1 + fail_above_pct / 100]


def _folder(name: str) -> Path | None:
    for candidate in (Path(name), REPO_ROOT / "results" / name):
        if candidate.is_dir():
            return candidate
    return None


def _rows(folder: Path) -> list[ResultRow]:
    loaded = load_results(folder)
    for problem in loaded.problems:
        print(f"note: {problem}", file=sys.stderr)
    return rows_of([result for _, result in loaded.results])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python harness/compare.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sets", nargs="+", metavar="RESULTS",
                        help="A and B (results folders or run names under results/), or one A/B run folder")
    parser.add_argument("--floor", nargs="+", default=[], metavar="AA_RUN",
                        help="A/A run folders (run_matrix.py --ab same) whose noise floors apply: a difference "
                             "smaller than its cell's floor is called noise")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write comparison.md, comparison.json and comparison.png into this folder")
    parser.add_argument("--fail-above", type=float, default=None, metavar="PCT",
                        help="exit 1 when a cell of B is significantly slower than A by more than PCT percent")
    args = parser.parse_args(argv)
    if args.fail_above is not None and args.fail_above < 0:
        print(f"error: --fail-above {args.fail_above:g}: must be 0 or more (a percentage)", file=sys.stderr)
        return 2
    if len(args.sets) > 2:
        print(f"error: {' '.join(args.sets)}: pass two result sets (A B), or one A/B run folder", file=sys.stderr)
        return 2
    folders = [_folder(name) for name in args.sets + args.floor]
    for name, folder in zip(args.sets + args.floor, folders):
        if folder is None:
            print(f"error: {name}: no such results folder; pass a folder of cell results or the name of "
                  "a run under results/", file=sys.stderr)
            return 2
    sets, floor_runs = folders[:len(args.sets)], folders[len(args.sets):]
    for name, folder in zip(args.floor, floor_runs):
        if not is_ab_run(folder):
            print(f"error: --floor {name}: not an A/A run (it holds no {MANIFEST}); make one with "
                  "run_matrix.py MATRIX --ab same", file=sys.stderr)
            return 2
    floors = floors_of(floor_runs)
    if len(sets) == 1:
        if not is_ab_run(sets[0]):
            print(f"error: {args.sets[0]}: not an A/B run (it holds no {MANIFEST}); pass two result sets A B, "
                  "or the folder of a run_matrix.py --ab run", file=sys.stderr)
            return 2
        comparison, problems = compare_ab(sets[0], floors)
        for problem in problems:
            print(f"note: {problem}", file=sys.stderr)
        names = ab_side_names(sets[0])
    else:
        comparison = compare(_rows(sets[0]), _rows(sets[1]), floors)
        names = list(args.sets)
    if not comparison.pairs:
        print(f"error: {' and '.join(args.sets)}: no successful cell in common (same task, framework, mode, data, "
              "batch, input, devices and precision); compare result sets of the same matrix", file=sys.stderr)
        return 2
    print(render(comparison, *names))
    if args.out:
        write(comparison, *names, args.out)
        print(f"written: {args.out / 'comparison.md'}, comparison.json, comparison.png", file=sys.stderr)
    if args.fail_above is not None:
        failed = regressions(comparison, args.fail_above)
        for pair in failed:
            print(f"regression: {pair.label}: B/A {pair.ratio:.3f}, above {1 + args.fail_above / 100:.3f}",
                  file=sys.stderr)
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
