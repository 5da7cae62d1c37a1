#!/usr/bin/env python
"""Keep images/catalog.yml and the environments' locks true to what they describe.

    python harness/catalog.py lock [--framework NAME ...] [--find-links DIR ...] [--skip-extra-indexes]
    python harness/catalog.py archs [--framework NAME ...] [--build] [docker backend options]
    python harness/catalog.py digests


``lock``: resolve each requirement file under images/<framework>/ (the top-level pins every
image variant and local environment names) into its lock beside it (``requirements-cpu.txt``
-> ``requirements-cpu.lock``): every package, transitive and NVIDIA ones included, pinned
with the hashes of its files, for every platform and Python from the oldest that installs
it (uv's universal resolution). Images and local environments install a lock hash-checked
(``pip install --require-hashes``), so a rebuild months later gets the same files or fails.
A variant's extra index (PyTorch's) must be reachable; ``--skip-extra-indexes`` leaves them
out where only PyPI and a wheelhouse (``--find-links``) are.

``digests``: pin every base image of the catalog by digest (``name:tag@sha256:...``, the tag
kept for people), asking the registry through the Docker engine for each tag's digest now; a
base that is pinned already gets the digest its tag points to now. Builds then start from
exactly that base, whatever the tag points to later.

``archs``: for every GPU variant, the GPU architectures its framework's build has code for,
read inside its image (``python -m bench.gpu_code``: the framework's own list where it keeps
one, its libraries' fat binaries where not), beside what the catalog says (``archs``,
``ptx``), which ``cuda: auto`` relies on. An image not on this host is listed as such, or
built first with ``--build``. Frameworks that compile their kernels at run time for the GPU
they find (XLA, CuPy) have no list to check.

Exit status: 0 when every lock was written, every base pinned, or every image read agrees
with the catalog; 1 when a lock could not be resolved, a digest could not be had, or an image
differs (the table says how: fix the
catalog's entry); 2 for bad input.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tabulate import tabulate  # noqa: E402

from bench.specs import FRAMEWORK_SPECS, FRAMEWORKS  # noqa: E402
from harness.backends import BackendError  # noqa: E402
from harness.backends.docker import DockerBackend  # noqa: E402
from harness.backends.local import default_cache_dir  # noqa: E402
from bench.result import write_text_atomic  # noqa: E402
from harness.images import (CATALOG_PATH, IMAGES_DIR, REPO_ROOT, Catalog, Variant, load_catalog,  # noqa: E402
                            lock_name, recipe, version_tuple)
from harness.matrix import MatrixError  # noqa: E402


# The oldest Python the local backend builds environments with (the harness's own).
LOCAL_PYTHON = "3.11"


@dataclass(frozen=True)
class LockTarget:
    """One requirement file to lock, for the oldest Python that installs it."""

    framework: str
    requirements: Path
    python: str
    index: str | None  # an extra package index its variants use

    @property
    def lock(self) -> Path:
        return self.requirements.with_name(lock_name(self.requirements.name))

    def command(self, uv: str, find_links: list[Path], skip_extra_indexes: bool) -> list[str]:
        command = [uv, "pip", "compile", str(self.requirements.relative_to(REPO_ROOT)), "--universal",
                   "--generate-hashes", "--python-version", self.python, "--quiet",
                   "--output-file", str(self.lock.relative_to(REPO_ROOT)),
                   "--custom-compile-command", "python harness/catalog.py lock"]
        if self.index and not skip_extra_indexes:
            # Its torch builds come from there, the rest from PyPI: whichever has the pinned version.
            command += ["--extra-index-url", self.index, "--index-strategy", "unsafe-best-match"]
        for folder in find_links:
            command += ["--find-links", str(folder)]
        constraints = self.requirements.with_name("build-constraints.txt")
        if constraints.is_file():  # what building its source packages needs (Chainer's setup.py)
            command += ["--build-constraints", str(constraints.relative_to(REPO_ROOT))]
        return command


def lock_targets(catalog: Catalog, frameworks: list[str]) -> list[LockTarget]:
    """Every requirement file the frameworks' variants (and local environments) install."""
    targets = []
    for framework in frameworks:
        files: dict[str, list[Variant]] = {}
        for variant in catalog.frameworks[framework]:
            files.setdefault(variant.requirements, []).append(variant)
        for name, variants in files.items():
            pythons = [variant.python for variant in variants]
            if name in ("requirements-cpu.txt", "requirements-gpu.txt") and not FRAMEWORK_SPECS[framework].image_only:
                pythons.append(LOCAL_PYTHON)  # the local backend installs these too
            targets.append(LockTarget(framework, IMAGES_DIR / framework / name, min(pythons, key=version_tuple),
                                      next((v.index for v in variants if v.index), None)))
    return targets


def write_locks(targets: list[LockTarget], uv: str, find_links: list[Path],
                skip_extra_indexes: bool) -> list[tuple[LockTarget, str]]:
    """Resolve each target into its lock; what became of each ("written", or why not)."""
    outcomes = []
    for target in targets:
        done = subprocess.run(target.command(uv, find_links, skip_extra_indexes), cwd=REPO_ROOT,
                              capture_output=True, text=True)
        problem = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        outcomes.append((target, "written" if done.returncode == 0 else f"FAILED: {problem.strip()}"))
    return outcomes


_BASE = re.compile(r'(\bbase: ")([^"]+)(")')


def pin_digests(path: Path, digest_of: Callable[[str], str]) -> list[tuple[str, str]]:
    """Rewrite every quoted base image in the catalog at ``path`` as ``name:tag@digest``, the
    digest from ``digest_of(name:tag)``; what became of each base ("sha256:...", or why it was
    left as it was). Comments and layout stay as they are."""
    text = path.read_text(encoding="utf-8")
    outcomes: dict[str, str] = {}
    for base in sorted({match.group(2) for match in _BASE.finditer(text)}):
        tag = base.split("@")[0]
        try:
            outcomes[base] = digest_of(tag)
        except Exception as error:  # the registry or the engine: say so, keep the base as it is
            outcomes[base] = f"FAILED: {type(error).__name__}: {str(error).splitlines()[0]}"
    text = _BASE.sub(lambda m: m.group(1) + (m.group(2).split("@")[0] + "@" + outcomes[m.group(2)]
                                             if outcomes[m.group(2)].startswith("sha256:") else m.group(2))
                     + m.group(3), text)
    write_text_atomic(path, text)
    load_catalog(path)  # still a valid catalog
    return sorted(outcomes.items())


@dataclass(frozen=True)
class ArchCheck:
    framework: str
    variant: Variant
    image: str | None  # the image's tag, None when it is not on this host
    found: dict | None  # what bench.gpu_code printed in it

    @property
    def verdict(self) -> str:
        if self.found is None:
            return "not on this host (--build builds it)"
        if not self.found["sass"] and not self.found["ptx"]:
            return f"nothing to check: {self.found['how']}"
        problems = []
        if set(self.found["sass"]) != set(self.variant.archs):
            problems.append(f"archs: [{', '.join(self.found['sass'])}]")
        newest_ptx = self.found["ptx"][-1] if self.found["ptx"] else None
        if newest_ptx != self.variant.ptx:
            problems.append(f"ptx: {newest_ptx}")
        return ("DIFFERS, the image has " + "; ".join(problems)) if problems else "agrees"

    @property
    def agrees(self) -> bool:
        return not self.verdict.startswith("DIFFERS")


def check_archs(catalog: Catalog, frameworks: list[str], image_of: Callable[[str, Variant], str | None],
                read: Callable[[str, str], dict]) -> list[ArchCheck]:
    """Each GPU variant of ``frameworks``: its image (``image_of``: the tag, or None when
    absent) and what ``read(tag, framework)`` finds in it."""
    checks = []
    for framework in frameworks:
        for variant in catalog.frameworks[framework]:
            if variant.device != "gpu":
                continue
            tag = image_of(framework, variant)
            checks.append(ArchCheck(framework, variant, tag, read(tag, framework) if tag else None))
    return checks


def _docker_image_of(backend: DockerBackend, build: bool) -> Callable[[str, Variant], str | None]:
    def image_of(framework: str, variant: Variant) -> str | None:
        made = recipe(framework, variant, backend.options)
        return backend.image(made).tag if build else backend.present_tag(made)
    return image_of


def _docker_read(backend: DockerBackend) -> Callable[[str, str], dict]:
    def read(tag: str, framework: str) -> dict:
        output = backend.client.containers.run(tag, ["python", "-m", "bench.gpu_code", framework], remove=True,
                                               network_mode="none", environment={"HOME": "/tmp"})
        return json.loads(output.decode().strip().splitlines()[-1])
    return read


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness/catalog.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    lock = commands.add_parser("lock", help="resolve each requirement file into its hash-pinned lock")
    lock.add_argument("--framework", action="append", choices=FRAMEWORKS, help="only these (repeatable)")
    lock.add_argument("--find-links", type=Path, action="append", default=[], metavar="DIR",
                      help="a folder of wheels to resolve from too (repeatable)")
    lock.add_argument("--skip-extra-indexes", action="store_true",
                      help="leave out the variants' extra indexes (a host that reaches only PyPI)")
    commands.add_parser("digests", help="pin every base image of the catalog by its digest now")
    archs = commands.add_parser("archs", help="check each GPU variant's archs and ptx against its image")
    archs.add_argument("--framework", action="append", choices=FRAMEWORKS, help="only these (repeatable)")
    archs.add_argument("--build", action="store_true", help="build the images that are not on this host")
    archs.add_argument("--cache-dir", type=Path, default=None, help="the harness's cache folder (build logs)")
    DockerBackend.add_arguments(archs)
    args = parser.parse_args(argv)
    if args.command == "lock":
        return lock_main(args)
    if args.command == "digests":
        return digests_main()
    try:
        catalog = load_catalog()
        backend = DockerBackend.from_args(args)
        checks = check_archs(catalog, args.framework or list(FRAMEWORKS), _docker_image_of(backend, args.build),
                             _docker_read(backend))
    except (MatrixError, BackendError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(tabulate([[c.framework, c.variant.variant, f"[{', '.join(c.variant.archs)}]", c.variant.ptx or "-",
                     c.verdict] for c in checks],
                   headers=["framework", "variant", "catalog archs", "catalog ptx", "image"]))
    return 0 if all(check.agrees for check in checks) else 1


def digests_main() -> int:
    from harness.backends.docker import engine_answers

    if not engine_answers():
        print("error: no Docker engine answers at DOCKER_HOST (or the default socket); the digests are "
              "asked of the registry through one: start one (scripts/docker-engine.sh start)", file=sys.stderr)
        return 2
    import docker

    client = docker.from_env(timeout=120)
    outcomes = pin_digests(CATALOG_PATH, lambda tag: client.images.get_registry_data(tag).id)
    print(tabulate(outcomes, headers=["base image", "digest"]))
    return 0 if all(outcome.startswith("sha256:") for _, outcome in outcomes) else 1


def lock_main(args: argparse.Namespace) -> int:
    from uv import find_uv_bin

    for folder in args.find_links:
        if not folder.is_dir():
            print(f"error: --find-links {folder}: no such folder; pass a folder of wheels", file=sys.stderr)
            return 2
    try:
        targets = lock_targets(load_catalog(), args.framework or list(FRAMEWORKS))
    except MatrixError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    outcomes = write_locks(targets, find_uv_bin(), [folder.resolve() for folder in args.find_links],
                           args.skip_extra_indexes)
    print(tabulate([[t.framework, t.requirements.name, t.lock.name, t.python, outcome] for t, outcome in outcomes],
                   headers=["framework", "requirements", "lock", "python", ""]))
    return 0 if all(outcome == "written" for _, outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
