"""python -m bench --framework pytorch --task cnn_cifar10 --device cpu --out cell.json
python -m bench --request cell.request.json --out cell.json   (what the harness runs)

Runs one cell and writes its result. A request file (bench/request.py) and flags say the same
things; flags given beside a request file replace its fields (a launcher passes the paths as
its container sees them)."""
import argparse
import os
import sys
import time
import traceback
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from . import data as datasets
from . import ceiling, environment, flops, frameworks, gpu_state, memory, precision
from .host import GPU_STAND_IN, compute_device, utc_now
from .protocol import ThroughputBlocks, infer_full, measure_throughput, train_full
from .request import BUDGET_S, DATA, DEFAULTS, DEVICES, MIN_BLOCK_S, MODES, Request, RequestError, field_type, read_fields
from .result import Metrics, Model, Result, ResultSettings, write_json_atomic
from .specs import CALIBRATIONS, CEILING, COMPILE_PROFILES, FRAMEWORKS, INFER, TASKS, RunOptions, TaskSpec, Unsupported, task_spec

# Throughput mode cycles over this many distinct batches: enough to defeat caches, small
# enough to prepare in a moment.
THROUGHPUT_BATCHES = 16
# Synthetic data for full mode holds at most this much (the seed's data sets, at most).
SYNTHETIC_BYTES = 2 << 30

# The flag of each request field: its choices, and what it means (the default is the request's).
FLAG_CHOICES = {"framework": FRAMEWORKS, "task": sorted(TASKS) + sorted(CALIBRATIONS), "device": DEVICES,
                "mode": MODES, "data": DATA, "precision": precision.PRECISIONS,
                "compile": COMPILE_PROFILES}
FLAG_HELP = {
    "device": "gpu = the visible GPUs (the launcher sets CUDA_VISIBLE_DEVICES)",
    "devices": "data-parallel replicas, for data-parallel tasks: GPUs, or CPU devices",
    "precision": "fp32 (TF32 off), tf32, or mixed precision fp16 / bf16 (bench/precision.py)",
    "threads": "intra- and inter-op threads of the framework (default: its own choice)",
    "data": "synthetic: seeded random data of the real shapes; real: the data set",
    "data_dir": "folder holding the data set, or where to fetch it (default: {})".format(datasets.default_data_dir()),
    "compile": "default: the framework out of the box; compiled: through its own compiler (torch.compile, XLA)",
    "warmup_steps": "untimed steps, the first (timed alone) included",
    "steps": "timed steps per block (throughput mode; default: as many as last --min-block-s)",
    "min_block_s": "shortest timed block, seconds (default: {} on a CPU, {} on a GPU)".format(
        MIN_BLOCK_S["cpu"], MIN_BLOCK_S["gpu"]),
    "repeats": "timed blocks at least (full mode: runs)",
    "max_repeats": "timed blocks at most",
    "target_ci": "stop adding blocks once the median's 95%% interval is within +-this fraction of it",
    "budget_s": "or once the timed blocks took this long (default: {} s on a CPU, {} s on a GPU)".format(
        BUDGET_S["cpu"], BUDGET_S["gpu"]),
    "epochs": "full mode (default: the task's)",
    "batch_size": "per device (default: the task's, smaller on CPU for some tasks)",
    "image_size": "input height and width, for tasks ending in global pooling (default: the task's, "
                  "smaller on CPU for some tasks)",
    "weights": "weights file in the canonical format (bench/weights.py); default: random",
    "gpu_model": "GPU model the cell asked for (recorded)",
    "cuda": "CUDA version the cell asked for (recorded)",
    "launcher": "what started this process (recorded)",
    "cells_at_once": "the most cells the harness runs at once on this host, one per GPU; 1: each cell alone (recorded)",
    "loader_workers": "workers of the framework's input pipeline over image files (default: one per CPU core)",
}


def parse_args(argv: Optional[List[str]]) -> Tuple[Request, Path]:
    """The request the flags (and the request file) make, and where its result goes."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--request", type=Path, help="a request file (JSON) written by the harness")
    parser.add_argument("--out", required=True, type=Path, help="result JSON file (written atomically)")
    for field in fields(Request):
        default = getattr(DEFAULTS, field.name) if field.name not in ("framework", "task") else None
        help_text = FLAG_HELP.get(field.name, "")
        if default is not None:
            help_text = "{}{}default: {}".format(help_text, "; " if help_text else "", default)
        parser.add_argument("--" + field.name.replace("_", "-"), default=argparse.SUPPRESS,
                            type=field_type(field),
                            choices=FLAG_CHOICES.get(field.name), help=help_text or None)
    args = vars(parser.parse_args(argv))
    source, out = args.pop("request"), args.pop("out")
    try:
        values = read_fields(source) if source else {}
        for name in ("framework", "task"):
            if name not in values and name not in args:
                raise RequestError("--{} is required (or a --request file that has it)".format(name))
        request = Request.from_dict(dict(values, **args), str(source or "the flags")).checked()
    except RequestError as error:
        parser.error(str(error))
    return request, out


def load_data(request: Request, spec: TaskSpec, run: RunOptions) -> datasets.Data:
    if request.data == "synthetic":
        if request.mode == "throughput":
            examples = run.global_batch_size * THROUGHPUT_BATCHES
            return datasets.synthetic(spec, run.input_shape, examples, 0, request.seed)
        if spec.kind == INFER:
            return datasets.synthetic(spec, run.input_shape, run.batch_size * spec.timed_batches, 0, request.seed)
        # The real set's size where it fits in memory; fewer examples (recorded) where not.
        example_bytes = 4 * _product(run.input_shape)
        limit = max(SYNTHETIC_BYTES // example_bytes, run.global_batch_size)
        return datasets.synthetic(spec, run.input_shape, min(spec.train_examples, limit),
                                  min(spec.test_examples, limit // 4), request.seed)
    data_dir = Path(request.data_dir) if request.data_dir else datasets.default_data_dir()
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


def run(request: Request, spec: TaskSpec, settings: ResultSettings, options: RunOptions,
        facts: Dict[str, Any]) -> Tuple[Model, Metrics]:
    started = time.perf_counter()
    if request.threads:
        environment.limit_threads(request.threads)  # before the framework starts its thread pools
    if options.device == "cpu" and options.devices > 1:
        environment.expose_cpu_devices(options.devices)
    nvml, gpu = None, {}  # type: Any, Dict[str, Any]
    if options.device == "gpu":
        precision.set_tf32_override(options.precision)  # before the framework loads cuBLAS and cuDNN
        nvml = environment.import_nvml()
        gpu = environment.gpu_info(nvml, os.environ.get("CUDA_VISIBLE_DEVICES")) or {}
        precision.check_tensor_cores(options.precision, gpu.get("compute_capability"))
    framework = frameworks.load(request.framework)
    framework.configure(options)  # first: TensorFlow's device options only apply before use
    facts.update(framework.describe(options))
    import_s = time.perf_counter() - started
    if spec.kind == CEILING:
        return ceiling.measure(framework, options)
    implementation = framework.TASKS.get(spec.name)
    if implementation is None:
        raise NotImplementedError("{} has no implementation of {}".format(request.framework, spec.name))
    data = load_data(request, spec, options)
    if spec.kind != INFER:
        settings.train_examples = _train_examples(data)

    building = time.perf_counter()
    model = implementation(spec, options)
    build_s = time.perf_counter() - building
    if isinstance(data, datasets.ImageFolderDataset):
        settings.loader_workers = model.loader_workers  # what its input pipeline runs
    described = Model(parameters=model.parameter_count(), expected_parameters=spec.expected_parameters,
                      layout=model.layout, note=getattr(model, "parameter_note", None),
                      weights=_sha256(Path(request.weights)) if request.weights else None,
                      flops_per_example=flops.step_flops_per_example(spec, options.input_shape))
    more = (implementation(spec, options) for _ in range(settings.repeats))  # a fresh model per repeat
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    # On a CPU cell (no nvml) neither sampler reads anything.
    with memory.NvmlPeakSampler(nvml, visible) as sampler, gpu_state.GpuStateSampler(nvml, visible) as monitor:
        if request.mode == "throughput":
            metrics = measure_throughput(model, spec, data, settings, options, monitor)
        else:  # the first step on a model of its own, over one batch: the timed runs start cold
            first = ThroughputBlocks(model, spec, data, options, pool=options.global_batch_size).timed(1)
            if spec.kind == INFER:
                metrics = infer_full(more, spec, data, options, monitor)
            else:
                metrics = train_full(more, spec, data, settings, options, monitor)
            metrics.first_step_s, metrics.loss_first = first
    monitor.record(metrics)
    metrics.import_s, metrics.build_s = import_s, build_s
    metrics.time_to_first_step_s = import_s + build_s + metrics.first_step_s
    if hasattr(model, "math_modes"):  # what the framework chose while it ran, where it may differ
        facts["math_modes"].update(model.math_modes())
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
    request, out = parse_args(argv)
    spec = task_spec(request.task)
    options = request.run_options(compute_device(request.device))
    cell, settings = request.cell(), request.settings()
    started = utc_now()
    facts = {"framework": request.framework}  # type: Dict[str, Any]
    result = Result(cell=cell, status="ok", settings=settings)
    try:
        refused = request.cannot_run(environment.mpi_workers())
        if refused:
            raise Unsupported(refused)
        result.model, result.metrics = run(request, spec, settings, options, facts)
    except Unsupported as error:
        result.status, result.error = "skipped", str(error)
    except Exception as error:  # recorded in the result: the matrix goes on
        traceback.print_exc()
        result.status, result.error = "failed", "{}: {}".format(type(error).__name__, error)
    result.env = dict(environment.collect(options.device, facts), launcher=request.launcher,
                      cells_at_once=request.cells_at_once, started_utc=started, finished_utc=utc_now())
    if request.device == "gpu":  # which GPUs the launcher (the harness, Slurm) gave the cell
        result.env["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    if options.device != request.device:
        result.env["gpu_stand_in"] = "computed on the CPU ({}=cpu): not a GPU measurement".format(GPU_STAND_IN)
    if environment.mpi_rank() == 0:  # the other MPI workers ran the same cell: one result
        write_json_atomic(out, result.to_dict())
    print("{}: {}".format(cell.id, result.status) + (" ({})".format(result.error) if result.error else ""))
    return 0 if result.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
