"""The overhead benchmark (harness/overhead.py) and its plain loops: every framework's plain
loop runs the bench's own network, and the benchmark pairs it with the bench's cell. Figures
are not asserted: they are the benchmark's to report."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO, framework_python
from harness import overhead
from harness.parity import LOCAL_FRAMEWORKS


def test_a_pair_without_both_sides_has_no_ratio():
    pair = overhead.Pair("pytorch", "cnn_cifar10", 64, None, plain_s=[0.10, 0.12], cell_s=[0.11, 0.13])
    assert pair.ratio == pytest.approx(0.12 / 0.11)
    assert overhead.Pair("jax", "gru_imdb", 64, None, plain_s=[0.1]).ratio is None
    assert overhead.Pair("jax", "gru_imdb", 64, None, [0.1], [0.1], error="the cell failed").ratio is None


def test_rounds_alternate_which_side_runs_first_and_keep_every_block():
    pair, order = overhead.Pair("pytorch", "gru_imdb", 64, None), []

    def side(name, times):
        return lambda: order.append(name) or times
    for index in range(4):
        pair.measure_round(index, side("plain", [0.10, 0.11]), side("cell", [0.12, 0.13]))
    assert order == ["plain", "cell", "cell", "plain", "plain", "cell", "cell", "plain"]
    assert pair.plain_s == [0.10, 0.11] * 4 and pair.cell_s == [0.12, 0.13] * 4
    low, high = pair.interval
    assert pair.ratio == pytest.approx(0.125 / 0.105) and low <= pair.ratio <= high


@pytest.mark.parametrize("argv, message", [
    (["--frameworks", "cntk"], "run only in their own images"),
    (["--rounds", "0"], "must be at least 1"),
    (["--target", "1.5"], "--target between 0 and 1"),
])
def test_bad_arguments_exit_2_saying_which(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        overhead.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.parametrize("framework", LOCAL_FRAMEWORKS)
def test_each_frameworks_plain_loop_trains_the_benchs_network(framework):
    python = framework_python(framework)
    script = overhead.plain_loop_script(framework)
    env = overhead.framework_env(framework)
    done = subprocess.run([str(python), str(script), "--task", "cnn_cifar10", "--batch-size", "16",
                           "--warmup-steps", "1", "--steps", "2", "--repeats", "2"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    timing = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(timing["step_time_s"]) == 2 and timing["median"] > 0


@pytest.mark.integration
def test_the_benchmark_pairs_a_plain_loop_with_the_cell_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    status = overhead.main(["--frameworks", "pytorch", "--tasks", "cnn_cifar10", "--rounds", "1",
                            "--warmup-steps", "1", "--steps", "2", "--repeats", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    (pair,) = report["pairs"]
    assert pair["error"] is None and pair["ratio"] > 0 and len(pair["plain_s"]) == len(pair["cell_s"]) == 1
    assert pair["interval"] is None  # one block a side: no interval
    assert status == (0 if pair["ratio"] <= 1.05 else 1)
    assert "cell / plain" in capsys.readouterr().out
