"""One typed row per result: what the tables, compare.py and report.py read of a result.

A result's ``env`` is free-form JSON written by the bench (and by the harness and backends);
this is the one place that knows its keys, names the device a result ran on, and picks the
time a result is compared by.
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.gpu_state import SLOWDOWNS
from bench.result import Result, ResultCell, Summary

from .peaks import load_peaks


@dataclass(frozen=True)
class Published:
    """Where published numbers (harness/reference/) come from: they ran nowhere here."""

    source: str
    year: int


@dataclass(frozen=True)
class AbTurn:
    """A result's side and round in an interleaved A/B run (env.ab)."""

    side: str  # "A" or "B"
    round: int


@dataclass(frozen=True)
class ResultRow:
    result: Result
    host: str | None  # the node, for results gathered from a cluster
    launcher: str | None  # the backend that ran it (local, docker, slurm...), or direct
    published: Published | None
    gpu_name: str | None  # as the driver names it (GPU cells)
    gpu_driver: str | None
    cpu_model: str | None
    cpu_cores: int | None
    cuda: str | None  # what the environment had (the cell's ``cuda`` is what was asked for)
    cudnn: str | None
    framework_version: str | None
    python: str | None
    image: str | None  # the image's tag, where it ran in one
    ptx_jit: bool  # its image had no native code for the GPU: the driver compiled its PTX
    bench_hash: str | None
    bench_commit: str | None  # the bench's git commit, where it ran from a checkout
    math_modes: str  # in a few words: "bfloat16 compute, TF32 off, XLA"
    cells_at_once: int
    finished_utc: str
    headline: Summary | None  # the time it is compared by (lower is better)
    peak_tflops_per_s: float | None  # of its GPU at its precision (harness/gpu_peaks.yml)
    throttled: tuple[str, ...]  # the slowdowns (bench/gpu_state.py's SLOWDOWNS) seen in its timed blocks
    examples_per_joule: float | None  # examples/s per watt of its GPUs' energy in the timed blocks
    ab: AbTurn | None  # its turn in an interleaved A/B run (harness/ab.py)

    @classmethod
    def of(cls, result: Result) -> "ResultRow":
        env = result.env
        gpu = env.get("gpu") or {}
        published = env.get("published")
        return cls(
            result=result, host=env.get("hostname"), launcher=env.get("launcher"),
            published=Published(**published) if published else None, gpu_name=gpu.get("name"),
            gpu_driver=gpu.get("driver"), cpu_model=env.get("cpu_model"), cpu_cores=env.get("cpu_cores"),
            cuda=env.get("cuda"), cudnn=env.get("cudnn"),
            framework_version=env.get("framework_version"), python=env.get("python"),
            image=(env.get("image") or {}).get("tag"), ptx_jit=(env.get("image") or {}).get("gpu_code") == "ptx-jit",
            bench_hash=env.get("bench_hash"), bench_commit=env.get("bench_commit"),
            math_modes=describe_math_modes(env.get("math_modes")), cells_at_once=env.get("cells_at_once", 1),
            finished_utc=env.get("finished_utc", ""), headline=headline_time(result),
            peak_tflops_per_s=load_peaks().peak(gpu["name"], result.cell.precision) if gpu.get("name") else None,
            throttled=throttled_by(result), examples_per_joule=result.metrics and result.metrics.examples_per_joule,
            ab=AbTurn(env["ab"]["side"], env["ab"]["round"]) if env.get("ab") else None)

    @property
    def cell(self) -> ResultCell:
        return self.result.cell

    @property
    def device(self) -> str:
        """The device a result ran on: "NVIDIA H200", or "CPU (AMD EPYC 7B13, 2 cores)"."""
        return self.device_label()

    def device_label(self, threads: bool = False) -> str:
        """The device; with ``threads``, a CPU's label says the threads the cell asked for (without
        a count each framework picks its own, not always one per core)."""
        if self.cell.device == "gpu":
            return self.gpu_name or self.cell.gpu or "GPU"
        used = f", {self.cell.threads} threads" if threads and self.cell.threads else ""
        return f"CPU ({self.cpu_model or 'unknown CPU'}, {self.cpu_cores or '?'} cores{used})"

    @property
    def ok(self) -> bool:
        return self.result.status == "ok"

    def headline_text(self, value: float | None = None) -> str:
        """The headline time (or ``value``, a time of the same kind) in its unit: per 1,000 items
        (inference), per step, or for training."""
        value = self.headline.median if value is None else value
        if self.result.metrics.seconds_per_1000:
            return f"{value:.3g} s per 1,000"
        if self.cell.mode == "throughput":
            ms = value * 1e3
            return f"{ms:.3g} ms per step" if ms < 100 else f"{ms:,.0f} ms per step"
        return f"{value:.3g} s" if value < 100 else f"{value:,.0f} s"


def rows_of(results: list[Result]) -> list[ResultRow]:
    return [ResultRow.of(result) for result in results]


def headline_time(result: Result) -> Summary | None:
    """The time a result is compared by (lower is better): seconds per 1,000 items for
    inference, the step time in throughput mode, the training time in full mode."""
    metrics = result.metrics
    return metrics and (metrics.seconds_per_1000 or metrics.step_time_s or metrics.train_time_s)


def throttled_by(result: Result) -> tuple[str, ...]:
    """The slowdowns its GPUs reported while the timed blocks ran, in NVML's order; none for a
    result without GPU state (a CPU cell, schema 5 and before)."""
    state = result.metrics and result.metrics.gpu_state
    seen = (state and state.throttle_reasons) or {}
    return tuple(reason for reason in SLOWDOWNS if seen.get(reason))


def describe_math_modes(modes: dict | None) -> str:
    """env.math_modes in a few words ("bfloat16 compute, TF32 off, autotuner on, XLA (jax.jit)"); empty
    for results that predate it."""
    if not modes:
        return ""
    parts = [f"{modes['compute_dtype']} compute"]
    tf32 = {name: modes[f"tf32_{name}"] for name in ("matmul", "convolutions") if modes[f"tf32_{name}"] is not None}
    if len(set(tf32.values())) == 1:
        parts.append(f"TF32 {_on(next(iter(tf32.values())))}")
    elif tf32:
        parts.append(", ".join(f"TF32 {name} {_on(value)}" for name, value in tf32.items()))
    if modes["loss_scaling"]:
        parts.append(f"{modes['loss_scaling']} loss scaling")
    if modes["autotuner"] is not None:
        parts.append(f"autotuner {_on(modes['autotuner'])}")
    if modes.get("compiler"):  # schema 5 on
        parts.append(modes["compiler"])
    elif modes["xla"]:
        parts.append("XLA")
    return ", ".join(parts)


def _on(value: bool) -> str:
    return "on" if value else "off"
