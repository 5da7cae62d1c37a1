"""Interleaved A/B runs (harness/ab.py): pairs on one axis, the order A B B A..., every turn
recorded with its side and round, resumed after an interruption, and judged paired by
compare.py; A/A gives the host's noise floor."""
from __future__ import annotations

import json

import pytest

from bench.result import bench_code_hash
from conftest import REPO, write_matrix
from harness import compare
from harness.ab import plan, round_folder, run_ab
from harness.backends import BackendError
from harness.matrix import Cell, MatrixError, Settings
from harness.results import RunFolder, read_result
from harness.run_matrix import main as run_matrix
from test_runner import ScriptBackend


def cell(framework="pytorch", threads=1, task="cnn_cifar10", compile="default"):
    return Cell(framework, task, "cpu", "auto", threads, 1, "fp32", Settings(steps=1), compile)


def test_pairs_are_the_cells_that_differ_in_the_axis_alone():
    cells = [cell(threads=1), cell(threads=2), cell("jax", 1), cell("jax", 2), cell("mxnet", 1)]
    ab = plan(cells, "threads", 4)
    assert ab.values == ("1", "2")
    assert [(s.a.framework, s.a.threads, s.b.threads) for s in ab.pairs] == [("pytorch", 1, 2), ("jax", 1, 2)]
    assert [(c.framework, why) for c, why in ab.left_out] == [("mxnet", "no cell with threads 2 to compare it with")]


def test_the_sides_alternate_round_by_round_pair_by_pair():
    ab = plan([cell(threads=1), cell(threads=2), cell("jax", 1), cell("jax", 2)], "threads", 4)
    order = [(t.round, t.cell.framework, t.side) for t in ab.schedule()]
    assert order[:8] == [(0, "pytorch", "A"), (0, "pytorch", "B"), (0, "jax", "A"), (0, "jax", "B"),
                         (1, "pytorch", "B"), (1, "pytorch", "A"), (1, "jax", "B"), (1, "jax", "A")]
    assert [t.position for t in ab.schedule()] == list(range(16))
    assert "".join(t.side for t in ab.schedule() if t.cell.framework == "pytorch") == "ABBAABBA"


def test_an_a_a_pairs_each_cell_with_itself():
    ab = plan([cell(threads=1), cell("jax", 1)], "same", 3)
    assert all(s.a is s.b for s in ab.pairs) and len(ab.schedule()) == 12 and not ab.left_out


@pytest.mark.parametrize("cells, axis, rounds, message", [
    ([cell(threads=1), cell(threads=2)], "framework", 4, "'framework' cannot be the A/B axis; use one of gpu,"),
    ([cell(threads=1), cell(threads=2), cell(threads=4)], "threads", 4, "3 value(s) of threads (1, 2, 4)"),
    ([cell(threads=1), cell(threads=2)], "threads", 1, "1 round(s): an A/B needs at least 2 rounds"),
    ([cell(threads=1), cell("jax", threads=2)], "threads", 4, "no two cells differ in threads alone"),
])
def test_an_axis_that_cannot_be_compared_is_refused_with_the_fix(cells, axis, rounds, message):
    with pytest.raises(MatrixError, match="^--ab: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        plan(cells, axis, rounds)


def test_a_compiled_side_that_is_the_default_run_is_left_out_and_said_so():
    """JAX compiles by default: its two compile profiles are one cell, nothing to compare."""
    from harness.matrix import fitted

    cells = list({c.id: c for c in (fitted(cell(f, compile=p)) for f in ("pytorch", "jax")
                                     for p in ("default", "compiled"))}.values())
    ab = plan(cells, "compile", 4)
    assert [s.a.framework for s in ab.pairs] == ["pytorch"]
    assert [(c.framework, why) for c, why in ab.left_out] == [("jax", "its compile compiled cell is the same run")]


# One side writes 0.10 s steps and the other 0.08 s (with a little noise), as results the bench would.
TIMED = f"""
    import json, random, sys
    sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'tests')!r})
    from conftest import result_payload
    base = 0.08 if "threads-2" in sys.argv[2] else 0.10
    payload = result_payload(cell_id=sys.argv[2], step_times=[base * random.uniform(0.99, 1.01) for _ in range(5)])
    payload["cell"]["threads"] = 2 if "threads-2" in sys.argv[2] else 1
    payload["env"]["bench_hash"] = {bench_code_hash()!r}
    open(sys.argv[1], "w").write(json.dumps(payload))
"""


def test_every_turn_is_recorded_in_order_and_the_sides_are_judged_paired(tmp_path):
    folder = RunFolder(tmp_path / "run")
    ab = plan([cell(threads=1), cell(threads=2)], "threads", 6)
    outcomes = run_ab(ab, folder, ScriptBackend(TIMED), tmp_path)
    assert [o.status for o in outcomes] == ["ok"] * 12
    manifest = json.loads((folder.root / "ab.json").read_text())
    assert manifest["axis"] == "threads" and [t["side"] for t in manifest["order"]][:4] == ["A", "B", "B", "A"]
    recorded = []
    for turn in ab.schedule():
        result = read_result(round_folder(folder, turn.round, turn.side).result_path(turn.cell.id))
        recorded.append((result.env["finished_utc"], result.env["ab"]["position"]))
        assert result.env["ab"] == {"axis": "threads", "side": turn.side, "value": ab.values["AB".index(turn.side)],
                                    "round": turn.round, "position": turn.position, "rounds": 6}
    assert [position for _, position in sorted(recorded)] == list(range(12))  # they ran in that order
    comparison, problems = compare.compare_ab(folder.root)
    assert not problems and comparison.differing == {"threads": (["1"], ["2"])}
    (pair,) = comparison.pairs
    assert pair.rounds == 6 and pair.ratio == pytest.approx(0.8, abs=0.02) and pair.verdict().startswith("faster by")
    text = compare.render(comparison, "threads 1", "threads 2")
    assert "interleaved A/B in one run, 6 rounds" in text and "note: with" not in text


def test_an_interrupted_a_b_keeps_its_finished_turns(tmp_path):
    folder = RunFolder(tmp_path / "run")
    ab = plan([cell(threads=1), cell(threads=2)], "threads", 3)
    run_ab(ab, folder, ScriptBackend(TIMED), tmp_path)
    round_folder(folder, 2, "B").result_path(cell(threads=2).id).unlink()  # as if killed in that turn
    again = ScriptBackend(TIMED)
    outcomes = run_ab(ab, folder, again, tmp_path)
    assert again.runs == 1 and sum(o.reused for o in outcomes) == 5


def test_a_side_that_cannot_run_skips_its_partner_in_every_round(tmp_path):
    class OneSideBroken(ScriptBackend):
        def prepare(self, cell, progress=None):
            if cell.threads == 2:
                raise BackendError("building the environment failed; see build.log")

    folder = RunFolder(tmp_path / "run")
    ab = plan([cell(threads=1), cell(threads=2)], "threads", 2)
    backend = OneSideBroken(TIMED)
    outcomes = run_ab(ab, folder, backend, tmp_path)
    assert backend.runs == 0 and {o.status for o in outcomes} == {"failed", "skipped"}
    skipped = read_result(round_folder(folder, 1, "A").result_path(cell(threads=1).id))
    assert skipped.status == "skipped" and "partner" in skipped.error and skipped.env["ab"]["round"] == 1


def test_an_environment_that_breaks_later_keeps_the_turns_already_measured(tmp_path):
    class Broken(ScriptBackend):
        def prepare(self, cell, progress=None):
            raise BackendError("building the environment failed; see build.log")

    folder = RunFolder(tmp_path / "run")
    ab = plan([cell(threads=1), cell(threads=2)], "threads", 2)
    run_ab(ab, folder, ScriptBackend(TIMED), tmp_path)
    outcomes = run_ab(plan([cell(threads=1), cell(threads=2)], "threads", 3), folder, Broken(TIMED), tmp_path)
    assert [o.reused for o in outcomes] == [True] * 4 + [False] * 2
    assert read_result(round_folder(folder, 1, "A").result_path(cell(threads=1).id)).status == "ok"
    assert read_result(round_folder(folder, 2, "A").result_path(cell(threads=1).id)).status == "failed"
    comparison, _ = compare.compare_ab(folder.root)
    assert comparison.pairs[0].rounds == 2 and not list(folder.staging.glob("prepare"))


# The same cell twice: each run's blocks 5% off the other's at random (a noisy host).
NOISY = TIMED.replace('base = 0.08 if "threads-2" in sys.argv[2] else 0.10', "base = 0.10 * random.uniform(0.95, 1.05)")


def test_an_a_a_measures_the_floor_that_later_comparisons_call_noise(tmp_path, capsys):
    aa = RunFolder(tmp_path / "aa")
    run_ab(plan([cell(threads=1)], "same", 8), aa, ScriptBackend(NOISY), tmp_path)
    comparison, _ = compare.compare_ab(aa.root)
    (floor,) = comparison.floors.values()
    assert 0.02 < floor < 0.11
    assert compare.main([str(aa.root)]) == 0
    assert "this host's noise floor (95% of A/A rounds differ by less)" in capsys.readouterr().out
    # Two sets measured apart on that host, 3% apart with tight blocks: noise, says the floor.
    a, b = (RunFolder(tmp_path / name) for name in "ab")
    for folder, scale in ((a, 1.0), (b, 1.03)):
        script = TIMED.replace('base = 0.08 if "threads-2" in sys.argv[2] else 0.10', f"base = {0.1 * scale}")
        from harness.runner import run_cell
        run_cell(cell(threads=1), folder, ScriptBackend(script), tmp_path)
    assert compare.main([str(a.root), str(b.root)]) == 0
    assert "slower by" in capsys.readouterr().out
    assert compare.main([str(a.root), str(b.root), "--floor", str(aa.root), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "within this host's noise floor" in out and "1 no significant difference (1 within" in out
    written = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert written["pairs"][0]["noise_floor"] == pytest.approx(floor) and not written["pairs"][0]["significant"]
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 0
    assert (tmp_path / "out" / "comparison.md").read_text().startswith("## B (")


def test_bad_a_b_options_are_one_line_and_exit_2(tmp_path, capsys):
    matrix = write_matrix(tmp_path / "m.yml", "matrix:\n  framework: [pytorch]\n  task: [cnn_cifar10]\n  gpu: [cpu]\n"
                                              "  threads: [1, 2]\nab:\n  axis: task\n")
    assert run_matrix([str(matrix), "--dry-run", "--backend", "current"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {matrix}:7: ab.axis: 'task' cannot be the A/B axis; use one "
                                               "of gpu, cuda, threads, devices, precision, compile, same")
    assert run_matrix([str(matrix), "--dry-run", "--backend", "current", "--ab", "cuda"]) == 2
    assert "the cells have 1 value(s) of cuda (auto); an A/B needs exactly two" in capsys.readouterr().err
    plain = write_matrix(tmp_path / "p.yml", "matrix:\n  framework: [pytorch]\n  task: [cnn_cifar10]\n  gpu: [cpu]\n")
    assert run_matrix([str(plain), "--dry-run", "--backend", "current", "--rounds", "4"]) == 2
    assert "only an A/B has rounds; add --ab AXIS" in capsys.readouterr().err
    assert run_matrix([str(matrix), "--dry-run", "--backend", "current", "--ab", "threads", "--rounds", "6"]) == 0
    out = capsys.readouterr().out
    assert "A/B: threads 1 (A) against 2 (B); 1 pairs, 6 rounds, 12 turns one at a time" in out
    assert "-ab-threads" in out and out.count("0 of 6 turns done") == 2


@pytest.mark.integration
def test_a_real_a_b_between_one_and_two_threads_and_a_real_a_a_on_this_host(tmp_path):
    """PyTorch's CNN with 1 and with 2 threads, interleaved, each turn a fresh bench process in
    the framework's own environment; then the same cell against itself."""
    import subprocess
    import sys

    matrix = write_matrix(tmp_path / "threads.yml", (
        "matrix:\n  framework: [pytorch]\n  task: [cnn_cifar10]\n  gpu: [cpu]\n  threads: [1, 2]\n"
        "settings:\n  warmup_steps: 1\n  min_block_s: 0.1\n  budget_s: 0.6\n  repeats: 3\n  batch_size: 16\n"
        "ab:\n  axis: threads\n  rounds: 2\n"))
    folder = tmp_path / "ab"
    done = subprocess.run([sys.executable, str(REPO / "harness" / "run_matrix.py"), str(matrix), "--backend", "local",
                           "--results", str(folder)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = done.stdout.splitlines()
    assert summary[0] == "B (threads 2) against A (threads 1); they differ in: threads 1 → 2"
    assert "interleaved A/B in one run, 2 rounds, each a fresh process a side, paired round by round. 1 pair " \
           "judged together (Benjamini–Hochberg false-discovery control at 5%)" in summary[1]
    assert "note: with 2 rounds the sign test can call no pair different (6 rounds at least" in done.stdout
    results = [read_result(path) for path in sorted((folder / "rounds").glob("*/cells/*.json"))]
    assert len(results) == 4 and all(r.status == "ok" for r in results)
    order = sorted((r.env["started_utc"], r.env["ab"]["position"], r.env["ab"]["side"], r.cell.threads) for r in results)
    assert [position for _, position, _, _ in order] == list(range(4))
    assert "".join(side for _, _, side, _ in order) == "ABBA"
    assert [threads for _, _, side, threads in order if side == "B"] == [2] * 2
    written = json.loads((folder / "comparison" / "comparison.json").read_text())
    assert written["differing"] == {"threads": {"a": ["1"], "b": ["2"]}} and written["pairs"][0]["rounds"] == 2
    assert (folder / "report.html").is_file() and (folder / "comparison" / "comparison.png").is_file()

    aa = tmp_path / "aa"
    done = subprocess.run([sys.executable, str(REPO / "harness" / "run_matrix.py"), str(matrix), "--backend", "local",
                           "--results", str(aa), "--ab", "same", "--rounds", "2", "--only", "threads=1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "this host's noise floor (95% of A/A rounds differ by less): median ±" in done.stdout
    floors = json.loads((aa / "comparison" / "comparison.json").read_text())["noise_floors"]
    assert len(floors) == 1 and 0 <= floors[0]["floor"] < 1
