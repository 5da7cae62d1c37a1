"""Runs the cells of a matrix through a backend, each in its own process with a timeout: one
at a time, or side by side on a host with several GPUs, one cell per GPU. Whatever happens to
a cell is recorded in its JSON and the matrix goes on; a cell whose successful result is
already there is not run again."""
from __future__ import annotations

import functools
import os
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
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


def bench_args(cell: Cell, backend: Backend, cells_at_once: int = 1) -> list[str]:
    """The bench's options for ``cell``, but for the paths (Launch adds those)."""
    s = cell.settings
    args = ["--framework", cell.framework, "--task", cell.task, "--device", cell.device,
            "--mode", s.mode, "--warmup-steps", str(s.warmup_steps),
            "--steps", str(s.steps), "--repeats", str(s.repeats), "--batch-size", str(cell.batch_size),
            "--seed", str(s.seed), "--cell-id", cell.id, "--backend", backend.name,
            "--devices", str(cell.devices), "--precision", cell.precision, "--cells-at-once", str(cells_at_once)]
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
            precision=cell.precision, batch_size=cell.batch_size, devices=cell.devices,
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


def check_and_prepare(cell: Cell, folder: RunFolder, backend: Backend, host_gpus: list[Gpu]) -> CellOutcome | None:
    """Skip the cell, or make its environment ready; the outcome when it will not run."""
    started = utc_now()
    reason = skip_reason(cell, host_gpus, backend)
    if reason:
        record(folder, cell, "skipped", reason, backend, started)
        return CellOutcome(cell, "skipped", reason)
    try:
        backend.prepare(cell)
    except BackendError as error:
        message = f"environment not ready: {error}"
        record(folder, cell, "failed", message, backend, started)
        return CellOutcome(cell, "failed", message)
    return None


def prepare_all(cells: list[Cell], folder: RunFolder, backend: Backend,
                host_gpus: list[Gpu]) -> list[tuple[Cell, CellOutcome | None]]:
    """check_and_prepare for every cell: first one cell per environment, up to the backend's
    ``prepare_at_once`` of them side by side (a build mostly waits on downloads and disks),
    then the others, whose environments are ready by then."""
    first_of_each: dict[tuple[str, str, str], Cell] = {}
    for cell in cells:
        first_of_each.setdefault((cell.framework, cell.device, cell.cuda), cell)
    firsts = list(first_of_each.values())
    with ThreadPoolExecutor(max_workers=backend.prepare_at_once, thread_name_prefix="prepare") as pool:
        early = dict(zip([cell.id for cell in firsts],
                         pool.map(lambda cell: check_and_prepare(cell, folder, backend, host_gpus), firsts)))
    return [(cell, early[cell.id] if cell.id in early else check_and_prepare(cell, folder, backend, host_gpus))
            for cell in cells]


def launch_cell(cell: Cell, folder: RunFolder, backend: Backend, gpus: list[Gpu], matrix_dir: Path,
                cells_at_once: int = 1, interrupted: threading.Event | None = None) -> CellOutcome | None:
    """Run a prepared cell on ``gpus`` and record how it ended; None when it was interrupted
    (nothing is recorded then: the next run of the matrix runs it again)."""
    started = utc_now()
    log_path = folder.logs / f"{cell.id}.log"
    folder.staging.mkdir(parents=True, exist_ok=True)
    staged = folder.staging / f"{cell.id}.json"
    staged.unlink(missing_ok=True)  # left by a run that was killed
    launch = Launch(cell, bench_args(cell, backend, cells_at_once), staged, log_path, cell.settings.timeout_s, gpus,
                    weights=_settings_path(cell.settings.weights, matrix_dir),
                    data_dir=_settings_path(cell.settings.data_dir, matrix_dir) if cell.settings.data == "real" else None,
                    interrupted=interrupted or threading.Event())
    try:
        ended = backend.run(launch)
    except Exception as error:  # the engine went away, say: this cell fails, the matrix goes on
        message = f"the {backend.name} backend could not run the cell: {type(error).__name__}: {error}"
        record(folder, cell, "failed", message, backend, started)
        return CellOutcome(cell, "failed", message)
    if ended.interrupted:
        staged.unlink(missing_ok=True)
        return None
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


def run_cell(cell: Cell, folder: RunFolder, backend: Backend, host_gpus: list[Gpu],
             matrix_dir: Path) -> CellOutcome:
    """One cell, start to end, on the first host GPUs it may use."""
    outcome = check_and_prepare(cell, folder, backend, host_gpus)
    if outcome is None:
        outcome = launch_cell(cell, folder, backend, host_gpu_for(cell, host_gpus)[:cell.devices], matrix_dir)
    assert outcome is not None  # nothing interrupts it
    return outcome


class Scheduler:
    """Which prepared cells may start now. GPU cells run side by side, each on GPUs no other
    running cell has; a CPU cell runs alone (it uses every core), after the cells started
    before it and before those after it; with ``at_once`` 1, every cell runs alone."""

    def __init__(self, host_gpus: list[Gpu], at_once: int):
        self.free = {gpu.uuid for gpu in host_gpus}
        self.at_once = at_once
        self.running: dict[str, tuple[Cell, list[Gpu]]] = {}  # by cell id

    def start_now(self, waiting: list[Cell], host_gpus: list[Gpu]) -> list[tuple[Cell, list[Gpu]]]:
        """The waiting cells (in order) that may start now, each with its GPUs; marks them running."""
        started = []
        for cell in waiting:
            if len(self.running) >= self.at_once or any(c.device == "cpu" for c, _ in self.running.values()):
                break
            if cell.device == "cpu":
                if not self.running:
                    self._start(cell, [], started)
                break  # nothing passes a CPU cell: it would wait forever for the host to be free
            gpus = [gpu for gpu in host_gpu_for(cell, host_gpus) if gpu.uuid in self.free][:cell.devices]
            if len(gpus) == cell.devices:
                self._start(cell, gpus, started)
        return started

    def _start(self, cell: Cell, gpus: list[Gpu], started: list) -> None:
        self.free -= {gpu.uuid for gpu in gpus}
        self.running[cell.id] = (cell, gpus)
        started.append((cell, gpus))

    def finished(self, cell: Cell) -> None:
        _, gpus = self.running.pop(cell.id)
        self.free |= {gpu.uuid for gpu in gpus}


def cells_at_once(host_gpus: list[Gpu], serial: bool) -> int:
    """One cell per GPU, unless asked for one at a time; one on a host without GPUs."""
    return 1 if serial else max(1, len(host_gpus))


def run_cells(cells: list[Cell], folder: RunFolder, backend: Backend, host_gpus: list[Gpu],
              matrix_dir: Path, force: bool = False, serial: bool = False) -> list[CellOutcome]:
    """Run the cells (skipping those already done) and record each one's end. Every
    environment is made ready first, so no build competes with a running cell."""
    outcomes: dict[str, CellOutcome] = {}
    bar = tqdm(total=len(cells), unit="cell", dynamic_ncols=True,
               bar_format="{desc} {n_fmt}/{total_fmt} cells |{bar}| {elapsed} elapsed, ETA {remaining}")

    def report(outcome: CellOutcome) -> None:
        outcomes[outcome.cell.id] = outcome
        note = "ok (kept from an earlier run)" if outcome.reused else outcome.status
        first_line = (outcome.error or "").splitlines()[0] if outcome.error else ""
        bar.write(f"[{len(outcomes)}/{len(cells)}] {outcome.cell.id}: {note}"
                  + (f": {first_line}" if first_line else ""), file=sys.stderr)
        bar.update()

    waiting = []
    with bar:
        to_run = []
        for cell in cells:
            if not force and is_done(folder.result_path(cell.id)):
                report(CellOutcome(cell, "ok", None, reused=True))
            else:
                to_run.append(cell)
        bar.set_description_str("preparing " + ", ".join(sorted({f"{c.framework} ({c.device})" for c in to_run})))
        for cell, outcome in prepare_all(to_run, folder, backend, host_gpus):
            if outcome:
                report(outcome)
            else:
                waiting.append(cell)
        at_once = cells_at_once(host_gpus, serial)
        scheduler = Scheduler(host_gpus, at_once)
        interrupted = threading.Event()
        with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="cell") as pool:
            running: dict[Future, Cell] = {}
            try:
                while waiting or running:
                    for cell, gpus in scheduler.start_now(waiting, host_gpus):
                        waiting.remove(cell)
                        running[pool.submit(launch_cell, cell, folder, backend, gpus, matrix_dir,
                                            at_once, interrupted)] = cell
                    assert running or not waiting, "a waiting cell fits no free GPUs"
                    bar.set_description_str("running " + ", ".join(
                        f"{c.framework} {c.task} on {c.gpu}" for c in running.values()))
                    done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
                    for future in done:
                        scheduler.finished(running.pop(future))
                        report(future.result())
            except BaseException:
                # Ctrl-C or SIGTERM: stop the running cells (their threads return within the
                # grace period) and record none of them; finished cells are already on disk.
                interrupted.set()
                raise
    return [outcomes[cell.id] for cell in cells]
