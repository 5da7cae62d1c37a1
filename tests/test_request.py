"""The contract between harness and bench: one request type, its defaults defined once, the
flags and the request file making the same request, one function from a request to its
result's cell, and a result schema that says what the result types hold."""
from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from bench import __main__ as bench_main
from bench import result as contract
from bench.request import DEFAULTS, Request, RequestError, read_fields
from conftest import REPO, write_matrix
from harness.matrix import Cell, Settings
from harness.runner import record
from harness.results import RunFolder, read_result


def test_the_flags_and_a_request_file_make_the_same_request(tmp_path):
    flags = ["--framework", "jax", "--task", "densenet121_xray", "--devices", "2", "--precision", "bf16",
             "--threads", "2", "--image-size", "32", "--steps", "3", "--launcher", "local"]
    from_flags, out = bench_main.parse_args(flags + ["--out", str(tmp_path / "a.json")])
    path = tmp_path / "cell.request.json"
    path.write_text(json.dumps(from_flags.to_dict()))
    from_file, _ = bench_main.parse_args(["--request", str(path), "--out", str(tmp_path / "b.json")])
    assert from_file == from_flags and out == tmp_path / "a.json"
    assert from_flags == Request("jax", "densenet121_xray", devices=2, precision="bf16", threads=2, image_size=32,
                                 steps=3, launcher="local")


def test_flags_beside_a_request_file_replace_its_fields(tmp_path):
    path = tmp_path / "cell.request.json"
    path.write_text(json.dumps(Request("pytorch", "resnet50_inference", weights="/host/w.npz").to_dict()))
    request, _ = bench_main.parse_args(["--request", str(path), "--weights", "/dlbench/weights/w.npz",
                                        "--out", str(tmp_path / "r.json")])
    assert request.weights == "/dlbench/weights/w.npz" and request.task == "resnet50_inference"


@pytest.mark.parametrize("content, message", [
    ({"framework": "pytorch", "task": "cnn_cifar10", "stepz": 3}, "unknown field stepz; the fields are framework, task"),
    ({"framework": "pytorch", "task": "cnn_cifar10", "steps": "3"}, "steps is '3'; it takes int"),
    ({"framework": "pytorch"}, "--task is required"),
    ({"framework": "pytorch", "task": "cnn_cifar10", "devices": 2}, "devices 2: cnn_cifar10 runs on one device"),
    ({"framework": "pytorch", "task": "resnet50_inference", "data": "real"}, "times random inputs"),
    ({"framework": "pytorch", "task": "cnn_cifar10", "data_dir": "/d"}, "only real data is read from a folder"),
    ({"framework": "pytorch", "task": "cnn_cifar10", "image_size": 64}, "image_size: cnn_cifar10 runs at its fixed"),
    ({"framework": "torch", "task": "cnn_cifar10"}, "framework 'torch': use one of pytorch, tensorflow"),
])
def test_a_bad_request_is_refused_in_one_line_naming_the_field(tmp_path, capsys, content, message):
    path = tmp_path / "bad.request.json"
    path.write_text(json.dumps(content))
    with pytest.raises(SystemExit) as stop:
        bench_main.parse_args(["--request", str(path), "--out", str(tmp_path / "r.json")])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and not (tmp_path / "r.json").exists()


def test_the_matrix_settings_take_their_defaults_from_the_request():
    settings = Settings()
    for name in ("mode", "data", "warmup_steps", "steps", "repeats", "epochs", "batch_size", "image_size",
                 "weights", "seed"):
        assert getattr(settings, name) == getattr(DEFAULTS, name), name


def test_a_matrix_cell_asks_the_bench_for_exactly_its_axes_and_settings():
    cell = Cell("keras-jax", "densenet121_xray", "H100", "12.8", 4, 2, "bf16", Settings(steps=7, image_size=96))
    request = cell.request("docker", cells_at_once=2)
    assert request == Request(
        framework="keras-jax", task="densenet121_xray", device="gpu", devices=2, precision="bf16", threads=4,
        steps=7, image_size=96, batch_size=64, epochs=5, min_block_s=0.25, budget_s=30.0, cell_id=cell.id,
        gpu_model="H100", cuda="12.8", launcher="docker", cells_at_once=2)
    assert cell.batch_size == 64 and cell.input_shape == (3, 96, 96)
    assert Request.from_dict(request.to_dict()).checked() == request  # what the bench reads back


def test_a_cell_that_never_ran_records_the_cell_the_bench_would_have(tmp_path):
    """The harness's record of a cell that produced no result and the bench's own result of
    the same request have the same ``cell``: one function makes both."""
    cell = Cell("mxnet", "cnn_cifar10", "cpu", "auto", "auto", 1, "bf16", Settings(steps=2))
    folder = RunFolder(tmp_path / "run")

    class Launcher:
        name = "local"

    record(folder, cell, "failed", "the process was killed", Launcher(), "2026-12-02T10:00:00+00:00")
    recorded = read_result(folder.result_path(cell.id))
    path = tmp_path / "cell.request.json"
    path.write_text(json.dumps(cell.request("local").to_dict()))
    out = tmp_path / "bench.json"
    assert bench_main.main(["--request", str(path), "--out", str(out)]) == 1
    written = read_result(out)
    assert written.status == "skipped" and written.error == "mxnet does not run bf16 on cpu (it runs fp32 there)"
    assert dataclasses.asdict(recorded.cell) == dataclasses.asdict(written.cell)
    assert recorded.env["launcher"] == written.env["launcher"] == "local"


def test_the_dry_run_shows_every_skip_the_bench_would_make_and_every_axis(tmp_path, capsys):
    from harness import run_matrix
    matrix = write_matrix(tmp_path / "m.yml", """
matrix:
  framework: [pytorch, keras-torch, mxnet]
  task: [densenet121_xray]
  gpu: [cpu]
  devices: [2]
  threads: [auto, 2]
  precision: [fp32, bf16]
""")
    assert run_matrix.main([str(matrix), "--dry-run", "--backend", "current", "--results", str(tmp_path / "r")]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[2:18] if "densenet121_xray" in line]
    assert len({tuple(row[:7]) for row in rows}) == 12  # threads and precision tell the cells apart
    plans = {(row[0], row[4], row[6]): " ".join(row[12:]) for row in rows}
    ceilings = [line.split()[:8] for line in lines[2:18] if "gemm_ceiling" in line]
    assert ceilings == [["pytorch", "gemm_ceiling", "cpu", "auto", threads, "1", precision, "default"]
                        for threads in ("auto", "2") for precision in ("fp32", "bf16")]  # by the first framework
    assert plans[("pytorch", "2", "bf16")] == "run"
    assert plans[("keras-torch", "auto", "fp32")].startswith("skip: Keras 3 has no data-parallel mechanism")
    assert plans[("mxnet", "2", "bf16")] == "skip: mxnet does not run bf16 on cpu (it runs fp32 there)"
    assert plans[("mxnet", "2", "fp32")] == "run"


def _schema_fields(node: dict, schema: dict) -> tuple[set[str], set[str]]:
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].split("/")[-1]]
    node = next((branch for branch in node.get("oneOf", []) if branch.get("type") == "object"), node)
    return set(node["properties"]), set(node.get("required", ()))


def _required(cls) -> set[str]:
    hints = typing.get_type_hints(cls)
    return {f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            and type(None) not in typing.get_args(hints[f.name])}


@pytest.mark.parametrize("cls, where", [
    (contract.Result, ()), (contract.ResultCell, ("cell",)), (contract.ResultSettings, ("settings",)),
    (contract.Metrics, ("metrics",)), (contract.Model, ("model",)), (contract.Summary, ("metrics", "step_time_s")),
])
def test_the_result_schema_holds_exactly_the_result_types_fields(cls, where):
    schema = json.loads(contract.SCHEMA_PATH.read_text())
    node = schema
    for key in where:
        node = node["properties"][key]
    properties, required = _schema_fields(node, schema)
    assert properties == {f.name for f in dataclasses.fields(cls)}
    # A field the type cannot leave out is required (but for the sections an ok result alone
    # must have, and a summary's mean, which results of schema 2 lack and from_dict derives).
    assert _required(cls) - {"settings", "metrics", "model", "mean"} <= required <= properties


def test_the_requests_choices_are_the_schemas():
    schema = json.loads(contract.SCHEMA_PATH.read_text())["properties"]["cell"]["properties"]
    from bench import request
    assert tuple(schema["device"]["enum"]) == request.DEVICES
    assert tuple(schema["mode"]["enum"]) == request.MODES
    assert set(schema["data"]["enum"]) == set(request.DATA)
    assert tuple(schema["precision"]["enum"]) == request.precision.PRECISIONS


def test_a_request_is_python_3_6_code():
    from test_py36 import problems_for_py36
    assert problems_for_py36((REPO / "bench" / "request.py").read_text()) == []


def test_an_unreadable_request_file_is_one_line(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("[1, 2]")
    with pytest.raises(RequestError, match="a request is a JSON object of fields"):
        read_fields(path)


def test_loader_workers_default_to_the_cores_the_cell_may_use():
    from bench.host import cpu_cores
    assert Request("pytorch", "densenet121_xray").run_options("cpu").loader_workers == cpu_cores()
    assert Request("jax", "densenet121_xray", loader_workers=3).run_options("cpu").loader_workers == 3
    cell = Cell("jax", "densenet121_xray", "cpu", "auto", "auto", 1, "fp32", Settings(loader_workers=3))
    assert cell.request().loader_workers == 3
    unset = Cell("jax", "densenet121_xray", "cpu", "auto", "auto", 1, "fp32", Settings())
    assert cell.id != unset.id and unset.id.endswith(".fp32.default." + unset.id.rsplit(".", 1)[1])
