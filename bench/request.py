"""The request: what one run of the bench measures, the one thing the harness hands it.

The harness writes a request as a JSON file (``python -m bench --request cell.request.json``);
a person can pass the same fields as flags (``--framework pytorch --task cnn_cifar10 ...``),
which build the same request. Every default is the field's default here, and the matrix's
settings take theirs from these. ``cell()`` turns a request into the ``cell`` of its result,
for the bench and for the harness when it records a cell that never ran. ``cannot_run()``
says which requests a framework refuses, for the bench and for the harness's dry run alike.

Standard library only, valid Python 3.6 (the CNTK image's interpreter).
"""
import json
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Dict, Optional

from . import precision
from .host import cpu_cores
from .result import ResultCell, ResultSettings, Timing
from .specs import CALIBRATIONS, CEILING, COMPILE_PROFILES, FRAMEWORK_SPECS, INFER, TASKS, RunOptions, task_spec

DEVICES = ("cpu", "gpu")
# Throughput mode's defaults per device: a timed block lasts at least MIN_BLOCK_S (long enough
# that the clock's and the launch's jitter vanish, and on a CPU a scheduler's time slice), and a
# cell's timed blocks stop after BUDGET_S whether or not the median has settled.
MIN_BLOCK_S = {"cpu": 1.0, "gpu": 0.25}
BUDGET_S = {"cpu": 12.0, "gpu": 30.0}
MODES = ("throughput", "full")
DATA = ("synthetic", "real")


class RequestError(ValueError):
    """A request the bench cannot run as asked: one line naming the field and the fix."""


@dataclass(frozen=True)
class Request:
    framework: str
    task: str
    device: str = "cpu"  # "gpu": the visible GPUs (the launcher sets CUDA_VISIBLE_DEVICES)
    devices: int = 1  # data-parallel replicas, for data-parallel tasks: GPUs, or CPU devices
    precision: str = "fp32"  # bench/precision.py
    threads: Optional[int] = None  # intra- and inter-op threads; None: the framework's own choice
    mode: str = "throughput"  # bench/protocol.py: throughput, or the seed's full protocol
    data: str = "synthetic"  # "synthetic": seeded random data of the real shapes; "real": the data set
    data_dir: Optional[str] = None  # where the data set is, or is fetched to; None: bench/data.py's default
    compile: str = "default"  # specs.COMPILE_PROFILES: out of the box, or through the framework's compiler
    warmup_steps: int = 2  # untimed steps, the first included (the time to the first step)
    # Throughput mode times blocks of steps (bench/protocol.py). ``steps`` per block; None: as
    # many as last at least ``min_block_s`` (None: the device's default), calibrated after warm-up.
    steps: Optional[int] = None
    min_block_s: Optional[float] = None
    # At least ``repeats`` blocks (full mode: exactly, a fresh model each), then more until the
    # median's 95% interval lies within ±target_ci of it, ``max_repeats`` blocks are timed, or the
    # timed blocks have taken ``budget_s`` (None: the device's default).
    repeats: int = 5
    max_repeats: int = 50
    target_ci: float = 0.03
    budget_s: Optional[float] = None
    epochs: Optional[int] = None  # full mode; None: the task's
    batch_size: Optional[int] = None  # per device; None: the task's (smaller on a CPU for some tasks)
    # Input height and width, for tasks ending in global pooling; None: the task's (smaller on a CPU).
    image_size: Optional[int] = None
    weights: Optional[str] = None  # a weights file in the canonical format (bench/weights.py); None: random
    seed: int = 0
    # Workers (processes or threads) of the framework's input pipeline over image files, the same
    # number in every framework; None: one per CPU core the cell may use.
    loader_workers: Optional[int] = None
    cell_id: Optional[str] = None  # None: task-framework-device-precision
    gpu_model: Optional[str] = None  # the GPU model the cell asked for (recorded)
    cuda: Optional[str] = None  # the CUDA version the cell asked for (recorded)
    launcher: str = "direct"  # what started the bench: a harness backend's name, or "direct"
    cells_at_once: int = 1  # the most cells the harness runs at once on this host (recorded)

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "the request") -> "Request":
        """A request from its JSON form; RequestError names an unknown or mistyped field."""
        known = {field.name: field for field in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise RequestError("{}: unknown field {}; the fields are {}".format(
                source, ", ".join(unknown), ", ".join(known)))
        for name, value in values.items():
            wanted = field_type(known[name])
            if value is not None and type(value) is not wanted and not (wanted is float and type(value) is int):
                raise RequestError("{}: {} is {!r}; it takes {}".format(source, name, value, wanted.__name__))
        try:
            return cls(**values)
        except TypeError:
            missing = [f.name for f in fields(cls) if f.name not in values and f.default is MISSING]
            raise RequestError("{}: {} missing; add {}".format(source, ", ".join(missing), missing[0])) from None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def checked(self) -> "Request":
        """The request, after checking each field's range and how the fields fit together."""
        for name, choices in (("framework", FRAMEWORK_SPECS), ("task", tuple(TASKS) + tuple(CALIBRATIONS)),
                              ("device", DEVICES), ("precision", precision.PRECISIONS), ("mode", MODES),
                              ("data", DATA), ("compile", COMPILE_PROFILES)):
            if getattr(self, name) not in choices:
                raise RequestError("{} {!r}: use one of {}".format(name, getattr(self, name), ", ".join(choices)))
        for name in ("steps", "repeats", "max_repeats", "epochs", "batch_size", "threads", "devices", "image_size",
                     "cells_at_once", "loader_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RequestError("{} {}: must be at least 1".format(name, value))
        if self.warmup_steps < 1:
            raise RequestError("warmup_steps {}: must be at least 1 (the first step is never timed)".format(
                self.warmup_steps))
        for name in ("min_block_s", "target_ci", "budget_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise RequestError("{} {}: must be above 0".format(name, value))
        if self.max_repeats < self.repeats:
            raise RequestError("max_repeats {}: must be at least repeats ({})".format(self.max_repeats, self.repeats))
        spec = task_spec(self.task)
        if self.devices > 1 and not spec.data_parallel:
            raise RequestError("devices {}: {} runs on one device; only data-parallel tasks ({}) take more".format(
                self.devices, spec.name, ", ".join(t.name for t in TASKS.values() if t.data_parallel)))
        if spec.dataset is None and self.data != "synthetic":
            raise RequestError("data {}: {} times random inputs (the seed's protocol); use synthetic".format(
                self.data, spec.name))
        if self.data_dir is not None and self.data != "real":
            raise RequestError("data_dir: only real data is read from a folder; drop it, or use data real")
        try:
            spec.input_shape_at(self.image_size)
        except ValueError as error:
            raise RequestError("image_size: {}".format(error)) from None
        if self.weights is not None and spec.kind != INFER:
            raise RequestError("weights: only {} loads a weights file".format(
                ", ".join(t.name for t in TASKS.values() if t.kind == INFER)))
        return self

    def resolved(self) -> "Request":
        """The request with the task's defaults filled in for the device: batch size, image
        size, epochs, timing, and the cell id."""
        spec = task_spec(self.task)
        filled = replace(self, batch_size=self.batch_size or spec.default_batch_size(self.device),
                         image_size=self.image_size or spec.default_image_size(self.device),
                         epochs=self.epochs or spec.epochs,
                         min_block_s=self.min_block_s or MIN_BLOCK_S[self.device],
                         budget_s=self.budget_s or BUDGET_S[self.device])
        return replace(filled, cell_id=self.cell_id or "{}-{}-{}-{}-{}".format(
            self.task, self.framework, self.device, self.precision, self.compile))

    @property
    def input_shape(self):
        return task_spec(self.task).input_shape_at(self.resolved().image_size)

    def cannot_run(self, mpi_workers: int = 1) -> Optional[str]:
        """Why the framework cannot run this request, or None: a precision it has not on the
        device, data parallelism it lacks or must be launched for (``mpi_workers``: the
        processes an MPI launcher started). The bench skips such a cell; the dry run shows it."""
        framework = FRAMEWORK_SPECS[self.framework]
        offered = framework.precisions[self.device]
        if self.precision not in offered:
            why = precision.NOT_ON_CPU.get(self.precision) if self.device == "cpu" else None
            return "{} does not run {} on {}{} (it runs {} there)".format(
                self.framework, self.precision, self.device, ": " + why if why else "", ", ".join(offered))
        if self.devices > 1 and framework.data_parallel is None:
            return framework.no_data_parallel
        if self.compile == "compiled" and framework.compiler is None:
            return framework.no_compiler
        if self.devices > 1 and framework.data_parallel_under_mpi and mpi_workers != self.devices:
            return ("{} trains on several devices with {}: the bench must be started by mpiexec -n {} "
                    "({} process(es) here)".format(self.framework, framework.data_parallel, self.devices, mpi_workers))
        return None

    def cell(self) -> ResultCell:
        """The ``cell`` of this request's result: what was asked for, defaults filled in."""
        asked = self.resolved()
        on_gpu = asked.device == "gpu"
        return ResultCell(
            id=asked.cell_id, framework=asked.framework, task=asked.task, device=asked.device,
            gpu=asked.gpu_model if on_gpu else None, cuda=asked.cuda if on_gpu else None,
            threads=asked.threads, precision=asked.precision, batch_size=asked.batch_size,
            devices=asked.devices, input_shape=list(self.input_shape), mode=asked.mode, data=asked.data,
            compile=asked.compile)

    def settings(self) -> ResultSettings:
        """How the cell is to be measured; throughput mode writes what its timing reached
        (steps per block, repeats) over the asked values."""
        asked = self.resolved()
        timing = None
        if asked.mode == "throughput" and task_spec(asked.task).kind != CEILING:
            timing = Timing(min_block_s=asked.min_block_s, target_ci=asked.target_ci, budget_s=asked.budget_s,
                            max_repeats=asked.max_repeats, steps_calibrated=asked.steps is None)
        return ResultSettings(warmup_steps=asked.warmup_steps, steps=asked.steps or 0, repeats=asked.repeats,
                              epochs=asked.epochs, seed=asked.seed, timing=timing)

    def run_options(self, device: str) -> RunOptions:
        """What the framework's implementation is given; ``device`` is where it computes (the
        CPU when it stands in for a GPU)."""
        asked = self.resolved()
        spec = task_spec(self.task)
        return RunOptions(device=device, devices=asked.devices, seed=asked.seed, threads=asked.threads,
                          batch_size=asked.batch_size, input_shape=self.input_shape,
                          learning_rate=spec.learning_rate * (asked.devices if spec.data_parallel else 1),
                          weights=asked.weights, precision=asked.precision,
                          loader_workers=asked.loader_workers or cpu_cores(), compile=asked.compile)


def field_type(field: Any) -> type:
    """int, float or str: what a request field holds (when it is not None)."""
    for kind in (int, float):
        if field.type in (kind, Optional[kind]):
            return kind
    return str


def read_fields(path: Path) -> Dict[str, Any]:
    """The fields of a request file, not yet checked; RequestError when it is not a JSON object."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RequestError("{}: not a readable JSON request ({})".format(path, error)) from None
    if not isinstance(values, dict):
        raise RequestError("{}: a request is a JSON object of fields".format(path))
    return values


DEFAULTS = Request("", "")  # each field's default, for the harness's matrix settings
