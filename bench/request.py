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
from .result import ResultCell, ResultSettings
from .specs import FRAMEWORK_SPECS, INFER, TASKS, RunOptions

DEVICES = ("cpu", "gpu")
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
    warmup_steps: int = 5
    steps: int = 20  # timed steps per repeat (throughput mode)
    repeats: int = 5
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
            wanted = int if known[name].type in (int, Optional[int]) else str
            if value is not None and (type(value) is not wanted):
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
        for name, choices in (("framework", FRAMEWORK_SPECS), ("task", TASKS), ("device", DEVICES),
                              ("precision", precision.PRECISIONS), ("mode", MODES), ("data", DATA)):
            if getattr(self, name) not in choices:
                raise RequestError("{} {!r}: use one of {}".format(name, getattr(self, name), ", ".join(choices)))
        for name in ("steps", "repeats", "epochs", "batch_size", "threads", "devices", "image_size",
                     "cells_at_once", "loader_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RequestError("{} {}: must be at least 1".format(name, value))
        if self.warmup_steps < 0:
            raise RequestError("warmup_steps {}: must be at least 0".format(self.warmup_steps))
        spec = TASKS[self.task]
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
        size, epochs, and the cell id."""
        spec = TASKS[self.task]
        filled = replace(self, batch_size=self.batch_size or spec.default_batch_size(self.device),
                         image_size=self.image_size or spec.default_image_size(self.device),
                         epochs=self.epochs or spec.epochs)
        return replace(filled, cell_id=self.cell_id or "{}-{}-{}-{}".format(
            self.task, self.framework, self.device, self.precision))

    @property
    def input_shape(self):
        return TASKS[self.task].input_shape_at(self.resolved().image_size)

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
            devices=asked.devices, input_shape=list(self.input_shape), mode=asked.mode, data=asked.data)

    def settings(self) -> ResultSettings:
        asked = self.resolved()
        return ResultSettings(warmup_steps=asked.warmup_steps, steps=asked.steps, repeats=asked.repeats,
                              epochs=asked.epochs, seed=asked.seed)

    def run_options(self, device: str) -> RunOptions:
        """What the framework's implementation is given; ``device`` is where it computes (the
        CPU when it stands in for a GPU)."""
        asked = self.resolved()
        spec = TASKS[self.task]
        return RunOptions(device=device, devices=asked.devices, seed=asked.seed, threads=asked.threads,
                          batch_size=asked.batch_size, input_shape=self.input_shape,
                          learning_rate=spec.learning_rate * (asked.devices if spec.data_parallel else 1),
                          weights=asked.weights, precision=asked.precision,
                          loader_workers=asked.loader_workers or cpu_cores())


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
