"""The docker backend: one image per framework variant (images/catalog.yml), built when missing
and found again by its content tag, and one container per cell.

A cell's container has no network, no privileges, the host user's uid and a read-only root
filesystem (scratch and HOME on a tmpfs); it sees its own staging folder (read-write), the
weights file and the data folder (read-only) and its image's kernel cache as mounts, only its
own GPUs (an NVIDIA device request by UUID) and, on a GPU cell, the cores NVML puts nearest
them, under the memory, CPU and process limits of the run and NVIDIA's recommended ulimits for
framework containers. It is removed afterwards, its output kept as the cell's log. Cells on
different GPUs run side by side, each container labelled with its run and its cell.
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import resource
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound
from docker.types import DeviceRequest, Mount, Ulimit

from bench.host import GPU_STAND_IN, compute_device

from ..images import DEFAULT_CPU_BASE_IMAGE, BuildOptions, Catalog, Choice, Recipe, load_catalog, recipe
from ..matrix import Cell
from .base import POLL_S, TERMINATE_GRACE_S, BackendError, Exit, HostBackend, Launch, Progress, quiet, register
from .local import default_cache_dir

# Containers of this harness carry these labels: the run folder, so that the ones a killed
# harness left behind can be found and removed before the run's first cell, and the cell id.
RUN_LABEL, CELL_LABEL = "org.dlbench.run", "org.dlbench.cell"
# Where a cell's files appear inside its container.
OUT_DIR, WEIGHTS_DIR, DATA_DIR = Path("/dlbench/out"), Path("/dlbench/weights"), Path("/dlbench/data")
KERNEL_CACHE_DIR = Path("/dlbench/kernel-cache")
# The engine's line for each Dockerfile instruction it builds: "Step 4/9 : RUN pip install ...".
BUILD_STEP = re.compile(r"^Step \d+/\d+ : ")
# What every cell's container is told: no network but the loopback (NCCL, Gloo and Open MPI
# would look for another interface), and JIT-compiled kernels (CUDA's PTX JIT, CuPy's) kept in
# the image's kernel cache, so that a cell does not compile them again.
CONTAINER_ENVIRONMENT = {
    "HOME": "/tmp", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
    "NCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo",
    "OMPI_MCA_oob_tcp_if_include": "lo", "OMPI_MCA_btl_tcp_if_include": "lo",
    "CUDA_CACHE_PATH": str(KERNEL_CACHE_DIR / "cuda"), "CUDA_CACHE_MAXSIZE": str(4 << 30),
    "CUPY_CACHE_DIR": str(KERNEL_CACHE_DIR / "cupy"),
}
# NVIDIA's recommended limits for framework containers: pinned memory without a cap, 64 MiB stacks.
ULIMITS = [Ulimit(name="memlock", soft=-1, hard=-1), Ulimit(name="stack", soft=64 << 20, hard=64 << 20)]


@dataclass(frozen=True)
class ContainerLimits:
    """Resource limits of every cell's container (None: the engine's default, no limit)."""

    memory: str | None = None  # e.g. "16g"; a cell over it is killed and recorded as out of memory
    cpus: float | None = None
    pids: int | None = 4096
    # PyTorch's DataLoader workers pass batches, and its data-parallel ranks the cell's arrays,
    # through /dev/shm: 16 global batches of 224-pixel images on 8 GPUs take 5 GB; NCCL's
    # buffers grow with the devices too.
    shm_per_device_gb: int = 2

    def shm_size(self, devices: int) -> str:
        return f"{self.shm_per_device_gb * max(1, devices)}g"


@dataclass(frozen=True)
class Image:
    tag: str
    id: str
    base: str
    base_digest: str | None  # the base image's registry digest, or its local id when it has none

    def facts(self, choice: Choice) -> dict[str, str | None]:
        """What the cell records about its image (bench/environment.py reads it): which one,
        why it was chosen and, on a GPU, whether its code is native to the GPU or PTX the
        driver compiles."""
        facts = {"tag": self.tag, "id": self.id, "base": self.base, "base_digest": self.base_digest,
                 "chosen_because": choice.why}
        if choice.variant.device == "gpu":
            facts["gpu_code"] = "ptx-jit" if choice.jit else "native"
        return facts


def engine_answers(client_factory=docker.from_env) -> bool:
    """True when a Docker engine answers at DOCKER_HOST (or the default socket)."""
    try:
        client = client_factory(timeout=5)
        return bool(client.ping())
    except (DockerException, requests.RequestException, OSError):
        return False


@register
class DockerBackend(HostBackend):
    name = "docker"
    summary = "one image per framework variant of images/catalog.yml, one container per cell"

    def __init__(self, cache_dir: Path, options: BuildOptions = BuildOptions(),
                 limits: ContainerLimits = ContainerLimits(), catalog: Catalog | None = None,
                 client: docker.DockerClient | None = None):
        if client is None and not engine_answers():
            raise BackendError("no Docker engine answers at DOCKER_HOST (or the default socket); "
                               "start one (scripts/docker-engine.sh start) or use --backend local")
        self.client = client or docker.from_env(timeout=600)
        self.catalog = catalog or load_catalog()
        self.options = options
        self.limits = limits
        self.images_dir = cache_dir / "images"  # build contexts' scratch space and build logs
        self.data_dir = cache_dir / "data"
        self.kernel_cache_dir = cache_dir / "kernel-cache"  # one folder per image
        self._images: dict[tuple[str, str], Image] = {}
        self._leftovers_removed: set[str] = set()  # run folders whose leftovers are gone
        self._ulimits = ULIMITS  # lowered once the engine says it may not set them
        self._leftovers_lock = threading.Lock()

    @classmethod
    def add_arguments(cls, parser) -> None:
        group = parser.add_argument_group("docker backend")
        group.add_argument("--base-image", default=os.environ.get("DLBENCH_BASE_IMAGE", DEFAULT_CPU_BASE_IMAGE),
                           help="base of the CPU images (default: $DLBENCH_BASE_IMAGE or %(default)s)")
        group.add_argument("--ca-cert", type=Path, action="append", default=[], metavar="FILE",
                           help="a PEM CA certificate every image trusts, for builds behind a "
                                "TLS-intercepting proxy (repeatable)")
        group.add_argument("--wheelhouse", type=Path, default=None, metavar="DIR",
                           help="wheels that builds install before asking a package index")
        group.add_argument("--offline", action="store_true",
                           help="build with no network: every wheel from --wheelhouse (air-gapped hosts)")
        group.add_argument("--memory", default=None, help="memory limit of each cell's container, e.g. 16g")
        group.add_argument("--cpus", type=float, default=None, help="CPU limit of each cell's container")

    @classmethod
    def from_args(cls, args, matrix=None) -> "DockerBackend":
        for certificate in args.ca_cert:
            if not certificate.is_file() or b"-----BEGIN CERTIFICATE-----" not in certificate.read_bytes():
                raise BackendError(f"--ca-cert {certificate}: not a PEM certificate file; pass a .crt/.pem file")
        if args.wheelhouse and not args.wheelhouse.is_dir():
            raise BackendError(f"--wheelhouse {args.wheelhouse}: no such folder; pass a folder of wheels")
        if args.offline and not args.wheelhouse:
            raise BackendError("--offline: builds would have nothing to install; pass --wheelhouse DIR as well")
        if args.cpus is not None and args.cpus <= 0:
            raise BackendError(f"--cpus {args.cpus:g}: must be more than 0")
        options = BuildOptions(cpu_base=args.base_image, ca_certificates=tuple(args.ca_cert),
                               wheelhouse=args.wheelhouse, offline=args.offline)
        return cls(args.cache_dir or default_cache_dir(), options,
                   ContainerLimits(memory=args.memory, cpus=args.cpus))

    def cannot_run(self, cell: Cell) -> str | None:
        found = self._choice_for(cell)
        return found if isinstance(found, str) else None

    def environment_of(self, cell: Cell) -> str | None:
        choice = self._choice_for(cell)
        if isinstance(choice, str) or choice.variant.device == "cpu":  # no choice to explain
            return None
        return f"{choice.variant.variant} image: {choice.why}"

    def _choice_for(self, cell: Cell) -> Choice | str:
        # Under a GPU stand-in (tests of the GPU paths) a GPU cell computes on the CPU, in the CPU image.
        if compute_device(cell.device) == "cpu":
            return self.catalog.variant_for(cell.framework, "cpu", "auto")
        return self.catalog.variant_for(cell.framework, cell.device, cell.cuda, self.inventory().gpu_host(cell))

    def _choice(self, cell: Cell) -> Choice:
        choice = self._choice_for(cell)
        assert not isinstance(choice, str), choice  # cannot_run() said why before
        return choice

    def prepare(self, cell: Cell, progress: Progress = quiet) -> None:
        variant = self._choice(cell).variant
        key = (cell.framework, variant.variant)
        if key not in self._images:  # one recipe (and one hash of its files) per image and run
            try:
                self._images[key] = self.image(recipe(cell.framework, variant, self.options), progress)
            except (DockerException, requests.RequestException) as error:  # the engine failed or timed out
                raise BackendError(f"the Docker engine failed while preparing the {cell.framework} "
                                   f"{variant.variant} image: {type(error).__name__}: {error}") from None

    def image(self, made: Recipe, progress: Progress = quiet) -> Image:
        """The recipe's image: found by its tag, or built (once, even by two harnesses). The
        base is pulled first where it is missing, so that the tag, which covers the base's
        id, is the same on a fresh host's first run as on every later one."""
        base = self._base(made.base) or self._pull(made.base, progress)
        tag = made.tag(base.id)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        name = tag.replace("/", "-").replace(":", "-")
        with open(self.images_dir / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                built = self.client.images.get(tag)
            except ImageNotFound:
                built = self._build(made, tag, self.images_dir / f"{name}.log", progress)
        return Image(tag=tag, id=built.id, base=made.base, base_digest=_digest(base))

    def _pull(self, reference: str, progress: Progress):
        progress(f"pulling {reference}")
        try:
            return self.client.images.pull(reference)
        except APIError as error:
            raise BackendError(f"the base image {reference} is not on this host and cannot be pulled "
                               f"({error.explanation or error}): load it, or make one with "
                               f"scripts/make-base-image.sh and pass --base-image") from None

    def present_tag(self, made: Recipe) -> str | None:
        """The recipe's tag when its image is on this host already (nothing is built), else None."""
        base = self._base(made.base)
        if base is None:
            return None
        tag = made.tag(base.id)
        try:
            self.client.images.get(tag)
        except ImageNotFound:
            return None
        return tag

    def _base(self, reference: str):
        try:
            return self.client.images.get(reference)
        except ImageNotFound:
            return None

    def _build(self, made: Recipe, tag: str, log_path: Path, progress: Progress):
        """Build the image, its log written to ``log_path`` line by line as the engine sends it,
        and the build step (or pip's latest line) passed to ``progress``."""
        context = Path(tempfile.mkdtemp(prefix="context-", dir=self.images_dir))
        try:
            made.write_context(context)
            with open(log_path, "w") as log:
                log.write(f"building {tag} from {made.dockerfile}\n"
                          f"build args: {json.dumps(made.build_args, indent=1)}\n")
                log.flush()
                step = ""
                try:
                    # Offline builds get no network at all; others the host's (the engine
                    # runs without a bridge), for pip to reach its index.
                    for chunk in self.client.api.build(
                            path=str(context), dockerfile=made.dockerfile, tag=tag, buildargs=made.build_args,
                            labels=made.labels, network_mode="none" if self.options.offline else "host",
                            rm=True, forcerm=True, decode=True):
                        if "error" in chunk:
                            log.write(f"{chunk['error'].rstrip()}\n")
                            raise BackendError(f"building {tag} failed: {chunk['error'].strip()}; see {log_path}")
                        text = chunk.get("stream") or chunk.get("status") or ""
                        if text.strip():
                            log.write(text if text.endswith("\n") else text + "\n")
                            log.flush()
                            line = text.strip().splitlines()[-1]
                            if BUILD_STEP.match(line):
                                step, line = line, ""
                            progress(f"building {made.framework} {made.variant.variant} image, "
                                     f"{step[:60]}{': ' + line[:60] if line else ''}")
                except APIError as error:
                    log.write(f"{error}\n")
                    raise BackendError(f"building {tag} failed: {error.explanation}; see {log_path}") from None
            return self.client.images.get(tag)
        finally:
            shutil.rmtree(context, ignore_errors=True)

    def run(self, launch: Launch) -> Exit:
        choice = self._choice(launch.cell)
        image = self._images[(launch.cell.framework, choice.variant.variant)]
        # The cell's own staging folder, read-write: its request and its result, nobody else's.
        mounts = [Mount(str(OUT_DIR), str(launch.result_path.parent), type="bind")]
        weights = data = None
        if launch.weights:
            weights = WEIGHTS_DIR / launch.weights.name
            mounts.append(Mount(str(WEIGHTS_DIR), str(launch.weights.parent), type="bind", read_only=True))
        if launch.cell.settings.data == "real":
            # The data set must be on the host already, extracted: the container has no network
            # and cannot write there.
            host_data = launch.data_dir or self.data_dir
            host_data.mkdir(parents=True, exist_ok=True)
            data = DATA_DIR
            mounts.append(Mount(str(DATA_DIR), str(host_data), type="bind", read_only=True))
        kernel_cache = self.kernel_cache_dir / image.id.split(":")[-1][:16]
        kernel_cache.mkdir(parents=True, exist_ok=True)
        mounts.append(Mount(str(KERNEL_CACHE_DIR), str(kernel_cache), type="bind"))
        argv = launch.bench_command("python", launch.bench_args(OUT_DIR / launch.result_path.name, weights, data))
        run_label = str(launch.folder.root if launch.folder else launch.result_path.parent)
        self.remove_leftovers(run_label)
        near_cpus = sorted({core for gpu in launch.gpus for core in gpu.near_cpus})
        create = functools.partial(
            self.client.containers.create,
            image.id, argv, detach=True, labels={RUN_LABEL: run_label, CELL_LABEL: launch.cell.id},
            mounts=mounts, read_only=True,
            # exec: torch.compile and XLA load the kernels they build there.
            tmpfs={"/tmp": "rw,exec,nosuid,nodev"},
            network_mode="none", user=f"{os.getuid()}:{os.getgid()}",
            environment={**CONTAINER_ENVIRONMENT, "DLBENCH_IMAGE": json.dumps(image.facts(choice)),
                         **{name: os.environ[name] for name in (GPU_STAND_IN,) if name in os.environ}},
            security_opt=["no-new-privileges"], cap_drop=["ALL"],
            mem_limit=self.limits.memory, memswap_limit=self.limits.memory,
            nano_cpus=int(self.limits.cpus * 1e9) if self.limits.cpus else None,
            # A pinned set, not only a quota, so that thread pools size themselves to it.
            cpuset_cpus=",".join(map(str, near_cpus)) or None,
            pids_limit=self.limits.pids, shm_size=self.limits.shm_size(launch.cell.devices),
            device_requests=_gpu_request(launch))
        asked = self._ulimits
        container = create(ulimits=asked)
        try:
            try:
                container.start()
            except APIError as error:
                if "rlimit" not in str(error) or asked is not ULIMITS:
                    raise
                # An engine that may not raise its own limits (in a container, a VM without
                # CAP_SYS_RESOURCE) cannot give NVIDIA's: the most it can, from now on.
                self._ulimits = _limits_within()
                _log_line(launch, f"the engine could not set NVIDIA's ulimits ({error.explanation}); cells "
                                  f"run under this host's hard limits: " + ", ".join(
                                      f"{u.name} {'unlimited' if u.hard == -1 else u.hard}" for u in self._ulimits))
                container.remove(force=True)
                container = create(ulimits=self._ulimits)
                container.start()
            status = _wait(container, time.monotonic() + launch.timeout_s, launch.interrupted)
            if status is None:  # timed out or interrupted
                container.stop(timeout=TERMINATE_GRACE_S)
                status = container.wait()
                if launch.interrupted.is_set():
                    return Exit(status.get("StatusCode"), timed_out=False, interrupted=True)
                return Exit(status.get("StatusCode"), timed_out=True)
            state = self.client.api.inspect_container(container.id)["State"]
            return Exit(status.get("StatusCode"), timed_out=False, out_of_memory=bool(state.get("OOMKilled")))
        finally:
            _keep_log(container, launch)
            container.remove(force=True)

    def remove_leftovers(self, run_label: str) -> None:
        """Once per run, before its first cell: remove the run's containers that a killed
        harness left running (never one of this harness's, which run side by side)."""
        with self._leftovers_lock:
            if run_label in self._leftovers_removed:
                return
            for container in self.client.containers.list(all=True, filters={"label": f"{RUN_LABEL}={run_label}"}):
                container.remove(force=True)
            self._leftovers_removed.add(run_label)


def _wait(container, deadline: float, interrupted: threading.Event) -> dict | None:
    """The container's exit status, or None when the deadline passed or the run was interrupted."""
    while not interrupted.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            # The engine answers when the container exits; the timeout is the client's.
            return container.wait(timeout=max(0.1, min(POLL_S, left)))
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            continue
    return None


def _gpu_request(launch: Launch) -> list[DeviceRequest]:
    """The cell's GPUs by UUID (the NVIDIA container toolkit exposes just those), or none."""
    if not launch.gpus or compute_device(launch.cell.device) == "cpu":  # none, or stand-ins
        return []
    return [DeviceRequest(driver="nvidia", device_ids=[gpu.uuid for gpu in launch.gpus], capabilities=[["gpu"]])]


def _digest(base) -> str | None:
    if base is None:
        return None
    digests = base.attrs.get("RepoDigests") or []
    return digests[0] if digests else base.id


def _limits_within() -> list[Ulimit]:
    """NVIDIA's ulimits, each lowered to this process's hard limit (-1: unlimited)."""
    within = []
    for ulimit in ULIMITS:
        _, hard = resource.getrlimit({"memlock": resource.RLIMIT_MEMLOCK, "stack": resource.RLIMIT_STACK}[ulimit.name])
        wanted = ulimit.hard
        limit = wanted if hard == resource.RLIM_INFINITY else (hard if wanted == -1 else min(wanted, hard))
        within.append(Ulimit(name=ulimit.name, soft=limit, hard=limit))
    return within


def _log_line(launch: Launch, text: str) -> None:
    launch.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(launch.log_path, "a", encoding="utf-8") as log:
        log.write(text + "\n")


def _keep_log(container, launch: Launch) -> None:
    launch.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(launch.log_path, "ab") as log:
        log.write(f"$ docker run {container.image.tags[0] if container.image.tags else container.image.id} "
                  f"{' '.join(container.attrs['Config']['Cmd'])}\n".encode())
        try:
            log.write(container.logs(stdout=True, stderr=True))
        except APIError as error:
            log.write(f"(the container's output could not be read: {error})\n".encode())
