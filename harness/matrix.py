"""matrix.yml: validation (pydantic, with file:line errors), expansion into cells.

Axes follow GitHub Actions' matrix rules: the product of the axes, minus every ``exclude``
entry that matches, then each ``include`` entry is merged into every cell whose axis values it
does not contradict, or becomes a new cell when it fits none.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError

from bench.precision import PRECISIONS
from bench.request import DATA, DEFAULTS, MODES, Request
from bench.specs import COMPILE_PROFILES, FRAMEWORK_GROUPS, FRAMEWORK_SPECS, FRAMEWORKS, GEMM_CEILING, INFER, TASKS

from .gpus import names_model

if typing.TYPE_CHECKING:
    from .backends.base import Inventory

AXES = ("framework", "task", "gpu", "cuda", "threads", "devices", "precision", "compile")

# A group name ("keras") stands for each of its frameworks, in axes, include and exclude alike.
FrameworkName = Literal[FRAMEWORKS + tuple(FRAMEWORK_GROUPS)]  # type: ignore[valid-type]
TaskName = Literal[tuple(TASKS)]  # type: ignore[valid-type]
# "auto" = whatever this host has, "cpu" = no GPU, anything else = a GPU model name.
GpuName = typing.Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")]
CudaVersion = typing.Annotated[str, Field(pattern=r"^(auto|\d+\.\d+)$")]
# "auto" = the framework's default; a number sets its intra- and inter-op threads.
Threads = typing.Union[Literal["auto"], typing.Annotated[int, Field(ge=1)]]
# Data-parallel replicas: GPUs of the cell's model, or CPU devices on a CPU cell.
Devices = typing.Annotated[int, Field(ge=1)]
# fp32 (TF32 off), tf32, or mixed precision fp16 / bf16: bench/precision.py.
Precision = Literal[PRECISIONS]  # type: ignore[valid-type]
# default: each framework out of the box; compiled: through its own compiler (bench/specs.py).
CompileProfile = Literal[COMPILE_PROFILES]  # type: ignore[valid-type]


Model = typing.TypeVar("Model", bound=BaseModel)


class MatrixError(Exception):
    """Bad matrix file; the message is one line: file:line: where: what, and the fix."""


# Settings added after cell ids were first published: part of a cell's id only when set, so that
# the ids of earlier results stay what they were.
SETTINGS_ADDED_LATER = ("loader_workers",)


class Settings(BaseModel):
    """How each cell is measured; the ``settings:`` block, overridable per ``include`` entry."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    # The bench's request defaults (bench/request.py), but for the timeout, the harness's own.
    mode: Literal[MODES] = DEFAULTS.mode  # type: ignore[valid-type]
    data: Literal[DATA] = DEFAULTS.data  # type: ignore[valid-type]
    data_dir: Optional[str] = None  # extracted data sets; default: the bench's cache folder
    # Throughput mode's timing (bench/protocol.py): untimed steps, the first included; steps per
    # timed block (None: calibrated to last min_block_s, None: the device's default); at least
    # ``repeats`` blocks, more until the median's 95% interval is within ±target_ci of it, or
    # max_repeats, or budget_s of timed blocks (None: the device's default). Full mode: repeats runs.
    warmup_steps: int = Field(DEFAULTS.warmup_steps, ge=1)
    steps: Optional[int] = Field(DEFAULTS.steps, ge=1)
    min_block_s: Optional[float] = Field(DEFAULTS.min_block_s, gt=0)
    repeats: int = Field(DEFAULTS.repeats, ge=1)
    max_repeats: int = Field(DEFAULTS.max_repeats, ge=1)
    target_ci: float = Field(DEFAULTS.target_ci, gt=0, lt=1)
    budget_s: Optional[float] = Field(DEFAULTS.budget_s, gt=0)
    epochs: Optional[int] = Field(None, ge=1)  # None: the task's (full mode)
    batch_size: Optional[int] = Field(None, ge=1)  # per device; None: the task's
    # Input height and width of tasks that end in global pooling (resnet50_inference,
    # densenet121_xray); None: the task's. Other tasks keep their fixed size.
    image_size: Optional[int] = Field(None, ge=8)
    # A weights file in the canonical format (bench/weights.py) for resnet50_inference,
    # relative to the matrix file; None: random weights (timing does not depend on them).
    weights: Optional[str] = None
    timeout_s: float = Field(1800, gt=0)
    seed: int = DEFAULTS.seed
    # Workers of every framework's input pipeline over image files; None: one per CPU core.
    loader_workers: Optional[int] = Field(DEFAULTS.loader_workers, ge=1)

    def merged(self, override: "Settings | None") -> "Settings":
        if override is None:
            return self
        return self.model_copy(update={name: getattr(override, name) for name in override.model_fields_set})


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    framework: Optional[FrameworkName] = None
    task: Optional[TaskName] = None
    gpu: Optional[GpuName] = None
    cuda: Optional[CudaVersion] = None
    threads: Optional[Threads] = None
    devices: Optional[Devices] = None
    precision: Optional[Precision] = None
    compile: Optional[CompileProfile] = None

    def axis_values(self) -> dict[str, str]:
        return {axis: getattr(self, axis) for axis in AXES if getattr(self, axis) is not None}


class ExcludeEntry(_Entry):
    pass


class IncludeEntry(_Entry):
    settings: Optional[Settings] = None


class Axes(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    framework: list[FrameworkName] = Field(min_length=1)
    task: list[TaskName] = Field(min_length=1)
    gpu: list[GpuName] = Field(["auto"], min_length=1)
    cuda: list[CudaVersion] = Field(["auto"], min_length=1)
    threads: list[Threads] = Field(["auto"], min_length=1)
    devices: list[Devices] = Field([1], min_length=1)
    precision: list[Precision] = Field(["fp32"], min_length=1)
    compile: list[CompileProfile] = Field(["default"], min_length=1)
    include: list[IncludeEntry] = []
    exclude: list[ExcludeEntry] = []


class AbSettings(BaseModel):
    """The ``ab:`` block: run the matrix as an interleaved A/B (harness/ab.py)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    axis: str  # the axis whose two values are the sides, or "same" (A/A: each cell against itself)
    rounds: int = Field(8, ge=2)  # each a fresh run a side


class MatrixFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    matrix: Axes
    settings: Settings = Settings()
    ab: Optional[AbSettings] = None
    # Options of the backend of that name, validated by it (Matrix.section): slurm's cluster options.
    slurm: Optional[dict[str, Any]] = None


@dataclass(frozen=True)
class Cell:
    """One run: a framework on a task on one device, with its settings."""

    framework: str
    task: str
    gpu: str  # "cpu" or a GPU model name
    cuda: str  # "auto" or a version
    threads: str | int  # "auto" or a thread count
    devices: int  # data-parallel replicas; 1 for tasks that are not data-parallel
    precision: str  # fp32, tf32, fp16 or bf16
    settings: Settings
    compile: str = "default"  # or "compiled"

    @property
    def device(self) -> str:
        return "cpu" if self.gpu == "cpu" else "gpu"

    def request(self, launcher: str = "direct", cells_at_once: int = 1, weights: Path | None = None,
                data_dir: Path | None = None) -> Request:
        """What the bench is asked to run for this cell, with the defaults it fills in; paths are
        as the bench will see them (a container's, where it runs in one)."""
        s = self.settings
        return Request(
            framework=self.framework, task=self.task, device=self.device, devices=self.devices,
            precision=self.precision, compile=self.compile, threads=None if self.threads == "auto" else self.threads,
            mode=s.mode, data=s.data, data_dir=str(data_dir) if data_dir else None,
            warmup_steps=s.warmup_steps, steps=s.steps, min_block_s=s.min_block_s, repeats=s.repeats,
            max_repeats=s.max_repeats, target_ci=s.target_ci, budget_s=s.budget_s, epochs=s.epochs,
            batch_size=s.batch_size, image_size=s.image_size, weights=str(weights) if weights else None, seed=s.seed,
            loader_workers=s.loader_workers,
            cell_id=self.id, gpu_model=self.gpu if self.device == "gpu" else None,
            cuda=self.cuda if self.device == "gpu" else None, launcher=launcher, cells_at_once=cells_at_once,
        ).resolved()

    @property
    def batch_size(self) -> int:
        return self.request().batch_size

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.request().input_shape

    @property
    def id(self) -> str:
        """Readable and unique: the axes, then a hash of the settings that change results."""
        unset_later = {name for name in SETTINGS_ADDED_LATER if getattr(self.settings, name) is None}
        measured = self.settings.model_dump(exclude={"timeout_s", *unset_later})
        digest = hashlib.sha256(json.dumps(measured, sort_keys=True).encode()).hexdigest()[:8]
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu.lower()).strip("-")
        return (f"{self.task}.{self.framework}.{gpu}.cuda-{self.cuda}.threads-{self.threads}"
                f".devices-{self.devices}.{self.precision}.{self.compile}.{digest}")

    def to_dict(self) -> dict[str, Any]:
        """The cell as JSON can carry it (to a cluster job); ``from_dict`` reads it back."""
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "settings"},
                "settings": self.settings.model_dump()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Cell":
        return cls(**{**values, "settings": Settings.model_validate(values["settings"])})


@dataclass(frozen=True)
class Matrix:
    path: Path
    spec: MatrixFile
    document: Any  # the parsed YAML, which knows the line of every key

    def cells(self, inventory: Inventory) -> list[Cell]:
        """Expand the matrix for a backend: ``gpu: auto`` becomes each GPU model the backend
        offers (this host's, a cluster's GRES types), or ``cpu`` when there is none."""
        local_models = inventory.names()
        cells: dict[str, Cell] = {}
        for combo in self._combinations():
            chosen = combo.axes
            for gpu in local_models if chosen["gpu"] == "auto" else [chosen["gpu"]]:
                if chosen["gpu"] == "auto" and not combo.included and self._excluded_on_host(chosen, gpu):
                    continue
                cell = fitted(Cell(chosen["framework"], chosen["task"], gpu, chosen["cuda"], chosen["threads"],
                                    chosen["devices"], chosen["precision"], self.spec.settings.merged(combo.settings),
                                    chosen["compile"]))
                cells.setdefault(cell.id, cell)
        return list(cells.values())

    def _excluded_on_host(self, axes: dict[str, Any], gpu: str) -> bool:
        """An exclude entry naming a GPU ("cpu", "H100") also removes the product's ``gpu: auto``
        cells once auto turns into that GPU on this host: ``{gpu: cpu, devices: 2}`` means
        "not on a CPU-only host"."""
        host_axes = {**axes, "gpu": gpu}
        for exclude in self.spec.matrix.exclude:
            for rule in _per_framework(exclude.axis_values()):
                if "gpu" in rule and all(
                        (value == gpu or names_model(value, gpu)) if axis == "gpu" else host_axes[axis] == value
                        for axis, value in rule.items()):
                    return True
        return False

    def _combinations(self) -> list["_Combo"]:
        """The product of the axes, minus excludes, plus includes (GitHub Actions' rules)."""
        axes = {axis: getattr(self.spec.matrix, axis) for axis in AXES}
        axes["framework"] = list(dict.fromkeys(m for name in axes["framework"] for m in _members(name)))
        combos = [_Combo(dict(zip(AXES, values))) for values in itertools.product(*axes.values())]
        for exclude in self.spec.matrix.exclude:
            for rule in _per_framework(exclude.axis_values()):
                combos = [c for c in combos if any(c.axes.get(k) != v for k, v in rule.items())]
        for number, include in enumerate(self.spec.matrix.include):
            for added in _per_framework(include.axis_values()):
                fitting = [c for c in combos if all(c.original.get(k, v) == v for k, v in added.items())]
                for combo in fitting:
                    combo.add(added, include.settings)
                if not fitting:
                    if "framework" not in added or "task" not in added:
                        raise MatrixError(
                            f"{self.place('matrix', 'include', number)}: "
                            f"matrix.include[{number}]: it matches no cell, so it adds one, and a new "
                            f"cell needs both 'framework' and 'task'; add them")
                    defaults = {axis: Axes.model_fields[axis].default[0] for axis in AXES
                                if axis not in ("framework", "task")}
                    combos.append(_Combo(defaults, added, include.settings, included=True))
        return combos

    def place(self, *loc: str | int) -> str:
        """``file:line`` of a key of the file, for errors found after validation."""
        return f"{self.path}:{_line_in(self.document, loc)}"

    def section(self, name: str, model: type[Model]) -> Model:
        """The top-level block ``name`` (a backend's options) validated as ``model``; an empty
        one when the file has none; problems are MatrixErrors with file:line."""
        try:
            return model.model_validate(getattr(self.spec, name) or {})
        except ValidationError as error:
            first = error.errors()[0]
            raise MatrixError(_describe(self.path, self.document, {**first, "loc": (name, *first["loc"])},
                                        MatrixFile, {name: model})) from None


def fitted(cell: Cell) -> Cell:
    """The cell as its task can run it: one device unless the task is data-parallel, the
    task's fixed input size unless it ends in global pooling, random inputs for a task whose
    protocol times random inputs. Cells that become equal are run once."""
    spec = TASKS[cell.task]
    settings = cell.settings
    if not spec.resizable and settings.image_size is not None:
        settings = settings.model_copy(update={"image_size": None})
    if spec.kind != INFER and settings.weights is not None:
        settings = settings.model_copy(update={"weights": None})
    if spec.dataset is None and (settings.data != "synthetic" or settings.data_dir):
        settings = settings.model_copy(update={"data": "synthetic", "data_dir": None})
    devices = cell.devices if spec.data_parallel else 1
    # Where the default already compiles, the compiled profile is the same run.
    compiled = "default" if FRAMEWORK_SPECS[cell.framework].compiles_by_default else cell.compile
    return dataclasses.replace(cell, devices=devices, compile=compiled, settings=settings)


def with_ceilings(cells: list[Cell], runnable: typing.Callable[[Cell], bool]) -> list[Cell]:
    """The cells after a ``gemm_ceiling`` cell for each GPU model (or the CPU), CUDA version,
    thread count and precision they use (bench/ceiling.py), run by the first of the cells' frameworks, in the
    tables' order, that ``runnable`` allows; once per run, whatever the cells' settings."""
    ceilings: dict[tuple[str, str, str | int, str], Cell] = {}
    ordered = sorted(cells, key=lambda cell: FRAMEWORKS.index(cell.framework))
    for cell in ordered:
        key = (cell.gpu, cell.cuda, cell.threads, cell.precision)
        if key in ceilings:
            continue
        settings = cell.settings.model_copy(update={
            "mode": "throughput", "data": "synthetic", "data_dir": None, "batch_size": None, "image_size": None,
            "weights": None, "loader_workers": None})
        ceiling = Cell(cell.framework, GEMM_CEILING.name, cell.gpu, cell.cuda, cell.threads, 1, cell.precision, settings)
        if runnable(ceiling):
            ceilings[key] = ceiling
    return [*ceilings.values(), *cells]


def _members(framework: str) -> tuple[str, ...]:
    return FRAMEWORK_GROUPS.get(framework, (framework,))


def _per_framework(values: dict[str, str]) -> list[dict[str, str]]:
    """An include/exclude entry naming a framework group, as one entry per member."""
    if "framework" not in values:
        return [values]
    return [{**values, "framework": member} for member in _members(values["framework"])]


class _Combo:
    """One row of the matrix while it is expanded; ``original`` holds the axes' own values,
    which an include entry may extend but never overwrite."""

    def __init__(self, original: dict[str, str], added: dict[str, str] | None = None,
                 settings: Settings | None = None, included: bool = False):
        self.original = original
        self.axes = {**original, **(added or {})}
        self.settings = settings
        self.included = included  # a cell an include entry added: excludes never apply to it

    def add(self, added: dict[str, str], settings: Settings | None) -> None:
        self.axes.update(added)
        if settings is not None:
            base = self.settings.model_dump(exclude_unset=True) if self.settings else {}
            self.settings = Settings.model_validate({**base, **settings.model_dump(exclude_unset=True)})


def only(cells: list[Cell], expressions: list[str]) -> list[Cell]:
    """The cells whose axes have the listed values: ``framework=pytorch,jax`` keeps PyTorch's
    and JAX's cells (``keras`` stands for its three backends, a GPU name matches as in the
    matrix); several expressions must all hold. MatrixError names an expression that is not
    ``AXIS=VALUE[,VALUE...]`` or that keeps no cell."""
    for expression in expressions:
        axis, _, listed = expression.partition("=")
        values = [value.strip() for value in listed.split(",") if value.strip()]
        if axis not in AXES or not values:
            raise MatrixError(f"--only {expression}: write AXIS=VALUE[,VALUE...] with an axis of {', '.join(AXES)}, "
                              f"e.g. framework=pytorch,jax")
        if axis == "framework":
            values = [member for value in values for member in _members(value)]

        def kept(cell: Cell) -> bool:
            value = str(getattr(cell, axis))
            return any(value == wanted or (axis == "gpu" and names_model(wanted, value)) for wanted in values)

        remaining = [cell for cell in cells if kept(cell)]
        if not remaining:
            present = sorted({str(getattr(cell, axis)) for cell in cells})
            raise MatrixError(f"--only {expression}: keeps no cell (the {axis} values here: {', '.join(present)}); "
                              f"check the spelling")
        cells = remaining
    return cells


def load(path: Path) -> Matrix:
    """Read and validate a matrix file; every problem is a MatrixError with file:line."""
    spec, document = load_yaml(Path(path), MatrixFile)
    return Matrix(Path(path), spec, document)


def load_yaml(path: Path, model: type[Model]) -> tuple[Model, Any]:
    """A YAML file validated as ``model``, and the parsed document (which knows every key's
    line); any problem is a MatrixError: file:line: where: what, and the fix."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise MatrixError(f"{path}: cannot read the file ({error.strerror}); check the path") from error
    try:
        document = YAML(typ="rt").load(text)
    except MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark else 1
        raise MatrixError(f"{path}:{line}: not valid YAML: {error.problem or error.context}; "
                          f"fix the syntax there") from error
    if not isinstance(document, dict):
        raise MatrixError(f"{path}:1: the file must be a mapping with the keys {', '.join(model.model_fields)}")
    try:
        return model.model_validate(_plain(document)), document
    except ValidationError as error:
        raise MatrixError(_describe(path, document, error.errors()[0], model)) from None


def _plain(node: Any) -> Any:
    """ruamel's round-trip containers as plain dicts and lists (pydantic's strict mode wants those)."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _describe(path: Path, document: Any, error: dict, model: type[BaseModel],
              sections: dict[str, type[BaseModel]] | None = None) -> str:
    loc = tuple(part for part in error["loc"] if not _is_union_tag(part))
    where = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc).replace(".[", "[") or "(top)"
    line = _line_in(document, loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(loc[:-1], model, sections or {}))
        message = f"unknown key {loc[-1]!r}; allowed keys here: {allowed}"
    elif kind == "missing":
        message = f"required key {loc[-1]!r} is missing; add it"
    elif "devices" in loc:
        message = f"{error['input']!r} is not a device count; use a whole number of at least 1"
    elif "threads" in loc:
        message = f"{error['input']!r} is not a thread count; use 'auto' or a whole number of at least 1"
    elif kind == "literal_error":
        message = f"{error['input']!r} is not allowed; allowed: {error['ctx']['expected']}"
    elif kind in ("string_type", "string_pattern_mismatch") and "cuda" in loc:
        message = f"{error['input']!r} is not a CUDA version; use 'auto' or a version like \"12.4\" (quoted)"
    elif kind in ("string_type", "string_pattern_mismatch") and "gpu" in loc:
        message = f"{error['input']!r} is not a GPU name; use 'auto', 'cpu' or a model such as H100"
    else:
        message = f"{error['msg'][0].lower()}{error['msg'][1:]} (got {error['input']!r})"
    return f"{path}:{line}: {where}: {message}"


def _is_union_tag(part: Any) -> bool:
    # pydantic names the branch of an Optional/Literal it tried, or "[key]" for a mapping's key,
    # in the location; not a key of the file.
    return isinstance(part, str) and (part.startswith("literal[") or part in ("str", "int", "float", "[key]"))


def _line_in(node: Any, loc: tuple) -> int:
    """1-based line of the deepest part of ``loc`` present in the YAML document."""
    line = 1
    for part in loc:
        try:
            if isinstance(part, str) and isinstance(node, dict) and part in node:
                line = node.lc.key(part)[0] + 1
            elif isinstance(part, int) and isinstance(node, list) and part < len(node):
                line = node.lc.item(part)[0] + 1
            else:
                break
            node = node[part]
        except (AttributeError, KeyError, TypeError):
            break
    return line


def _allowed_keys(loc: tuple, model: Any, sections: dict[str, type[BaseModel]]) -> list[str]:
    """Field names of the model at ``loc`` inside ``model`` (or inside a section's own model)."""
    if loc and loc[0] in sections:
        model, loc = sections[loc[0]], loc[1:]
    for part in loc:
        if isinstance(part, int) or part not in getattr(model, "model_fields", {}):
            continue
        annotation = model.model_fields[part].annotation
        model = next(t for t in _flatten(annotation) if isinstance(t, type) and issubclass(t, BaseModel))
    return list(model.model_fields)


def _flatten(annotation: Any) -> list[Any]:
    args = typing.get_args(annotation)
    return [annotation] if not args else [t for arg in args for t in _flatten(arg)]
