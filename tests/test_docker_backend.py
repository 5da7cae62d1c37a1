"""The docker backend's container logic against a stand-in for the Docker SDK's client: what a
cell's container is given (GPUs by UUID, no network, no privileges, the host uid, mounts), and
how a run ends (exit, timeout, interrupt, out of memory). The same paths run against a real
engine in test_docker.py, except the GPU request, which needs an NVIDIA host."""
from __future__ import annotations

import json
import os
import threading
import time
import types

import pytest
import requests

from harness.backends.base import Launch
from harness.backends.docker import DockerBackend
from harness.gpus import Gpu
from harness.matrix import Cell, Settings

H100S = [Gpu(0, "GPU-aaaa", "NVIDIA H100 80GB HBM3", 80 << 30), Gpu(1, "GPU-bbbb", "NVIDIA H100 80GB HBM3", 80 << 30)]


class FakeContainer:
    """Exits with ``status`` after ``runs_s`` seconds, or with 143 once stopped."""

    def __init__(self, argv, kwargs, runs_s, status):
        self.argv, self.kwargs, self.runs_s, self.status = argv, kwargs, runs_s, status
        self.id, self.started, self.stopped, self.removed = "c0ffee", None, False, False
        self.attrs = {"Config": {"Cmd": argv}}
        self.image = types.SimpleNamespace(tags=["dlbench/pytorch:tag"], id="sha256:image")

    def start(self):
        self.started = time.monotonic()

    def wait(self, timeout=None):
        if self.stopped:
            return {"StatusCode": 143}
        left = self.started + self.runs_s - time.monotonic()
        if timeout is None or left <= timeout:
            time.sleep(max(0.0, left))
            return {"StatusCode": self.status}
        time.sleep(timeout)
        raise requests.exceptions.ReadTimeout("the client's timeout")

    def stop(self, timeout):
        self.stopped = True

    def logs(self, stdout, stderr):
        return b"the cell's output\n"

    def remove(self, force):
        self.removed = True


class FakeClient:
    def __init__(self, runs_s=0.0, status=0, oom=False):
        self.created: list[FakeContainer] = []
        image = types.SimpleNamespace(id="sha256:image", attrs={"RepoDigests": ["nvidia/cuda@sha256:base"]})
        self.images = types.SimpleNamespace(get=lambda reference: image)
        self.containers = types.SimpleNamespace(create=self._create, list=lambda **kwargs: [])
        self.api = types.SimpleNamespace(inspect_container=lambda cid: {"State": {"OOMKilled": oom}})
        self.runs_s, self.status = runs_s, status

    def _create(self, image, argv, **kwargs):
        self.created.append(FakeContainer(argv, kwargs, self.runs_s, self.status))
        return self.created[-1]


def launch(tmp_path, gpus=(), timeout_s=60.0, devices=1):
    gpu = "H100" if gpus else "cpu"
    task = "densenet121_xray" if devices > 1 else "cnn_cifar10"
    cell = Cell("pytorch", task, gpu, "auto", "auto", devices, "fp32", Settings())
    return Launch(cell, tmp_path / "staging" / "cell.request.json", tmp_path / "staging" / "cell.json",
                  tmp_path / "logs" / "cell.log", timeout_s, list(gpus))


def backend(tmp_path, client):
    return DockerBackend(tmp_path / "cache", client=client)


def run(tmp_path, client, **kwargs):
    made = backend(tmp_path, client)
    cell_launch = launch(tmp_path, **kwargs)
    made.prepare(cell_launch.cell)
    return made.run(cell_launch), client.created[-1], cell_launch


def test_a_gpu_cell_gets_its_own_gpus_by_uuid_and_nothing_else(tmp_path):
    ended, container, cell_launch = run(tmp_path, FakeClient(), gpus=H100S, devices=2)
    assert (ended.returncode, ended.timed_out, ended.interrupted, ended.out_of_memory) == (0, False, False, False)
    (request,) = container.kwargs["device_requests"]
    assert request["Driver"] == "nvidia" and request["DeviceIDs"] == ["GPU-aaaa", "GPU-bbbb"]
    assert request["Capabilities"] == [["gpu"]]
    options = container.kwargs
    assert options["network_mode"] == "none" and options["cap_drop"] == ["ALL"]
    assert options["security_opt"] == ["no-new-privileges"] and options["user"] == f"{os.getuid()}:{os.getgid()}"
    (out,) = options["mounts"]
    assert out["Target"] == "/dlbench/out" and out["Source"] == str(cell_launch.result_path.parent)
    assert container.argv[-4:] == ["--request", "/dlbench/out/cell.request.json", "--out", "/dlbench/out/cell.json"]
    image = json.loads(options["environment"]["DLBENCH_IMAGE"])
    assert image["id"] == "sha256:image" and image["tag"].startswith("dlbench/pytorch:cuda13.0-")
    assert image["base_digest"] == "nvidia/cuda@sha256:base"
    assert container.removed and "the cell's output" in cell_launch.log_path.read_text()


def test_a_cpu_cell_gets_no_gpu(tmp_path):
    _, container, _ = run(tmp_path, FakeClient())
    assert container.kwargs["device_requests"] == []
    assert json.loads(container.kwargs["environment"]["DLBENCH_IMAGE"])["tag"].startswith("dlbench/pytorch:cpu-")


def test_a_container_past_its_timeout_is_stopped(tmp_path):
    began = time.monotonic()
    ended, container, _ = run(tmp_path, FakeClient(runs_s=60), timeout_s=1.2)
    assert ended.timed_out and not ended.interrupted and container.stopped and container.removed
    assert 1.2 <= time.monotonic() - began < 5


def test_an_interrupt_stops_the_container_at_once(tmp_path):
    made = backend(tmp_path, FakeClient(runs_s=60))
    cell_launch = launch(tmp_path)
    made.prepare(cell_launch.cell)
    threading.Timer(0.5, cell_launch.interrupted.set).start()
    began = time.monotonic()
    ended = made.run(cell_launch)
    assert ended.interrupted and not ended.timed_out
    assert time.monotonic() - began < 3
    container = made.client.created[-1]
    assert container.stopped and container.removed


@pytest.mark.parametrize("oom", [True, False])
def test_the_engine_says_whether_the_memory_limit_killed_the_cell(tmp_path, oom):
    ended, _, _ = run(tmp_path, FakeClient(status=137, oom=oom))
    assert ended.out_of_memory is oom and ended.returncode == 137
    assert ended.describe().startswith("ran out of memory" if oom else "exited with 137")
