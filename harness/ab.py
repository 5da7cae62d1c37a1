"""Interleaved A/B runs: the cells of a matrix whose axis holds two values (``cuda: ["12.8",
"12.6"]``, ``threads: [1, 2]``...) run in pairs, round by round, each turn a fresh process (or
container, or job), the two sides alternating A B, B A, A B... so that a host whose speed
drifts slows both alike. ``same`` runs each cell against itself (A/A): how much this host varies
between two runs of the same thing, its noise floor.

A run folder of an A/B holds ``ab.json`` (the pairs and the order they ran in) and one run
folder per round and side, ``rounds/<round>-<side>/`` (cells/, logs/, as any run's); every
result there says in ``env.ab`` which side and round it was and where in the order it ran.
Turns run one at a time, so that neither side ever shares the host with the other.
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench import result as contract
from bench.host import utc_now
from tqdm import tqdm

from .backends import Backend
from .matrix import AXES, Cell, MatrixError, fitted
from .results import RunFolder
from .runner import CellOutcome, check_and_prepare, is_done, launch_cell, record

SAME = "same"  # the A/A "axis": each cell against itself
SIDES = ("A", "B")
MANIFEST = "ab.json"
# Axes that name what a cell measures, not how: an A/B between two of them compares two things.
NOT_COMPARABLE = ("framework", "task")


@dataclass(frozen=True)
class Sides:
    a: Cell
    b: Cell


@dataclass(frozen=True)
class Turn:
    position: int  # where in the order it ran, from 0
    round: int
    side: str  # "A" or "B"
    cell: Cell

    def env(self, plan: "AbPlan") -> dict:
        """What its result records of the A/B (env.ab)."""
        return {"axis": plan.axis, "side": self.side, "value": plan.values[SIDES.index(self.side)],
                "round": self.round, "position": self.position, "rounds": plan.rounds}


@dataclass(frozen=True)
class AbPlan:
    axis: str  # an axis of the matrix, or "same"
    values: tuple[str, str]  # each side's value of the axis ("same": both the cell's own)
    rounds: int
    pairs: list[Sides]
    left_out: list[tuple[Cell, str]]  # cells with no partner on the other side, and why

    def schedule(self) -> list[Turn]:
        """Round by round, pair by pair: A then B in even rounds, B then A in odd ones."""
        turns = []
        for number in range(self.rounds):
            order = SIDES if number % 2 == 0 else SIDES[::-1]
            for sides in self.pairs:
                for side in order:
                    turns.append(Turn(len(turns), number, side, sides.a if side == "A" else sides.b))
        return turns

    def cells(self) -> list[Cell]:
        """Every cell the A/B runs, once (an A/A pair's two sides are one cell)."""
        return list({cell.id: cell for sides in self.pairs for cell in (sides.a, sides.b)}.values())

    def manifest(self) -> dict:
        return {"axis": self.axis, "values": list(self.values), "rounds": self.rounds,
                "pairs": [{"a": sides.a.id, "b": sides.b.id} for sides in self.pairs],
                "order": [{"position": t.position, "round": t.round, "side": t.side, "cell": t.cell.id}
                          for t in self.schedule()],
                "left_out": [{"cell": cell.id, "why": why} for cell, why in self.left_out]}


def plan(cells: list[Cell], axis: str, rounds: int, where: str = "--ab") -> AbPlan:
    """Pair the cells on ``axis``: A is its first value among the cells, B the second; MatrixError
    (``where`` names the option or the matrix key) when the axis cannot be the comparison."""
    if rounds < 2:
        raise MatrixError(f"{where}: {rounds} round(s): an A/B needs at least 2 rounds to tell change from noise "
                          f"(8 or more to judge many cells at once); raise it")
    if axis == SAME:
        return AbPlan(SAME, ("A", "A"), rounds, [Sides(cell, cell) for cell in cells], [])
    if axis not in AXES or axis in NOT_COMPARABLE:
        allowed = ", ".join([a for a in AXES if a not in NOT_COMPARABLE] + [SAME])
        raise MatrixError(f"{where}: {axis!r} cannot be the A/B axis; use one of {allowed}")
    values = list(dict.fromkeys(str(getattr(cell, axis)) for cell in cells))
    if len(values) != 2:
        raise MatrixError(f"{where}: the cells have {len(values)} value(s) of {axis} ({', '.join(values)}); an A/B "
                          f"needs exactly two: list two in the matrix's {axis} axis, or pick them with "
                          f"--only {axis}=VALUE,VALUE")
    by_id = {cell.id: cell for cell in cells}
    pairs, left_out, partnered = [], [], set()
    for cell in cells:
        if str(getattr(cell, axis)) != values[0]:
            continue
        value_b = next(getattr(c, axis) for c in cells if str(getattr(c, axis)) == values[1])
        counterpart = fitted(dataclasses.replace(cell, **{axis: value_b}))
        partner = by_id.get(counterpart.id)
        if counterpart.id == cell.id:  # JAX's compiled cell is its default cell, say
            left_out.append((cell, f"its {axis} {values[1]} cell is the same run"))
        elif partner is None:
            left_out.append((cell, f"no cell with {axis} {values[1]} to compare it with"))
        else:
            pairs.append(Sides(cell, partner))
            partnered.add(partner.id)
    left_out += [(cell, f"no cell with {axis} {values[0]} to compare it with") for cell in cells
                 if str(getattr(cell, axis)) == values[1] and cell.id not in partnered]
    if not pairs:
        raise MatrixError(f"{where}: no two cells differ in {axis} alone; an A/B compares cells that are the same "
                          f"but for the axis")
    return AbPlan(axis, (values[0], values[1]), rounds, pairs, left_out)


def round_folder(folder: RunFolder, number: int, side: str) -> RunFolder:
    return RunFolder(folder.root / "rounds" / f"{number:02d}-{side}")


def run_ab(ab: AbPlan, folder: RunFolder, backend: Backend, matrix_dir: Path,
           force: bool = False) -> list[CellOutcome]:
    """Every turn of the plan in order, one at a time, each recorded in its round's folder; a
    turn already done (an interrupted A/B run again) is kept. A cell whose environment cannot
    be made, or that the backend skips, is recorded in every round with its partner, which
    then does not run either."""
    contract.write_json_atomic(folder.root / MANIFEST, ab.manifest())
    turns = ab.schedule()
    # Preparing records a cell that will not run; each turn records it in its own round below.
    scratch = RunFolder(folder.staging / "prepare")
    not_ready: dict[str, CellOutcome] = {}
    for cell in ab.cells():
        outcome = check_and_prepare(cell, scratch, backend)
        if outcome is not None:
            not_ready[cell.id] = outcome
    shutil.rmtree(scratch.root, ignore_errors=True)
    for sides in ab.pairs:
        for cell, partner in ((sides.a, sides.b), (sides.b, sides.a)):
            if partner.id in not_ready and cell.id not in not_ready:
                not_ready[cell.id] = CellOutcome(cell, "skipped", f"its A/B partner {partner.id} cannot run")
    outcomes: list[CellOutcome] = []
    placement = backend.placement(serial=True)
    interrupted = threading.Event()
    bar = tqdm(total=len(turns), unit="turn", dynamic_ncols=True,
               bar_format="{desc} {n_fmt}/{total_fmt} turns |{bar}| {elapsed} elapsed, ETA {remaining}")
    with bar, ThreadPoolExecutor(max_workers=1, thread_name_prefix="turn") as pool:
        for turn in turns:
            where = round_folder(folder, turn.round, turn.side)
            bar.set_description_str(f"round {turn.round + 1}/{ab.rounds}, {turn.side}: {turn.cell.id}")
            if not force and is_done(where.result_path(turn.cell.id)):
                outcome = CellOutcome(turn.cell, "ok", None, reused=True)
            elif turn.cell.id in not_ready:
                outcome = not_ready[turn.cell.id]
                record(where, turn.cell, outcome.status, outcome.error or "", backend, utc_now(), {"ab": turn.env(ab)})
            else:
                [(_, gpus)] = placement.start_now([turn.cell])
                try:
                    outcome = pool.submit(launch_cell, turn.cell, where, backend, gpus, matrix_dir, 1, interrupted,
                                          {"ab": turn.env(ab)}).result()
                except BaseException:
                    interrupted.set()  # Ctrl-C or SIGTERM: the running turn stops, unrecorded
                    raise
                finally:
                    placement.finished(turn.cell)
                assert outcome is not None, "an A/B turn runs to its end (a detached job cannot keep the order)"
            outcomes.append(outcome)
            bar.write(f"[{turn.position + 1}/{len(turns)}] round {turn.round + 1} {turn.side} {turn.cell.id}: "
                      f"{'ok (kept from an earlier run)' if outcome.reused else outcome.status}", file=sys.stderr)
            bar.update()
    return outcomes
