"""Published reference numbers (harness/reference/*.yml) as results, marked as published and
not reproduced, so the tables can show them beside fresh results of the same protocol."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bench.result import Metrics, Result, ResultCell, ResultSettings, Summary
from bench.specs import FRAMEWORKS, INFER, TASKS

from .matrix import load_yaml

REFERENCE_DIR = Path(__file__).with_name("reference")
SECONDS = {"s": 1.0, "min": 60.0, "s per 1,000 images": 1.0}


class Device(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    gpu: str
    cuda: str
    cudnn: str
    count: int = Field(1, ge=1)


class Timings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    task: Literal[tuple(TASKS)]  # type: ignore[valid-type]
    unit: Literal[tuple(SECONDS)]  # type: ignore[valid-type]
    data: Literal["real", "synthetic"] = "real"
    values: dict[Literal[FRAMEWORKS], dict[str, float]]  # type: ignore[valid-type]  # framework -> device -> value


class ReferenceSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    source: str
    year: int
    devices: dict[str, Device]
    timings: list[Timings]

    @model_validator(mode="after")
    def _devices_exist(self) -> "ReferenceSet":
        for timing in self.timings:
            for framework, by_device in timing.values.items():
                unknown = set(by_device) - set(self.devices)
                if unknown:
                    raise ValueError(f"{timing.task} {framework}: no device named {', '.join(sorted(unknown))} "
                                     f"under devices; add it there")
        return self


def results_of(reference: ReferenceSet, name: str) -> list[Result]:
    """One result per published number, in the units and shape of a full-mode result."""
    results = []
    for timing in reference.timings:
        spec = TASKS[timing.task]
        for framework, by_device in timing.values.items():
            for device_name, value in by_device.items():
                device = reference.devices[device_name]
                seconds = Summary.of([value * SECONDS[timing.unit]])
                if spec.kind == INFER:
                    metrics = Metrics(seconds_per_1000=seconds, throughput_per_s=1000 / seconds.median)
                else:
                    metrics = Metrics(train_time_s=seconds,
                                      throughput_per_s=spec.train_examples * spec.epochs / seconds.median)
                cell = ResultCell(id=f"{name}.{timing.task}.{framework}.{device_name}.{timing.data}", framework=framework,
                            task=timing.task, device="gpu", gpu=device.gpu, cuda=device.cuda, threads=None,
                            precision="fp32", batch_size=spec.batch_size, devices=device.count,
                            input_shape=list(spec.input_shape), mode="full", data=timing.data)
                results.append(Result(
                    cell=cell, status="ok", metrics=metrics,
                    settings=ResultSettings(warmup_steps=0, steps=0, repeats=1, epochs=spec.epochs, seed=0,
                                      train_examples=None if spec.kind == INFER else spec.train_examples),
                    env={"published": {"source": reference.source, "year": reference.year},
                         "gpu": {"name": device.gpu}, "cuda": device.cuda, "cudnn": device.cudnn,
                         "finished_utc": f"{reference.year}-01-01T00:00:00+00:00"}))
    return results


@functools.cache
def published_results(folder: Path = REFERENCE_DIR) -> tuple[Result, ...]:
    """Every reference set's results (each file under harness/reference/ is one set)."""
    found = []
    for path in sorted(folder.glob("*.yml")):
        found += results_of(load_yaml(path, ReferenceSet)[0], path.stem)
    return tuple(found)
