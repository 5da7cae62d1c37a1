"""python -m bench --framework pytorch --task cnn_cifar10 --device cpu --out cell.json"""
import argparse
import hashlib
import itertools
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from . import data as datasets
from . import environment, flops, frameworks, memory, precision
from .host import GPU_STAND_IN, compute_device, utc_now
from .protocol import infer_full, measure_throughput, train_full
from .result import Cell, Metrics, Model, Result, Settings, write_json_atomic
from .specs import FRAMEWORKS, INFER, TASKS, RunOptions, TaskSpec, Unsupported

# Throughput mode cycles over this many distinct batches: enough to defeat caches, small
# enough to prepare in a moment.
THROUGHPUT_BATCHES = 16
# Synthetic data for full mode holds at most this much (the seed's data sets, at most).
SYNTHETIC_BYTES = 2 << 30


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--framework", required=True, choices=FRAMEWORKS)
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="gpu = the visible GPUs (the harness sets CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--devices", type=int, default=1,
                        help="data-parallel replicas, for data-parallel tasks: GPUs, or CPU devices")
    parser.add_argument("--out", required=True, type=Path, help="result JSON file (written atomically)")
    parser.add_argument("--mode", choices=("throughput", "full"), default="throughput")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data-dir", type=Path, default=None,
                        help="folder holding the data set, or where to fetch it "
                             "(default: {})".format(datasets.default_data_dir()))
    source.add_argument("--synthetic", action="store_true", help="seeded random data of the real shapes")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat (throughput mode)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None, help="full mode (default: the task's)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="per device (default: the task's, smaller on CPU for some tasks)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input height and width, for tasks ending in global pooling "
                             "(default: the task's, smaller on CPU for some tasks)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="weights file in the canonical format (bench/weights.py); default: random")
    parser.add_argument("--precision", choices=precision.PRECISIONS, default="fp32",
                        help="fp32 (TF32 off), tf32, or mixed precision fp16 / bf16 (bench/precision.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="intra- and inter-op threads of the framework (default: its own choice)")
    parser.add_argument("--cell-id", default=None)
    parser.add_argument("--gpu-model", default=None, help="GPU model the cell asked for (recorded)")
    parser.add_argument("--cuda", default=None, help="CUDA version the cell asked for (recorded)")
    parser.add_argument("--backend", default="direct", help="what launched this process (recorded)")
    parser.add_argument("--cells-at-once", type=int, default=1,
                        help="the most cells the harness runs at once on this host, one per GPU; "
                             "1: each cell alone (recorded)")
    args = parser.parse_args(argv)
    for name in ("steps", "repeats", "epochs", "batch_size", "threads", "devices", "image_size", "cells_at_once"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error("--{} must be at least 1".format(name.replace("_", "-")))
    if args.warmup_steps < 0:
        parser.error("--warmup-steps must be at least 0")
    spec = TASKS[args.task]
    if args.devices > 1 and not spec.data_parallel:
        parser.error("--devices: {} runs on one device; only data-parallel tasks ({}) take more".format(
            spec.name, ", ".join(t.name for t in TASKS.values() if t.data_parallel)))
    if spec.dataset is None and not args.synthetic:
        parser.error("{} times random inputs (the seed's protocol): pass --synthetic".format(spec.name))
    try:
        spec.input_shape_at(args.image_size)
    except ValueError as error:
        parser.error("--image-size: {}".format(error))
    if args.weights is not None and spec.kind != INFER:
        parser.error("--weights: only {} loads a weights file".format(
            ", ".join(t.name for t in TASKS.values() if t.kind == INFER)))
    return args


def load_data(args: argparse.Namespace, spec: TaskSpec, run: RunOptions) -> datasets.Data:
    if args.synthetic:
        if args.mode == "throughput":
            examples = run.global_batch_size * THROUGHPUT_BATCHES
            return datasets.synthetic(spec, run.input_shape, examples, 0, args.seed)
        if spec.kind == INFER:
            return datasets.synthetic(spec, run.input_shape, run.batch_size * spec.timed_batches, 0, args.seed)
        # The real set's size where it fits in memory; fewer examples (recorded) where not.
        example_bytes = 4 * _product(run.input_shape)
        limit = max(SYNTHETIC_BYTES // example_bytes, run.global_batch_size)
        return datasets.synthetic(spec, run.input_shape, min(spec.train_examples, limit),
                                  min(spec.test_examples, limit // 4), args.seed)
    data_dir = args.data_dir or datasets.default_data_dir()
    if spec.dataset == "cifar10":
        return datasets.load_cifar10(datasets.fetch(datasets.CIFAR10_ARCHIVE, data_dir))
    if spec.dataset == "imdb":
        return datasets.load_imdb(datasets.fetch(datasets.IMDB_FILE, data_dir), spec.vocabulary,
                                  spec.input_shape[0])
    if spec.dataset == "chestxray14":
        stored_size = round(run.input_shape[-1] * spec.stored_size_ratio)
        return datasets.load_chestxray14(datasets.chestxray14_folder(data_dir), stored_size)
    raise ValueError("{} has no data set loader".format(spec.name))


def _product(shape: Tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _train_examples(data: datasets.Data) -> int:
    if isinstance(data, datasets.ImageFolderDataset):
        return len(data.train.paths)
    return len(data.x_train)


def run(args: argparse.Namespace, spec: TaskSpec, settings: Settings, options: RunOptions,
        facts: Dict[str, Any]) -> Tuple[Model, Metrics]:
    if args.threads:
        environment.limit_threads(args.threads)  # before the framework starts its thread pools
    if options.device == "cpu" and options.devices > 1:
        environment.expose_cpu_devices(options.devices)
    nvml, gpu = None, {}  # type: Any, Dict[str, Any]
    if options.device == "gpu":
        precision.set_tf32_override(options.precision)  # before the framework loads cuBLAS and cuDNN
        nvml = environment.import_nvml()
        gpu = environment.gpu_info(nvml, os.environ.get("CUDA_VISIBLE_DEVICES")) or {}
    framework = frameworks.load(args.framework)
    precision.check(args.framework, framework.PRECISIONS, options.precision, options.device,
                    gpu.get("compute_capability"))
    framework.configure(options)  # first: TensorFlow's device options only apply before use
    facts.update(framework.describe(options))
    implementation = framework.TASKS.get(spec.name)
    if implementation is None:
        raise NotImplementedError("{} has no implementation of {}".format(args.framework, spec.name))
    data = load_data(args, spec, options)
    if spec.kind != INFER:
        settings.train_examples = _train_examples(data)

    model = implementation(spec, options)
    described = Model(parameters=model.parameter_count(), expected_parameters=spec.expected_parameters,
                      layout=model.layout, note=getattr(model, "parameter_note", None),
                      weights=_sha256(args.weights) if args.weights else None,
                      flops_per_example=flops.step_flops_per_example(spec, options.input_shape))
    more = (implementation(spec, options) for _ in range(settings.repeats - 1))  # a fresh model per repeat
    with memory.NvmlPeakSampler(nvml, os.environ.get("CUDA_VISIBLE_DEVICES")) as sampler:
        if args.mode == "throughput":
            metrics = measure_throughput(model, spec, data, settings, options)
        elif spec.kind == INFER:
            metrics = infer_full(itertools.chain([model], more), spec, data, options)
        else:
            metrics = train_full(itertools.chain([model], more), spec, data, settings, options)
    allocator_peak = framework.device_memory_peak(options)
    if allocator_peak:
        metrics.device_memory_peak_bytes, metrics.device_memory_source = allocator_peak, "allocator"
    elif sampler.peak is not None:
        metrics.device_memory_peak_bytes, metrics.device_memory_source = sampler.peak, "nvml"
    host = memory.host_peak_rss()
    metrics.host_peak_rss_bytes, metrics.host_child_peak_rss_bytes = host["process"], host["largest_child"]
    metrics.tflops_per_s = metrics.throughput_per_s * described.flops_per_example / 1e12
    return described, metrics


def _sha256(path: Path) -> str:
    return datasets.checksum_of(path, "sha256")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    spec = TASKS[args.task]
    options = RunOptions(
        device=compute_device(args.device), devices=args.devices, seed=args.seed, threads=args.threads,
        batch_size=args.batch_size or spec.default_batch_size(args.device),
        input_shape=spec.input_shape_at(args.image_size or spec.default_image_size(args.device)),
        learning_rate=spec.learning_rate * (args.devices if spec.data_parallel else 1),
        weights=str(args.weights) if args.weights else None, precision=args.precision)
    cell = Cell(
        id=args.cell_id or "{}-{}-{}-{}".format(args.task, args.framework, args.device, args.precision),
        framework=args.framework, task=args.task, device=args.device,
        gpu=args.gpu_model if args.device == "gpu" else None,
        cuda=args.cuda if args.device == "gpu" else None, threads=args.threads,
        precision=args.precision, batch_size=options.batch_size, devices=options.devices,
        input_shape=list(options.input_shape), mode=args.mode,
        data="synthetic" if args.synthetic else "real",
    )
    settings = Settings(warmup_steps=args.warmup_steps, steps=args.steps, repeats=args.repeats,
                        epochs=args.epochs or spec.epochs, seed=args.seed)
    started = utc_now()
    facts = {"framework": args.framework}  # type: Dict[str, Any]
    result = Result(cell=cell, status="ok", settings=settings)
    try:
        result.model, result.metrics = run(args, spec, settings, options, facts)
    except Unsupported as error:
        result.status, result.error = "skipped", str(error)
    except Exception as error:  # recorded in the result: the matrix goes on
        traceback.print_exc()
        result.status, result.error = "failed", "{}: {}".format(type(error).__name__, error)
    result.env = dict(environment.collect(options.device, facts), backend=args.backend,
                      cells_at_once=args.cells_at_once,
                      started_utc=started, finished_utc=utc_now())
    if args.device == "gpu":  # which GPUs the launcher (the harness, Slurm) gave the cell
        result.env["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    if options.device != args.device:
        result.env["gpu_stand_in"] = "computed on the CPU ({}=cpu): not a GPU measurement".format(GPU_STAND_IN)
    if environment.mpi_rank() == 0:  # the other MPI workers ran the same cell: one result
        write_json_atomic(args.out, result.to_dict())
    print("{}: {}".format(cell.id, result.status) + (" ({})".format(result.error) if result.error else ""))
    return 0 if result.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
