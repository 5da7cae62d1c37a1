"""What bench/environment.py records of where a cell ran: the CUDA libraries actually loaded,
read from libraries built here that answer as the CUDA runtime and cuDNN do."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from bench.environment import _cudnn_version_text, loaded_cuda_libraries
from conftest import REPO

FAKE_LIBRARIES = {
    "libcudart.so.12": "int cudaRuntimeGetVersion(int *version) { *version = 12080; return 0; }",
    "libcudnn.so.9": "unsigned long cudnnGetVersion(void) { return 91002; }",
}


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_the_cuda_runtime_and_cudnn_the_process_loaded_are_recorded_with_their_versions(tmp_path):
    for name, source in FAKE_LIBRARIES.items():
        (tmp_path / f"{name}.c").write_text(source)
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / name), str(tmp_path / f"{name}.c")], check=True)
    script = (f"import ctypes, json, sys; sys.path.insert(0, {str(REPO)!r})\n"
              "from bench.environment import loaded_cuda_libraries\n"
              "before = loaded_cuda_libraries()\n"
              f"for name in {sorted(FAKE_LIBRARIES)!r}: ctypes.CDLL({str(tmp_path)!r} + '/' + name)\n"
              "print(json.dumps([before, loaded_cuda_libraries()]))")
    before, after = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                              check=True).stdout)
    assert before is None  # nothing loaded: nothing to record
    assert after == {"cudart": {"path": str(tmp_path / "libcudart.so.12"), "version": "12.8"},
                     "cudnn": {"path": str(tmp_path / "libcudnn.so.9"), "version": "9.10.2"}}


def test_cudnn_numbers_its_versions_two_ways():
    assert _cudnn_version_text(91002) == "9.10.2" and _cudnn_version_text(8906) == "8.9.6"
    assert _cudnn_version_text(7605) == "7.6.5"


def test_without_proc_maps_nothing_is_claimed(tmp_path):
    assert loaded_cuda_libraries(str(tmp_path / "no-maps")) is None
