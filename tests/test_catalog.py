"""harness/catalog.py: the locks it writes for each requirement file (a stand-in resolver), and
the catalog's GPU architectures checked against what a build has code for (bench/gpu_code.py,
on fat binaries made here in NVIDIA's layout)."""
from __future__ import annotations

import struct

from bench.gpu_code import ELF, FATBIN_MAGIC, PTX, fatbin_archs, from_arch_flags, gpu_code, libraries_archs
from harness.catalog import check_archs
from harness.images import load_catalog


def fatbin(*entries: tuple[int, int], payload: bytes = b"\0" * 24) -> bytes:
    """A fat binary as nvcc lays it out: its header, then per entry a 64-byte header (kind,
    header size, payload size, toolchain version, architecture) and the payload."""
    body = b""
    for kind, arch in entries:
        header = struct.pack("<HHIQIIHHI", kind, 0x101, 64, len(payload), 0, 0, 8, 12, arch)
        body += header + b"\0" * (64 - len(header)) + payload
    return struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(body)) + body


def test_the_architectures_of_every_fat_binary_in_a_library_are_found(tmp_path):
    library = tmp_path / "libframework.so"
    # Two fat binaries among other bytes, and the magic once by chance in data.
    library.write_bytes(b"\x7fELF" + b"x" * 100 + fatbin((ELF, 70), (ELF, 80), (PTX, 80)) + b"y" * 33
                        + struct.pack("<I", FATBIN_MAGIC) + b"\xff" * 12
                        + fatbin((ELF, 86), (PTX, 86), (ELF, 90)) + b"z" * 7)
    assert libraries_archs([str(library)]) == (["7.0", "8.0", "8.6", "9.0"], ["8.0", "8.6"])
    assert fatbin_archs(b"no device code here") == (set(), set())


def test_a_builds_own_arch_list_reads_as_sass_and_ptx():
    assert from_arch_flags(["sm_60", "sm_70", "sm_80", "sm_89", "compute_90"]) == (["6.0", "7.0", "8.0", "8.9"],
                                                                                    ["9.0"])
    assert from_arch_flags("sm_75 sm_90a sm_100 sm_120 compute_120".split()) == (["7.5", "9.0", "10.0", "12.0"],
                                                                                 ["12.0"])


def test_frameworks_that_compile_at_run_time_have_no_list():
    assert gpu_code("jax") == {"framework": "jax", "sass": [], "ptx": [],
                               "how": "XLA compiles its kernels at run time for the GPU it finds"}


def test_the_catalog_is_checked_against_what_each_image_has():
    catalog = load_catalog()
    pytorch = {v.variant: v for v in catalog.frameworks["pytorch"]}
    found = {  # what each image would print
        "cuda13.0": {"sass": list(pytorch["cuda13.0"].archs), "ptx": ["12.0"], "how": "torch's arch flags"},
        "cuda12.8": {"sass": ["7.5", "8.0", "9.0"], "ptx": ["9.0"], "how": "torch's arch flags"},
    }
    checks = check_archs(catalog, ["pytorch", "jax"],
                         lambda framework, variant: f"{framework}:{variant.variant}"
                         if framework == "jax" or variant.variant in found else None,
                         lambda tag, framework: {"sass": [], "ptx": [], "how": "XLA compiles at run time"}
                         if framework == "jax" else found[tag.split(":")[1]])
    verdicts = {(c.framework, c.variant.variant): c.verdict for c in checks}
    assert verdicts == {
        ("pytorch", "cuda13.0"): "agrees",
        ("pytorch", "cuda12.8"): "DIFFERS, the image has archs: [7.5, 8.0, 9.0]; ptx: 9.0",
        ("pytorch", "cuda12.6"): "not on this host (--build builds it)",
        ("pytorch", "cuda11.8"): "not on this host (--build builds it)",
        ("jax", "cuda12.8"): "nothing to check: XLA compiles at run time"}
    assert [c.agrees for c in checks] == [True, False, True, True, True]


def test_each_requirement_file_is_locked_for_the_oldest_python_that_installs_it(tmp_path):
    from harness.catalog import lock_targets, write_locks

    targets = {(t.framework, t.requirements.name): t for t in lock_targets(load_catalog(), ["pytorch", "mxnet",
                                                                                              "chainer", "cntk"])}
    assert targets[("pytorch", "requirements-gpu.txt")].python == "3.11"  # the 3.12 image, and local environments
    assert targets[("mxnet", "requirements-gpu.txt")].python == "3.9"  # the CUDA 11.2 image's
    assert targets[("cntk", "requirements-cpu.txt")].python == "3.6"  # its image only
    cu128 = targets[("pytorch", "requirements-cu128.txt")].command("uv", [tmp_path], skip_extra_indexes=False)
    assert cu128[cu128.index("--extra-index-url") + 1] == "https://download.pytorch.org/whl/cu128"
    assert cu128[cu128.index("--find-links") + 1] == str(tmp_path) and "--universal" in cu128
    assert "--extra-index-url" not in targets[("pytorch", "requirements-cu128.txt")].command("uv", [], True)
    chainer = targets[("chainer", "requirements-cpu.txt")].command("uv", [], False)
    assert chainer[chainer.index("--build-constraints") + 1] == "images/chainer/build-constraints.txt"

    # A resolver that cannot reach an index fails that lock, and says why; the others are written.
    fake_uv = tmp_path / "uv"
    fake_uv.write_text("#!/bin/sh\ncase \"$3\" in *cu128*) echo 'error: index unreachable' >&2; exit 2;; esac\n")
    fake_uv.chmod(0o755)
    outcomes = dict((t.requirements.name, o) for t, o in write_locks(
        [targets[("pytorch", "requirements-cu128.txt")], targets[("cntk", "requirements-cpu.txt")]],
        str(fake_uv), [], False))
    assert outcomes == {"requirements-cu128.txt": "FAILED: error: index unreachable", "requirements-cpu.txt": "written"}


def test_every_base_is_pinned_by_its_digest_now_and_a_registry_error_leaves_it_as_it_was(tmp_path):
    from harness.catalog import pin_digests
    from harness.images import CATALOG_PATH

    catalog = tmp_path / "catalog.yml"
    catalog.write_text(CATALOG_PATH.read_text())

    def digest_of(tag: str) -> str:
        if tag.startswith("ubuntu:"):
            raise ConnectionError("registry-1.docker.io: no such host")
        return "sha256:" + format(abs(hash(tag)), "x").rjust(64, "0")[:64]

    outcomes = dict(pin_digests(catalog, digest_of))
    assert outcomes["ubuntu:16.04"] == "FAILED: ConnectionError: registry-1.docker.io: no such host"
    pinned = load_catalog(catalog)
    bases = {v.base for variants in pinned.frameworks.values() for v in variants}
    assert "ubuntu:16.04" in bases and "cpu" in bases  # left as it was; the run's own CPU base
    cuda = {base for base in bases if base.startswith("nvidia/cuda:")}
    assert cuda and all(base == f"{base.split('@')[0]}@{digest_of(base.split('@')[0])}" for base in cuda)
    assert catalog.read_text().count("\n#") == CATALOG_PATH.read_text().count("\n#")  # comments kept
    # Again: a pinned base gets the digest its tag points to now.
    again = dict(pin_digests(catalog, lambda tag: "sha256:" + "e" * 64))
    assert all(digest == "sha256:" + "e" * 64 for base, digest in again.items() if not base.startswith("ubuntu:"))
    assert "nvidia/cuda:12.8.1-base-ubuntu22.04@sha256:" + "e" * 64 in catalog.read_text()
