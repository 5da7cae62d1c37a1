"""The docker backend's container logic against a stand-in for the Docker SDK's client: what a
cell's container is given (GPUs by UUID, no network, no privileges, the host uid, mounts), and
how a run ends (exit, timeout, interrupt, out of memory). The same paths run against a real
engine in test_docker.py, except the GPU request, which needs an NVIDIA host."""
from __future__ import annotations

import json
import os
import resource
import threading
import time
import types

import pytest
import requests
from docker.errors import ImageNotFound

from harness.backends.base import BackendError, Launch
from harness.backends.docker import DockerBackend
from harness.gpus import Driver, Gpu
from harness.images import BuildOptions, load_catalog, recipe
from harness.matrix import Cell, Settings
from harness.results import RunFolder

CATALOG = load_catalog()
H100S = [Gpu(0, "GPU-aaaa", "NVIDIA H100 80GB HBM3", 80 << 30, "9.0", near_cpus=(0, 1, 2, 3)),
         Gpu(1, "GPU-bbbb", "NVIDIA H100 80GB HBM3", 80 << 30, "9.0", near_cpus=(2, 3, 4, 5))]


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
        self.leftovers = [FakeContainer(["python"], {}, 0, 0)]  # a killed harness's container
        self.listed: list[dict] = []
        self.containers = types.SimpleNamespace(create=self._create, list=self._list)
        self.api = types.SimpleNamespace(inspect_container=lambda cid: {"State": {"OOMKilled": oom}})
        self.runs_s, self.status = runs_s, status

    def _list(self, all, filters):
        self.listed.append(filters)
        return self.leftovers

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
    out, kernel_cache = options["mounts"]
    assert out["Target"] == "/dlbench/out" and out["Source"] == str(cell_launch.result_path.parent)
    assert not out["ReadOnly"] and kernel_cache["Target"] == "/dlbench/kernel-cache"
    assert kernel_cache["Source"].startswith(str(tmp_path / "cache" / "kernel-cache"))
    # Read-only but for /tmp and the mounts; pinned to the cores nearest its GPUs; NVIDIA's limits.
    assert options["read_only"] and "exec" in options["tmpfs"]["/tmp"].split(",")
    assert options["cpuset_cpus"] == "0,1,2,3,4,5" and options["shm_size"] == "4g"
    assert {(u["Name"], u["Soft"]) for u in options["ulimits"]} == {("memlock", -1), ("stack", 64 << 20)}
    environment = options["environment"]
    assert environment["NCCL_SOCKET_IFNAME"] == environment["GLOO_SOCKET_IFNAME"] == "lo"
    assert environment["CUDA_CACHE_PATH"].startswith("/dlbench/kernel-cache/")
    assert container.argv[-4:] == ["--request", "/dlbench/out/cell.request.json", "--out", "/dlbench/out/cell.json"]
    image = json.loads(options["environment"]["DLBENCH_IMAGE"])
    assert image["id"] == "sha256:image" and image["tag"].startswith("dlbench/pytorch:cuda13.0-")
    assert image["base_digest"] == "nvidia/cuda@sha256:base"
    assert container.removed and "the cell's output" in cell_launch.log_path.read_text()


def test_a_cpu_cell_gets_no_gpu(tmp_path):
    _, container, _ = run(tmp_path, FakeClient())
    assert container.kwargs["device_requests"] == [] and container.kwargs["cpuset_cpus"] is None
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


def test_cells_side_by_side_are_labelled_each_and_only_a_killed_harness_leftovers_are_removed(tmp_path):
    client = FakeClient()
    made = backend(tmp_path, client)
    folder = RunFolder(tmp_path / "run")
    cells = [Cell("pytorch", "cnn_cifar10", "H100", "auto", "auto", 1, "fp32", Settings(data="real", steps=n))
             for n in (1, 2)]
    for cell, gpu in zip(cells, H100S):
        staging = folder.cell_staging(cell.id)
        made.prepare(cell)
        made.run(Launch(cell, staging / f"{cell.id}.request.json", staging / f"{cell.id}.json",
                        tmp_path / "logs" / f"{cell.id}.log", 60, [gpu], data_dir=tmp_path / "data", folder=folder))
    # Before the first cell only: a second cell of the run must not remove the first one's container.
    assert client.listed == [{"label": f"org.dlbench.run={folder.root}"}] and client.leftovers[0].removed
    for cell, container in zip(cells, client.created):
        assert container.kwargs["labels"] == {"org.dlbench.run": str(folder.root), "org.dlbench.cell": cell.id}
        out, data, _ = container.kwargs["mounts"]
        assert out["Source"] == str(folder.cell_staging(cell.id)) and not out["ReadOnly"]
        assert data["Target"] == "/dlbench/data" and data["ReadOnly"]


class BuildingClient(FakeClient):
    """Has no image of the bench until it builds one, sending the engine's build messages."""

    def __init__(self, messages, tmp_path):
        super().__init__()
        self.messages, self.logs_seen, self.built = messages, [], False
        found = self.images.get

        def get(reference):
            if reference.startswith("dlbench/") and not self.built:
                raise ImageNotFound(f"No such image: {reference}")
            return found(reference)

        self.images = types.SimpleNamespace(get=get)
        self.api.build = self._build
        self.log_dir = tmp_path / "cache" / "images"

    def _build(self, decode, **kwargs):
        assert decode
        for message in self.messages:
            yield message
            self.logs_seen.append("".join(path.read_text() for path in self.log_dir.glob("*.log")))
        self.built = not any("error" in message for message in self.messages)


def test_a_build_writes_its_log_as_it_goes_and_says_which_step_it_is_on(tmp_path):
    client = BuildingClient([{"stream": "Step 1/3 : FROM debian\n"}, {"stream": " ---> 1234\n"},
                             {"stream": "Step 2/3 : RUN pip install torch\n"},
                             {"stream": "Collecting torch==2.5.1\n"}], tmp_path)
    said = []
    backend(tmp_path, client).prepare(launch(tmp_path).cell, said.append)
    assert "Step 1/3 : FROM debian" in client.logs_seen[0]  # written before the build went on
    assert "Collecting torch" not in client.logs_seen[2] and "Collecting torch" in client.logs_seen[3]
    assert said[-1] == "building pytorch cpu image, Step 2/3 : RUN pip install torch: Collecting torch==2.5.1"


def test_a_failed_build_or_an_engine_error_fails_the_image_with_its_reason(tmp_path):
    client = BuildingClient([{"stream": "Step 1/3 : FROM debian\n"}, {"error": "pip: no matching distribution"}],
                            tmp_path)
    with pytest.raises(BackendError, match=r"building dlbench/pytorch:cpu-\w+ failed: pip: no matching "
                                           r"distribution; see .*\.log"):
        backend(tmp_path, client).prepare(launch(tmp_path).cell)
    assert "pip: no matching distribution" in next(client.log_dir.glob("*.log")).read_text()

    def timed_out(**kwargs):
        raise requests.exceptions.ReadTimeout("Read timed out. (read timeout=600)")

    client.api.build = timed_out
    with pytest.raises(BackendError, match="the Docker engine failed while preparing the pytorch cpu image: "
                                           "ReadTimeout: Read timed out"):
        backend(tmp_path, client).prepare(launch(tmp_path).cell)


STAND_IN_HOST = [Gpu(0, "GPU-v100", "Tesla V100-SXM2-16GB", 16 << 30, "7.0"),
                 Gpu(1, "GPU-a100", "NVIDIA A100-SXM4-80GB", 80 << 30, "8.0"),
                 Gpu(2, "GPU-h100", "NVIDIA H100 80GB HBM3", 80 << 30, "9.0")]


@pytest.mark.parametrize("framework, gpu, expected", [
    ("pytorch", "V100", "cuda12.6"), ("pytorch", "A100", "cuda12.8"), ("pytorch", "H100", "cuda12.8"),
    ("tensorflow", "V100", "cuda12.5"), ("tensorflow", "H100", "skip: no tensorflow GPU image runs"),
    ("keras-torch", "A100", "skip: no keras-torch GPU image runs"),
    ("mxnet", "H100", "cuda11.7 PTX JIT"), ("chainer", "H100", "cuda12.2"), ("jax", "V100", "cuda12.8"),
    ("cntk", "V100", "cuda10.0"), ("cntk", "A100", "skip: no cntk GPU image runs")])
def test_a_host_with_an_r535_driver_and_three_gpu_generations_gets_the_right_image_for_each(
        tmp_path, framework, gpu, expected):
    made = backend(tmp_path, FakeClient())
    made.gpus, made.driver = STAND_IN_HOST, Driver("535.104.05", "12.2")
    cell = Cell(framework, "cnn_cifar10", gpu, "auto", "auto", 1, "fp32", Settings())
    skipped = made.skip_reason(cell)
    if expected.startswith("skip: "):
        assert skipped and skipped.startswith(expected[len("skip: "):]), skipped
        return
    assert skipped is None, skipped
    variant, *jit = expected.split(" ", 1)
    assert made.environment_of(cell).startswith(f"{variant} image: ")
    made.prepare(cell)
    host_gpu = next(g for g in STAND_IN_HOST if gpu in g.name)
    made.run(Launch(cell, tmp_path / "s" / "c.request.json", tmp_path / "s" / "c.json", tmp_path / "c.log", 60,
                    [host_gpu]))
    image = json.loads(made.client.created[-1].kwargs["environment"]["DLBENCH_IMAGE"])
    assert image["gpu_code"] == ("ptx-jit" if jit else "native") and image["tag"].startswith(f"dlbench/{framework}:{variant}-")
    assert image["chosen_because"] == made.environment_of(cell).split(": ", 1)[1]


def test_the_dry_run_says_which_image_each_gpu_cell_gets_and_why(tmp_path, capsys):
    from harness.run_matrix import print_plan

    made = backend(tmp_path, FakeClient())
    made.gpus, made.driver = STAND_IN_HOST, Driver("535.104.05", "12.2")
    cells = [Cell("pytorch", "cnn_cifar10", gpu, "auto", "auto", 1, "fp32", Settings()) for gpu in ("V100", "H100")]
    print_plan(cells, RunFolder(tmp_path / "run"), made, len(cells))
    shown = capsys.readouterr().out
    assert "run (cuda12.6 image)" in shown and "run (cuda12.8 image)" in shown
    assert ("pytorch on V100, cuda auto: cuda12.6 image: native code for compute capability 7.0 (newer builds "
            "passed over: the cuda13.0 image needs driver 580.65.06 or newer (this host has 535.104.05); the "
            "cuda12.8 image is built for compute capability 7.5, 8.0, 8.6, 9.0, 10.0, 12.0 with PTX 12.0; "
            "the GPU is 7.0)") in shown


def test_a_missing_base_is_pulled_first_so_an_image_keeps_its_tag_from_the_first_run_on(tmp_path):
    client = BuildingClient([{"stream": "Step 1/1 : FROM debian\n"}], tmp_path)
    present, pulled = client.images.get, []

    def get(reference):
        if not reference.startswith("dlbench/") and not pulled:
            raise ImageNotFound(f"No such image: {reference}")
        return present(reference)

    def pull(reference):
        pulled.append(reference)
        return present(reference)

    client.images = types.SimpleNamespace(get=get, pull=pull)
    cell = launch(tmp_path).cell
    first = backend(tmp_path, client).image(recipe(cell.framework, CATALOG.frameworks["pytorch"][0], BuildOptions()))
    again = backend(tmp_path, client).image(recipe(cell.framework, CATALOG.frameworks["pytorch"][0], BuildOptions()))
    assert pulled == ["debian:bookworm-slim"] and first.tag == again.tag and client.built


def test_a_base_that_cannot_be_pulled_says_how_to_make_one(tmp_path):
    from docker.errors import APIError

    client = BuildingClient([], tmp_path)

    def get(reference):
        raise ImageNotFound(f"No such image: {reference}")

    def pull(reference):
        raise APIError("pull access denied", explanation="dial tcp: lookup registry-1.docker.io: no such host")

    client.images = types.SimpleNamespace(get=get, pull=pull)
    with pytest.raises(BackendError, match=r"the base image debian:bookworm-slim is not on this host and cannot be "
                                           r"pulled \(dial tcp: .*\): load it, or make one with "
                                           r"scripts/make-base-image.sh and pass --base-image"):
        backend(tmp_path, client).prepare(launch(tmp_path).cell)


def test_an_engine_that_may_not_raise_its_limits_runs_the_cell_under_the_hosts_and_says_so(tmp_path):
    from docker.errors import APIError

    class LimitedClient(FakeClient):
        def _create(self, image, argv, **kwargs):
            container = super()._create(image, argv, **kwargs)
            if len(self.created) == 1:  # NVIDIA's limits: refused at start, as runc does
                def refuse():
                    raise APIError("500", explanation="error setting rlimit type 8: operation not permitted")
                container.start = refuse
            return container

    client = LimitedClient()
    ended, container, cell_launch = run(tmp_path, client)
    assert ended.returncode == 0 and len(client.created) == 2 and all(c.removed for c in client.created)
    assert client.created[0].kwargs["ulimits"][0]["Hard"] == -1  # asked for first
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    memlock = container.kwargs["ulimits"][0]
    assert memlock["Name"] == "memlock" and memlock["Hard"] == (-1 if hard == resource.RLIM_INFINITY else hard)
    assert "the engine could not set NVIDIA's ulimits (error setting rlimit type 8" in cell_launch.log_path.read_text()
