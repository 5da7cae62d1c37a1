"""The docker backend for real: a Docker engine (DOCKER_HOST; scripts/docker-engine.sh starts
one), a Debian base image made without a registry, the PyTorch CPU image built through the
harness offline from a wheelhouse, and cells run in containers end to end (one image keeps CI
short: every image is built by the same shared Dockerfile).

Without an engine these tests are skipped, except under CI=true, where they fail."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from bench.result import bench_code_hash
from conftest import CACHE, REPO, docker_options, write_matrix
from harness.backends.docker import DockerBackend
from harness.gpus import Gpu
from harness.images import BuildOptions
from harness.matrix import Cell, Settings
from harness.results import RunFolder, load_results
from harness.runner import run_cells

pytestmark = [pytest.mark.integration, pytest.mark.docker]

FRAMEWORKS = ("pytorch",)
QUICK = "settings:\n  warmup_steps: 1\n  steps: 2\n  repeats: 2\n  max_repeats: 2\n  timeout_s: 600\n"


def run_matrix(matrix: Path, results: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "harness" / "run_matrix.py"), str(matrix),
                           "--results", str(results), "--no-ceiling", *options], capture_output=True, text=True,
                          timeout=2400)


def test_cells_run_in_images_built_offline_and_merge_with_local_results(engine, base_image, wheelhouse, certificate, tmp_path):
    matrix = write_matrix(tmp_path / "m.yml", f"matrix:\n  framework: [{', '.join(FRAMEWORKS)}]\n"
                                              "  task: [cnn_cifar10, gru_imdb]\n  gpu: [cpu]\n" + QUICK)
    done = run_matrix(matrix, tmp_path / "docker", "--backend", "docker", *docker_options(base_image, wheelhouse, certificate))
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = load_results(tmp_path / "docker" / "cells")
    assert not loaded.problems and len(loaded.results) == 2 * len(FRAMEWORKS)
    for _, result in loaded.results:
        assert result.status == "ok", result.error
        framework = result.cell.framework
        image = result.env["image"]
        assert result.env["launcher"] == "docker" and image["tag"].startswith(f"dlbench/{framework}:cpu-")
        assert engine.images.get(image["tag"]).id == image["id"]
        # The base as pinned, and its digest in the registry as the image's record of it.
        assert image["base"] == base_image
        assert image["base_digest"] == (base_image.replace(":bookworm@", "@") if "@" in base_image
                                        else engine.images.get(base_image).id)
        labels = engine.images.get(image["tag"]).labels
        assert labels["org.dlbench.bench-hash"] == result.env["bench_hash"]
        assert labels["org.dlbench.framework"] == framework
        assert result.env["python"].startswith("3.11.")  # the base image's own Python
        log = (tmp_path / "docker" / "logs" / f"{result.cell.id}.log").read_text()
        assert (f"$ docker run {image['tag']} python -m bench "
                f"--request /dlbench/out/{result.cell.id}.request.json") in log
    assert not engine.containers.list(all=True, filters={"label": "org.dlbench.run"})  # all removed

    # The extra CA certificate is in the image's trust store, which pip is told to use.
    pytorch = next(r for _, r in loaded.results if r.cell.framework == "pytorch").env["image"]["tag"]
    bundle = engine.containers.run(pytorch, ["cat", "/etc/ssl/certs/ca-certificates.crt"], remove=True,
                                   network_mode="none").decode()
    assert certificate.read_text().strip() in bundle

    # What the build has GPU code for, read inside the image (a CPU build: none); the catalog's
    # GPU variants are not built here, and the check says so.
    found = engine.containers.run(pytorch, ["python", "-m", "bench.gpu_code", "pytorch"], remove=True,
                                  network_mode="none").decode()
    assert '"sass": [], "ptx": [], "how": "a CPU build"' in found
    archs = subprocess.run([sys.executable, str(REPO / "harness" / "catalog.py"), "archs", "--framework", "pytorch",
                            *docker_options(base_image, wheelhouse, certificate)], capture_output=True, text=True)
    assert archs.returncode == 0, archs.stderr
    assert archs.stdout.count("not on this host (--build builds it)") == 4, archs.stdout

    # Nothing changed: the same images are found by their tags, none is built again.
    logs = sorted((CACHE / "images").glob("dlbench-pytorch-cpu-*.log"), key=lambda p: p.stat().st_mtime)
    built_at = logs[-1].stat().st_mtime_ns
    again = run_matrix(matrix, tmp_path / "again", "--backend", "docker", *docker_options(base_image, wheelhouse, certificate), "--force")
    assert again.returncode == 0, again.stderr[-3000:]
    assert logs[-1].stat().st_mtime_ns == built_at

    # The local backend's results of the same cells merge into the same tables, a column each.
    local = run_matrix(matrix, tmp_path / "local", "--backend", "local")
    assert local.returncode == 0, local.stderr[-3000:]
    merged = subprocess.run([sys.executable, str(REPO / "harness" / "report.py"), str(tmp_path / "docker"),
                             str(tmp_path / "local"), "--out", str(tmp_path / "merged"), "--no-charts"],
                            capture_output=True, text=True, check=True)
    assert "docker backend" in merged.stdout and "local backend" in merged.stdout
    cnn = (tmp_path / "merged" / "tables" / "cnn_cifar10-throughput-synthetic-batch64-3x32x32.md").read_text()
    for framework in FRAMEWORKS:
        row = next(line for line in cnn.splitlines() if line.startswith(f"| {framework} "))
        assert row.count(" ms [") == 2, row  # a number from each backend


def test_a_cell_over_its_memory_limit_is_recorded_and_the_next_cell_runs(engine, base_image, wheelhouse, certificate, tmp_path):
    # PyTorch alone takes more than 150 MB once imported.
    matrix = write_matrix(tmp_path / "m.yml", "matrix:\n  framework: [pytorch]\n"
                                              "  task: [cnn_cifar10, gru_imdb]\n  gpu: [cpu]\n" + QUICK)
    done = run_matrix(matrix, tmp_path / "results", "--backend", "docker", *docker_options(base_image, wheelhouse, certificate), "--memory", "150m")
    assert done.returncode == 1
    results = {r.cell.task: r for _, r in load_results(tmp_path / "results" / "cells").results}
    assert results["cnn_cifar10"].status == "failed"
    assert "ran out of memory" in results["cnn_cifar10"].error
    assert results["gru_imdb"].status in ("ok", "failed")  # it ran: its own outcome is recorded
    assert not engine.containers.list(all=True, filters={"label": "org.dlbench.run"})


def test_two_gpu_cells_run_side_by_side_in_real_containers_and_both_finish(engine, base_image, wheelhouse, certificate,
                                                                          tmp_path, monkeypatch):
    """The scheduler is given two stand-in GPUs; the cells compute on the CPU, in the CPU image,
    each in a read-only container of its own that must not stop the other's."""
    monkeypatch.setenv("DLBENCH_GPU_STAND_IN", "cpu")
    backend = DockerBackend(CACHE, BuildOptions(cpu_base=base_image, ca_certificates=(certificate,),
                                                wheelhouse=wheelhouse, offline=True))
    backend.gpus = [Gpu(index, f"GPU-stand-in-{index}", "NVIDIA H100 80GB HBM3", 80 << 30, "9.0") for index in (0, 1)]
    settings = Settings(warmup_steps=1, steps=2, repeats=2, max_repeats=2, timeout_s=600)
    cells = [Cell("pytorch", task, "H100", "auto", "auto", 1, "fp32", settings) for task in ("cnn_cifar10", "gru_imdb")]
    folder = RunFolder(tmp_path / "run")
    outcomes = run_cells(cells, folder, backend, tmp_path)
    assert [o.status for o in outcomes] == ["ok", "ok"], [o.error for o in outcomes]
    first, second = sorted((r.env["started_utc"], r.env["finished_utc"]) for _, r in load_results(folder.cells).results)
    assert second[0] < first[1]  # they ran at once
    assert not engine.containers.list(all=True, filters={"label": f"org.dlbench.run={folder.root}"})
    assert not list(folder.staging.iterdir())  # each cell's staging folder went with it


def test_a_container_has_no_network(engine, base_image, wheelhouse, certificate, tmp_path):
    """Real data that is not on the host cannot be fetched from inside a cell."""
    matrix = write_matrix(tmp_path / "m.yml", "matrix:\n  framework: [pytorch]\n  task: [cnn_cifar10]\n"
                                              "  gpu: [cpu]\n" + QUICK + f"  data: real\n  data_dir: {tmp_path / 'data'}\n")
    done = run_matrix(matrix, tmp_path / "results", "--backend", "docker", *docker_options(base_image, wheelhouse, certificate))
    assert done.returncode == 1
    ((_, result),) = load_results(tmp_path / "results" / "cells").results
    assert result.status == "failed" and result.error.startswith("DataUnavailable: cifar-10-batches-py")
    log = next((tmp_path / "results" / "logs").glob("*.log")).read_text()
    assert "Temporary failure in name resolution" in log or "Network is unreachable" in log or \
        "Name or service not known" in log, log[-2000:]


def test_compose_file_is_valid_for_the_compose_tool_and_hardened_as_the_harness_containers(engine):
    def config(*options: str) -> dict:
        done = subprocess.run(["bash", str(REPO / "scripts" / "compose.sh"), *options, "config"],
                              capture_output=True, text=True, cwd=REPO, env={**os.environ, "DLBENCH_GPUS": "1,2"})
        assert done.returncode == 0, done.stderr
        return YAML(typ="safe").load(done.stdout)["services"]

    services = config("--profile", "gpu")
    assert "pytorch" in services and "cntk" in services
    gpu = services["pytorch-gpu"]
    (devices,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices["device_ids"] == ["1,2"] and devices["capabilities"] == ["gpu"]
    for service in (services["pytorch"], gpu):
        assert service["build"]["args"]["BENCH_HASH"] == bench_code_hash()
        assert service["user"] == f"{os.getuid()}:{os.getgid()}" and service["read_only"] is True
        assert service["network_mode"] == "none" and service["cap_drop"] == ["ALL"]
        assert service["ulimits"]["memlock"] == -1 and service["environment"]["NCCL_SOCKET_IFNAME"] == "lo"


def test_the_engine_decides_the_automatic_backend(engine, tmp_path):
    matrix = write_matrix(tmp_path / "m.yml", "matrix:\n  framework: [cntk]\n  task: [cnn_cifar10]\n  gpu: [cpu]\n")

    def plan(environment: dict) -> str:
        return subprocess.run([sys.executable, str(REPO / "harness" / "run_matrix.py"), str(matrix), "--dry-run"],
                              capture_output=True, text=True, env=environment, check=True).stdout

    assert "skip" not in plan(dict(os.environ))  # CNTK has an image
    assert "skip: CNTK 2.7 installs only on Python 3.5/3.6" in plan(
        {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"})
