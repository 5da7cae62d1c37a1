"""Inside a Slurm job: run one cell through the runtime backend the harness chose, on the GPUs
Slurm gave the job, and leave how it ended beside the result for the harness to collect.

    python -m harness.backends.slurm_job RUN/jobs/<cell id>.launch.json

Slurm's time limit is the cell's timeout: the runtime waits without one of its own, and the
SIGTERM Slurm sends at the limit (or on scancel) stops the cell's process or container.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

from bench.result import write_json_atomic

from .. import backends
from ..gpus import Gpu
from ..matrix import Cell
from .slurm import job_files


def allocated_gpus(cell: Cell, visible: str | None) -> list[Gpu]:
    """The job's GPUs as Slurm exposed them (CUDA_VISIBLE_DEVICES: indices, or UUIDs)."""
    if cell.device != "gpu":
        return []
    if not visible:
        raise SystemExit(f"the job asked for {cell.devices} {cell.gpu} GPUs and Slurm set no CUDA_VISIBLE_DEVICES: "
                         f"the node's gres.conf must name the GPUs' device files")
    return [Gpu(index=number, uuid=entry.strip(), name=cell.gpu, memory_total_bytes=0)
            for number, entry in enumerate(visible.split(","))]


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    cell = Cell.from_dict(spec["cell"])
    result_path, exit_path = job_files(Path(spec["staging"]), cell.id, os.environ["SLURM_JOB_ID"])
    options = backends.options(spec["runtime_argv"])
    runtime = backends.BACKENDS[spec["runtime"]].from_args(options)
    launch = backends.Launch(cell, Path(spec["request_path"]), result_path, Path(spec["log_path"]), math.inf,
                             allocated_gpus(cell, os.environ.get("CUDA_VISIBLE_DEVICES")),
                             weights=Path(spec["weights"]) if spec["weights"] else None,
                             data_dir=Path(spec["data_dir"]) if spec["data_dir"] else None)
    signal.signal(signal.SIGTERM, lambda signum, frame: launch.interrupted.set())
    runtime.prepare(cell)  # ready already: the harness prepared it before submitting
    ended = runtime.run(launch)
    write_json_atomic(exit_path, {"returncode": ended.returncode, "timed_out": ended.timed_out,
                                  "out_of_memory": ended.out_of_memory, "described": ended.describe()})
    if ended.returncode == 0:
        return 0
    return ended.returncode if ended.returncode and ended.returncode > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
