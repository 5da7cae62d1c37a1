#!/usr/bin/env python
"""Merge every cell result under one or more folders into comparison tables.

    python harness/merge.py results/<run> [more folders...] [--out DIR] [--mixed-bench] [--no-reference]

Prints the tables and writes them (Markdown, CSV) to DIR, by default <first folder>/tables.
Files that are not valid cell results are reported and skipped. Published reference numbers
(harness/reference/) join the tables of the protocols they were measured with.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.reference import published_results  # noqa: E402
from harness.results import add_folder_arguments, load_results, missing_folder  # noqa: E402
from harness.tables import build_tables, write_tables  # noqa: E402


def merge(folders: list[Path], out_dir: Path, mixed_bench: bool = False, reference: bool = True) -> str:
    """Load, tabulate, write; returns the Markdown it wrote. Problems go to stderr."""
    loaded = load_results(*folders)
    tables, dropped = build_tables([result for _, result in loaded.results], mixed_bench,
                                   published_results() if reference else ())
    for problem in loaded.problems + dropped:
        print(f"note: {problem}", file=sys.stderr)
    summary = write_tables(tables, [result for _, result in loaded.results], out_dir)
    return summary.read_text(encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python harness/merge.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_folder_arguments(parser, "where to write the tables")
    args = parser.parse_args(argv)
    problem = missing_folder(args.folders)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    print(merge(args.folders, args.out or args.folders[0] / "tables", args.mixed_bench, not args.no_reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
