"""Runs the cells of a matrix one by one through a backend, each in its own process with a
timeout. Whatever happens to a cell is recorded in its JSON and the matrix goes on; a cell
whose successful result is already there is not run again."""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from bench import result as contract
from bench.host import host_facts, utc_now

from .backends import Backend, BackendError, Launch
from .gpus import Gpu
from .matrix import Cell, host_gpu_for
from .results import RunFolder, read_result

LOG_TAIL_LINES = 12
# The bench sources do not change while a matrix runs: hash them once.
current_bench_hash = functools.cache(contract.bench_code_hash)


@dataclass
class CellOutcome:
    cell: Cell
    status: str
    error: str | None
    reused: bool = False


def skip_reason(cell: Cell, host_gpus: list[Gpu], backend: Backend) -> str | None:
    """Why this host and backend cannot run ``cell``, or None."""
    if cell.device == "cpu" and cell.cuda != "auto":
        return f"a CPU cell has no CUDA version (cuda: {cell.cuda}); use cuda: auto with gpu: cpu"
    if cell.device == "gpu" and not host_gpu_for(cell, host_gpus):
        present = ", ".join(sorted({gpu.name for gpu in host_gpus})) or "no GPU"
        return f"this host has no {cell.gpu} GPU (it has {present})"
    if cell.device == "gpu" and len(host_gpu_for(cell, host_gpus)) < cell.devices:
        return (f"the cell asks for {cell.devices} {cell.gpu} GPUs and this host has "
                f"{len(host_gpu_for(cell, host_gpus))}")
    return backend.cannot_run(cell)


def bench_args(cell: Cell, backend: Backend) -> list[str]:
    """The bench's options for ``cell``, but for the paths (Launch adds those)."""
    s = cell.settings
    args = ["--framework", cell.framework, "--task", cell.task, "--device", cell.device,
            "--mode", s.mode, "--warmup-steps", str(s.warmup_steps),
            "--steps", str(s.steps), "--repeats", str(s.repeats), "--batch-size", str(cell.batch_size),
            "--seed", str(s.seed), "--cell-id", cell.id, "--backend", backend.name,
            "--devices", str(cell.devices)]
    if cell.image_size:
        args += ["--image-size", str(cell.image_size)]
    if s.epochs:
        args += ["--epochs", str(s.epochs)]
    if s.data == "synthetic":
        args.append("--synthetic")
    if cell.device == "gpu":
        args += ["--gpu-model", cell.gpu, "--cuda", cell.cuda]
    if cell.threads != "auto":
        args += ["--threads", str(cell.threads)]
    return args


def _settings_path(value: str | None, matrix_dir: Path) -> Path | None:
    """A path from matrix.yml's settings, relative to the matrix file."""
    return (matrix_dir / os.path.expanduser(value)).resolve() if value else None


def is_done(path: Path) -> bool:
    """A finished, valid, successful result of the current bench code is never redone."""
    try:
        result = read_result(path)
    except ValueError:
        return False
    return result.status == "ok" and result.env.get("bench_hash") == current_bench_hash()


def record(folder: RunFolder, cell: Cell, status: str, error: str, backend: Backend,
           started: str) -> None:
    """Write the result of a cell that produced none itself (skipped, crashed, timed out)."""
    result = contract.Result(
        cell=contract.Cell(
            id=cell.id, framework=cell.framework, task=cell.task, device=cell.device,
            gpu=None if cell.device == "cpu" else cell.gpu, cuda=None if cell.device == "cpu" else cell.cuda,
            threads=None if cell.threads == "auto" else cell.threads,
            precision="fp32", batch_size=cell.batch_size, devices=cell.devices,
            input_shape=list(cell.input_shape), mode=cell.settings.mode, data=cell.settings.data),
        status=status, error=error,
        env={**host_facts(), "backend": backend.name, "bench_hash": current_bench_hash(),
             "started_utc": started, "finished_utc": utc_now()},
    )
    contract.write_json_atomic(folder.result_path(cell.id), result.to_dict())


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(line for line in text.splitlines()[-lines:])


def run_cell(cell: Cell, folder: RunFolder, backend: Backend, host_gpus: list[Gpu],
             matrix_dir: Path) -> CellOutcome:
    started = utc_now()
    reason = skip_reason(cell, host_gpus, backend)
    if reason:
        record(folder, cell, "skipped", reason, backend, started)
        return CellOutcome(cell, "skipped", reason)
    log_path = folder.logs / f"{cell.id}.log"
    try:
        backend.prepare(cell)
    except BackendError as error:
        message = f"environment not ready: {error}"
        record(folder, cell, "failed", message, backend, started)
        return CellOutcome(cell, "failed", message)
    folder.staging.mkdir(parents=True, exist_ok=True)
    staged = folder.staging / f"{cell.id}.json"
    staged.unlink(missing_ok=True)  # left by a run that was killed
    gpus = host_gpu_for(cell, host_gpus)[:cell.devices]
    launch = Launch(cell, bench_args(cell, backend), staged, log_path, cell.settings.timeout_s, gpus,
                    weights=_settings_path(cell.settings.weights, matrix_dir),
                    data_dir=_settings_path(cell.settings.data_dir, matrix_dir) if cell.settings.data == "real" else None)
    ended = backend.run(launch)
    if not ended.timed_out:
        try:
            result = read_result(staged)
        except ValueError:
            pass  # the cell died before writing a valid result: recorded below
        else:
            folder.cells.mkdir(parents=True, exist_ok=True)
            os.replace(staged, folder.result_path(cell.id))
            return CellOutcome(cell, result.status, result.error)
    status = "timeout" if ended.timed_out else "failed"
    detail = f" after {cell.settings.timeout_s:g} s" if ended.timed_out else ""
    message = f"the cell process {ended.describe()}{detail}; see {log_path}\n{log_tail(log_path)}".rstrip()
    record(folder, cell, status, message, backend, started)
    return CellOutcome(cell, status, message)


def run_cells(cells: list[Cell], folder: RunFolder, backend: Backend, host_gpus: list[Gpu],
              matrix_dir: Path, force: bool = False) -> list[CellOutcome]:
    outcomes = []
    with tqdm(total=len(cells), unit="cell", dynamic_ncols=True,
              bar_format="{desc} {n_fmt}/{total_fmt} cells |{bar}| {elapsed} elapsed, ETA {remaining}") as bar:
        for number, cell in enumerate(cells, start=1):
            bar.set_description_str(f"cell {number}/{len(cells)}: {cell.framework} {cell.task} on {cell.gpu}")
            if not force and is_done(folder.result_path(cell.id)):
                outcome = CellOutcome(cell, "ok", None, reused=True)
            else:
                outcome = run_cell(cell, folder, backend, host_gpus, matrix_dir)
            outcomes.append(outcome)
            note = "ok (kept from an earlier run)" if outcome.reused else outcome.status
            first_line = (outcome.error or "").splitlines()[0] if outcome.error else ""
            bar.write(f"[{number}/{len(cells)}] {cell.id}: {note}" + (f": {first_line}" if first_line else ""),
                      file=sys.stderr)
            bar.update()
    return outcomes
