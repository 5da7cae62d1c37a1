"""The result of one matrix cell: data classes, statistics and atomic writing.

This module and ``result.schema.json`` are the contract between the bench (which
writes results) and the harness (which reads and merges them). Standard library only.
"""
import dataclasses
import hashlib
import json
import os
import random
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from .flops import step_flops_per_example
from .specs import TASKS

# 3: summaries carry mean, coefficient of variation and a 95% interval; 4: env.launcher (was
# env.backend), env.published for published numbers; 5: cell.compile, settings.timing (calibrated
# throughput timing), the time to the first step, full mode's first epochs; 6: the GPUs' state and
# energy over the timed blocks (metrics.gpu_state, energy_j_per_example, examples_per_joule).
SCHEMA_VERSION = 6
SCHEMA_PATH = Path(__file__).with_name("result.schema.json")
BENCH_DIR = Path(__file__).resolve().parent


@dataclass
class ResultCell:
    """What was asked for: one point of the matrix (bench/request.py makes it from a request)."""

    id: str
    framework: str
    task: str
    device: str  # "cpu" or "gpu"
    gpu: Optional[str]  # GPU model name; None for CPU cells
    cuda: Optional[str]  # CUDA version asked for ("auto" = whatever the environment has)
    threads: Optional[int]  # intra/inter-op threads asked for; None = the framework's default
    precision: str
    batch_size: int  # per device
    devices: int  # data-parallel replicas (GPUs, or CPU devices/processes)
    input_shape: List[int]  # one example as the model takes it (C, H, W) or (T,)
    mode: str  # "throughput" or "full"
    data: str  # "real" or "synthetic"
    compile: str = "default"  # "default" (out of the box) or "compiled" (the framework's compiler)


@dataclass
class Timing:
    """Throughput mode's calibrated timing: what was asked, and what it reached."""

    min_block_s: float  # each timed block lasts at least this long
    target_ci: float  # stop once the median's 95% interval is within ±this fraction of it...
    budget_s: float  # ...or once the timed blocks have taken this long...
    max_repeats: int  # ...or after this many blocks
    steps_calibrated: bool  # steps per block chosen to last min_block_s (False: steps were given)
    ci_half_width: Optional[float] = None  # reached: the interval's larger side, over the median
    stopped_by: Optional[str] = None  # "target", "budget" or "max_repeats"
    timed_s: Optional[float] = None  # the timed blocks' total

    @property
    def target_reached(self) -> bool:
        return self.ci_half_width is not None and self.ci_half_width <= self.target_ci


@dataclass
class ResultSettings:
    """How the cell was measured (bench/protocol.py)."""

    warmup_steps: int
    steps: int
    repeats: int
    epochs: int
    seed: int
    # Training examples per epoch (full mode) or in the pool cycled over (throughput mode).
    train_examples: Optional[int] = None
    # Workers of the framework's input pipeline, where it read image files; None: arrays in memory.
    loader_workers: Optional[int] = None
    timing: Optional[Timing] = None  # throughput mode: how steps and repeats were reached


# Bootstrap resamples for the median's confidence interval; seeded, so the same values always
# give the same interval.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass
class Summary:
    """Every measured value plus the statistics the tables show: the median with its
    interquartile range and a 95% bootstrap confidence interval, and the coefficient of
    variation (sample standard deviation over the mean) that marks a noisy measurement."""

    values: List[float]
    median: float
    min: float
    max: float
    q1: float
    q3: float
    iqr: float
    mean: float
    cv: Optional[float]  # None for a single value
    ci95: Optional[List[float]]  # [low, high] of the median; None for a single value

    @classmethod
    def of(cls, values: List[float]) -> "Summary":
        if not values:
            raise ValueError("a summary needs at least one value")
        values = [float(v) for v in values]
        q1, median, q3 = (_quantile(values, q) for q in (0.25, 0.5, 0.75))
        mean = statistics.mean(values)
        cv = statistics.stdev(values) / abs(mean) if len(values) > 1 and mean else None
        return cls(values, median, min(values), max(values), q1, q3, q3 - q1, mean, cv,
                   median_interval(values) if len(values) > 1 else None)


def median_interval(values: List[float], level: float = 0.95) -> List[float]:
    """Percentile bootstrap confidence interval of the median: resample the values with
    replacement, take each resample's median, and read the interval off their distribution.
    With few values it can be no narrower than what the values allow (with 5: at worst from
    the smallest to the largest)."""
    rng = random.Random(BOOTSTRAP_SEED)
    count = len(values)
    medians = sorted(_quantile([values[rng.randrange(count)] for _ in range(count)], 0.5)
                     for _ in range(BOOTSTRAP_RESAMPLES))
    tail = (1 - level) / 2
    return [_quantile(medians, tail), _quantile(medians, 1 - tail)]


def _quantile(values: List[float], q: float) -> float:
    """Linear interpolation between the sorted values (statistics.quantiles' "inclusive"
    method, which keeps quartiles inside the observed range for small samples)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


@dataclass
class GpuState:
    """What the cell's GPUs did while the timed blocks ran (bench/gpu_state.py): NVML read every
    50 ms during each block and once at its end, the pauses between blocks left out. Clocks,
    temperatures and power are one GPU's figures, over every reading of every GPU; None where
    the GPUs report no such figure."""

    samples: int  # readings taken: one per GPU each time
    sm_clock_mhz_min: Optional[float]
    sm_clock_mhz_median: Optional[float]
    sm_clock_mhz_max: Optional[float]
    max_sm_clock_mhz: Optional[int]  # the most the SM clock can run at (the lowest of the GPUs')
    memory_clock_mhz_median: Optional[float]
    temperature_c_min: Optional[float]
    temperature_c_median: Optional[float]
    temperature_c_max: Optional[float]
    power_w_median: Optional[float]
    power_w_max: Optional[float]
    power_limit_w: Optional[float]  # the enforced limit (the lowest of the GPUs')
    energy_j: Optional[float]  # all GPUs, all blocks, from the energy counters (Volta on)
    # Each clock-event reason seen (bench/gpu_state.py names them): the fraction of readings in
    # which it was active; None where the GPUs do not say.
    throttle_reasons: Optional[Dict[str, float]]


@dataclass
class Metrics:
    step_time_s: Optional[Summary] = None  # throughput mode: mean step time of each repeat
    throughput_per_s: Optional[float] = None  # items per second at the median time
    tflops_per_s: Optional[float] = None  # achieved: throughput x the model's FLOPs per example
    # Peak GPU memory of the busiest of the cell's GPUs, and where the figure comes from:
    # "allocator" (the framework's own peak) or "nvml" (sampled use above the start's).
    device_memory_peak_bytes: Optional[int] = None
    device_memory_source: Optional[str] = None
    host_peak_rss_bytes: Optional[int] = None  # this process
    host_child_peak_rss_bytes: Optional[int] = None  # its largest child (loader workers, replicas)
    train_time_s: Optional[Summary] = None  # full mode: training time of each repeat (all epochs)
    epoch_time_s: Optional[Summary] = None  # full mode: every epoch of every repeat
    test_accuracy: Optional[Summary] = None  # full mode, classification: each repeat's, dropout off
    test_roc_auc: Optional[Summary] = None  # full mode, multi-label: mean ROC-AUC of each repeat
    seconds_per_1000: Optional[Summary] = None  # inference: the seed's unit, per repeat
    loss_first: Optional[float] = None
    loss_last: Optional[float] = None
    # Inference: mean and spread of the first batch's outputs (equal across frameworks given
    # the same weights file and seed).
    output_mean: Optional[float] = None
    output_std: Optional[float] = None
    # Until the first step: the framework's import and set-up, the model's build, the first step
    # (tracing, compiling, autotuning, running it); data loading is left out. Seconds.
    import_s: Optional[float] = None
    build_s: Optional[float] = None
    first_step_s: Optional[float] = None
    time_to_first_step_s: Optional[float] = None
    first_epoch_s: Optional[Summary] = None  # full mode: each repeat's first epoch (in epoch_time_s too)
    # gemm_ceiling: each matrix size's rate (bench/ceiling.py); tflops_per_s is the fastest.
    gemm_tflops_per_s: Optional[Dict[str, float]] = None
    # GPU cells: the GPUs' state over the timed blocks, and where their energy counters could be
    # read, the energy those blocks took per example and its inverse (examples/s per watt).
    gpu_state: Optional[GpuState] = None
    energy_j_per_example: Optional[float] = None
    examples_per_joule: Optional[float] = None


@dataclass
class Model:
    parameters: int
    expected_parameters: int
    layout: str  # memory layout of the input batches, e.g. NCHW or NHWC
    note: Optional[str] = None  # why the parameter count differs from the task's, if it does
    weights: Optional[str] = None  # SHA-256 of the weights file loaded; None: random initialisation
    flops_per_example: Optional[int] = None  # per example and step, counted from the layers (flops.py)


@dataclass
class Result:
    cell: ResultCell
    status: str
    settings: Optional[ResultSettings] = None
    error: Optional[str] = None
    metrics: Optional[Metrics] = None
    model: Optional[Model] = None
    env: Dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Result":
        """Rebuild a result from its JSON form (already validated against the schema)."""
        metrics = data.get("metrics")
        if metrics is not None:
            metrics = Metrics(**{key: _metric(key, value) for key, value in metrics.items()})
        settings, model = dict(data.get("settings") or {}), data.get("model")
        if settings.get("timing"):
            settings["timing"] = Timing(**settings["timing"])
        env = dict(data.get("env") or {})
        if "backend" in env:  # schema 3 and before: what launched the bench
            env["launcher"] = env.pop("backend")
        result = cls(
            cell=ResultCell(**data["cell"]),
            status=data["status"],
            settings=ResultSettings(**settings) if settings else None,
            error=data.get("error"),
            metrics=metrics,
            model=Model(**model) if model else None,
            env=env,
            schema_version=data["schema_version"],
        )
        result.add_work_if_missing()
        return result

    def add_work_if_missing(self) -> None:
        """Results written before FLOPs were counted (schema 2) get them from the task's
        layers at the input shape the cell ran."""
        if self.model is None or self.model.flops_per_example is not None or self.cell.task not in TASKS:
            return
        self.model.flops_per_example = step_flops_per_example(TASKS[self.cell.task], tuple(self.cell.input_shape))
        if self.metrics is not None and self.metrics.throughput_per_s:
            self.metrics.tflops_per_s = self.metrics.throughput_per_s * self.model.flops_per_example / 1e12


def _metric(key: str, value: Any) -> Any:
    """One field of Metrics from its JSON form. Results written before a statistic existed
    (schema 2) get it from their values."""
    if key == "gpu_state" and value is not None:
        return GpuState(**value)
    if isinstance(value, dict) and "values" in value:
        return Summary(**value) if "ci95" in value else Summary.of(value["values"])
    return value


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# The mode of a new file under this process's umask (mkstemp's own 0600 would hide results
# from the rest of a team sharing a filesystem). Read once, at import, before any thread starts.
FILE_MODE = 0o666 & ~_umask()


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".{}.".format(path.name), suffix=".tmp", dir=str(path.parent))
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, payload: Dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def bench_sources() -> List[Path]:
    """The bench's source files (code and schema), sorted: what its hash covers and what an
    image copies."""
    return [source for source in sorted(BENCH_DIR.rglob("*"))
            if source.suffix in (".py", ".json") and "__pycache__" not in source.parts]


def bench_code_hash() -> str:
    """SHA-256 over the bench's sources: two results compare only if this matches."""
    digest = hashlib.sha256()
    for source in bench_sources():
        digest.update(source.relative_to(BENCH_DIR).as_posix().encode())
        digest.update(b"\0")
        digest.update(source.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()
