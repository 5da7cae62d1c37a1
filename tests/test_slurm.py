"""The slurm backend for real: a one-node Slurm cluster (scripts/slurm-cluster.sh: slurmctld,
slurmd, munge, slurmdbd on MariaDB) with fake GPUs as GRES, two h100 and one a100. Jobs run
the real bench in the shared PyTorch environment, or in its image through the node's Docker
engine; GPU cells compute on the CPU there (DLBENCH_GPU_STAND_IN=cpu), while expansion,
submission, GRES, CUDA_VISIBLE_DEVICES and collection are the real path.

Without a cluster (SLURM_CONF) these tests are skipped, except under CI=true, where they fail."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, docker_options, write_matrix
from harness.results import RunFolder, read_result

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

QUICK = "settings: {warmup_steps: 1, steps: 2, repeats: 1, max_repeats: 1, batch_size: 8, timeout_s: 600}\nslurm: {poll_s: 1}\n"


@pytest.fixture(scope="module")
def cluster():
    if not os.environ.get("SLURM_CONF") or subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        message = ("no Slurm cluster answers (SLURM_CONF); start one with "
                   "`eval \"$(scripts/slurm-cluster.sh start)\"`")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N"], capture_output=True, text=True,
                          check=True).stdout.split()[0]


def harness(matrix: Path, results: Path, *options: str) -> list[str]:
    return [sys.executable, str(REPO / "harness" / "run_matrix.py"), str(matrix), "--results", str(results),
            "--backend", "slurm", "--no-ceiling", *options]


def run_matrix(matrix: Path, results: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(harness(matrix, results, *options), capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "DLBENCH_GPU_STAND_IN": "cpu"})


def job_ids(folder: RunFolder) -> dict[str, str]:
    return {path.stem: json.loads(path.read_text())["job_id"] for path in folder.jobs.glob("*.json")
            if not path.name.endswith(".launch.json")}


def results(folder: RunFolder) -> dict[tuple[str, str, int], object]:
    found = {}
    for path in folder.cells.glob("*.json"):
        result = read_result(path)
        found[(result.cell.task, result.cell.gpu or "cpu", result.cell.devices)] = result
    return found


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"waited {timeout_s:g} s for {what}")


def squeue_states() -> dict[str, str]:
    listed = subprocess.run(["squeue", "--noheader", "--format=%i %T"], capture_output=True, text=True).stdout
    return dict(line.split() for line in listed.splitlines())


def test_a_matrix_over_gpu_types_runs_as_jobs_detaches_survives_a_killed_harness_and_merges(cluster, tmp_path):
    matrix = write_matrix(tmp_path / "m.yml", """
matrix:
  framework: [pytorch]
  task: [cnn_cifar10]
  gpu: [H100, A100, V100]
  include:
    - {framework: pytorch, task: densenet121_xray, gpu: H100, devices: 2,
       settings: {warmup_steps: 1, steps: 1, repeats: 1, max_repeats: 1, batch_size: 2, image_size: 64, timeout_s: 600}}
""" + QUICK)
    folder = RunFolder(tmp_path / "results")
    plan = run_matrix(matrix, folder.root, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "skip: the cluster has no V100 GPU (it has a100, h100)" in plan.stdout
    assert "4 cells on the cluster: a100 ×1, h100 ×2 (the most on one node)" in plan.stdout
    assert not folder.root.exists()  # a dry run submits and writes nothing

    # --detach: submitted, not waited for; V100 is skipped with the cluster's types.
    detached = run_matrix(matrix, folder.root, "--detach")
    assert detached.returncode == 0, detached.stderr
    assert "3 still running as cluster jobs" in detached.stderr
    submitted = job_ids(folder)
    assert len(submitted) == 3
    [skipped] = [r for r in results(folder).values() if r.status == "skipped"]
    assert skipped.cell.gpu == "V100" and skipped.error == "the cluster has no V100 GPU (it has a100, h100)"

    # One harness at a time on a results folder.
    with folder.lock():
        busy = run_matrix(matrix, folder.root)
    assert busy.returncode == 2 and "another harness is using this results folder" in busy.stderr

    # A waiting harness killed outright leaves the jobs running; the next run submits nothing again.
    waiting = subprocess.Popen(harness(matrix, folder.root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "DLBENCH_GPU_STAND_IN": "cpu"})
    wait_for(lambda: "RUNNING" in squeue_states().values(), 120, "a job to run")
    waiting.send_signal(signal.SIGKILL)
    waiting.wait()
    done = run_matrix(matrix, folder.root)
    assert done.returncode == 0, done.stderr + done.stdout
    assert job_ids(folder) == submitted

    found = results(folder)
    node = socket.gethostname().split(".")[0]
    for (task, gpu, devices), gres, visible in [
            (("cnn_cifar10", "H100", 1), "gpu:h100:1", {"0", "1"}),
            (("cnn_cifar10", "A100", 1), "gpu:a100:1", {"2"}),
            (("densenet121_xray", "H100", 2), "gpu:h100:2", {"0,1"})]:
        result = found[(task, gpu, devices)]
        assert result.status == "ok", result.error
        slurm = result.env["slurm"]
        assert slurm["job_id"] == submitted[result.cell.id] and slurm["state"] == "COMPLETED"
        assert slurm["gres"] == gres and slurm["node"] == cluster == node and slurm["runtime"] == "local"
        assert result.env["cuda_visible_devices"] in visible  # set by Slurm for the job's GRES
        assert result.env["launcher"] == "slurm" and "computed on the CPU" in result.env["gpu_stand_in"]
        assert result.metrics.step_time_s.median > 0
    tables = (folder.tables / "README.md").read_text()
    assert "h100" in tables.lower() and "a100" in tables.lower()


def test_cancelled_timed_out_and_crashing_jobs_are_each_recorded_as_such(cluster, tmp_path):
    matrix = write_matrix(tmp_path / "m.yml", """
matrix:
  framework: [pytorch]
  task: [cnn_cifar10]
  gpu: [A100]
  include:
    - {framework: pytorch, task: gru_imdb, gpu: H100, settings: {LONG, timeout_s: 600}}
    - {framework: pytorch, task: cnn_cifar10, gpu: H100, settings: {LONG, timeout_s: 60}}
settings: {LONG, timeout_s: 600}
slurm: {poll_s: 1}
""".replace("LONG", "warmup_steps: 1, steps: 100000, repeats: 1, max_repeats: 1, batch_size: 8"))
    folder = RunFolder(tmp_path / "results")
    running = subprocess.Popen(harness(matrix, folder.root), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "DLBENCH_GPU_STAND_IN": "cpu"})
    ids = wait_for(lambda: len(job_ids(folder)) == 3 and job_ids(folder), 120, "three jobs")
    by_task_gpu = {}
    for cell_id, job_id in ids.items():
        by_task_gpu[tuple(cell_id.split(".")[:3])] = (cell_id, job_id)
    cancelled_cell, cancelled = by_task_gpu[("gru_imdb", "pytorch", "h100")]
    crashing_cell, crashing = by_task_gpu[("cnn_cifar10", "pytorch", "a100")]
    wait_for(lambda: squeue_states().get(cancelled) == "RUNNING", 180, "the job to cancel to run")
    subprocess.run(["scancel", cancelled], check=True)
    wait_for(lambda: squeue_states().get(crashing) == "RUNNING", 180, "the crashing job to run")
    # The bench process dies as a crash or the kernel's OOM killer would end it.
    wait_for(lambda: subprocess.run(["pkill", "-KILL", "-f", f"bench --request .*/{crashing_cell}.request.json"]).returncode == 0,
             60, "the crashing cell's bench process")
    out, err = running.communicate(timeout=600)
    assert running.returncode == 1, err

    found = {r.cell.id: r for r in (read_result(p) for p in folder.cells.glob("*.json"))}
    assert found[cancelled_cell].status == "failed"
    assert f"the Slurm job {cancelled} on {cluster} was cancelled" in found[cancelled_cell].error
    assert found[cancelled_cell].env["slurm"]["state"] == "CANCELLED"
    assert found[crashing_cell].status == "failed"
    assert f"the Slurm job {crashing} on {cluster} ended FAILED: the cell process was killed by SIGKILL" in (
        found[crashing_cell].error)
    [timed_out] = [r for r in found.values() if r.cell.id not in (cancelled_cell, crashing_cell)]
    assert timed_out.status == "timeout" and timed_out.env["slurm"]["state"] == "TIMEOUT"
    assert "passed its time limit of 1 min (timeout_s 60)" in timed_out.error
    assert not squeue_states()  # nothing of the run is left in the queue


@pytest.mark.docker
def test_a_cell_runs_in_its_image_through_the_nodes_engine(cluster, engine, base_image, wheelhouse, certificate, tmp_path):
    matrix = write_matrix(tmp_path / "m.yml", "matrix:\n  framework: [pytorch]\n  task: [cnn_cifar10]\n"
                                              "  gpu: [cpu]\n" + QUICK)
    done = run_matrix(matrix, tmp_path / "results", "--slurm-runtime", "docker",
                      *docker_options(base_image, wheelhouse, certificate))
    assert done.returncode == 0, done.stderr + done.stdout
    [result] = results(RunFolder(tmp_path / "results")).values()
    assert result.status == "ok", result.error
    assert result.env["slurm"]["runtime"] == "docker" and result.env["slurm"]["gres"] is None
    assert result.env["image"]["tag"].startswith("dlbench/pytorch")


def test_an_interrupted_harness_cancels_its_jobs_and_records_none(cluster, tmp_path):
    matrix = write_matrix(tmp_path / "m.yml", """
matrix: {framework: [pytorch], task: [cnn_cifar10], gpu: [A100]}
settings: {warmup_steps: 1, steps: 100000, repeats: 1, max_repeats: 1, batch_size: 8, timeout_s: 600}
slurm: {poll_s: 1}
""")
    folder = RunFolder(tmp_path / "results")
    running = subprocess.Popen(harness(matrix, folder.root), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "DLBENCH_GPU_STAND_IN": "cpu"})
    [(cell_id, job_id)] = wait_for(lambda: job_ids(folder), 120, "the job").items()
    wait_for(lambda: squeue_states().get(job_id) == "RUNNING", 120, "the job to run")
    running.send_signal(signal.SIGTERM)
    _, err = running.communicate(timeout=120)
    assert running.returncode == 128 + signal.SIGTERM, err
    # scancel is asynchronous: the job may still be COMPLETING while slurmd kills its processes.
    assert squeue_states().get(job_id) in (None, "COMPLETING")
    wait_for(lambda: job_id not in squeue_states(), 60, "the cancelled job to leave the queue")
    wait_for(lambda: subprocess.run(["sacct", "--noheader", "--parsable2", "--allocations", f"--jobs={job_id}",
                                     "--format=State"], capture_output=True, text=True).stdout.startswith("CANCELLED"),
             30, "the accounting to say CANCELLED")
    assert not folder.result_path(cell_id).exists() and not job_ids(folder)
