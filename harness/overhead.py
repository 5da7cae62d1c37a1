#!/usr/bin/env python
"""Overhead benchmark: does the bench's measured step cost what a plain loop costs?

For every framework and task, runs in the framework's own environment, --rounds times (a fresh
process each), the few lines an expert would write (scripts/plain_loops/<framework>_loop.py: the
bench's own network from the cell's seed, the same synthetic batches, layout and batch size, a
plain training or inference loop, timed in blocks as the bench times them) and, in the same
process, the bench's own cell (the bench's configure(), data, model and timed block), their
blocks alternating A B B A ..., so that a host whose speed drifts from one second to the next
slows both sides alike. Each cell block is divided by the plain block beside it; the pair's
ratio is the median of those ratios, with its 95% bootstrap interval (the pairs resampled
whole), beside each side's median seconds per step. A ratio above 1 + --target is overhead of
the bench's to find.

    python harness/overhead.py [--frameworks pytorch jax ...] [--tasks cnn_cifar10 ...] [--rounds 2]

Writes the table as JSON to --out (default results/overhead-<host>.json). Exit status: 0 when
every pair ran and is within the target, 1 when not, 2 for bad input. A benchmark: the figures
depend on the host and on what else runs on it.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tabulate import tabulate  # noqa: E402

from bench.frameworks import KERAS_BACKENDS  # noqa: E402
from bench.result import write_text_atomic  # noqa: E402
from bench.specs import FRAMEWORKS, TASKS  # noqa: E402
from harness.backends.base import REPO_ROOT  # noqa: E402
from harness.backends.local import VirtualenvBackend  # noqa: E402
from harness import significance  # noqa: E402
from harness.parity import LOCAL_FRAMEWORKS  # noqa: E402

PLAIN_LOOPS = REPO_ROOT / "scripts" / "plain_loops"
TIMEOUT_S = 1800


@dataclass
class Pair:
    """One framework and task: seconds per step of every timed block of the plain loop and of
    the cell, all rounds together, plain_s[i] and cell_s[i] run one right after the other.
    Judged on the median of cell_s[i] / plain_s[i]: neighbouring blocks share the host's state
    of the moment, so its slow drift cancels in each ratio, and a burst of interference that
    doubles one block of a pair, as often the plain loop's as the cell's, moves the median of
    the ratios little (it moves the fastest block of either side, or the median of either,
    by up to 2×)."""

    framework: str
    task: str
    batch_size: int
    image_size: int | None
    plain_s: list[float] = field(default_factory=list)
    cell_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.error or not self.plain_s or not self.cell_s:
            return None
        return statistics.median(cell / plain for plain, cell in zip(self.plain_s, self.cell_s))

    @property
    def interval(self) -> tuple[float, float] | None:
        return None if self.ratio is None else significance.paired(self.plain_s, self.cell_s).bootstrap_interval()


def _sizes(task: str) -> list[str]:
    spec = TASKS[task]
    image_size = spec.default_image_size("cpu")
    return ["--batch-size", str(spec.default_batch_size("cpu"))] + (
        ["--image-size", str(image_size)] if image_size else [])


def framework_env(framework: str) -> dict[str, str]:
    """The environment a framework's process runs in: the repository importable, and Keras's
    backend named (and only for Keras: another framework's TensorFlow would read it too)."""
    env = {key: value for key, value in os.environ.items() if key != "KERAS_BACKEND"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    if framework in KERAS_BACKENDS:
        env["KERAS_BACKEND"] = KERAS_BACKENDS[framework]
    return env


def plain_loop_script(framework: str) -> Path:
    return PLAIN_LOOPS / f"{'keras' if framework in KERAS_BACKENDS else framework}_loop.py"


def _run(command: list[str], framework: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=framework_env(framework),
                          timeout=TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    return done.stdout


def step_times(python: Path, framework: str, task: str, timing: list[str]) -> tuple[list[float], list[float]]:
    """Seconds per step of each timed block of the plain loop and of the bench's cell, alternating
    in one process."""
    output = _run([str(python), str(plain_loop_script(framework)), "--task", task, *_sizes(task), *timing,
                   "--cell", framework], framework)
    blocks = json.loads(output.strip().splitlines()[-1])
    return blocks["step_time_s"], blocks["cell_step_time_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python harness/overhead.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frameworks", nargs="+", default=list(LOCAL_FRAMEWORKS), choices=FRAMEWORKS,
                        metavar="FRAMEWORK", help=f"default: all of {', '.join(LOCAL_FRAMEWORKS)}")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), metavar="TASK")
    parser.add_argument("--rounds", type=int, default=1, help="processes per pair, each alternating the plain loop "
                        "and the cell (default 1)")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block (default 3)")
    parser.add_argument("--repeats", type=int, default=12, help="timed blocks a side per process (default 12)")
    parser.add_argument("--target", type=float, default=0.05, help="largest acceptable overhead (default 0.05)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / f"overhead-{socket.gethostname()}.json")
    args = parser.parse_args(argv)
    if min(args.rounds, args.steps, args.repeats) < 1 or args.warmup_steps < 1 or not 0 < args.target < 1:
        parser.error("--rounds, --steps, --repeats and --warmup-steps must be at least 1, --target between 0 and 1")
    image_only = [f for f in args.frameworks if f not in LOCAL_FRAMEWORKS]
    if image_only:
        parser.error(f"--frameworks: {', '.join(image_only)} run only in their own images; "
                     f"choose among {', '.join(LOCAL_FRAMEWORKS)}")

    timing = ["--warmup-steps", str(args.warmup_steps), "--steps", str(args.steps), "--repeats", str(args.repeats)]
    backend = VirtualenvBackend()
    pairs = []
    for framework in args.frameworks:
        backend.prepare_environment(framework, "cpu")
        python = backend.environment_path(framework, "cpu") / "bin" / "python"
        for task in args.tasks:
            spec = TASKS[task]
            pair = Pair(framework, task, spec.default_batch_size("cpu"), spec.default_image_size("cpu"))
            try:
                for _ in range(args.rounds):
                    plain, cell = step_times(python, framework, task, timing)
                    pair.plain_s.extend(plain)
                    pair.cell_s.extend(cell)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                pair.error = str(error)
            pairs.append(pair)
            print(f"{framework} {task}: " + (f"{pair.ratio:.3f}" if pair.ratio else f"failed: {pair.error}"),
                  file=sys.stderr, flush=True)

    rows = [[p.framework, p.task, p.batch_size,
             f"{statistics.median(p.plain_s) * 1000:.1f}" if p.plain_s else "",
             f"{statistics.median(p.cell_s) * 1000:.1f}" if p.cell_s else "",
             f"{p.ratio:.3f}" if p.ratio else f"failed: {p.error}",
             "{:.3f}–{:.3f}".format(*p.interval) if p.interval else ""] for p in pairs]
    print(tabulate(rows, headers=["framework", "task", "batch", "plain loop ms/step", "bench cell ms/step",
                                  "cell / plain", "95% interval"]))
    write_text_atomic(args.out, json.dumps({
        "host": socket.gethostname(), "cpu_count": os.cpu_count(), "target": args.target, "rounds": args.rounds,
        "warmup_steps": args.warmup_steps, "steps": args.steps, "repeats": args.repeats,
        "pairs": [dict(asdict(p), ratio=p.ratio, interval=p.interval)
                  for p in pairs]}, indent=2) + "\n")
    over = [p for p in pairs if p.ratio is None or p.ratio > 1 + args.target]
    for p in over:
        print(f"overhead: {p.framework} {p.task}: " + (f"{p.ratio - 1:+.1%}" if p.ratio else "failed"), file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
