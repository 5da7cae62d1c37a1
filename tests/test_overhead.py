"""The overhead benchmark (harness/overhead.py) and its plain loops: every framework's plain
loop runs the bench's own network, and the benchmark pairs it with the bench's cell. Figures
are not asserted: they are the benchmark's to report."""
from __future__ import annotations

import importlib
import json
import os
import subprocess

import pytest

from conftest import REPO, framework_python
from harness import overhead
from harness.parity import LOCAL_FRAMEWORKS


def test_a_pair_without_both_sides_has_no_ratio():
    pair = overhead.Pair("pytorch", "cnn_cifar10", 64, None, plain_s=[0.10, 0.12], cell_s=[0.11, 0.13])
    assert pair.ratio == pytest.approx((0.11 / 0.10 + 0.13 / 0.12) / 2)  # the median of two ratios
    assert overhead.Pair("jax", "gru_imdb", 64, None, plain_s=[0.1]).ratio is None
    assert overhead.Pair("jax", "gru_imdb", 64, None, [0.1], [0.1], error="the cell failed").ratio is None


def test_the_plain_loop_and_the_cell_alternate_block_by_block(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(overhead.PLAIN_LOOPS))
    common = importlib.import_module("common")
    order = []

    class Cell:
        def run(self, steps):
            order.append(("cell", steps))
    monkeypatch.setattr(common, "bench_cell", lambda *arguments: Cell())

    def loop(spec, input_shape, batch_size):
        return "NTC", (len, lambda steps: order.append(("plain", steps)))  # a block: its number of batches
    common.main({"gru_imdb": loop}, None, ["--task", "gru_imdb", "--batch-size", "2", "--warmup-steps", "3",
                                           "--steps", "4", "--repeats", "4", "--cell", "pytorch"])
    warm_up = [("plain", 3), ("cell", 1), ("cell", 2)]  # the cell's as the protocol's: one step, then the rest
    assert order == warm_up + [("plain", 4), ("cell", 4), ("cell", 4), ("plain", 4)] * 2
    blocks = json.loads(capsys.readouterr().out)
    assert len(blocks["step_time_s"]) == len(blocks["cell_step_time_s"]) == 4


def test_a_pair_is_judged_on_the_median_ratio_of_neighbouring_blocks_with_an_interval():
    # The host drifts (a later block is slower on both sides) and bursts of interference double
    # a block of either side: each ratio of neighbours cancels the drift, their median the bursts.
    plain = [0.10, 0.20, 0.12, 0.14, 0.16, 0.18, 0.40]
    cell = [0.101, 0.102, 0.242, 0.1414, 0.1616, 0.1818, 0.202]
    pair = overhead.Pair("pytorch", "gru_imdb", 64, None, plain_s=plain, cell_s=cell)
    low, high = pair.interval
    assert pair.ratio == pytest.approx(1.01) and low <= pair.ratio <= high
    swapped = overhead.Pair("pytorch", "gru_imdb", 64, None, plain_s=cell, cell_s=plain)
    assert swapped.ratio == pytest.approx(1 / 1.01)


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
