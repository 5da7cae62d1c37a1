"""What every plain loop shares: the task's synthetic batches (bench/data.py's, so both sides
train on the same numbers), the block timing of the bench's throughput protocol, and the JSON
line the overhead benchmark reads. Imports numpy and the bench's numpy-only modules alone."""
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

from bench.data import synthetic, to_layout  # noqa: E402
from bench.specs import INFER, TASKS, TaskSpec  # noqa: E402

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


def main(loops: Dict[str, Callable[[TaskSpec, Tuple[int, ...], int], Tuple[str, Loop]]],
         seed_framework: Optional[Callable[[int], Any]], argv: Optional[Sequence[str]] = None) -> None:
    """Time one task's plain loop: warm-up steps, then ``repeats`` blocks of ``steps`` steps;
    print the seconds per step of each block as JSON. ``seed_framework(SEED)`` seeds the
    framework's global generators before the model is built (None: its keys are explicit)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", required=True, choices=sorted(loops))
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    spec = TASKS[args.task]
    input_shape = spec.input_shape_at(args.image_size)
    if seed_framework:
        seed_framework(SEED)
    layout, (prepare, run) = loops[args.task](spec, input_shape, args.batch_size)
    cycle = itertools.cycle(batches(spec, input_shape, args.batch_size, layout))
    blocks = [prepare([next(cycle) for _ in range(args.warmup_steps)])]
    blocks += [prepare([next(cycle) for _ in range(args.steps)]) for _ in range(args.repeats)]
    run(blocks[0])
    step_times = []
    for block in blocks[1:]:
        start = time.perf_counter()
        run(block)
        step_times.append((time.perf_counter() - start) / args.steps)
    print(json.dumps({"task": args.task, "inference": spec.kind == INFER, "step_time_s": step_times,
                      "median": statistics.median(step_times)}))
