#!/usr/bin/env python
"""Keep images/catalog.yml true to the images it describes.

    python harness/catalog.py archs [--framework NAME ...] [--build] [docker backend options]

``archs``: for every GPU variant, the GPU architectures its framework's build has code for,
read inside its image (``python -m bench.gpu_code``: the framework's own list where it keeps
one, its libraries' fat binaries where not), beside what the catalog says (``archs``,
``ptx``), which ``cuda: auto`` relies on. An image not on this host is listed as such, or
built first with ``--build``. Frameworks that compile their kernels at run time for the GPU
they find (XLA, CuPy) have no list to check.

Exit status: 0 when every image read agrees with the catalog, 1 when one differs (the table
says how: fix the catalog's entry), 2 for bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tabulate import tabulate  # noqa: E402

from bench.specs import FRAMEWORKS  # noqa: E402
from harness.backends import BackendError  # noqa: E402
from harness.backends.docker import DockerBackend  # noqa: E402
from harness.backends.local import default_cache_dir  # noqa: E402
from harness.images import Catalog, Variant, load_catalog, recipe  # noqa: E402
from harness.matrix import MatrixError  # noqa: E402


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
    archs = commands.add_parser("archs", help="check each GPU variant's archs and ptx against its image")
    archs.add_argument("--framework", action="append", choices=FRAMEWORKS, help="only these (repeatable)")
    archs.add_argument("--build", action="store_true", help="build the images that are not on this host")
    archs.add_argument("--cache-dir", type=Path, default=None, help="the harness's cache folder (build logs)")
    DockerBackend.add_arguments(archs)
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
