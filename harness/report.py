#!/usr/bin/env python
"""Tables and reports of any set of result folders (a run, or runs from several machines or
clusters merged): the Markdown and CSV tables, a PNG chart per table, and one self-contained
HTML report (tables, charts, the history of cells measured in several runs, environment,
flagged cells) that opens from disk with nothing fetched from anywhere. The tables are printed
too.

    python harness/report.py RESULTS [more folders...] [--out DIR] [--no-charts] [--mixed-bench] [--no-reference]

DIR is where run_matrix.py writes a run's own: the folder itself when there is one, and
results/merged-<UTC time>/ for several. Made from two folders, the report also compares the
second with the first (harness/compare.py: the summary, a chart of the ratios, every pair). --no-charts writes the tables alone. Files that are
not valid cell results are reported and skipped. Published reference numbers
(harness/reference/) join the tables of the protocols they were measured with.
"""
from __future__ import annotations

import argparse
import base64
import html
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.result import Result, write_text_atomic  # noqa: E402
from harness.charts import plt, save  # noqa: E402
from harness.compare import Comparison, compare, detail_rows, summary_lines  # noqa: E402
from harness.compare import chart as comparison_chart  # noqa: E402
from harness.history import draw as draw_history, history, overview  # noqa: E402
from harness.images import REPO_ROOT  # noqa: E402
from harness.reference import published_results  # noqa: E402
from harness.results import load_results  # noqa: E402
from harness.rows import ResultRow, rows_of  # noqa: E402
from harness.tables import Table, build_tables, write_tables  # noqa: E402

# Marks the tables put on a cell's text: the class the HTML gives such a cell, and the heading
# its notes are listed under.
FLAGS = {"⚠": ("unstable", "unstable"), "†": ("mismatch", "parameter count differs"),
         "‡": ("shared", "shared its host"), "♨": ("throttled", "GPU throttled")}
NOT_RUN = ("failed", "timeout", "skipped")


def chart(table: Table, path: Path) -> Path:
    """Horizontal bars: a group per framework, a bar per device column, the median with the
    interquartile range as error bars; a log scale when the times span over two decades."""
    numbers = table.numbers.astype(float)
    frameworks, columns = list(numbers.index), list(numbers.columns)
    height = 0.8 / max(1, len(columns))
    figure, axes = plt.subplots(figsize=(9, 1.2 + 0.3 * len(frameworks) * max(1, len(columns))))
    for offset, column in enumerate(columns):
        medians = numbers[column].to_numpy()
        low = np.clip(medians - table.q1[column].astype(float).to_numpy(), 0, None)
        high = np.clip(table.q3[column].astype(float).to_numpy() - medians, 0, None)
        positions = np.arange(len(frameworks)) + offset * height
        axes.barh(positions, np.nan_to_num(medians), height, xerr=[np.nan_to_num(low), np.nan_to_num(high)],
                  capsize=2, label=column)
    axes.set_yticks(np.arange(len(frameworks)) + height * (len(columns) - 1) / 2, frameworks)
    axes.invert_yaxis()
    values = numbers.to_numpy()[~np.isnan(numbers.to_numpy())]
    if values.size and values.min() > 0 and values.max() / values.min() > 100:
        axes.set_xscale("log")
    better = "longer is better" if table.higher_is_better else "shorter is faster"
    axes.set_xlabel(f"{table.unit} (median, bars: interquartile range; {better})")
    axes.set_title(table.title, fontsize=10)
    axes.legend(fontsize=7, loc="best")
    return save(figure, path)


def _cell_class(text: str) -> str:
    classes = [css for mark, (css, _) in FLAGS.items() if mark in text]
    if text in NOT_RUN:
        classes.append("not-run")
    return " ".join(classes)


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(str(column))}</th>" for column in table.display.columns)
    rows = []
    for framework, row in table.display.iterrows():
        cells = "".join(f'<td class="{_cell_class(str(text))}">{html.escape(str(text))}</td>' for text in row)
        rows.append(f"<tr><th>{html.escape(str(framework))}</th>{cells}</tr>")
    return f'<table><thead><tr><th>framework</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _environment(results: list[Result]) -> pd.DataFrame:
    """One row per place results ran: host, devices, drivers and versions, per framework."""
    rows = [{"host": row.host, "launcher": row.launcher, "device": row.device, "driver": row.gpu_driver,
             "CUDA": row.cuda, "cuDNN": row.cudnn,
             "framework": f"{row.cell.framework} {row.framework_version or ''}".strip(),
             "precision": row.cell.precision, "math modes": row.math_modes, "Python": row.python,
             "image": row.image, "bench": (row.bench_hash or "")[:12]}
            for row in rows_of(results) if not row.published]
    frame = pd.DataFrame(rows)
    return frame.drop_duplicates().sort_values(["host", "device", "framework", "precision"]) if not frame.empty else frame


def _frame_html(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if pd.isna(v) else str(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass(frozen=True)
class Section:
    """A section of the page after the tables, listed in its contents."""

    id: str
    title: str
    body: str  # HTML


def _data_uri(png: Path) -> str:
    return f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"


def history_section(results: list[tuple[Path, Result]], charts: Path) -> Section | None:
    """Every series measured in two runs or more, run after run (harness/history.py): a chart per
    task (charts/history-<task>.png) and the change-points found; None when no series has two."""
    found = history(results)
    if not found.tracked:
        return None
    images = "".join(f'<img alt="history chart: {html.escape(task)}" src="{_data_uri(path)}">'
                     for task, path in draw_history(found, charts).items())
    changes = (_frame_html(pd.DataFrame(overview(found))) if found.change_points
               else "<p>No change-points: every series kept its level.</p>")
    return Section("history", "History", (
        f"<p>{len(found.tracked)} series measured in two runs or more, in the order the runs finished: each "
        "run's median with its interquartile range, and a dashed line where a series changed level "
        "(<code>harness/history.py</code> finds the change-points; slowdowns first below).</p>" + images + changes))


def comparison_section(comparison: Comparison, a_name: str, b_name: str, charts: Path) -> Section:
    """B against A (harness/compare.py): its one-screen summary, a chart of every pair's ratio
    with its interval (charts/comparison.png), and the pairs."""
    summary = summary_lines(comparison, a_name, b_name)
    headers, rows = detail_rows(comparison)
    image = comparison_chart(comparison, charts / "comparison.png", a_name, b_name)
    return Section("comparison", "B against A", (
        f"<p>{html.escape(summary[0])}</p><ul>" + "".join(f"<li>{html.escape(line.strip())}</li>" for line in summary[1:])
        + f'</ul><img alt="comparison chart" src="{_data_uri(image)}">' + _frame_html(pd.DataFrame(rows, columns=headers))))


STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 90em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
thead th { background: #f0f0f0; }
td.unstable { background: #fff4cc; }
td.mismatch { background: #e8e0ff; }
td.not-run { color: #a00; }
td.shared { font-style: italic; }
td.throttled { background: #ffe0cc; }
img { max-width: 100%; border: 1px solid #eee; }
.notes li { font-size: 0.85em; }
"""


def html_report(tables: list[Table], charts: dict[str, Path], results: list[Result], sources: list[Path],
                problems: list[str], sections: Sequence[Section] = ()) -> str:
    flagged = defaultdict(list)
    for table in tables:
        for note in table.notes:
            kind = FLAGS[note[0]][1] if note[0] in FLAGS else "did not run"
            flagged[kind].append(f"{table.title}: {note.lstrip(''.join(FLAGS) + ' ')}")
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        # The browser itself refuses any fetch: everything the page shows is inside it.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        'style-src \'unsafe-inline\'">',
        "<title>dlbench report</title>", f"<style>{STYLE}</style></head><body>",
        "<h1>dlbench report</h1>",
        f"<p>{len(results)} results from "
        f"{html.escape(', '.join(str(s) for s in sources))}; made "
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}. Columns marked "
        "<em>published</em> are the seed's numbers, measured elsewhere and not reproduced here.</p>",
        "<ul>" + "".join(f'<li><a href="#{t.name}">{html.escape(t.title)}</a></li>' for t in tables)
        + "".join(f'<li><a href="#{s.id}">{html.escape(s.title)}</a></li>' for s in sections)
        + '<li><a href="#flagged">Flagged cells</a></li><li><a href="#environment">Environment</a></li></ul>',
    ]
    for table in tables:
        notes = "".join(f"<li>{html.escape(note)}</li>" for note in table.notes)
        parts += [f'<section id="{table.name}"><h2>{html.escape(table.title)}</h2>',
                  f"<p>{html.escape(table.description)}</p>", _table_html(table),
                  f'<img alt="chart: {html.escape(table.title)}" src="{_data_uri(charts[table.name])}">',
                  f'<ul class="notes">{notes}</ul></section>']
    parts += [f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>{s.body}</section>' for s in sections]
    parts.append('<section id="flagged"><h2>Flagged cells</h2>')
    if flagged:
        for kind, entries in flagged.items():
            parts.append(f"<h3>{html.escape(kind)}</h3><ul>" + "".join(f"<li>{html.escape(e)}</li>" for e in entries) + "</ul>")
    else:
        parts.append("<p>None: every cell ran, with stable timings and the task's parameter count.</p>")
    if problems:
        parts.append("<h3>left out</h3><ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in problems) + "</ul>")
    parts += ['</section><section id="environment"><h2>Environment</h2>', _frame_html(_environment(results)),
              "</section></body></html>"]
    return "\n".join(parts) + "\n"


def report(folders: list[Path], out_dir: Path, mixed_bench: bool = False, reference: bool = True,
           charts: bool = True, compared: tuple[Comparison, str, str] | None = None) -> Path | None:
    """Tables (``out_dir/tables/``) and, with ``charts``, the charts and report.html under
    ``out_dir``, with ``compared`` (a comparison and its sides' names) as a section of its
    own, by default the second of two folders against the first; returns the report's path.
    Problems with files go to stderr."""
    loaded = load_results(*folders)
    results = [result for _, result in loaded.results]
    tables, dropped = build_tables(results, mixed_bench, published_results() if reference else ())
    for problem in loaded.problems + dropped:
        print(f"note: {problem}", file=sys.stderr)
    write_tables(tables, results, out_dir / "tables")
    if not charts:
        return None
    drawn = {table.name: chart(table, out_dir / "charts" / f"{table.name}.png") for table in tables}
    page = out_dir / "report.html"
    if compared is None and len(folders) == 2:
        compared = two_sets(loaded.results, *folders)
    sections = [comparison_section(*compared, out_dir / "charts")] if compared else []
    timeline = history_section(loaded.results, out_dir / "charts")
    sections += [timeline] if timeline else []
    write_text_atomic(page, html_report(tables, drawn, results, folders, loaded.problems + dropped, sections))
    return page


def two_sets(loaded: list[tuple[Path, Result]], first: Path, second: Path) -> tuple[Comparison, str, str] | None:
    """The second folder's results against the first's, when they have cells in common."""
    a, b = ([ResultRow.of(result) for path, result in loaded if path.is_relative_to(folder)]
            for folder in (first, second))
    comparison = compare(a, b)
    return (comparison, str(first), str(second)) if comparison.pairs else None


def default_out(folders: list[Path]) -> Path:
    """A run folder's own place, or a new folder under results/ for a merge of several."""
    if len(folders) == 1:
        return folders[0]
    return REPO_ROOT / "results" / f"merged-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python harness/report.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="folders holding cell result JSON files")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write (default: the folder itself when there is one, "
                             "results/merged-<UTC time>/ for several)")
    parser.add_argument("--no-charts", action="store_true", help="write the tables alone: no charts, no HTML page")
    parser.add_argument("--mixed-bench", action="store_true",
                        help="compare results measured by different bench code (by default only the "
                             "newest result's bench hash is shown; the others are listed)")
    parser.add_argument("--no-reference", action="store_true",
                        help="leave the published reference numbers (harness/reference/) out of the tables")
    args = parser.parse_args(argv)
    for folder in args.folders:
        if not folder.is_dir():
            print(f"error: {folder}: no such results folder; pass a folder of cell results", file=sys.stderr)
            return 2
    out = args.out or default_out(args.folders)
    page = report(args.folders, out, args.mixed_bench, not args.no_reference, charts=not args.no_charts)
    print((out / "tables" / "README.md").read_text(encoding="utf-8"))
    print(f"tables: {out / 'tables'}" + (f"; report: {page}" if page else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
