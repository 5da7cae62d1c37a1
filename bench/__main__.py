"""python -m bench --framework pytorch --task cnn_cifar10 --device cpu --out cell.json"""
from __future__ import annotations

import argparse
import itertools
import sys
import traceback
from pathlib import Path

from . import data as datasets
from . import environment, frameworks
from .host import utc_now
from .protocol import measure_throughput, train_full
from .result import Cell, Model, Result, Settings, write_json_atomic
from .specs import FRAMEWORKS, TASKS, TaskSpec

# Throughput mode cycles over this many distinct batches: enough to defeat caches, small
# enough to prepare in a moment.
THROUGHPUT_BATCHES = 16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--framework", required=True, choices=FRAMEWORKS)
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="gpu = the first visible GPU (the harness sets CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--out", required=True, type=Path, help="result JSON file (written atomically)")
    parser.add_argument("--mode", choices=("throughput", "full"), default="throughput")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data-dir", type=Path, default=None,
                        help="folder holding the extracted data set, or where to fetch it "
                             f"(default: {datasets.default_data_dir()})")
    source.add_argument("--synthetic", action="store_true", help="seeded random data of the real shapes")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat (throughput mode)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None, help="full mode (default: the task's)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the task's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="intra- and inter-op threads of the framework (default: its own choice)")
    parser.add_argument("--cell-id", default=None)
    parser.add_argument("--gpu-model", default=None, help="GPU model the cell asked for (recorded)")
    parser.add_argument("--cuda", default=None, help="CUDA version the cell asked for (recorded)")
    parser.add_argument("--backend", default="direct", help="what launched this process (recorded)")
    args = parser.parse_args(argv)
    for name in ("steps", "repeats", "epochs", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup_steps < 0:
        parser.error("--warmup-steps must be at least 0")
    return args


def load_data(args: argparse.Namespace, spec: TaskSpec, batch_size: int) -> datasets.Dataset:
    if args.synthetic:
        if args.mode == "full":
            return datasets.synthetic(spec, spec.train_examples, spec.test_examples, args.seed)
        return datasets.synthetic(spec, batch_size * THROUGHPUT_BATCHES, 0, args.seed)
    folder = datasets.fetch(datasets.CIFAR10_ARCHIVE, args.data_dir or datasets.default_data_dir())
    return datasets.load_cifar10(folder)


def run(args: argparse.Namespace, spec: TaskSpec, settings: Settings, batch_size: int,
        facts: dict) -> tuple[Model, object]:
    if args.threads:
        environment.limit_threads(args.threads)  # before the framework starts its thread pools
    framework = frameworks.load(args.framework)
    framework.configure(args.device, args.seed, args.threads)  # first: TensorFlow's GPU options only apply before use
    facts.update(framework.describe(args.device))
    implementation = framework.TASKS.get(spec.name)
    if implementation is None:
        raise NotImplementedError(f"{args.framework} has no implementation of {spec.name} yet")
    data = load_data(args, spec, batch_size)

    def make_trainer():
        return implementation(spec, args.device, args.seed)

    trainer = make_trainer()
    model = Model(parameters=trainer.parameter_count(), expected_parameters=spec.expected_parameters,
                  layout=trainer.layout)
    if args.mode == "throughput":
        metrics = measure_throughput(trainer, data, settings, batch_size)
    else:
        more = (make_trainer() for _ in range(settings.repeats - 1))
        metrics = train_full(itertools.chain([trainer], more), data, settings, batch_size)
    return model, metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = TASKS[args.task]
    batch_size = args.batch_size or spec.batch_size
    cell = Cell(
        id=args.cell_id or f"{args.task}-{args.framework}-{args.device}",
        framework=args.framework, task=args.task, device=args.device,
        gpu=args.gpu_model if args.device == "gpu" else None,
        cuda=args.cuda if args.device == "gpu" else None, threads=args.threads,
        precision="fp32", batch_size=batch_size, mode=args.mode,
        data="synthetic" if args.synthetic else "real",
    )
    settings = Settings(warmup_steps=args.warmup_steps, steps=args.steps, repeats=args.repeats,
                        epochs=args.epochs or spec.epochs, seed=args.seed)
    started = utc_now()
    facts: dict = {"framework": args.framework}
    result = Result(cell=cell, status="ok", settings=settings)
    try:
        result.model, result.metrics = run(args, spec, settings, batch_size, facts)
    except Exception as error:  # recorded in the result: the matrix goes on
        traceback.print_exc()
        result.status, result.error = "failed", f"{type(error).__name__}: {error}"
    result.env = {**environment.collect(args.device, facts), "backend": args.backend,
                  "started_utc": started, "finished_utc": utc_now()}
    write_json_atomic(args.out, result.to_dict())
    print(f"{cell.id}: {result.status}" + (f" ({result.error})" if result.error else ""))
    return 0 if result.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
