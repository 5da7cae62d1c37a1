"""The image catalog (images/catalog.yml) and image recipes: which image a cell runs in, what
goes into it, and the tag that names exactly that content.

A recipe lists every file of the build context (Dockerfile, install scripts, the variant's
requirement file, the bench sources, extra CA certificates, the wheelhouse) and every build
argument; its tag is a hash of all of them and of the base image, so an unchanged image is
found again and a changed one gets a new tag.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bench.result import BENCH_DIR, bench_code_hash, bench_sources
from bench.specs import FRAMEWORKS

from .matrix import MatrixError, load_yaml

REPO_ROOT = BENCH_DIR.parent
IMAGES_DIR = REPO_ROOT / "images"
CATALOG_PATH = IMAGES_DIR / "catalog.yml"
# `base: cpu` in the catalog: the run's CPU base image, overridable per run.
CPU_BASE = "cpu"
DEFAULT_CPU_BASE_IMAGE = "debian:bookworm-slim"
IMAGE_REPOSITORY = "dlbench"
LABEL = "org.dlbench"
FrameworkName = Literal[FRAMEWORKS]  # type: ignore[valid-type]  # each Keras backend is its own image


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


@dataclass(frozen=True)
class GpuHost:
    """What decides whether a GPU image runs on a host: its NVIDIA driver (version, and the
    newest CUDA it supports) and the GPU's compute capability; None where it cannot be told
    (a cluster's nodes, an old NVML), which passes every check."""

    driver: str | None = None  # "535.104.05"
    driver_cuda: str | None = None  # "12.2"
    compute_capability: str | None = None  # "9.0"

    def describe(self) -> str:
        parts = [f"driver {self.driver} (CUDA {self.driver_cuda})" if self.driver else None,
                 f"compute capability {self.compute_capability}" if self.compute_capability else None]
        return ", ".join(part for part in parts if part) or "an unknown driver and GPU"


@dataclass(frozen=True)
class Choice:
    """The variant a cell runs in, and why: ``jit`` when the GPU is newer than every
    architecture the build has code for and the driver compiles its PTX at start-up."""

    variant: "Variant"
    why: str
    jit: bool = False


class Variant(BaseModel):
    """One buildable image of a framework."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    variant: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    device: Literal["cpu", "gpu"]
    base: str = Field(min_length=1)
    python: str = Field(pattern=r"^3\.\d+$")
    requirements: str = Field(pattern=r"^requirements[a-z0-9._-]*\.txt$")
    cuda: Optional[str] = Field(None, pattern=r"^\d+\.\d+$")
    cudnn: Optional[str] = Field(None, pattern=r"^\d+(\.\d+)*$")
    index: Optional[str] = None  # an extra package index for this variant's wheels
    # Debian/Ubuntu packages the framework's libraries link beyond the base image.
    system_packages: tuple[str, ...] = Field((), strict=False)  # a YAML list
    # GPU variants: the oldest driver that runs this CUDA build (NVIDIA's minor-version
    # compatibility), the compute capabilities the framework's build has native code (SASS)
    # for, and the newest one it carries PTX for, which a driver of the build's CUDA version
    # or newer compiles for newer GPUs. `harness/catalog.py archs` reads them from the images.
    min_driver: Optional[str] = Field(None, pattern=r"^\d+(\.\d+)*$")
    archs: tuple[str, ...] = Field((), strict=False)
    ptx: Optional[str] = Field(None, pattern=r"^\d+\.\d+$")

    @property
    def lock(self) -> str:
        """The lock file of its requirements: every package, transitive ones included, pinned
        with its hashes (``harness/catalog.py lock`` writes it from the requirements)."""
        return lock_name(self.requirements)

    @model_validator(mode="after")
    def _cuda_for_gpu_only(self) -> "Variant":
        if (self.device == "gpu") != (self.cuda is not None):
            raise ValueError("a gpu variant names its cuda version and a cpu variant none")
        if self.device == "gpu" and (self.min_driver is None or not self.archs):
            raise ValueError("a gpu variant names its min_driver and its archs (compute capabilities)")
        for arch in self.archs:
            if not re.fullmatch(r"\d+\.\d+", arch):
                raise ValueError(f"archs: {arch!r} is not a compute capability such as 8.0")
        return self

    def fit(self, host: GpuHost) -> Choice | str:
        """Whether this GPU variant runs on ``host``: natively, through the driver's PTX JIT,
        or not (the reason)."""
        assert self.cuda is not None and self.min_driver is not None
        if host.driver and version_tuple(host.driver) < version_tuple(self.min_driver):
            return f"the {self.variant} image needs driver {self.min_driver} or newer (this host has {host.driver})"
        capability = host.compute_capability
        if capability is None:
            return Choice(self, "the driver runs it")
        major, minor = version_tuple(capability)
        # SASS runs on its own major architecture, at its minor revision or a later one.
        if any(version_tuple(arch)[0] == major and version_tuple(arch)[1] <= minor for arch in self.archs):
            return Choice(self, f"native code for compute capability {capability}")
        built = f"built for compute capability {', '.join(self.archs)}" + (f" with PTX {self.ptx}" if self.ptx else "")
        if self.ptx and version_tuple(capability) >= version_tuple(self.ptx):
            if host.driver_cuda and version_tuple(host.driver_cuda) < version_tuple(self.cuda):
                return (f"the {self.variant} image is {built}; a {capability} GPU needs its PTX compiled by a "
                        f"driver for CUDA {self.cuda} or newer (this host's is for CUDA {host.driver_cuda})")
            return Choice(self, f"{built}: its PTX compiled for {capability} by the driver at start-up", jit=True)
        return f"the {self.variant} image is {built}; the GPU is {capability}"


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    frameworks: dict[FrameworkName, list[Variant]]

    @model_validator(mode="after")
    def _complete(self) -> "Catalog":
        missing = [name for name in FRAMEWORKS if name not in self.frameworks]
        if missing:
            raise ValueError(f"no variants for {', '.join(missing)}; every framework needs at least a cpu variant")
        for name, variants in self.frameworks.items():
            names = [v.variant for v in variants]
            if len(set(names)) != len(names):
                raise ValueError(f"{name}: variant names repeat ({', '.join(names)})")
            if not any(v.device == "cpu" for v in variants):
                raise ValueError(f"{name}: no cpu variant; add one")
        return self

    def variant_for(self, framework: str, device: str, cuda: str, host: GpuHost = GpuHost()) -> Choice | str:
        """The variant a cell runs in, or why there is none: a CPU cell takes the CPU variant;
        a GPU cell the variant of its CUDA version, ``auto`` the newest CUDA build that
        ``host``'s driver runs with native code for its GPU, else the newest it runs through
        PTX JIT."""
        variants = [v for v in self.frameworks[framework] if v.device == device]
        if device == "cpu":
            return Choice(variants[0], "the CPU image")
        if not variants:
            return f"images/catalog.yml has no GPU image of {framework}"
        if cuda != "auto":
            chosen = [v for v in variants if v.cuda == cuda]
            if not chosen:
                offered = ", ".join(v.cuda for v in variants)
                return f"no {framework} release in images/catalog.yml is built for CUDA {cuda} (it has {offered})"
            return chosen[0].fit(host)
        fits = [variant.fit(host) for variant in sorted(variants, key=lambda v: version_tuple(v.cuda), reverse=True)]
        choices = [fit for fit in fits if isinstance(fit, Choice)]
        if not choices:
            return f"no {framework} GPU image runs on {host.describe()}: " + "; ".join(fits)
        best = next((choice for choice in choices if not choice.jit), choices[0])
        newer = [f"the {fit.variant.variant} image would need PTX JIT" if isinstance(fit, Choice) else fit
                 for fit in fits[:fits.index(best)]]
        return Choice(best.variant, best.why + (f" (newer builds passed over: {'; '.join(newer)})" if newer else ""),
                      best.jit)


def load_catalog(path: Path = CATALOG_PATH) -> Catalog:
    """Read and validate the catalog; a bad one is a MatrixError naming file:line and the fix."""
    catalog, document = load_yaml(path, Catalog)
    for framework, variants in catalog.frameworks.items():
        for number, variant in enumerate(variants):
            requirements = IMAGES_DIR / framework / variant.requirements
            if not requirements.is_file():
                line = document["frameworks"][framework].lc.item(number)[0] + 1
                raise MatrixError(f"{path}:{line}: frameworks.{framework}[{number}].requirements: "
                                  f"{requirements.relative_to(REPO_ROOT)} does not exist; add it or fix the name")
    return catalog


@dataclass(frozen=True)
class BuildOptions:
    """How images are built on this host: the CPU base, extra CA certificates, a wheelhouse,
    and whether pip may reach a package index at all."""

    cpu_base: str = DEFAULT_CPU_BASE_IMAGE
    ca_certificates: tuple[Path, ...] = ()
    wheelhouse: Path | None = None
    offline: bool = False


@dataclass
class Recipe:
    """Everything one image is made of."""

    framework: str
    variant: Variant
    base: str
    files: dict[str, Path]  # path in the build context -> file on this host
    build_args: dict[str, str]
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def dockerfile(self) -> str:
        return f"images/{self.framework}/Dockerfile"

    def content_hash(self, base_id: str | None) -> str:
        """SHA-256 over the base image (its id when the engine has it), the build arguments and
        every file of the context, by path and content."""
        digest = hashlib.sha256()
        digest.update(f"base {self.base} {base_id or ''}\n".encode())
        for name, value in sorted(self.build_args.items()):
            digest.update(f"arg {name}={value}\n".encode())
        for relative, source in sorted(self.files.items()):
            digest.update(f"file {relative} {_file_digest(source)}\n".encode())
        return digest.hexdigest()

    def tag(self, base_id: str | None) -> str:
        return f"{IMAGE_REPOSITORY}/{self.framework}:{self.variant.variant}-{self.content_hash(base_id)[:12]}"

    def write_context(self, folder: Path) -> None:
        """Lay the build context out in ``folder``: the repository's paths, nothing else."""
        for relative, source in self.files.items():
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)  # wheels are large: link rather than copy when possible
            except OSError:
                shutil.copy2(source, target)


_digests: dict[tuple[Path, int, int], str] = {}


def _file_digest(path: Path) -> str:
    """A file's SHA-256, remembered by path, size and modification time (wheels are large)."""
    stat = path.stat()
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def lock_name(requirements: str) -> str:
    """requirements-cpu.txt -> requirements-cpu.lock"""
    return requirements.removesuffix(".txt") + ".lock"


def installed_requirements(folder: Path, requirements: str) -> Path:
    """What an environment installs: the requirements' lock, hash-checked, where there is one
    (an index ``harness/catalog.py lock`` could not reach leaves a variant without), else the
    requirements themselves."""
    lock = folder / lock_name(requirements)
    return lock if lock.is_file() else folder / requirements


# name==version pins (a requirement line, a lock's, a Dockerfile's pip install), name normalised.
_PIN = re.compile(r"(?<![\w.-])([A-Za-z0-9][\w.-]*)(?:\[[^]]*\])?==([^\s;\\\"']+)")


def _project(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(text: str) -> dict[str, str]:
    """The exact pins in a requirement or lock file's text (or a Dockerfile's), by project."""
    return {_project(name): version for name, version in _PIN.findall(text)}


def wheelhouse_files(wheelhouse: Path, wanted: dict[str, str], named: str) -> list[Path]:
    """The wheelhouse files an image uses: distributions of the ``wanted`` pins (a pin without a
    local version also takes a build with one: torch==2.13.0 takes 2.13.0+cpu) and files
    ``named`` (the Dockerfile's text) names outright, such as a Python source tarball. The
    others stay out of its build context and its tag."""
    chosen = []
    for path in sorted(wheelhouse.iterdir()):
        if not path.is_file():
            continue
        stem = path.name.removesuffix(".whl").removesuffix(".tar.gz").removesuffix(".zip")
        name, _, rest = stem.partition("-")
        version = rest.split("-")[0]
        pinned = wanted.get(_project(name))
        if path.name in named or (pinned is not None and (version == pinned or (
                "+" not in pinned and version.split("+")[0] == pinned))):
            chosen.append(path)
    return chosen


def recipe(framework: str, variant: Variant, options: BuildOptions) -> Recipe:
    own = IMAGES_DIR / framework
    installed = installed_requirements(own, variant.requirements)
    files = {f"images/{framework}/Dockerfile": own / "Dockerfile",
             f"images/{framework}/{installed.name}": installed,
             "images/ca-certificates/README.md": IMAGES_DIR / "ca-certificates" / "README.md",
             "images/wheelhouse/README.md": IMAGES_DIR / "wheelhouse" / "README.md"}
    wanted = pins(installed.read_text(encoding="utf-8"))
    constraints = own / "build-constraints.txt"
    if constraints.is_file():
        files[f"images/{framework}/build-constraints.txt"] = constraints
        wanted.update(pins(constraints.read_text(encoding="utf-8")))
    for script in sorted((IMAGES_DIR / "common").iterdir()):
        files[f"images/common/{script.name}"] = script
    for source in bench_sources():  # the files bench_code_hash covers: the image's bench is the hashed bench
        files[f"bench/{source.relative_to(BENCH_DIR).as_posix()}"] = source
    for certificate in options.ca_certificates:
        files[f"images/ca-certificates/{certificate.stem}.crt"] = certificate
    if options.wheelhouse:
        dockerfile = (own / "Dockerfile").read_text(encoding="utf-8")
        for wheel in wheelhouse_files(options.wheelhouse, {**pins(dockerfile), **wanted}, dockerfile):
            files[f"images/wheelhouse/{wheel.name}"] = wheel
    base = options.cpu_base if variant.base == CPU_BASE else variant.base
    build_args = {"BASE_IMAGE": base, "FRAMEWORK": framework, "PYTHON_VERSION": variant.python,
                  "SYSTEM_PACKAGES": " ".join(variant.system_packages), "REQUIREMENTS": installed.name,
                  "PIP_OFFLINE": "1" if options.offline else "0",
                  "PIP_EXTRA_INDEX_URL": "" if options.offline else (variant.index or ""),
                  "BENCH_HASH": bench_code_hash()}
    labels = {f"{LABEL}.framework": framework, f"{LABEL}.variant": variant.variant,
              f"{LABEL}.device": variant.device, f"{LABEL}.cuda": variant.cuda or "",
              f"{LABEL}.cudnn": variant.cudnn or "", f"{LABEL}.python": variant.python,
              f"{LABEL}.base": base, f"{LABEL}.bench-hash": build_args["BENCH_HASH"],
              f"{LABEL}.hash-checked": "true" if installed.suffix == ".lock" else "false"}
    return Recipe(framework, variant, base, files, build_args, labels)
