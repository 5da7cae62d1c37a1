"""The bench's entry point, run in the harness's Python (no framework installed there): a cell
whose framework cannot start is still recorded, once, by MPI rank 0 only."""
from __future__ import annotations

import json
import os

import pytest

from bench import __main__ as bench_main
from bench import environment
from bench.environment import mpi_rank


@pytest.mark.parametrize("environ, rank", [
    ({}, 0),
    ({"OMPI_COMM_WORLD_RANK": "1"}, 1),
    ({"PMI_RANK": "3"}, 3),
    ({"PMIX_RANK": "0", "PMI_RANK": "2"}, 0),
    ({"OMPI_COMM_WORLD_RANK": ""}, 0),
])
def test_the_mpi_rank_comes_from_the_launchers_variables(environ, rank):
    assert mpi_rank(environ) == rank


def arguments(out):
    return ["--framework", "cntk", "--task", "cnn_cifar10", "--steps", "1",
            "--repeats", "1", "--warmup-steps", "1", "--out", str(out)]


def test_rank_zero_records_a_cell_whose_framework_cannot_start(tmp_path, monkeypatch):
    monkeypatch.delenv("OMPI_COMM_WORLD_RANK", raising=False)
    out = tmp_path / "cell.json"
    assert bench_main.main(arguments(out)) == 1
    result = json.loads(out.read_text())
    assert result["status"] == "failed" and "cntk" in result["error"]


def test_other_mpi_ranks_write_no_result(tmp_path, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    out = tmp_path / "cell.json"
    assert bench_main.main(arguments(out)) == 1
    assert not out.exists()


def test_xla_flags_come_before_the_bare_thread_count_xla_stops_reading_at(monkeypatch):
    for name in environment.THREAD_VARIABLES:
        monkeypatch.setenv(name, "0")  # restored after the test, as XLA_FLAGS is
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    environment.limit_threads(2)
    environment.expose_cpu_devices(2)
    assert os.environ["XLA_FLAGS"] == ("--xla_dump_to=/tmp/x --xla_cpu_multi_thread_eigen=false "
                                       "--xla_force_host_platform_device_count=2 intra_op_parallelism_threads=2")
