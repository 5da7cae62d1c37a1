"""The result contract: statistics, atomic writes, the schema."""
from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest

from bench.result import Summary, write_json_atomic
from conftest import REPO
from harness.results import schema_problem


def test_summary_statistics():
    summary = Summary.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (summary.median, summary.min, summary.max) == (3.0, 1.0, 5.0)
    assert (summary.q1, summary.q3, summary.iqr) == (2.0, 4.0, 2.0)
    assert summary.values == [5.0, 1.0, 3.0, 2.0, 4.0]  # every repeat is kept, in order


def test_summary_of_one_value_has_no_spread():
    summary = Summary.of([0.25])
    assert summary.median == summary.q1 == summary.q3 == 0.25 and summary.iqr == 0


def test_summary_needs_values():
    with pytest.raises(ValueError):
        Summary.of([])


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "cell.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["cell.json"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_are_as_readable_as_the_umask_allows(tmp_path, umask, mode):
    # Results are shared on team filesystems: not mkstemp's 0600.
    target = tmp_path / "cell.json"
    write = f"from bench.result import write_text_atomic; write_text_atomic({str(target)!r}, '{{}}')"
    subprocess.run(["sh", "-c", f"umask {umask:03o} && exec \"$0\" -c \"$1\"", sys.executable, write],
                   cwd=REPO, check=True)
    assert stat.S_IMODE(target.stat().st_mode) == mode


def test_schema_requires_an_error_text_for_cells_that_are_not_ok(make_result):
    failed = make_result(status="failed", error=None)
    assert "error" in schema_problem(failed)
    assert schema_problem(make_result(status="failed", error="boom")) is None


def test_schema_requires_metrics_and_environment_for_ok_cells(make_result):
    ok = make_result()
    assert schema_problem(ok) is None
    del ok["env"]["cpu_model"]
    assert "cpu_model" in schema_problem(ok)


def test_a_schema_2_result_gets_the_statistics_and_work_it_was_written_without(make_result):
    from bench.result import Result
    payload = make_result()  # schema 3, as the bench writes it now
    payload["schema_version"] = 2
    for key in ("mean", "cv", "ci95"):
        del payload["metrics"]["step_time_s"][key]
    del payload["model"]["flops_per_example"], payload["metrics"]["tflops_per_s"]
    assert schema_problem(payload) is None
    result = Result.from_dict(payload)
    assert result.metrics.step_time_s.ci95 == Summary.of(payload["metrics"]["step_time_s"]["values"]).ci95
    assert result.model.flops_per_example == 3 * 124_528_640
    assert result.metrics.tflops_per_s == pytest.approx(result.metrics.throughput_per_s * 373_585_920 / 1e12)
