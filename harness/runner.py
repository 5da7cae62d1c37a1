"""Runs the cells of a matrix through a backend, each in its own process (or container, or
cluster job) with a timeout, as many at once and on such GPUs as the backend's placement
allows. Whatever happens to a cell is recorded in its JSON and the matrix goes on; a cell
whose successful result is already there is not run again."""
from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from bench import result as contract
from bench.host import host_facts, utc_now

from .backends import Backend, BackendError, Launch, Progress, quiet
from .gpus import Gpu
from .matrix import Cell
from .results import RunFolder, read_result
from .rows import ResultRow

LOG_TAIL_LINES = 12
# The bench sources do not change while a matrix runs: hash them once.
current_bench_hash = functools.cache(contract.bench_code_hash)


@dataclass
class CellOutcome:
    cell: Cell
    status: str
    error: str | None
    reused: bool = False


def _settings_path(value: str | None, matrix_dir: Path) -> Path | None:
    """A path from matrix.yml's settings, relative to the matrix file."""
    return (matrix_dir / os.path.expanduser(value)).resolve() if value else None


def is_done(path: Path) -> bool:
    """A finished, valid, successful result of the current bench code is never redone."""
    try:
        result = read_result(path)
    except ValueError:
        return False
    return result.status == "ok" and ResultRow.of(result).bench_hash == current_bench_hash()


def record(folder: RunFolder, cell: Cell, status: str, error: str, backend: Backend,
           started: str, more_env: dict | None = None) -> None:
    """Write the result of a cell that produced none itself (skipped, crashed, timed out)."""
    result = contract.Result(
        cell=cell.request().cell(), status=status, error=error,
        env={**host_facts(), "launcher": backend.name, "bench_hash": current_bench_hash(),
             "started_utc": started, "finished_utc": utc_now(), **(more_env or {})},
    )
    contract.write_json_atomic(folder.result_path(cell.id), result.to_dict())


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(line for line in text.splitlines()[-lines:])


def check_and_prepare(cell: Cell, folder: RunFolder, backend: Backend,
                      progress: Progress = quiet) -> CellOutcome | None:
    """Skip the cell, or make its environment ready; the outcome when it will not run."""
    started = utc_now()
    reason = backend.skip_reason(cell)
    if reason:
        record(folder, cell, "skipped", reason, backend, started)
        return CellOutcome(cell, "skipped", reason)
    try:
        backend.prepare(cell, progress)
    except BackendError as error:
        message = f"environment not ready: {error}"
        record(folder, cell, "failed", message, backend, started)
        return CellOutcome(cell, "failed", message)
    return None


def prepare_all(cells: list[Cell], folder: RunFolder, backend: Backend,
                show: Progress = quiet) -> list[tuple[Cell, CellOutcome | None]]:
    """check_and_prepare for every cell: first one cell per environment, up to the backend's
    ``prepare_at_once`` of them side by side (a build mostly waits on downloads and disks),
    then the others, whose environments are ready by then. ``show`` is told, in one line,
    what each environment being prepared is doing."""
    first_of_each: dict[tuple[str, str, str], Cell] = {}
    for cell in cells:
        first_of_each.setdefault((cell.framework, cell.device, cell.cuda), cell)
    firsts = list(first_of_each.values())
    doing = {f"{cell.framework} ({cell.device})": "" for cell in firsts}
    lock = threading.Lock()

    def prepare(cell: Cell) -> CellOutcome | None:
        def progress(text: str) -> None:
            with lock:
                doing[f"{cell.framework} ({cell.device})"] = text
                show("preparing " + "; ".join(text or name for name, text in sorted(doing.items())))
        return check_and_prepare(cell, folder, backend, progress)

    with ThreadPoolExecutor(max_workers=backend.prepare_at_once, thread_name_prefix="prepare") as pool:
        early = dict(zip([cell.id for cell in firsts], pool.map(prepare, firsts)))
    return [(cell, early[cell.id] if cell.id in early else check_and_prepare(cell, folder, backend))
            for cell in cells]


def launch_cell(cell: Cell, folder: RunFolder, backend: Backend, gpus: list[Gpu], matrix_dir: Path,
                cells_at_once: int = 1, interrupted: threading.Event | None = None,
                more_env: dict | None = None) -> CellOutcome | None:
    """Run a prepared cell on ``gpus`` and record how it ended, with ``more_env`` in its result's
    env (an A/B's side and round); None when it was interrupted (nothing is recorded then: the
    next run of the matrix runs it again) or is still running outside the harness (a detached
    cluster job: the next run collects it)."""
    started = utc_now()
    log_path = folder.logs / f"{cell.id}.log"
    staging = folder.cell_staging(cell.id)
    staging.mkdir(parents=True, exist_ok=True)
    staged = staging / f"{cell.id}.json"
    staged.unlink(missing_ok=True)  # left by a run that was killed
    weights = _settings_path(cell.settings.weights, matrix_dir)
    data_dir = _settings_path(cell.settings.data_dir, matrix_dir) if cell.settings.data == "real" else None
    request_path = staging / f"{cell.id}.request.json"
    contract.write_json_atomic(request_path, cell.request(backend.name, cells_at_once, weights, data_dir).to_dict())
    launch = Launch(cell, request_path, staged, log_path, cell.settings.timeout_s, gpus, weights=weights,
                    data_dir=data_dir, interrupted=interrupted or threading.Event(), folder=folder)
    try:
        ended = backend.run(launch)
    except Exception as error:  # the engine went away, say: this cell fails, the matrix goes on
        shutil.rmtree(staging, ignore_errors=True)
        message = f"the {backend.name} backend could not run the cell: {type(error).__name__}: {error}"
        record(folder, cell, "failed", message, backend, started, more_env)
        return CellOutcome(cell, "failed", message)
    if ended.pending:  # the job reads its request when it starts
        return None
    try:
        if ended.interrupted:
            return None
        if not ended.timed_out:
            try:
                result = read_result(staged)
            except ValueError:
                pass  # the cell died before writing a valid result: recorded below
            else:
                keep_result(folder, cell, staged, {**ended.env, **(more_env or {})})
                return CellOutcome(cell, result.status, result.error)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    status = "timeout" if ended.timed_out else "failed"
    if ended.detail:
        message = f"{ended.detail}; see {log_path}"
    else:
        after = f" after {cell.settings.timeout_s:g} s" if ended.timed_out else ""
        message = f"the cell process {ended.describe()}{after}; see {log_path}"
    message = f"{message}\n{log_tail(log_path)}".rstrip()
    record(folder, cell, status, message, backend, started, {**ended.env, **(more_env or {})})
    return CellOutcome(cell, status, message)


def keep_result(folder: RunFolder, cell: Cell, staged: Path, more_env: dict) -> None:
    """Move a result the cell wrote into cells/, with what the harness and the backend know of
    where and how it ran."""
    folder.cells.mkdir(parents=True, exist_ok=True)
    if more_env:
        payload = json.loads(staged.read_text(encoding="utf-8"))
        payload["env"].update(more_env)
        contract.write_json_atomic(staged, payload)
    os.replace(staged, folder.result_path(cell.id))


def run_cell(cell: Cell, folder: RunFolder, backend: Backend, matrix_dir: Path) -> CellOutcome:
    """One cell, start to end, where the backend's placement puts it."""
    outcome = check_and_prepare(cell, folder, backend)
    if outcome is None:
        [(_, gpus)] = backend.placement(serial=True).start_now([cell])
        outcome = launch_cell(cell, folder, backend, gpus, matrix_dir)
    assert outcome is not None  # nothing interrupts it
    return outcome


def run_cells(cells: list[Cell], folder: RunFolder, backend: Backend, matrix_dir: Path,
              force: bool = False, serial: bool = False) -> list[CellOutcome]:
    """Run the cells (skipping those already done) and record each one's end; a cell that is
    still running outside the harness (a detached cluster job) has no outcome yet. Every
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
        for cell, outcome in prepare_all(to_run, folder, backend, bar.set_description_str):
            if outcome:
                report(outcome)
            else:
                waiting.append(cell)
        placement = backend.placement(serial)
        at_once = placement.at_once
        interrupted = threading.Event()
        with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="cell") as pool:
            running: dict[Future, Cell] = {}
            try:
                while waiting or running:
                    for cell, gpus in placement.start_now(waiting):
                        waiting.remove(cell)
                        running[pool.submit(launch_cell, cell, folder, backend, gpus, matrix_dir,
                                            placement.most_on_host(cell), interrupted)] = cell
                    assert running or not waiting, "a waiting cell fits no free GPUs"
                    bar.set_description_str("running " + ", ".join(
                        f"{c.framework} {c.task} on {c.gpu}" for c in running.values()))
                    done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
                    for future in done:
                        placement.finished(running.pop(future))
                        outcome = future.result()
                        if outcome is None:  # still running outside the harness
                            bar.update()
                        else:
                            report(outcome)
            except BaseException:
                # Ctrl-C or SIGTERM: stop the running cells (their threads return within the
                # grace period) and record none of them; finished cells are already on disk.
                interrupted.set()
                raise
    return [outcomes[cell.id] for cell in cells if cell.id in outcomes]
