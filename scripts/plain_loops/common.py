"""What every plain loop shares: the task's synthetic batches (bench/data.py's, so both sides
train on the same numbers), the block timing of the bench's throughput protocol, the bench's
own cell built in the same process to alternate with (--cell), and the JSON line the overhead
benchmark reads."""
import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: bench/ is importable

from bench import frameworks  # noqa: E402
from bench.__main__ import load_data  # noqa: E402
from bench.data import synthetic, to_layout  # noqa: E402
from bench.protocol import ThroughputBlocks  # noqa: E402
from bench.request import Request  # noqa: E402
from bench.specs import FRAMEWORKS, INFER, TASKS, TaskSpec  # noqa: E402

Batch = Tuple[np.ndarray, np.ndarray]
# A task's plain loop: given numpy batches, prepare(batches) turns them into whatever the loop
# feeds (outside the clock), run(prepared) trains or infers on all of them and waits for the
# device (inside the clock).
Loop = Tuple[Callable[[List[Batch]], Any], Callable[[Any], Any]]
# Distinct batches cycled through, as the bench's throughput mode does.
DISTINCT_BATCHES = 16
# The bench's default seed (bench/request.py): the plain loop starts from the cell's initial
# weights (a seed's weights can be slower than another's, through denormal numbers) and data.
SEED = 0


def batches(spec: TaskSpec, input_shape: Tuple[int, ...], batch_size: int, layout: str) -> List[Batch]:
    examples = DISTINCT_BATCHES * batch_size
    data = synthetic(spec, input_shape, examples, 0, SEED)
    x = to_layout(data.x_train, layout)
    return [(x[i:i + batch_size], data.y_train[i:i + batch_size]) for i in range(0, examples, batch_size)]


def bench_cell(framework_name: str, spec: TaskSpec, batch_size: int, image_size: Optional[int]) -> ThroughputBlocks:
    """The bench's own cell, as python -m bench builds it for a CPU throughput run on synthetic
    data: the framework configured by the bench, the bench's data and model, the protocol's
    timed block."""
    request = Request(framework=framework_name, task=spec.name, batch_size=batch_size, image_size=image_size,
                      seed=SEED).checked()
    options = request.run_options("cpu")
    framework = frameworks.load(framework_name)
    framework.configure(options)
    model = framework.TASKS[spec.name](spec, options)
    return ThroughputBlocks(model, spec, load_data(request, spec, options), options)


def main(loops: Dict[str, Callable[[TaskSpec, Tuple[int, ...], int], Tuple[str, Loop]]],
         seed_framework: Optional[Callable[[int], Any]], argv: Optional[Sequence[str]] = None) -> None:
    """Time one task's plain loop: warm-up steps, then ``repeats`` blocks of ``steps`` steps;
    print the seconds per step of each block as JSON. ``seed_framework(SEED)`` seeds the
    framework's global generators before the model is built (None: its keys are explicit).

    With --cell FRAMEWORK, the bench's own cell runs in the same process, warmed up alike, and
    the two alternate block by block (A B B A ...), so that whatever else slows the host slows
    both: its blocks are printed beside the plain loop's."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", required=True, choices=sorted(loops))
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cell", choices=FRAMEWORKS, help="the bench's framework name to alternate with")
    args = parser.parse_args(argv)
    spec = TASKS[args.task]
    input_shape = spec.input_shape_at(args.image_size)
    # The cell first: the bench configures the framework (threads, math modes) for both sides.
    cell = bench_cell(args.cell, spec, args.batch_size, args.image_size) if args.cell else None
    if seed_framework:
        seed_framework(SEED)
    layout, (prepare, run) = loops[args.task](spec, input_shape, args.batch_size)
    cycle = itertools.cycle(batches(spec, input_shape, args.batch_size, layout))
    blocks = [prepare([next(cycle) for _ in range(args.warmup_steps)])]
    blocks += [prepare([next(cycle) for _ in range(args.steps)]) for _ in range(args.repeats)]

    def timed(work: Callable[[], Any]) -> float:
        start = time.perf_counter()
        work()
        return (time.perf_counter() - start) / args.steps

    run(blocks[0])
    if cell:
        cell.run(1)  # the protocol's warm-up: the first step alone, then the rest
        cell.run(args.warmup_steps - 1)
    step_times, cell_step_times = [], []
    for index, block in enumerate(blocks[1:]):
        sides = [lambda: step_times.append(timed(lambda: run(block)))]
        if cell:
            sides.append(lambda: cell_step_times.append(timed(lambda: cell.run(args.steps))))
        for side in sides if index % 2 == 0 else sides[::-1]:
            side()
    print(json.dumps({"task": args.task, "inference": spec.kind == INFER, "step_time_s": step_times,
                      "median": statistics.median(step_times), "cell_step_time_s": cell_step_times}))
