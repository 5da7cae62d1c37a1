"""The slurm backend's logic against a stand-in for Slurm's commands: the cluster's GPU types as
the inventory, what sbatch is asked for, every end state recorded, jobs found again by a later
run, interruption. The same paths run against a real one-node cluster in test_slurm.py."""
from __future__ import annotations

import json
import subprocess
import threading

import pytest

from bench.result import bench_code_hash
from conftest import result_payload, write_matrix
from harness import backends
from harness.backends import BackendError
from harness.backends.local import CurrentInterpreterBackend
from harness.backends.slurm import JobRecord, JobState, SlurmCli, SlurmBackend, SlurmOptions, job_files
from harness.matrix import Cell, MatrixError, Settings, load
from harness.results import RunFolder, read_result
from harness.runner import run_cells

NODES = [("node1", "gpu:h100:2(S:0-1),gpu:a100:1(S:0)", 64), ("node2", "gpu:a100:4", 64), ("cpu1", "(null)", 32)]


class FakeSlurm:
    """Slurm's commands as the backend calls them: jobs end in the states a test scripts."""

    def __init__(self, ends=("COMPLETED",), exit_code="0:0", write_result=True):
        self.ends = list(ends)  # one end state per submission, in turn
        self.exit_code, self.write_result = exit_code, write_result
        self.submitted: list[list[str]] = []
        self.cancelled: list[str] = []
        self.live: set[str] = set()  # jobs that stay RUNNING until a test ends them
        self.final: dict[str, str] = {}
        self.lock = threading.Lock()

    def nodes(self, partition):
        return NODES

    def submit(self, argv):
        with self.lock:  # cells are submitted from several threads
            self.submitted.append(argv)
            job_id = str(100 + len(self.submitted))
            self.final[job_id] = self.ends.pop(0) if self.ends else "COMPLETED"
        return job_id

    def states(self, job_ids):
        return {job_id: JobState(job_id, "RUNNING" if job_id in self.live else self.final[job_id],
                                 self.exit_code, "node1", "main") for job_id in job_ids}

    def cancel(self, job_ids):
        self.cancelled += job_ids


def slurm_backend(fake, **options):
    return SlurmBackend(SlurmOptions(poll_s=0.05, **options), CurrentInterpreterBackend(), [], cli=fake)


def gpu_cell(gpu="H100", devices=1, task="cnn_cifar10", steps=1):
    return Cell("pytorch", task, gpu, "auto", "auto", devices, "fp32", Settings(steps=steps, timeout_s=150))


class JobWritingSlurm(FakeSlurm):
    """A job that 'ran' writes the bench's result where the job would, when the test says so."""

    def __init__(self, folder, **kwargs):
        super().__init__(**kwargs)
        self.folder = folder

    def submit(self, argv):
        job_id = super().submit(argv)
        if self.write_result:
            cell_id = next(a for a in argv if a.startswith("--job-name=")).split("=", 1)[1]
            payload = result_payload(cell_id=cell_id)
            payload["env"]["bench_hash"] = bench_code_hash()
            path, _ = job_files(self.folder.cell_staging(cell_id), cell_id, job_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(payload))
        return job_id


def run(tmp_path, fake, cells, **options):
    folder = fake.folder
    backend = SlurmBackend(SlurmOptions(poll_s=0.05, **options.pop("slurm", {})), CurrentInterpreterBackend(), [],
                           cli=fake, **options)
    try:
        return run_cells(cells, folder, backend, tmp_path), backend
    finally:
        backend.release()


def test_the_inventory_is_the_clusters_gres_types_with_the_most_on_one_node():
    inventory = slurm_backend(FakeSlurm()).inventory()
    assert [(m.name, m.most_per_cell) for m in inventory.gpu_models] == [("a100", 4), ("h100", 2)]
    assert inventory.names() == ["a100", "h100"]
    assert inventory.describe() == "the cluster: a100 ×4, h100 ×2 (the most on one node); 64 CPU cores"


def test_gpu_names_the_cluster_lacks_are_skipped_saying_which_types_it_has():
    backend = slurm_backend(FakeSlurm())
    assert backend.skip_reason(gpu_cell("H100")) is None
    assert backend.skip_reason(gpu_cell("V100")) == "the cluster has no V100 GPU (it has a100, h100)"
    assert backend.skip_reason(gpu_cell("H100", devices=4, task="densenet121_xray")) == (
        "the cell asks for 4 H100 GPUs and the cluster has 2 on one node")
    mapped = slurm_backend(FakeSlurm(), gres_types={"A100 80GB": "a100"})
    assert mapped.skip_reason(gpu_cell("A100 80GB")) is None
    with pytest.raises(BackendError, match="'V100' maps to the GRES type 'v100', which the cluster does not have "
                                           r"\(its types: a100, h100\)"):
        slurm_backend(FakeSlurm(), gres_types={"V100": "v100"}).inventory()


def test_sbatch_is_asked_for_the_cells_gres_time_name_and_the_cluster_options(tmp_path):
    backend = slurm_backend(FakeSlurm(), partition="gpu", account="ml", qos="high", constraint="nvlink",
                            sbatch_args=["--mem=64G"], cpus_per_gpu=8)
    cell = gpu_cell("H100", devices=2, task="densenet121_xray")
    launch = backends.Launch(cell, tmp_path / "staged.request.json", tmp_path / "staged.json", tmp_path / "logs" / "cell.log", 150)
    argv, gres = backend.sbatch_argv(launch, tmp_path / "spec.json")
    assert gres == "gpu:h100:2"
    assert {f"--job-name={cell.id}", "--gres=gpu:h100:2", "--time=3", "--cpus-per-gpu=8", "--partition=gpu",
            "--account=ml", "--qos=high", "--constraint=nvlink", "--mem=64G", f"--output={launch.log_path}",
            "--open-mode=append"} <= set(argv)
    assert argv[-2] == "--wrap" and "-m harness.backends.slurm_job" in argv[-1] and "spec.json" in argv[-1]
    cpu_argv, cpu_gres = backend.sbatch_argv(
        backends.Launch(gpu_cell("cpu"), launch.request_path, launch.result_path, launch.log_path, 150), tmp_path / "spec.json")
    assert cpu_gres is None and "--exclusive" in cpu_argv and not any(a.startswith("--gres") for a in cpu_argv)


def test_a_completed_job_gives_the_benchs_result_with_the_job_recorded(tmp_path):
    fake = JobWritingSlurm(RunFolder(tmp_path / "run"))
    [outcome], _ = run(tmp_path, fake, [gpu_cell()])
    result = read_result(fake.folder.result_path(gpu_cell().id))
    assert outcome.status == result.status == "ok"
    assert result.env["slurm"] == {"job_id": "101", "state": "COMPLETED", "exit_code": "0:0", "node": "node1",
                                   "partition": "main", "gres": "gpu:h100:1", "runtime": "current", "submission": 1}
    spec = json.loads((fake.folder.jobs / f"{gpu_cell().id}.launch.json").read_text())
    assert Cell.from_dict(spec["cell"]) == gpu_cell()


@pytest.mark.parametrize("end, exit_code, status, words", [
    ("FAILED", "3:0", "failed", "the Slurm job 101 on node1 failed (exit code 3:0)"),
    ("OUT_OF_MEMORY", "0:125", "failed", "the Slurm job 101 on node1 ran out of memory"),
    ("TIMEOUT", "0:15", "timeout", "passed its time limit of 3 min (timeout_s 150) and was stopped"),
    ("CANCELLED", "0:15", "failed", "the Slurm job 101 on node1 was cancelled (scancel, or an administrator)"),
    ("DEADLINE", "0:0", "failed", "reached its deadline"),
])
def test_every_end_state_is_recorded_with_the_jobs_exit_code(tmp_path, end, exit_code, status, words):
    fake = JobWritingSlurm(RunFolder(tmp_path / "run"), ends=[end], exit_code=exit_code, write_result=False)
    [outcome], _ = run(tmp_path, fake, [gpu_cell()])
    result = read_result(fake.folder.result_path(gpu_cell().id))
    assert outcome.status == result.status == status
    assert words in result.error
    assert result.env["slurm"]["state"] == end and result.env["slurm"]["exit_code"] == exit_code


@pytest.mark.parametrize("end", ["NODE_FAIL", "PREEMPTED", "BOOT_FAIL"])
def test_a_node_failure_or_preemption_is_submitted_once_more_then_recorded(tmp_path, end):
    fake = JobWritingSlurm(RunFolder(tmp_path / "run"), ends=[end, "COMPLETED"])
    [outcome], _ = run(tmp_path, fake, [gpu_cell()])
    assert outcome.status == "ok" and len(fake.submitted) == 2
    assert read_result(fake.folder.result_path(gpu_cell().id)).env["slurm"]["submission"] == 2

    again = JobWritingSlurm(RunFolder(tmp_path / "again"), ends=[end, end], write_result=False)
    [outcome], _ = run(tmp_path, again, [gpu_cell()])
    assert outcome.status == "failed" and len(again.submitted) == 2
    assert f"ended {end} (after being submitted twice)" in outcome.error


def test_detached_jobs_are_collected_by_the_next_run_and_never_submitted_twice(tmp_path):
    folder = RunFolder(tmp_path / "run")
    fake = JobWritingSlurm(folder)
    cells = [gpu_cell("H100"), gpu_cell("A100")]
    fake.live = {"101", "102"}
    outcomes, _ = run(tmp_path, fake, cells, detach=True)
    assert outcomes == [] and len(fake.submitted) == 2
    jobs = [JobRecord.read(folder.jobs, cell.id).job_id for cell in cells]
    assert sorted(jobs) == ["101", "102"]

    fake.live = {jobs[1]}  # the first has ended; the second still runs
    outcomes, _ = run(tmp_path, fake, cells, detach=True)
    assert [(o.cell, o.status) for o in outcomes] == [(cells[0], "ok")] and len(fake.submitted) == 2

    threading.Timer(0.3, fake.live.clear).start()  # a waiting run sees the second end
    outcomes, _ = run(tmp_path, fake, cells)
    assert [(o.status, o.reused) for o in outcomes] == [("ok", True), ("ok", False)]
    assert len(fake.submitted) == 2


def test_a_failed_cell_gets_a_new_job_on_the_next_run(tmp_path):
    folder = RunFolder(tmp_path / "run")
    fake = JobWritingSlurm(folder, ends=["FAILED", "COMPLETED"], exit_code="1:0", write_result=False)
    assert [o.status for o in run(tmp_path, fake, [gpu_cell()])[0]] == ["failed"]
    fake.write_result = True
    assert [o.status for o in run(tmp_path, fake, [gpu_cell()])[0]] == ["ok"]
    assert len(fake.submitted) == 2


def test_an_interrupted_run_cancels_its_jobs_and_records_none(tmp_path):
    folder = RunFolder(tmp_path / "run")
    fake = JobWritingSlurm(folder, write_result=False)
    fake.live = {"101"}
    backend = SlurmBackend(SlurmOptions(poll_s=0.05), CurrentInterpreterBackend(), [], cli=fake)
    launch = backends.Launch(gpu_cell(), folder.staging / "c.request.json", folder.staging / "c.json", folder.logs / "c.log", 150, folder=folder)
    threading.Timer(0.5, launch.interrupted.set).start()
    ended = backend.run(launch)
    backend.release()
    assert ended.interrupted and fake.cancelled == ["101"]
    assert JobRecord.read(folder.jobs, gpu_cell().id) is None


def test_the_slurm_block_is_validated_with_file_and_line(tmp_path):
    path = write_matrix(tmp_path / "m.yml", """
matrix:
  framework: [pytorch]
  task: [cnn_cifar10]
slurm:
  partition: gpu
  gres_types: {"A100 80GB": a100_80gb}
  qos_name: high
""")
    with pytest.raises(MatrixError, match=r"m.yml:7: slurm.qos_name: unknown key 'qos_name'; allowed keys here: "
                                          r"partition, account, qos"):
        load(path).section("slurm", SlurmOptions)
    path.write_text(path.read_text().replace("  qos_name: high\n", "  poll_s: fast\n"))
    with pytest.raises(MatrixError, match=r"m.yml:7: slurm.poll_s: "):
        load(path).section("slurm", SlurmOptions)


def test_command_line_options_take_precedence_over_the_matrix_block(tmp_path):
    path = write_matrix(tmp_path / "m.yml", """
matrix: {framework: [pytorch], task: [cnn_cifar10]}
slurm: {partition: gpu, sbatch_args: [--mem=8G], gres_types: {H100: h100}}
""")
    args = backends.options(["--backend", "slurm", "--partition", "debug", "--sbatch-arg=--exclusive",
                             "--gres-type", "A100 80GB=a100", "--slurm-runtime", "current"])
    backend = SlurmBackend.from_args(args, load(path))
    assert backend.options.partition == "debug" and backend.options.runtime == "current"
    assert backend.options.sbatch_args == ["--mem=8G", "--exclusive"]
    assert backend.options.gres_types == {"H100": "h100", "A100 80GB": "a100"}
    with pytest.raises(BackendError, match="--gres-type 'A100': write NAME=TYPE"):
        SlurmBackend.from_args(backends.options(["--gres-type", "A100"]), load(path))

    class Cluster(FakeSlurm):
        def nodes(self, partition):
            return [("node1", "gpu:a100:1", 8)]

    backend = SlurmBackend.from_args(args, load(path))
    backend.cli = Cluster()
    with pytest.raises(BackendError, match=r"m.yml:2: slurm.gres_types: 'H100' maps to the GRES type 'h100', which "
                                           r"the cluster does not have \(its types: a100\); fix the name"):
        backend.inventory()


def test_sacct_and_scontrol_answers_are_read():
    answers = {
        "sacct": "101|COMPLETED|0:0|node1|main\n102|CANCELLED by 0|0:15|node1|main\n103|PENDING|0:0|None assigned|main\n"
                 "106|COMPLETED|0:0|node1|\n",  # sacct's partition lags behind the job's end
        "104": "JobId=104 JobName=x JobState=RUNNING Reason=None ExitCode=0:0 NodeList=node2 Partition=gpu\n",
        "106": "JobId=106 JobName=x JobState=COMPLETED Reason=None ExitCode=0:0 NodeList=node1 Partition=main\n",
    }

    def fake_run(argv, **kwargs):
        answer = answers.get(argv[0], answers.get(argv[-1]))
        if answer is None:
            return subprocess.CompletedProcess(argv, 1, "", "slurm_load_jobs error: Invalid job id specified")
        return subprocess.CompletedProcess(argv, 0, answer, "")

    states = SlurmCli(fake_run).states(["101", "102", "103", "104", "105", "106"])
    assert states["101"] == JobState("101", "COMPLETED", "0:0", "node1", "main")
    assert states["102"].state == "CANCELLED" and states["102"].ended
    assert states["103"].node == "" and not states["103"].ended
    assert states["104"] == JobState("104", "RUNNING", "0:0", "node2", "gpu")
    assert "105" not in states
    assert states["106"] == JobState("106", "COMPLETED", "0:0", "node1", "main")


def test_missing_slurm_commands_are_a_clear_error():
    def missing(argv, **kwargs):
        raise FileNotFoundError(argv[0])

    with pytest.raises(BackendError, match="sinfo is not on PATH: the slurm backend needs Slurm's client commands"):
        SlurmCli(missing).nodes(None)


def test_job_records_survive_a_round_trip(tmp_path):
    record = JobRecord("cell", "7", 1, "2026-12-02T00:00:00+00:00", "gpu:h100:1", "local")
    record.write(tmp_path)
    assert JobRecord.read(tmp_path, "cell") == record
    assert JobRecord.read(tmp_path, "other") is None
