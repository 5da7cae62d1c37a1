"""The result of one matrix cell: data classes, statistics and atomic writing.

This module and ``result.schema.json`` are the contract between the bench (which
writes results) and the harness (which reads and merges them). Standard library only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("result.schema.json")
BENCH_DIR = Path(__file__).resolve().parent


@dataclass
class Cell:
    """What was asked for: one point of the matrix."""

    id: str
    framework: str
    task: str
    device: str  # "cpu" or "gpu"
    gpu: str | None  # GPU model name; None for CPU cells
    cuda: str | None  # CUDA version asked for ("auto" = whatever the environment has)
    threads: int | None  # intra/inter-op threads asked for; None = the framework's default
    precision: str
    batch_size: int
    mode: str  # "throughput" or "full"
    data: str  # "real" or "synthetic"


@dataclass
class Settings:
    warmup_steps: int
    steps: int
    repeats: int
    epochs: int
    seed: int


@dataclass
class Summary:
    """Every measured value plus the robust statistics the tables show."""

    values: list[float]
    median: float
    min: float
    max: float
    q1: float
    q3: float
    iqr: float

    @classmethod
    def of(cls, values: list[float]) -> "Summary":
        if not values:
            raise ValueError("a summary needs at least one value")
        values = [float(v) for v in values]
        if len(values) == 1:
            q1 = q3 = values[0]
        else:
            # 'inclusive' keeps the quartiles inside the observed range for small samples.
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(values, statistics.median(values), min(values), max(values), q1, q3, q3 - q1)


@dataclass
class Metrics:
    step_time_s: Summary | None = None  # throughput mode: mean step time of each repeat
    throughput_per_s: float | None = None  # items per second at the median step time
    train_time_s: Summary | None = None  # full mode: training time of each repeat (all epochs)
    epoch_time_s: Summary | None = None  # full mode: every epoch of every repeat
    test_accuracy: Summary | None = None  # full mode: accuracy of each repeat, dropout off
    loss_first: float | None = None
    loss_last: float | None = None


@dataclass
class Model:
    parameters: int
    expected_parameters: int
    layout: str  # memory layout of the input batches, e.g. NCHW or NHWC


@dataclass
class Result:
    cell: Cell
    status: str
    settings: Settings | None = None
    error: str | None = None
    metrics: Metrics | None = None
    model: Model | None = None
    env: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Result":
        """Rebuild a result from its JSON form (already validated against the schema)."""
        metrics = data.get("metrics")
        if metrics is not None:
            metrics = Metrics(**{
                key: Summary(**value) if isinstance(value, dict) else value
                for key, value in metrics.items()
            })
        settings, model = data.get("settings"), data.get("model")
        return cls(
            cell=Cell(**data["cell"]),
            status=data["status"],
            settings=Settings(**settings) if settings else None,
            error=data.get("error"),
            metrics=metrics,
            model=Model(**model) if model else None,
            env=data.get("env") or {},
            schema_version=data["schema_version"],
        )


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def bench_code_hash() -> str:
    """SHA-256 over the bench's sources: two results compare only if this matches."""
    digest = hashlib.sha256()
    for source in sorted(BENCH_DIR.rglob("*")):
        if source.suffix in (".py", ".json") and "__pycache__" not in source.parts:
            digest.update(source.relative_to(BENCH_DIR).as_posix().encode())
            digest.update(b"\0")
            digest.update(source.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()
