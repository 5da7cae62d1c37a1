#!/usr/bin/env python
"""A history of results: each cell's time run after run, the steps in it, and what changed at
each step; a guard against regressions that stay.

    python harness/history.py RESULTS... [--by date|commit|framework-version|cuda]
                              [--fail-on-regression] [--out DIR] [--json FILE]

RESULTS are run folders, or folders of them. A series is what one cell measured (task,
framework, mode, data, batch, input, devices) on one host and device, at one precision, compile
profile, set of math modes, launcher and thread count; what changes along it is the CUDA,
cuDNN, driver, framework version, image and bench code. Each run folder is a point of it, in
the order the runs finished (a run's repeats of a cell are one point: the median of their
medians); --by commit|framework-version|cuda makes one point of each value instead, in the
order the values were first measured.

Change-points are found in the log of each series' medians (ruptures' Pelt with a median cost,
two points or more on each side, a penalty scaled by the series' own run-to-run noise). Each
is a slowdown or a speed-up between two points, with the medians before and after, their ratio
and the axes whose values differ between the two. It prints a summary, slowdowns first, and a
table for each slowdown; --json FILE writes the same as JSON, --out DIR the summary
(history.txt) and a chart per task (history-<task>.png).

Exit status: 0; 1 with --fail-on-regression when a series' latest change-point is a slowdown
(a regression not undone since); 2 for bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import ruptures

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tabulate import tabulate  # noqa: E402

from bench.result import Result, write_text_atomic  # noqa: E402
from harness.charts import plt, save  # noqa: E402
from harness.compare import AXES, measured  # noqa: E402
from harness.results import load_results  # noqa: E402
from harness.rows import ResultRow  # noqa: E402

# What a new run may change; a series holds every other axis fixed.
CHANGING = ("cuda", "cudnn", "driver", "framework version", "image", "bench code")
FIXED = tuple(axis for axis in AXES if axis not in CHANGING)

# A step needs MIN_SIZE points on each side. A segment costs its points' absolute deviations
# from its median, which one point among two or more cannot drag past the others: so one
# outlying run is never a step, and the newest run alone is not one until the next confirms it.
MIN_SIZE = 2
# The penalty a change-point must pay, in units of the series' noise: BASE + PER_LOG * ln(points).
# Set on simulated series with 3% Gaussian noise (docs/comparing.md gives the rates measured):
# a flat series shows a false step 1.7 to 2.5% of the time at 4 to 6 points, 0.1 to 0.8% at 8 to 50.
PENALTY_BASE, PENALTY_PER_LOG = 6.0, 2.0
# Timings are not known to better than 0.1%: medians that happen to be equal are not noise-free.
NOISE_FLOOR = 0.001


def noise(signal: np.ndarray) -> float:
    """The run-to-run noise of a series of log times: the root mean square of its successive
    differences over √2, leaving out the largest fifth of them (at least one), which a step or an
    outlier would make; no less than NOISE_FLOOR."""
    steps = np.sort(np.abs(np.diff(signal)))
    kept = steps[: len(steps) - max(1, len(steps) // 5)]
    return max(float(np.sqrt(np.mean(kept ** 2) / 2)), NOISE_FLOOR)


def detect(medians: Sequence[float]) -> list[int]:
    """Where a series of median times changes level: the index of the first point after each
    change-point."""
    signal = np.log(np.asarray(medians, dtype=float))
    if len(signal) < 2 * MIN_SIZE:
        return []
    penalty = noise(signal) * (PENALTY_BASE + PENALTY_PER_LOG * np.log(len(signal)))
    ends = ruptures.Pelt(model="l1", min_size=MIN_SIZE, jump=1).fit(signal).predict(pen=penalty)
    return ends[:-1]  # the last end is the series' own


def timed(row: ResultRow) -> bool:
    """A result a history follows: it ran, has a headline time, was measured here, and is not a
    side of an interleaved A/B run, whose two sides differ on purpose (compare.py judges those)."""
    return row.ok and row.headline is not None and row.published is None and row.ab is None


def run_folder(path: Path) -> Path:
    """The run a result file belongs to: the folder holding it, or the one above its cells/."""
    return path.parent.parent if path.parent.name == "cells" else path.parent


@dataclass(frozen=True)
class RunResult:
    run: Path  # the run folder it came from
    row: ResultRow


# What a point gathers, for each --by: a run folder, or a commit or version.
GROUPS: dict[str, Callable[[RunResult], object]] = {
    "date": lambda r: r.run,
    "commit": lambda r: r.row.bench_commit or AXES["bench code"](r.row),
    "framework-version": lambda r: r.row.framework_version,
    "cuda": lambda r: r.row.cuda,
}


@dataclass
class Point:
    group: str  # the run folder (by date), or the commit or version it gathers
    results: list[RunResult]

    @property
    def medians(self) -> list[float]:
        """Each result's median: a run's repeats, or every run of a commit or version."""
        return [r.row.headline.median for r in self.results]

    @property
    def median(self) -> float:
        return float(np.median(self.medians))

    @property
    def interval(self) -> tuple[float, float]:
        """From the lowest first quartile to the highest third quartile of its results' timed
        blocks: one result's interquartile range, widened by its results' disagreement."""
        return (min(r.row.headline.q1 for r in self.results), max(r.row.headline.q3 for r in self.results))

    @property
    def finished(self) -> datetime:
        return max(datetime.fromisoformat(r.row.finished_utc) for r in self.results)

    @property
    def first_finished(self) -> datetime:
        return min(datetime.fromisoformat(r.row.finished_utc) for r in self.results)

    @property
    def runs(self) -> list[str]:
        return sorted({str(r.run) for r in self.results})

    def values(self, axis: str) -> list[str]:
        return sorted({str(AXES[axis](r.row)) for r in self.results})

    def to_json(self) -> dict:
        return {"group": self.group, "runs": self.runs, "finished_utc": self.finished.isoformat(),
                "median_s": self.median, "interval_s": list(self.interval), "medians_s": self.medians}


@dataclass
class ChangePoint:
    before: Point  # the last point before the change
    after: Point  # the first point after it
    median_before: float  # the median of the points' medians since the previous change-point
    median_after: float  # ... and until the next
    points_before: int
    points_after: int
    changed: dict[str, tuple[list[str], list[str]]]  # axis -> its values before and after, where they differ

    @property
    def ratio(self) -> float:
        return self.median_after / self.median_before

    @property
    def slowdown(self) -> bool:
        return self.ratio > 1

    @property
    def kind(self) -> str:
        return "slowdown" if self.slowdown else "speed-up"

    def what_changed(self) -> str:
        return "; ".join(f"{axis} {', '.join(before)} → {', '.join(after)}"
                         for axis, (before, after) in self.changed.items()) or "none of the recorded axes"


@dataclass
class Series:
    row: ResultRow  # one of its results: what the series holds fixed
    points: list[Point]
    change_points: list[ChangePoint] = field(default_factory=list)

    @property
    def task(self) -> str:
        return self.row.cell.task

    @property
    def label(self) -> str:
        """Its line on its task's chart: framework, device and what else it holds fixed, where not
        the default."""
        cell = self.row.cell
        devices = f"{cell.devices} × " if cell.devices > 1 else ""
        parts = [cell.framework, devices + self.row.device_label(threads=True), cell.precision]
        parts += [value for value, usual in ((cell.compile, "default"), (cell.mode, "throughput"),
                                             (cell.data, "synthetic")) if value != usual]
        return ", ".join(parts) + (f" on {self.row.host}" if self.row.host else "")

    @property
    def name(self) -> str:
        return f"{self.task}: {self.label}"

    @property
    def unresolved(self) -> bool:
        """Its latest change-point is a slowdown: a regression not undone since."""
        return bool(self.change_points) and self.change_points[-1].slowdown

    def to_json(self) -> dict:
        cell = self.row.cell
        return {"name": self.name, "task": cell.task, "framework": cell.framework, "mode": cell.mode,
                "data": cell.data, "batch_size": cell.batch_size, "input_shape": list(cell.input_shape),
                "devices": cell.devices, **{axis: AXES[axis](self.row) for axis in FIXED}}


@dataclass
class History:
    by: str
    series: list[Series]

    @property
    def tracked(self) -> list[Series]:
        """The series with two points or more: those with a history."""
        return [s for s in self.series if len(s.points) > 1]

    @property
    def change_points(self) -> list[tuple[Series, ChangePoint]]:
        """Every change-point with its series: slowdowns first, then speed-ups, the largest first."""
        found = [(s, c) for s in self.series for c in s.change_points]
        return sorted(found, key=lambda sc: (not sc[1].slowdown, -abs(np.log(sc[1].ratio))))

    @property
    def unresolved(self) -> list[Series]:
        return [s for s in self.series if s.unresolved]

    def to_json(self) -> dict:
        return {"by": self.by, "series": len(self.series), "tracked": len(self.tracked),
                "change_points": [{"series": s.to_json(), "kind": c.kind, "ratio": c.ratio,
                                   "latest": c is s.change_points[-1],
                                   "median_before_s": c.median_before, "median_after_s": c.median_after,
                                   "points_before": c.points_before, "points_after": c.points_after,
                                   "before": c.before.to_json(), "after": c.after.to_json(),
                                   "changed": {axis: {"before": before, "after": after}
                                               for axis, (before, after) in c.changed.items()}}
                                  for s, c in self.change_points],
                "unresolved": [s.name for s in self.unresolved]}


def history(results: Sequence[tuple[Path, Result]], by: str = "date") -> History:
    """The series of the results (each result file with its path), their points and change-points."""
    grouped: dict[tuple, list[RunResult]] = defaultdict(list)
    for path, result in results:
        row = ResultRow.of(result)
        if timed(row):
            key = measured(row) + tuple(str(AXES[axis](row)) for axis in FIXED)
            grouped[key].append(RunResult(run_folder(path), row))
    return History(by, sorted((_series(members, by) for members in grouped.values()), key=lambda s: s.name))


def _series(results: list[RunResult], by: str) -> Series:
    groups: dict[str, list[RunResult]] = defaultdict(list)
    for result in results:
        value = GROUPS[by](result)
        groups["none" if value is None else str(value)].append(result)
    # A run is placed by when it finished; a commit or version by when it was first measured.
    points = sorted((Point(group, members) for group, members in groups.items()),
                    key=lambda p: (p.finished if by == "date" else p.first_finished, p.group))
    series = Series(results[0].row, points)
    medians = [p.median for p in points]
    bounds = [0, *detect(medians), len(points)]
    for start, index, end in zip(bounds, bounds[1:], bounds[2:]):
        before, after = points[index - 1], points[index]
        changed = {axis: (before.values(axis), after.values(axis)) for axis in AXES
                   if before.values(axis) != after.values(axis)}
        series.change_points.append(ChangePoint(before, after, float(np.median(medians[start:index])),
                                                float(np.median(medians[index:end])), index - start, end - index,
                                                changed))
    return series


def _when(point: Point) -> str:
    return f"{point.finished:%Y-%m-%d %H:%M}"


def overview(found: History) -> list[dict[str, str]]:
    """One row per change-point, slowdowns first: the summary's table and the report's."""
    return [{"series": s.name,
             "change": f"{c.kind} ×{c.ratio:.3f}" + (", latest" if c is s.change_points[-1] else ""),
             "before": f"{c.before.group} ({_when(c.before)})", "after": f"{c.after.group} ({_when(c.after)})",
             "medians": f"{s.row.headline_text(c.median_before)} → {s.row.headline_text(c.median_after)}",
             "what changed": c.what_changed()}
            for s, c in found.change_points]


def render(found: History) -> str:
    """The summary: counts, a line per change-point (slowdowns first), then a table per slowdown."""
    slowdowns = [(s, c) for s, c in found.change_points if c.slowdown]
    lines = [f"{len(found.series)} series, {len(found.tracked)} with two points or more (by {found.by}); "
             f"{len(found.change_points)} change-point(s): {len(slowdowns)} slowdown(s), "
             f"{len(found.change_points) - len(slowdowns)} speed-up(s); "
             f"{len(found.unresolved)} series whose latest change-point is a slowdown"]
    if found.change_points:
        lines += ["", tabulate(overview(found), headers="keys")]
    for series, change in slowdowns:
        latest = " (latest: unresolved)" if change is series.change_points[-1] else ""
        rows = [["runs", "\n".join(change.before.runs), "\n".join(change.after.runs)],
                ["finished", _when(change.before), _when(change.after)],
                ["median", f"{series.row.headline_text(change.median_before)} ({change.points_before} points)",
                 f"{series.row.headline_text(change.median_after)} ({change.points_after} points)"]]
        if found.by != "date":
            rows.insert(0, [found.by, change.before.group, change.after.group])
        rows += [[axis, ", ".join(before), ", ".join(after)] for axis, (before, after) in change.changed.items()]
        lines += ["", f"slowdown ×{change.ratio:.3f} in {series.name}{latest}",
                  tabulate(rows, headers=["", "before", "after"])]
    return "\n".join(lines)


def draw(found: History, folder: Path) -> dict[str, Path]:
    """A chart per task of its series with two points or more: folder/history-<task>.png."""
    by_task: dict[str, list[Series]] = defaultdict(list)
    for series in found.tracked:
        by_task[series.task].append(series)
    return {task: chart(task, members, found.by, folder / f"history-{task}.png")
            for task, members in sorted(by_task.items())}


def chart(task: str, series: list[Series], by: str, path: Path) -> Path:
    """A line per series: its points' medians with their intervals as error bars, a dashed line
    of its colour at each change-point, labelled with the ratio; a log scale when the times span
    over two decades. By date the x axis is time; else the commits or versions in the order
    they were first measured."""
    order = [] if by == "date" else _first_measured(series)

    def place(point: Point) -> object:
        return point.finished if by == "date" else order.index(point.group)

    figure, axes = plt.subplots(figsize=(9, 4.5))
    for member in series:
        medians = np.array([p.median for p in member.points])
        low, high = np.array([p.interval for p in member.points]).T
        drawn = axes.errorbar([place(p) for p in member.points], medians, yerr=[medians - low, high - medians],
                              marker="o", markersize=3, capsize=2, label=member.label)
        colour = drawn.lines[0].get_color()
        for change in member.change_points:
            before, after = place(change.before), place(change.after)
            at = before + (after - before) / 2
            axes.axvline(at, color=colour, linestyle="--", linewidth=1)
            axes.text(at, 0.98, f"{change.kind} ×{change.ratio:.2f}", transform=axes.get_xaxis_transform(),
                      rotation=90, va="top", ha="right", fontsize=7, color=colour)
    times = [p.median for s in series for p in s.points]
    if max(times) / min(times) > 100:
        axes.set_yscale("log")
    if by == "date":
        figure.autofmt_xdate()
    else:
        axes.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=7)
        axes.set_xlabel(by)
    axes.set_ylabel("seconds (median; bars: interquartile\nrange of its results; lower is faster)")
    axes.set_title(f"{task}: history by {by}", fontsize=10)
    axes.legend(fontsize=7, loc="best")
    return save(figure, path)


def _first_measured(series: list[Series]) -> list[str]:
    """The commits or versions of the series' points, in the order each was first measured."""
    first: dict[str, datetime] = {}
    for point in (p for s in series for p in s.points):
        first[point.group] = min(first.get(point.group, point.first_finished), point.first_finished)
    return sorted(first, key=lambda group: (first[group], group))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python harness/history.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, metavar="RESULTS", help="run folders, or folders of them")
    parser.add_argument("--by", choices=list(GROUPS), default="date",
                        help="a point per run, in the order they finished (date, the default), or per bench "
                             "commit, framework version or CUDA version")
    parser.add_argument("--fail-on-regression", action="store_true",
                        help="exit 1 when a series' latest change-point is a slowdown")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the summary (history.txt) and a chart per task (history-<task>.png) there")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="write the summary as JSON (its shape: docs/comparing.md)")
    args = parser.parse_args(argv)
    results = []
    for folder in args.folders:
        if not folder.is_dir():
            print(f"error: {folder}: no such results folder; pass run folders or folders of them", file=sys.stderr)
            return 2
        loaded = load_results(folder)
        for problem in loaded.problems:
            print(f"note: {problem}", file=sys.stderr)
        if not any(timed(ResultRow.of(result)) for _, result in loaded.results):
            print(f"error: {folder}: no successful cell results in it; pass run folders or folders of them",
                  file=sys.stderr)
            return 2
        results += loaded.results
    found = history(results, args.by)
    text = render(found)
    print(text)
    if args.json:
        write_text_atomic(args.json, json.dumps(found.to_json(), indent=2) + "\n")
    if args.out:
        write_text_atomic(args.out / "history.txt", text + "\n")
        draw(found, args.out)
    for series in found.unresolved if args.fail_on_regression else ():
        change = series.change_points[-1]
        print(f"regression: {series.name}: ×{change.ratio:.3f} since {change.after.group}", file=sys.stderr)
    return 1 if args.fail_on_regression and found.unresolved else 0


if __name__ == "__main__":
    sys.exit(main())
