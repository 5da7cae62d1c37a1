"""The slurm backend: every cell is one Slurm job, placed by the cluster, not by the harness.

The harness prepares each framework's environment (a virtual environment on a filesystem the
nodes share, or an image) before it submits anything, then submits one job per cell with
``sbatch``: ``--gres=gpu:<type>:<devices>`` for GPU cells (the node's Slurm sets
CUDA_VISIBLE_DEVICES), the cell's timeout as ``--time``, the cell id as job name, its output
into the run folder's ``logs/``. The job runs the cell through a host backend, the *runtime*
(``local``: the shared virtual environment; ``docker``: the framework's image through the
node's engine; ``apptainer``: its image as a SIF file), with ``python -m
harness.backends.slurm_job``.

Jobs outlive the harness. The run folder's ``jobs/`` holds each submitted cell's job id until
its result is in: running the same command again collects what has ended, waits for what
still runs (``--detach``: does not wait) and submits only what is missing or failed. Ctrl-C
or SIGTERM cancels this run's jobs. Every end state is recorded with the job's exit code and
log: COMPLETED (the result the bench wrote), FAILED, OUT_OF_MEMORY, TIMEOUT, CANCELLED,
DEADLINE, and PREEMPTED, NODE_FAIL or BOOT_FAIL (submitted once more, then recorded).

The Slurm commands are driven directly (``sinfo``, ``sbatch --parsable``, ``sacct``,
``scontrol show job``, ``scancel``): a job here is a command, not a Python function to pickle,
and it must be found again by a later harness from its id alone; pyslurm follows one Slurm
release at a time.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from bench.host import utc_now
from bench.result import write_json_atomic

from ..matrix import Cell, MatrixError
from .base import (BACKENDS, REPO_ROOT, Backend, BackendError, Exit, GpuModel, Inventory, Launch, Placement,
                   Progress, quiet, register)

# States a job does not leave by itself; any other state is still on its way.
# LOST is the harness's own word for a job the cluster has forgotten.
END_STATES = {"COMPLETED", "FAILED", "OUT_OF_MEMORY", "TIMEOUT", "CANCELLED", "PREEMPTED", "NODE_FAIL",
              "BOOT_FAIL", "DEADLINE", "LOST"}
# Ends that are the cluster's doing, not the cell's: the job is submitted once more.
RESUBMITTED = {"PREEMPTED", "NODE_FAIL", "BOOT_FAIL"}
SUBMISSIONS = 2  # the first, and the one after a node failure or preemption
# A job that neither sacct nor scontrol knows this long after its submission is lost.
LOST_AFTER_S = 600
# Cells whose jobs may be in the queue at once.
MOST_JOBS = 500


class SlurmOptions(BaseModel):
    """The ``slurm:`` block of matrix.yml; the command line's options take precedence."""

    model_config = ConfigDict(extra="forbid", strict=True)

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None  # node features, e.g. "nvlink&ib"
    sbatch_args: list[str] = []  # passed to sbatch as they are, e.g. ["--exclusive", "--mem=64G"]
    # Matrix GPU names -> the cluster's GRES types ("A100 80GB": a100_80gb); a name not
    # listed matches a type whose words it has ("H100" names h100).
    gres_types: dict[str, str] = {}
    cpus_per_gpu: Optional[int] = Field(None, ge=1)  # default: the cluster's
    runtime: Literal["local", "docker", "apptainer", "current"] = "local"
    poll_s: float = Field(10.0, gt=0)  # how often sacct is asked about the run's jobs


@dataclass
class JobState:
    job_id: str
    state: str  # COMPLETED, RUNNING, ... (Slurm's word, without "by <uid>")
    exit_code: str = ""  # "exit:signal", as sacct writes it
    node: str = ""
    partition: str = ""

    @property
    def ended(self) -> bool:
        return self.state in END_STATES


class SlurmCli:
    """The Slurm client commands, each one call; SlurmError says what a command answered."""

    def __init__(self, run=subprocess.run):
        self._run = run

    def call(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        try:
            done = self._run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL, timeout=120)
        except FileNotFoundError:
            raise BackendError(f"{argv[0]} is not on PATH: the slurm backend needs Slurm's client commands "
                               f"(sinfo, sbatch, sacct, scontrol, scancel) and the cluster's slurm.conf "
                               f"(SLURM_CONF)") from None
        except subprocess.TimeoutExpired:
            raise BackendError(f"{argv[0]} did not answer in 120 s: is slurmctld up?") from None
        if check and done.returncode != 0:
            raise BackendError(f"{' '.join(argv[:2])} failed (exit {done.returncode}): "
                               f"{(done.stderr or done.stdout).strip() or 'no message'}")
        return done

    def nodes(self, partition: str | None) -> list[tuple[str, str, int]]:
        """(node, GRES, CPUs) of every node, in the partition when one is named."""
        argv = ["sinfo", "--noheader", "--Node", "--format=%N|%G|%c"]
        if partition:
            argv.append(f"--partition={partition}")
        rows = []
        for line in self.call(*argv).stdout.splitlines():
            node, gres, cpus = line.strip().split("|")
            rows.append((node, gres, int(cpus) if cpus.isdigit() else 0))
        return rows

    def submit(self, argv: list[str]) -> str:
        """sbatch --parsable: the new job's id."""
        return self.call("sbatch", "--parsable", *argv).stdout.strip().split(";")[0]

    def states(self, job_ids: list[str]) -> dict[str, JobState]:
        """What sacct (the accounting database) says of the jobs, and scontrol (the controller)
        of those sacct does not know yet, or at all, or knows only in part (its partition
        lags a few seconds behind); a job neither knows is left out."""
        found: dict[str, JobState] = {}
        if job_ids:
            done = self.call("sacct", "--noheader", "--parsable2", "--allocations", f"--jobs={','.join(job_ids)}",
                             "--format=JobID,State,ExitCode,NodeList,Partition", check=False)
            if done.returncode == 0:
                for line in done.stdout.splitlines():
                    job_id, state, exit_code, node, partition = line.split("|")[:5]
                    if job_id in job_ids:
                        found[job_id] = JobState(job_id, state.split()[0] if state else "", exit_code,
                                                 "" if node in ("None assigned", "(null)") else node, partition)
        for job_id in job_ids:
            if job_id not in found or not found[job_id].partition:
                found.update(self._controller_state(job_id))
        return found

    def _controller_state(self, job_id: str) -> dict[str, JobState]:
        done = self.call("scontrol", "--oneliner", "show", "job", job_id, check=False)
        fields = dict(re.findall(r"(\w+)=(\S*)", done.stdout)) if done.returncode == 0 else {}
        if not fields.get("JobState"):
            return {}
        return {job_id: JobState(job_id, fields["JobState"], fields.get("ExitCode", ""),
                                 "" if fields.get("NodeList") == "(null)" else fields.get("NodeList", ""),
                                 fields.get("Partition", ""))}

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids:
            self.call("scancel", *job_ids, check=False)


@dataclass
class JobRecord:
    """jobs/<cell id>.json: a submitted cell's job, kept until a later job of the cell replaces it."""

    cell_id: str
    job_id: str
    submission: int  # 1, or 2 after a node failure or preemption
    submitted_utc: str
    gres: str | None
    runtime: str

    @staticmethod
    def path(jobs: Path, cell_id: str) -> Path:
        return jobs / f"{cell_id}.json"

    @classmethod
    def read(cls, jobs: Path, cell_id: str) -> JobRecord | None:
        try:
            return cls(**json.loads(cls.path(jobs, cell_id).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None

    def write(self, jobs: Path) -> None:
        write_json_atomic(self.path(jobs, self.cell_id), asdict(self))


def time_limit_minutes(cell: Cell) -> int:
    """The cell's timeout as Slurm's --time: whole minutes, at least one."""
    return max(1, math.ceil(cell.settings.timeout_s / 60))


def job_files(staging: Path, cell_id: str, job_id: str) -> tuple[Path, Path]:
    """Where a job writes the cell's result, and how its runtime saw the cell end."""
    return staging / f"{cell_id}.job-{job_id}.json", staging / f"{cell_id}.job-{job_id}.exit.json"


class JobWatcher:
    """One thread asks Slurm about every job the run waits for, every ``poll_s`` seconds, so
    a thousand waiting cells cost one sacct call a poll."""

    def __init__(self, cli: SlurmCli, poll_s: float):
        self.cli, self.poll_s = cli, poll_s
        self.states: dict[str, JobState] = {}
        self.watched: dict[str, float] = {}  # job id -> when the watch began
        self.changed = threading.Condition()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def wait(self, job_id: str, interrupted: threading.Event) -> JobState | None:
        """The job's end state, or None when the run was interrupted first."""
        with self.changed:
            self.watched.setdefault(job_id, time.monotonic())
            if self.thread is None:
                self.thread = threading.Thread(target=self._poll, name="slurm-poll", daemon=True)
                self.thread.start()
            while not interrupted.is_set():
                state = self.states.get(job_id)
                if state and state.ended:
                    del self.watched[job_id]
                    return state
                self.changed.wait(timeout=0.5)
            del self.watched[job_id]
            return None

    def _poll(self) -> None:
        while not self.stopped.is_set():
            with self.changed:
                job_ids = list(self.watched)
            try:
                states = self.cli.states(job_ids)
            except BackendError as error:  # slurmctld away for a moment: ask again next time
                print(f"slurm: {error}", file=sys.stderr)
                states = {}
            with self.changed:
                self.states.update(states)
                for job_id in job_ids:
                    if job_id not in states and time.monotonic() - self.watched.get(job_id, 0) > LOST_AFTER_S:
                        self.states[job_id] = JobState(job_id, "LOST")
                self.changed.notify_all()
            self.stopped.wait(self.poll_s)

    def stop(self) -> None:
        self.stopped.set()


class ClusterQueue(Placement):
    """Slurm places the jobs: every prepared cell is submitted at once (up to MOST_JOBS in the
    queue); the harness hands out no GPUs itself."""

    def __init__(self, inventory: Inventory, at_once: int = MOST_JOBS):
        self.inventory = inventory
        self.at_once = at_once
        self.running: set[str] = set()

    def most_on_host(self, cell: Cell) -> int:
        """GPU cells may share a node with as many others as it has GPUs; CPU cells have theirs alone."""
        model = self.inventory.model_for(cell.gpu) if cell.device == "gpu" else None
        return model.most_per_cell if model else 1

    def start_now(self, waiting: list[Cell]) -> list[tuple[Cell, list]]:
        started = [(cell, []) for cell in waiting[:max(0, self.at_once - len(self.running))]]
        self.running |= {cell.id for cell, _ in started}
        return started

    def finished(self, cell: Cell) -> None:
        self.running.discard(cell.id)


@register
class SlurmBackend(Backend):
    name = "slurm"
    summary = "one Slurm job per cell, placed by the cluster (--partition, --gres-type, --detach ...)"

    def __init__(self, options: SlurmOptions, runtime: Backend, runtime_argv: list[str],
                 detach: bool = False, cli: SlurmCli | None = None, places: dict[str, str] | None = None):
        self.options = options
        self.places = places or {}  # where each of options.gres_types was given: "file:line: " or "--gres-type "
        self.runtime = runtime  # the host backend each job runs its cell with
        self.runtime_argv = runtime_argv  # the command line that makes the same runtime on a node
        self.detach = detach
        self.cli = cli or SlurmCli()
        self.prepare_at_once = runtime.prepare_at_once
        self._inventory: Inventory | None = None
        self.watcher = JobWatcher(self.cli, options.poll_s)

    @classmethod
    def add_arguments(cls, parser) -> None:
        group = parser.add_argument_group("slurm backend (also the matrix file's slurm: block)")
        group.add_argument("--partition", help="partition the jobs go to (default: the cluster's)")
        group.add_argument("--account", help="account the jobs are charged to")
        group.add_argument("--qos", help="quality of service of the jobs")
        group.add_argument("--constraint", help="node features the jobs need, e.g. 'nvlink'")
        group.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                           help="an sbatch option passed as it is, e.g. --sbatch-arg=--mem=64G (repeatable)")
        group.add_argument("--gres-type", action="append", default=[], metavar="NAME=TYPE",
                           help="a matrix GPU name and the cluster's GRES type for it, e.g. 'A100 80GB=a100_80gb' "
                                "(repeatable)")
        group.add_argument("--slurm-runtime", choices=SlurmOptions.model_fields["runtime"].annotation.__args__,
                           help="what a job runs its cell in: local (the framework's virtual environment under "
                                "--cache-dir, on a filesystem the nodes share; the default), docker (its image "
                                "through the node's engine), apptainer (its image as a SIF file), current")
        group.add_argument("--detach", action="store_true",
                           help="submit the jobs and exit; running the same command again collects them")

    @classmethod
    def from_args(cls, args, matrix=None) -> "SlurmBackend":
        try:
            options = matrix.section("slurm", SlurmOptions) if matrix else SlurmOptions()
        except MatrixError as error:
            raise BackendError(str(error)) from None
        aliases = dict(options.gres_types)
        places = {name: f"{matrix.place('slurm', 'gres_types', name)}: slurm.gres_types" for name in aliases}
        for pair in args.gres_type:
            name, _, gres = pair.partition("=")
            if not name.strip() or not gres.strip():
                raise BackendError(f"--gres-type {pair!r}: write NAME=TYPE, e.g. 'A100 80GB=a100_80gb'")
            aliases[name.strip()] = gres.strip()
            places[name.strip()] = "--gres-type"
        given = {"partition": args.partition, "account": args.account, "qos": args.qos,
                 "constraint": args.constraint, "runtime": args.slurm_runtime}
        options = options.model_copy(update={
            **{key: value for key, value in given.items() if value is not None},
            "sbatch_args": [*options.sbatch_args, *args.sbatch_arg], "gres_types": aliases})
        if options.runtime not in BACKENDS:
            raise BackendError(f"slurm runtime {options.runtime!r} is not a backend here")
        runtime = BACKENDS[options.runtime].from_args(args, matrix)
        return cls(options, runtime, list(getattr(args, "argv", [])), detach=args.detach, places=places)

    # Placement: the cluster's GPU types and Slurm's own scheduling.

    def inventory(self) -> Inventory:
        if self._inventory is None:
            self._inventory = self._ask_inventory()
        return self._inventory

    def _ask_inventory(self) -> Inventory:
        most: dict[str, int] = {}
        nodes = self.cli.nodes(self.options.partition)
        for _, gres, _ in nodes:
            per_node: dict[str, int] = {}
            for kind, count in re.findall(r"\bgpu(?::([^:(,]+))?:(\d+)", gres):
                per_node[kind or "gpu"] = per_node.get(kind or "gpu", 0) + int(count)
            for kind, count in per_node.items():
                most[kind] = max(most.get(kind, 0), count)
        inventory = Inventory("the cluster", tuple(GpuModel(kind, count) for kind, count in sorted(most.items())),
                              aliases=self.options.gres_types, cpu_cores=max((cpus for *_, cpus in nodes), default=0))
        for name, gres in self.options.gres_types.items():
            if gres not in most:
                raise BackendError(f"{self.places.get(name, 'slurm.gres_types')}: {name!r} maps to the GRES type "
                                   f"{gres!r}, which the cluster does not have (its types: "
                                   f"{', '.join(sorted(most)) or 'none'}); fix the name")
        return inventory

    def placement(self, serial: bool) -> Placement:
        return ClusterQueue(self.inventory(), 1 if serial else MOST_JOBS)

    def cannot_run(self, cell: Cell) -> str | None:
        return self.runtime.cannot_run(cell)

    def prepare(self, cell: Cell, progress: Progress = quiet) -> None:
        """The runtime's environment, made on this host before any job is submitted: a virtual
        environment under the shared cache folder, an image on the engine the nodes use."""
        self.runtime.prepare(cell, progress)

    # Jobs.

    def run(self, launch: Launch) -> Exit:
        assert launch.folder is not None, "the slurm backend keeps its jobs in the run folder"
        jobs = launch.folder.jobs
        record = self._job_to_follow(launch)
        for submission in range(record.submission if record else 1, SUBMISSIONS + 1):
            if record is None:
                record = self._submit(launch, submission)
            if self.detach:
                state = self.cli.states([record.job_id]).get(record.job_id)
                if not (state and state.ended):
                    return Exit(None, timed_out=False, pending=True)
            else:
                state = self.watcher.wait(record.job_id, launch.interrupted)
            if state is None:  # interrupted: this run's job goes, and nothing is recorded
                self.cli.cancel([record.job_id])
                for path in (JobRecord.path(jobs, launch.cell.id), *job_files(launch.result_path.parent,
                                                                              launch.cell.id, record.job_id)):
                    path.unlink(missing_ok=True)
                return Exit(None, timed_out=False, interrupted=True)
            if state.state not in RESUBMITTED or submission == SUBMISSIONS:
                return self._collect(launch, record, state)
            record = None  # the node failed or the job was preempted: once more
        raise AssertionError("unreachable")

    def _job_to_follow(self, launch: Launch) -> JobRecord | None:
        """The cell's job from an earlier run, when it is still to collect: queued, running, or
        ended without its end recorded in cells/. None: the cell needs a new job."""
        record = JobRecord.read(launch.folder.jobs, launch.cell.id)
        if record is None:
            return None
        try:
            collected = json.loads(launch.folder.result_path(launch.cell.id).read_text(encoding="utf-8"))
            if collected["env"]["slurm"]["job_id"] == record.job_id:
                return None
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return record

    def sbatch_argv(self, launch: Launch, spec: Path) -> tuple[list[str], str | None]:
        """sbatch's options and command for the cell, and the GRES it asks for."""
        cell = launch.cell
        argv = [f"--job-name={cell.id}", f"--chdir={Path.cwd()}", f"--output={launch.log_path}",
                "--open-mode=append", f"--time={time_limit_minutes(cell)}",
                "--ntasks=1", "--export=ALL"]
        gres = None
        if cell.device == "gpu":
            model = self.inventory().model_for(cell.gpu)
            gres = f"gpu:{model.name}:{cell.devices}"
            argv.append(f"--gres={gres}")
            if self.options.cpus_per_gpu:
                argv.append(f"--cpus-per-gpu={self.options.cpus_per_gpu}")
        else:
            argv.append("--exclusive")  # a CPU cell has its node to itself, as it has the host locally
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self.options, key):
                argv.append(f"--{key}={getattr(self.options, key)}")
        argv += self.options.sbatch_args
        command = (f"cd {shlex.quote(str(Path.cwd()))} && PYTHONPATH={shlex.quote(str(REPO_ROOT))}"
                   f"${{PYTHONPATH:+:$PYTHONPATH}} exec {shlex.quote(sys.executable)} -m harness.backends.slurm_job "
                   f"{shlex.quote(str(spec))}")
        return argv + ["--wrap", command], gres

    def _submit(self, launch: Launch, submission: int) -> JobRecord:
        folder = launch.folder
        folder.jobs.mkdir(parents=True, exist_ok=True)
        launch.log_path.parent.mkdir(parents=True, exist_ok=True)
        spec = folder.jobs / f"{launch.cell.id}.launch.json"
        write_json_atomic(spec, {
            "runtime": self.runtime.name, "runtime_argv": self.runtime_argv,
            "cell": launch.cell.to_dict(), "request_path": str(launch.request_path),
            "staging": str(launch.result_path.parent), "log_path": str(launch.log_path),
            "weights": str(launch.weights) if launch.weights else None,
            "data_dir": str(launch.data_dir) if launch.data_dir else None})
        argv, gres = self.sbatch_argv(launch, spec)
        job_id = self.cli.submit(argv)
        record = JobRecord(launch.cell.id, job_id, submission, utc_now(), gres, self.runtime.name)
        record.write(folder.jobs)
        with open(launch.log_path, "a", encoding="utf-8") as log:
            log.write(f"submitted as Slurm job {job_id}{f' (again, submission {submission})' if submission > 1 else ''}"
                      f": sbatch {' '.join(shlex.quote(a) for a in argv[:-2])}\n")
        return record

    def _collect(self, launch: Launch, record: JobRecord, state: JobState) -> Exit:
        """The job's end as the runner records it: its result moved to where the runner reads
        it, and what Slurm says of the job in ``env.slurm``."""
        result, runtime_exit = job_files(launch.result_path.parent, launch.cell.id, record.job_id)
        if result.is_file():
            os.replace(result, launch.result_path)
        try:
            ran = json.loads(runtime_exit.read_text(encoding="utf-8"))
            runtime_exit.unlink()
        except (OSError, ValueError):
            ran = {}
        facts = {"slurm": {"job_id": record.job_id, "state": state.state, "exit_code": state.exit_code,
                           "node": state.node or None, "partition": state.partition or None, "gres": record.gres,
                           "runtime": record.runtime, "submission": record.submission}}
        code = _exit_status(state.exit_code)
        job = f"the Slurm job {record.job_id}" + (f" on {state.node}" if state.node else "")
        ends = {
            "COMPLETED": None,
            "FAILED": f"{job} failed (exit code {state.exit_code})",
            "OUT_OF_MEMORY": f"{job} ran out of memory (killed at its memory limit)",
            "TIMEOUT": f"{job} passed its time limit of {time_limit_minutes(launch.cell)} min "
                       f"(timeout_s {launch.cell.settings.timeout_s:g}) and was stopped",
            "CANCELLED": f"{job} was cancelled (scancel, or an administrator), not by this harness",
            "DEADLINE": f"{job} reached its deadline and was stopped",
            "LOST": f"{job} is known neither to sacct nor to scontrol {LOST_AFTER_S} s after it was "
                    f"submitted; see the cluster's logs",
        }
        detail = ends.get(state.state, f"{job} ended {state.state}"
                          + (" (after being submitted twice)" if state.state in RESUBMITTED else ""))
        if ran.get("described") and state.state in ("COMPLETED", "FAILED"):
            # The runtime saw more than an exit code: a container's memory limit, a signal.
            detail = f"{job} ended {state.state}: the cell process {ran['described']}"
        return Exit(code, timed_out=state.state == "TIMEOUT" or bool(ran.get("timed_out")),
                    out_of_memory=state.state == "OUT_OF_MEMORY" or bool(ran.get("out_of_memory")),
                    detail=detail, env=facts)

    def release(self) -> None:
        self.watcher.stop()
        self.runtime.release()


def _exit_status(exit_code: str) -> int | None:
    """sacct's "exit:signal" as a return code: the signal as a negative number when one killed it."""
    status, _, signal_number = exit_code.partition(":")
    if signal_number.isdigit() and int(signal_number):
        return -int(signal_number)
    return int(status) if status.isdigit() else None
