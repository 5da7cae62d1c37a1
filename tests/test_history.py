"""history.py: change-points in each cell's series of results, where they happened, what changed
there, and a guard that fails on a slowdown not undone since."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from conftest import SLOWER, result_payload, write_run_history
from harness.history import detect, history, main
from harness.results import load_results

SEEDS = range(50)
NOISE = 0.03


def noisy(points: int, seed: int) -> np.ndarray:
    return 1 + np.random.default_rng(seed).normal(0, NOISE, points)


def test_a_flat_series_has_no_change_point():
    false = [seed for seed in SEEDS if detect(noisy(20, seed))]
    assert len(false) <= 1


def test_a_ten_percent_step_in_the_middle_is_found_where_it_is():
    found = [detect(noisy(20, seed) * np.where(np.arange(20) >= 10, 1.10, 1)) for seed in SEEDS]
    assert sum(len(f) == 1 and abs(f[0] - 10) <= 1 for f in found) >= 45
    assert detect(np.r_[np.ones(10), np.full(10, 1.10)]) == [10]  # without noise: exactly there


@pytest.mark.parametrize("where", [10, 19], ids=["in the middle", "the newest run"])
def test_a_single_outlier_is_not_a_step(where):
    assert not any(detect(noisy(20, seed) * np.where(np.arange(20) == where, 1.5, 1)) for seed in SEEDS)


def test_too_short_a_series_has_no_change_point():
    assert detect([1.0, 1.0, 2.0]) == []
    assert detect([1.0, 1.0, 2.0, 2.0]) == [2]  # two runs on each side


def test_a_history_of_runs_finds_the_step_between_two_runs_and_what_changed(tmp_path):
    found = history(load_results(write_run_history(tmp_path / "history")).results)
    assert len(found.series) == 2 and len(found.tracked) == 2
    [(series, change)] = found.change_points
    assert series.row.cell.framework == "pytorch" and len(series.points) == 10
    assert len(series.points[2].medians) == 2  # a run's repeats are one point
    assert change.slowdown and change.ratio == pytest.approx(1.10, rel=0.02)
    assert change.before.runs == [str(tmp_path / "history" / "run-04")]
    assert change.after.runs == [str(tmp_path / "history" / "run-05")]
    assert change.changed == {"cuda": (["12.8"], ["13.0"]), "framework version": (["1.0"], ["2.0"])}
    assert found.unresolved == [series]


def test_points_by_framework_version_gather_the_runs_of_each(tmp_path):
    found = history(load_results(write_run_history(tmp_path / "history")).results, by="framework-version")
    pytorch = next(s for s in found.series if s.row.cell.framework == "pytorch")
    assert [p.group for p in pytorch.points] == ["1.0", "2.0"] and len(pytorch.points[1].runs) == 5
    assert found.change_points == []  # two points: too few for a step


def test_the_command_prints_the_step_writes_json_and_charts(tmp_path, capsys):
    root = write_run_history(tmp_path / "history")
    assert main([str(root), "--json", str(tmp_path / "history.json"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 series, 2 with two points or more (by date); 1 change-point(s): 1 slowdown(s)")
    written = json.loads((tmp_path / "history.json").read_text())
    [change] = written["change_points"]
    assert f"slowdown ×{change['ratio']:.3f}, latest" in out and change["ratio"] == pytest.approx(1.10, rel=0.02)
    assert "cuda 12.8 → 13.0; framework version 1.0 → 2.0" in out
    assert change["kind"] == "slowdown" and change["latest"] and change["series"]["framework"] == "pytorch"
    assert change["before"]["runs"] == [str(root / "run-04")] and change["points_after"] == 5
    assert change["changed"]["cuda"] == {"before": ["12.8"], "after": ["13.0"]}
    assert written["unresolved"] == [change["series"]["name"]]
    assert (tmp_path / "out" / "history-cnn_cifar10.png").is_file()
    assert (tmp_path / "out" / "history.txt").read_text() == out


def test_fail_on_regression_exits_1_on_a_slowdown_and_0_on_a_speed_up(tmp_path, capsys):
    slower = write_run_history(tmp_path / "slower")
    assert main([str(slower), "--fail-on-regression"]) == 1
    assert re.fullmatch(rf"regression: cnn_cifar10: pytorch, NVIDIA H100 80GB HBM3, fp32 on host: ×1\.\d+ since "
                        rf"{re.escape(str(slower / 'run-05'))}\n", capsys.readouterr().err)
    assert main([str(write_run_history(tmp_path / "faster", (1,) * 5 + (0.90,) * 5)), "--fail-on-regression"]) == 0
    assert re.search(r"speed-up ×0\.\d+, latest", capsys.readouterr().out)


def test_a_regression_undone_since_does_not_fail(tmp_path):
    root = write_run_history(tmp_path / "history", SLOWER + (1,) * 5)  # five more runs as fast as before the step
    found = history(load_results(root).results)
    assert [c.kind for _, c in found.change_points] == ["slowdown", "speed-up"] and found.unresolved == []
    assert main([str(root), "--fail-on-regression"]) == 0


def test_the_sides_of_an_interleaved_ab_run_are_not_points_of_a_history(tmp_path):
    root = write_run_history(tmp_path / "history")
    for side, cuda in (("A", "12.8"), ("B", "13.0")):
        cells = root / "ab" / "rounds" / f"0-{side}" / "cells"
        cells.mkdir(parents=True)
        payload = result_payload(device="gpu", gpu_name="NVIDIA H100 80GB HBM3", cuda=cuda, cudnn="9",
                                 finished="2026-11-20T10:00:00+00:00")
        payload["env"]["ab"] = {"axis": "cuda", "side": side, "value": cuda, "round": 0, "position": 0, "rounds": 2}
        (cells / "cnn_cifar10.pytorch.json").write_text(json.dumps(payload))
    loaded = load_results(root)
    assert len(loaded.results) == 23 and not loaded.problems
    assert [len(s.points) for s in history(loaded.results).series] == [10, 10]


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'missing'}: no such results folder") and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'empty'}: no successful cell results") and err.count("\n") == 1
