"""The apptainer backend: each framework variant's image as a SIF file, one ``apptainer exec``
(or ``singularity exec``) per cell: how most HPC sites run containers, without a daemon or
root. The SIF files are the docker backend's images converted, e.g. on a host with Docker:

    apptainer build SIF_DIR/pytorch-cpu.sif docker-daemon://dlbench/pytorch:cpu-<hash>

named ``<framework>-<variant>.sif`` (the variants of images/catalog.yml) in ``--sif-dir``.
A cell's container sees only its staging folder (writable), the weights and data (read-only),
a clean environment and, on GPU cells, its own GPUs (``--nv`` with CUDA_VISIBLE_DEVICES).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from bench.result import write_text_atomic

from ..images import Catalog, Choice, load_catalog
from ..matrix import Cell
from .base import BackendError, Exit, HostBackend, Launch, Progress, cell_environment, quiet, register, run_process

# Where a cell's files appear inside its container (as in the docker backend's containers).
OUT_DIR, WEIGHTS_DIR, DATA_DIR = Path("/dlbench/out"), Path("/dlbench/weights"), Path("/dlbench/data")


@register
class ApptainerBackend(HostBackend):
    name = "apptainer"
    summary = "each framework variant's image as a SIF file (--sif-dir), one apptainer exec per cell"

    def __init__(self, sif_dir: Path, command: str = "apptainer", catalog: Catalog | None = None):
        self.sif_dir = sif_dir
        self.command = command
        self.catalog = catalog or load_catalog()
        self._image_ids: dict[Path, str] = {}

    @classmethod
    def add_arguments(cls, parser) -> None:
        group = parser.add_argument_group("apptainer backend")
        group.add_argument("--sif-dir", type=Path, default=None, metavar="DIR",
                           help="folder of <framework>-<variant>.sif images (default: <cache dir>/sif)")
        group.add_argument("--apptainer-command", default=None, metavar="NAME",
                           help="apptainer or singularity (default: whichever is on PATH)")

    @classmethod
    def from_args(cls, args, matrix=None) -> "ApptainerBackend":
        from .local import default_cache_dir

        command = args.apptainer_command or next(
            (name for name in ("apptainer", "singularity") if shutil.which(name)), None)
        if command is None or not shutil.which(command):
            raise BackendError(f"{args.apptainer_command or 'apptainer'} is not on PATH: install Apptainer "
                               f"(or SingularityCE), or pass --apptainer-command")
        return cls(args.sif_dir or (args.cache_dir or default_cache_dir()) / "sif", command)

    def choice(self, cell: Cell) -> Choice | str:
        """The cell's variant, chosen for this host's driver and GPU, or why there is none."""
        return self.catalog.variant_for(cell.framework, cell.device, cell.cuda, self.inventory().gpu_host(cell))

    def sif_path(self, cell: Cell) -> Path | str:
        """The cell's SIF file, or why there is none."""
        choice = self.choice(cell)
        if isinstance(choice, str):
            return choice
        return self.sif_dir / f"{cell.framework}-{choice.variant.variant}.sif"

    def environment_of(self, cell: Cell) -> str | None:
        choice = self.choice(cell)
        if isinstance(choice, str) or choice.variant.device == "cpu":  # no choice to explain
            return None
        return f"{choice.variant.variant} image ({self.sif_path(cell)}): {choice.why}"

    def cannot_run(self, cell: Cell) -> str | None:
        found = self.sif_path(cell)
        if isinstance(found, str):
            return found
        if not found.is_file():
            return (f"no image {found}: convert the docker backend's {cell.framework} image with "
                    f"`{self.command} build {found} docker-daemon://<its tag>`")
        return None

    def prepare(self, cell: Cell, progress: Progress = quiet) -> None:
        found = self.sif_path(cell)
        assert isinstance(found, Path), found  # cannot_run() said why before
        if found not in self._image_ids:
            self._image_ids[found] = image_id(found)

    def command_line(self, launch: Launch) -> list[str]:
        """``apptainer exec`` for the cell: a clean environment, only its own folders, its GPUs."""
        sif = self.sif_path(launch.cell)
        choice = self.choice(launch.cell)
        assert isinstance(choice, Choice), choice  # cannot_run() said why before
        binds = [f"{launch.result_path.parent}:{OUT_DIR}"]
        weights = data = None
        if launch.weights:
            weights = WEIGHTS_DIR / launch.weights.name
            binds.append(f"{launch.weights.parent}:{WEIGHTS_DIR}:ro")
        if launch.data_dir:
            data = DATA_DIR
            binds.append(f"{launch.data_dir}:{DATA_DIR}:ro")
        image = {"tag": sif.name, "id": self._image_ids[sif], "base": choice.variant.base, "base_digest": None,
                 "chosen_because": choice.why}
        if choice.variant.device == "gpu":
            image["gpu_code"] = "ptx-jit" if choice.jit else "native"
        argv = [self.command, "exec", "--containall", "--cleanenv", "--no-home", "--pwd", "/opt/dlbench"]
        if launch.gpus:
            argv.append("--nv")
        for bind in binds:
            argv += ["--bind", bind]
        for name, value in (("PYTHONUNBUFFERED", "1"), ("DLBENCH_IMAGE", json.dumps(image)),
                            ("CUDA_VISIBLE_DEVICES", ",".join(gpu.uuid for gpu in launch.gpus))):
            argv += ["--env", f"{name}={value}"]
        return argv + [str(sif), *launch.bench_command("python", launch.bench_args(OUT_DIR / launch.result_path.name,
                                                                                     weights, data))]

    def run(self, launch: Launch) -> Exit:
        # --cleanenv: the container gets the variables command_line() passes, none of the host's.
        return run_process(self.command_line(launch), cell_environment(launch), launch.log_path, launch.timeout_s,
                           launch.interrupted)


def image_id(sif: Path) -> str:
    """A SIF file is its image, so its SHA-256 is its id; kept beside it (``<sif>.sha256``,
    valid while the file's size and modification time are the same), so that the cells of a
    cluster's jobs do not each read gigabytes again."""
    stat = sif.stat()
    stamp = f"{stat.st_size} {stat.st_mtime_ns}"
    kept = sif.with_name(sif.name + ".sha256")
    try:
        known_stamp, known_id = kept.read_text(encoding="utf-8").split("\n")[:2]
        if known_stamp == stamp:
            return known_id
    except (OSError, ValueError):
        pass
    digest = hashlib.sha256()
    with open(sif, "rb") as image:
        for block in iter(lambda: image.read(1 << 20), b""):
            digest.update(block)
    write_text_atomic(kept, f"{stamp}\nsha256:{digest.hexdigest()}\n")
    return f"sha256:{digest.hexdigest()}"
