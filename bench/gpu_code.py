"""Which GPU architectures a framework's build has code for, read from the build itself:
``python -m bench.gpu_code FRAMEWORK`` prints JSON, e.g.

    {"framework": "mxnet", "sass": ["5.0", ..., "8.6"], "ptx": ["8.6"], "how": "fat binaries of libmxnet.so"}

``sass``: compute capabilities with native code; ``ptx``: those it carries PTX for (a newer GPU
runs it once the driver has compiled it). A framework that compiles its kernels at run time
for the GPU it finds (XLA, CuPy's NVRTC) says so in ``how`` and lists none. The harness's
``harness/catalog.py archs`` runs this in each GPU image to check images/catalog.yml.

Where the framework cannot tell (MXNet, CNTK), its libraries' fat binaries are read: NVIDIA's
container of device code, one header (magic 0xBA55ED50) followed by entries, each with its
kind (1: PTX, 2: an ELF cubin) and its architecture, as ``cuobjdump --list-elf`` lists them.
Only the standard library: it runs in CNTK's Python 3.6 image too.
"""
import glob
import json
import os
import struct
import sys
from typing import Dict, Iterable, List, Optional, Set, Tuple

FATBIN_MAGIC = 0xBA55ED50
_FATBIN_HEADER = struct.Struct("<IHHQ")  # magic, version, header size, size of the entries
# An entry's header, as far as read here: kind, (version), header size, payload size, (two
# words), minor and major of the toolchain, the architecture (e.g. 86 for sm_86).
_ENTRY_HEADER = struct.Struct("<HHIQIIHHI")
PTX, ELF = 1, 2


def fatbin_archs(blob: bytes) -> Tuple[Set[str], Set[str]]:
    """The architectures of every fat binary in ``blob`` (a shared library's bytes): those
    with native code (SASS, in cubins) and those with PTX, as compute capabilities ("8.6")."""
    sass, ptx = set(), set()  # type: Set[str], Set[str]
    start = blob.find(struct.pack("<I", FATBIN_MAGIC))
    while 0 <= start <= len(blob) - _FATBIN_HEADER.size:
        _, version, header_size, size = _FATBIN_HEADER.unpack_from(blob, start)
        if version == 1 and header_size == _FATBIN_HEADER.size:  # else a chance match of the magic
            entry, end = start + header_size, min(start + header_size + size, len(blob))
            while entry + _ENTRY_HEADER.size <= end:
                kind, _, entry_header, payload, _, _, _, _, arch = _ENTRY_HEADER.unpack_from(blob, entry)
                if entry_header < _ENTRY_HEADER.size or kind not in (PTX, ELF):
                    break  # not an entry: a format not known here
                (ptx if kind == PTX else sass).add("{}.{}".format(arch // 10, arch % 10))
                entry += entry_header + payload
        start = blob.find(struct.pack("<I", FATBIN_MAGIC), start + 4)
    return sass, ptx


def libraries_archs(paths: Iterable[str]) -> Tuple[List[str], List[str]]:
    sass, ptx = set(), set()  # type: Set[str], Set[str]
    for path in paths:
        with open(path, "rb") as library:
            found_sass, found_ptx = fatbin_archs(library.read())
        sass |= found_sass
        ptx |= found_ptx
    return _sorted(sass), _sorted(ptx)


def _sorted(capabilities: Iterable[str]) -> List[str]:
    return sorted(capabilities, key=lambda text: tuple(int(part) for part in text.split(".")))


def from_arch_flags(flags: Iterable[str]) -> Tuple[List[str], List[str]]:
    """["sm_80", "sm_90", "compute_90"] (a build's own list) as SASS and PTX capabilities."""
    sass, ptx = set(), set()  # type: Set[str], Set[str]
    for flag in flags:
        kind, _, number = flag.strip().rstrip("a").partition("_")
        if number.isdigit():
            (ptx if kind == "compute" else sass).add("{}.{}".format(int(number) // 10, int(number) % 10))
    return _sorted(sass), _sorted(ptx)


def gpu_code(framework: str) -> Dict[str, object]:
    """What the installed build of ``framework`` has code for (imports the framework)."""
    sass, ptx, how = [], [], ""  # type: List[str], List[str], str
    if framework in ("pytorch", "keras-torch"):
        import torch
        if torch.version.cuda:
            # The list torch.cuda.get_arch_list() gives, without needing a GPU to ask.
            sass, ptx = from_arch_flags(torch._C._cuda_getArchFlags().split())
        how = "torch's arch flags (CUDA {})".format(torch.version.cuda) if torch.version.cuda else "a CPU build"
    elif framework in ("tensorflow", "keras-tensorflow"):
        import tensorflow as tf
        info = tf.sysconfig.get_build_info()
        sass, ptx = from_arch_flags(info.get("cuda_compute_capabilities") or [])
        how = "tf.sysconfig.get_build_info()" if info.get("is_cuda_build") else "a CPU build"
    elif framework in ("jax", "keras-jax"):
        how = "XLA compiles its kernels at run time for the GPU it finds"
    elif framework == "chainer":
        how = "CuPy compiles its kernels at run time (NVRTC) for the GPU it finds"
    elif framework == "mxnet":
        import mxnet
        libraries = mxnet.libinfo.find_lib_path()
        sass, ptx = libraries_archs(libraries)
        how = "fat binaries of " + ", ".join(os.path.basename(path) for path in libraries)
    elif framework == "cntk":
        import cntk
        libraries = sorted(glob.glob(os.path.join(os.path.dirname(cntk.__file__), "libs", "*.so*")))
        sass, ptx = libraries_archs(libraries)
        how = "fat binaries of CNTK's {} libraries".format(len(libraries))
    else:
        raise ValueError("unknown framework {!r}".format(framework))
    return {"framework": framework, "sass": sass, "ptx": ptx, "how": how}


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.gpu_code FRAMEWORK", file=sys.stderr)
        return 2
    print(json.dumps(gpu_code(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
