"""The apptainer backend without Apptainer (it is not packaged for this host): the SIF file a
cell needs and the skip when it is missing, and the exec line a cell runs, run through a
stand-in ``apptainer`` that records what it was asked."""
from __future__ import annotations

import hashlib
import json
import stat
import sys

import pytest

from harness import backends
from harness.backends import BackendError
from harness.backends.apptainer import ApptainerBackend, image_id
from harness.gpus import Gpu
from harness.matrix import Cell, Settings


def cell(gpu="cpu"):
    return Cell("pytorch", "cnn_cifar10", gpu, "auto", "auto", 1, "fp32", Settings(steps=1))


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """An ``apptainer`` on PATH that writes its arguments to the cell's log and exits 0."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "apptainer"
    script.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin")
    return script


def test_a_missing_sif_skips_the_cell_saying_how_to_make_it(tmp_path, stand_in):
    backend = ApptainerBackend.from_args(backends.options(["--sif-dir", str(tmp_path / "sif")]))
    assert backend.skip_reason(cell()) == (
        f"no image {tmp_path}/sif/pytorch-cpu.sif: convert the docker backend's pytorch image with "
        f"`apptainer build {tmp_path}/sif/pytorch-cpu.sif docker-daemon://<its tag>`")


def test_without_apptainer_the_backend_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendError, match="apptainer is not on PATH: install Apptainer"):
        ApptainerBackend.from_args(backends.options([]))


def test_a_cell_runs_with_a_clean_environment_its_own_folders_and_gpus(tmp_path, stand_in):
    (tmp_path / "sif").mkdir()
    (tmp_path / "sif" / "pytorch-cpu.sif").write_bytes(b"an image")
    backend = ApptainerBackend.from_args(backends.options(["--sif-dir", str(tmp_path / "sif")]))
    assert backend.skip_reason(cell()) is None
    backend.prepare(cell())
    weights = tmp_path / "w" / "resnet50.npz"
    launch = backends.Launch(cell(), tmp_path / "staging" / "c.request.json", tmp_path / "staging" / "c.json",
                             tmp_path / "logs" / "c.log", 60, weights=weights)
    ended = backend.run(launch)
    assert ended.returncode == 0
    argv = json.loads(launch.log_path.read_text().splitlines()[-1])
    assert argv[:6] == ["exec", "--containall", "--cleanenv", "--no-home", "--pwd", "/opt/dlbench"]
    assert "--nv" not in argv
    assert f"{tmp_path}/staging:/dlbench/out" in argv and f"{tmp_path}/w:/dlbench/weights:ro" in argv
    image = json.loads(next(a for a in argv if a.startswith("DLBENCH_IMAGE=")).split("=", 1)[1])
    assert image["tag"] == "pytorch-cpu.sif" and image["id"] == "sha256:" + hashlib.sha256(b"an image").hexdigest()
    kept = tmp_path / "sif" / "pytorch-cpu.sif.sha256"
    assert kept.read_text().splitlines()[1] == image["id"]  # the next cell (or job) reads it, not the image
    kept.write_text(kept.read_text().replace(image["id"], "sha256:kept"))
    assert image_id(tmp_path / "sif" / "pytorch-cpu.sif") == "sha256:kept"
    (tmp_path / "sif" / "pytorch-cpu.sif").write_bytes(b"another image")  # changed: hashed again
    assert image_id(tmp_path / "sif" / "pytorch-cpu.sif") == "sha256:" + hashlib.sha256(b"another image").hexdigest()
    assert argv[argv.index(str(tmp_path / "sif" / "pytorch-cpu.sif")) + 1:] == [
        "python", "-m", "bench", "--request", "/dlbench/out/c.request.json", "--out", "/dlbench/out/c.json",
        "--weights", "/dlbench/weights/resnet50.npz"]

    gpu_launch = backends.Launch(cell("H100"), launch.request_path, launch.result_path, launch.log_path, 60,
                                 gpus=[Gpu(0, "GPU-aaaa", "NVIDIA H100", 1)])
    backend._image_ids[backend.sif_path(cell("H100"))] = "sha256:gpu"
    gpu_argv = backend.command_line(gpu_launch)
    assert "--nv" in gpu_argv and "CUDA_VISIBLE_DEVICES=GPU-aaaa" in gpu_argv


def test_a_data_parallel_cntk_cell_runs_under_mpiexec_one_process_per_device(tmp_path, stand_in):
    """CNTK's data parallelism is one MPI process per device: the backend starts them all with
    mpiexec, so the bench (and the dry run before it) sees as many workers as devices."""
    (tmp_path / "sif").mkdir()
    (tmp_path / "sif" / "cntk-cpu.sif").write_bytes(b"an image")
    backend = ApptainerBackend.from_args(backends.options(["--sif-dir", str(tmp_path / "sif")]))
    data_parallel = Cell("cntk", "densenet121_xray", "cpu", "auto", "auto", 2, "fp32", Settings(steps=1))
    assert backend.skip_reason(data_parallel) is None  # no "must be started by mpiexec"
    backend.prepare(data_parallel)
    for devices, launcher in ((2, ["mpiexec", "-n", "2"]), (1, [])):
        launch = backends.Launch(Cell("cntk", "densenet121_xray", "cpu", "auto", "auto", devices, "fp32",
                                      Settings(steps=1)),
                                 tmp_path / "staging" / "c.request.json", tmp_path / "staging" / "c.json",
                                 tmp_path / "logs" / f"c{devices}.log", 60)
        assert backend.run(launch).returncode == 0
        argv = json.loads(launch.log_path.read_text().splitlines()[-1])
        after_image = argv[argv.index(str(tmp_path / "sif" / "cntk-cpu.sif")) + 1:]
        assert after_image[:len(launcher) + 3] == launcher + ["python", "-m", "bench"]
    # A framework whose replicas are its own processes or threads needs no launcher.
    pytorch = Cell("pytorch", "densenet121_xray", "cpu", "auto", "auto", 2, "fp32", Settings(steps=1))
    assert backends.Launch(pytorch, launch.request_path, launch.result_path, launch.log_path, 60).bench_command(
        "python", [])[:3] == ["python", "-m", "bench"]
