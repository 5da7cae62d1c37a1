"""matrix.yml: expansion (GitHub Actions rules), settings overrides, validation errors."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from bench.specs import FRAMEWORKS, TASKS
from conftest import REPO, write_matrix
from harness.backends.base import host_inventory
from harness.gpus import Gpu
from harness.matrix import MatrixError, load, only

H100 = Gpu(0, "GPU-aaa", "NVIDIA H100 80GB HBM3", 80 << 30)
H100_B = Gpu(1, "GPU-bbb", "NVIDIA H100 80GB HBM3", 80 << 30)
A100 = Gpu(2, "GPU-ccc", "NVIDIA A100-SXM4-40GB", 40 << 30)

BASE = """
matrix:
  framework: [pytorch, tensorflow]
  task: [cnn_cifar10]
  gpu: [cpu, H100]
  cuda: [auto]
{extra}
settings:
  steps: 7
"""


def cells_of(tmp_path, extra="", gpus=()):
    matrix = load(write_matrix(tmp_path / "matrix.yml", BASE.format(extra=extra)))
    return [(c.framework, c.gpu, c.cuda) for c in matrix.cells(host_inventory(list(gpus)))], matrix.cells(host_inventory(list(gpus)))


def test_the_default_matrix_on_a_host_without_gpus():
    cells = load(REPO / "matrix.yml").cells(host_inventory([]))
    # keras = its three backends; every task on one CPU device (the 2-device split is excluded
    # on CPU-only hosts).
    assert [(c.framework, c.task, c.devices) for c in cells] == [
        (framework, task.name, 1) for framework in FRAMEWORKS for task in TASKS.values()]
    assert all(c.device == "cpu" for c in cells)
    assert all(c.settings.mode == "throughput" and c.settings.data == "synthetic" for c in cells)


def test_the_default_matrix_on_a_gpu_host_runs_the_data_parallel_task_on_1_and_2_gpus():
    cells = load(REPO / "matrix.yml").cells(host_inventory([H100, H100_B]))
    assert [(c.framework, c.task, c.devices) for c in cells] == [
        (framework, task.name, devices) for framework in FRAMEWORKS for task in TASKS.values()
        for devices in ((1, 2) if task.data_parallel else (1,))]
    assert {c.gpu for c in cells} == {H100.name}


def test_an_exclude_naming_a_gpu_applies_to_auto_once_resolved_on_the_host(tmp_path):
    text = ("matrix:\n  framework: [pytorch]\n  task: [densenet121_xray]\n  devices: [1, 2]\n"
            "  exclude:\n    - {gpu: cpu, devices: 2}\n    - {gpu: a100, devices: 1}\n"
            "  include:\n    - {framework: chainer, task: densenet121_xray, devices: 2}\n")
    matrix = load(write_matrix(tmp_path / "m.yml", text))
    # On a CPU-only host auto is cpu: pytorch's 2-device cell goes; the included cell stays.
    assert [(c.framework, c.gpu, c.devices) for c in matrix.cells(host_inventory([]))] == [
        ("pytorch", "cpu", 1), ("chainer", "cpu", 2)]
    assert [(c.framework, c.gpu, c.devices) for c in matrix.cells(host_inventory([H100, A100]))] == [
        ("pytorch", H100.name, 1), ("pytorch", A100.name, 2), ("pytorch", H100.name, 2),
        ("chainer", A100.name, 2), ("chainer", H100.name, 2)]


def test_auto_gpu_becomes_each_gpu_model_of_the_host(tmp_path):
    path = write_matrix(tmp_path / "m.yml", "matrix:\n  framework: [pytorch]\n  task: [cnn_cifar10]\n")
    cells = load(path).cells(host_inventory([H100, H100_B, A100]))
    assert [c.gpu for c in cells] == ["NVIDIA A100-SXM4-40GB", "NVIDIA H100 80GB HBM3"]
    assert [c.gpu for c in load(path).cells(host_inventory([]))] == ["cpu"]


def test_product_of_the_axes_and_the_base_settings(tmp_path):
    combos, cells = cells_of(tmp_path)
    assert combos == [("pytorch", "cpu", "auto"), ("pytorch", "H100", "auto"),
                      ("tensorflow", "cpu", "auto"), ("tensorflow", "H100", "auto")]
    assert {c.settings.steps for c in cells} == {7}
    assert {c.device for c in cells} == {"cpu", "gpu"}


def test_exclude_removes_every_matching_cell(tmp_path):
    combos, _ = cells_of(tmp_path, "  exclude:\n    - {framework: tensorflow, gpu: H100}")
    assert ("tensorflow", "H100", "auto") not in combos and len(combos) == 3


def test_include_adds_settings_to_the_cells_it_matches(tmp_path):
    extra = "  include:\n    - framework: pytorch\n      settings: {batch_size: 128, steps: 3}"
    _, cells = cells_of(tmp_path, extra)
    by_framework = {(c.framework, c.gpu): c for c in cells}
    assert by_framework[("pytorch", "cpu")].batch_size == 128
    assert by_framework[("pytorch", "cpu")].settings.steps == 3
    assert by_framework[("tensorflow", "cpu")].batch_size == 64  # the task's own
    assert by_framework[("tensorflow", "cpu")].settings.steps == 7


def test_include_that_fits_no_cell_adds_one(tmp_path):
    extra = "  include:\n    - {framework: pytorch, task: cnn_cifar10, gpu: cpu, cuda: \"12.4\"}"
    combos, _ = cells_of(tmp_path, extra)
    assert combos[-1] == ("pytorch", "cpu", "12.4") and len(combos) == 5


def test_include_never_overwrites_an_axis_value(tmp_path):
    # gpu: A100 contradicts every cell's original gpu value, so it is a new cell, not a rewrite.
    extra = "  include:\n    - {framework: pytorch, task: cnn_cifar10, gpu: A100}"
    combos, _ = cells_of(tmp_path, extra)
    assert ("pytorch", "cpu", "auto") in combos and ("pytorch", "A100", "auto") in combos


def test_a_new_cell_from_include_needs_framework_and_task(tmp_path):
    path = write_matrix(tmp_path / "matrix.yml", BASE.format(extra="  include:\n    - {gpu: V100}"))
    with pytest.raises(MatrixError, match=r"matrix.yml:7: matrix.include\[0\]: .*'framework' and 'task'"):
        load(path).cells(host_inventory([]))


def test_threads_is_an_axis(tmp_path):
    text = "matrix:\n  framework: [pytorch]\n  task: [cnn_cifar10]\n  gpu: [cpu]\n  threads: [1, 2, auto]\n"
    cells = load(write_matrix(tmp_path / "m.yml", text)).cells(host_inventory([]))
    assert [c.threads for c in cells] == [1, 2, "auto"]
    assert cells[0].id.startswith("cnn_cifar10.pytorch.cpu.cuda-auto.threads-1.")


def test_keras_stands_for_its_three_backends_everywhere(tmp_path):
    text = ("matrix:\n  framework: [keras, pytorch]\n  task: [cnn_cifar10]\n  gpu: [cpu]\n"
            "  exclude:\n    - {framework: keras, gpu: cpu}\n"
            "  include:\n    - {framework: keras, task: cnn_cifar10, gpu: cpu, cuda: auto, settings: {steps: 2}}\n")
    cells = load(write_matrix(tmp_path / "m.yml", text)).cells(host_inventory([]))
    assert [(c.framework, c.settings.steps) for c in cells] == [
        ("pytorch", None), ("keras-tensorflow", 2), ("keras-jax", 2), ("keras-torch", 2)]


def test_precision_is_an_axis_like_the_others(tmp_path):
    text = ("matrix:\n  framework: [pytorch, jax]\n  task: [cnn_cifar10]\n  gpu: [H100]\n"
            "  precision: [fp32, tf32, bf16]\n"
            "  exclude:\n    - {framework: jax, precision: tf32}\n"
            "  include:\n    - {framework: pytorch, precision: fp16, task: cnn_cifar10, gpu: H100}\n")
    cells = load(write_matrix(tmp_path / "m.yml", text)).cells(host_inventory([]))
    assert [(c.framework, c.precision) for c in cells] == [
        ("pytorch", "fp32"), ("pytorch", "tf32"), ("pytorch", "bf16"), ("jax", "fp32"), ("jax", "bf16"),
        ("pytorch", "fp16")]
    assert cells[2].id.startswith("cnn_cifar10.pytorch.h100.cuda-auto.threads-auto.devices-1.bf16.")
    assert load(write_matrix(tmp_path / "d.yml", "matrix:\n  framework: [pytorch]\n  task: [cnn_cifar10]\n")
                ).cells(host_inventory([]))[0].precision == "fp32"


def test_cell_ids_change_with_measured_settings_only(tmp_path):
    _, cells = cells_of(tmp_path)
    first = cells[0]
    longer = first.settings.model_copy(update={"timeout_s": 99.0})
    bigger = first.settings.model_copy(update={"batch_size": 32})
    assert dataclasses.replace(first, settings=longer).id == first.id
    assert dataclasses.replace(first, settings=bigger).id != first.id
    assert dataclasses.replace(first, threads=4).id != first.id
    assert dataclasses.replace(first, precision="bf16").id != first.id
    assert len({c.id for c in cells}) == len(cells)


@pytest.mark.parametrize("text, expected", [
    ("matrix:\n  framework: [pytorch, pytorc]\n  task: [cnn_cifar10]\n",
     r"m.yml:2: matrix.framework\[1\]: 'pytorc' is not allowed; allowed: 'pytorch', 'tensorflow', .*'keras'"),
    ("matrix:\n  framework: [pytorch]\n  task: [cnn_cifar10]\nsettings:\n  mode: fastest\n",
     r"m.yml:5: settings.mode: 'fastest' is not allowed; allowed: 'throughput' or 'full'"),
    ("matrix:\n  framework: [pytorch]\n  task: [cnn_cifar10]\nsettings:\n  step: 3\n",
     r"m.yml:5: settings.step: unknown key 'step'; allowed keys here: mode, data, data_dir, warmup_steps"),
    ("matrix:\n  framework: [pytorch]\n  task: [cnn_cifar10]\nsettings:\n  steps: 0\n",
     r"m.yml:5: settings.steps: input should be greater than or equal to 1"),
    ("matrix:\n  framework: [pytorch]\n  task: [cnn_cifar10]\nsettings:\n  repeats: '3'\n",
     r"m.yml:5: settings.repeats: input should be a valid integer"),
    ("matrix:\n  framework: [pytorch]\n  task: [cnn_cifar10]\n  cuda: [12.4]\n",
     r"m.yml:4: matrix.cuda\[0\]: .*use 'auto' or a version like \"12.4\" \(quoted\)"),
    ("matrix:\n  framework: [pytorch]\n", r"m.yml:1: matrix.task: required key 'task' is missing"),
    ("matrix:\n  framework: [pytorch]\n  task: [cnn_cifar10]\n  precision: [fp32, fp8]\n",
     r"m.yml:4: matrix.precision\[1\]: 'fp8' is not allowed; allowed: 'fp32', 'tf32', 'fp16' or 'bf16'"),
    ("matrix:\n  framework: [pytorch]\n  task: [cnn_cifar10]\n  threads: [auto, 0]\n",
     r"m.yml:4: matrix.threads\[1\]: 0 is not a thread count; use 'auto' or a whole number of at least 1"),
    ("matrix:\n  framework: [pytorch\n  task: [x]\n", r"m.yml:\d: not valid YAML"),
    ("- just a list\n", r"m.yml:1: the file must be a mapping"),
    ("matrix:\n  framework: [pytorch]\n  task: [cnn_cifar10]\n  include:\n    - framework: pytorch\n      bogus: 1\n",
     r"m.yml:6: matrix.include\[0\].bogus: unknown key 'bogus'; allowed keys here: framework, task, gpu, cuda, threads, devices, precision, compile, settings"),
])
def test_validation_errors_name_file_line_field_and_fix(tmp_path, text, expected):
    with pytest.raises(MatrixError, match=expected):
        load(write_matrix(tmp_path / "m.yml", text))


def test_a_missing_matrix_file(tmp_path):
    with pytest.raises(MatrixError, match="cannot read the file"):
        load(tmp_path / "absent.yml")


def test_cli_rejects_a_bad_matrix_with_one_line_exit_2_and_nothing_written(tmp_path):
    path = write_matrix(tmp_path / "m.yml", "matrix:\n  framework: [pytorch]\n  task: [cnn_cifar10]\n  gpus: [cpu]\n")
    results = tmp_path / "results"
    done = subprocess.run([sys.executable, str(REPO / "harness" / "run_matrix.py"), str(path),
                           "--results", str(results), "--backend", "current"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {path}:4: matrix.gpus: unknown key 'gpus'; allowed keys here: "
        "framework, task, gpu, cuda, threads, devices, precision, compile, include, exclude"]
    assert not results.exists()


def test_cli_dry_run_lists_cells_and_their_plan(tmp_path):
    path = write_matrix(tmp_path / "m.yml", BASE.format(extra=""))
    done = subprocess.run([sys.executable, str(REPO / "harness" / "run_matrix.py"), str(path), "--dry-run",
                           "--results", str(tmp_path / "r"), "--backend", "current"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "4 cells" in done.stdout and "skip: this host has no H100 GPU" in done.stdout
    assert not (tmp_path / "r").exists()


def test_only_keeps_the_cells_whose_axes_have_the_listed_values(tmp_path):
    cells = load(write_matrix(tmp_path / "m.yml", """
matrix:
  framework: [pytorch, keras, jax]
  task: [cnn_cifar10, gru_imdb]
  gpu: [cpu, "H100 80GB"]
  precision: [fp32, bf16]
""")).cells(host_inventory([]))
    chosen = only(cells, ["framework=pytorch,keras", "task=gru_imdb", "gpu=H100", "precision=bf16"])
    assert sorted(c.framework for c in chosen) == ["keras-jax", "keras-tensorflow", "keras-torch", "pytorch"]
    assert {(c.task, c.gpu, c.precision) for c in chosen} == {("gru_imdb", "H100 80GB", "bf16")}
    assert only(cells, []) == cells
    with pytest.raises(MatrixError, match=r"--only task=gru: keeps no cell \(the task values here: cnn_cifar10, "
                                          r"gru_imdb\); check the spelling"):
        only(cells, ["task=gru"])
    with pytest.raises(MatrixError, match="--only tasks=gru_imdb: write AXIS=VALUE"):
        only(cells, ["tasks=gru_imdb"])


def test_cli_dry_run_shows_every_axis_and_what_only_chose(tmp_path):
    path = write_matrix(tmp_path / "m.yml", BASE.format(extra="  threads: [1, 2]\n  precision: [fp32, bf16]"))
    done = subprocess.run([sys.executable, str(REPO / "harness" / "run_matrix.py"), str(path), "--dry-run",
                           "--backend", "current", "--only", "gpu=cpu", "threads=2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    header, _, *rows = done.stdout.splitlines()[:8]
    ceilings, rows = rows[:2], rows[2:]  # one per precision, first
    assert [row.split()[:7] for row in ceilings] == [
        ["pytorch", "gemm_ceiling", "cpu", "auto", "2", "1", precision] for precision in ("fp32", "bf16")]
    assert header.split() == ["framework", "task", "gpu", "cuda", "threads", "devices", "precision", "compile",
                              "mode", "data", "batch", "input", "plan"]
    assert [row.split()[:7] for row in rows] == [
        ["pytorch", "cnn_cifar10", "cpu", "auto", "2", "1", "fp32"], ["pytorch", "cnn_cifar10", "cpu", "auto", "2", "1", "bf16"],
        ["tensorflow", "cnn_cifar10", "cpu", "auto", "2", "1", "fp32"],
        ["tensorflow", "cnn_cifar10", "cpu", "auto", "2", "1", "bf16"]]
    assert "4 cells (of 16, chosen by --only)" in done.stdout


def test_compile_profiles_are_cells_of_their_own_but_a_default_that_compiles_is_run_once(tmp_path):
    path = write_matrix(tmp_path / "m.yml", """
matrix:
  framework: [pytorch, jax, mxnet, chainer]
  task: [gru_imdb]
  gpu: [cpu]
  compile: [default, compiled]
""")
    cells = load(path).cells(host_inventory([]))
    assert [(c.framework, c.compile) for c in cells] == [
        ("pytorch", "default"), ("pytorch", "compiled"), ("jax", "default"), ("mxnet", "default"),
        ("chainer", "default"), ("chainer", "compiled")]
    assert len({c.id for c in cells}) == 6 and ".compiled." in cells[1].id and ".default." in cells[0].id
    assert cells[1].request().compile == "compiled"
    assert cells[5].request().cannot_run() == "Chainer is define-by-run only: it has no graph compiler"


def test_a_ceiling_per_gpu_cuda_and_precision_by_the_first_framework_that_can_run_it(tmp_path):
    from harness.matrix import with_ceilings
    path = write_matrix(tmp_path / "m.yml", """
matrix:
  framework: [chainer, mxnet, jax]
  task: [gru_imdb, cnn_cifar10]
  gpu: [cpu, H100]
  precision: [fp32, bf16]
""")
    cells = load(path).cells(host_inventory([H100]))
    # What a backend allows: what the bench would run, and (say) no jax here.
    everything = with_ceilings(cells, lambda cell: cell.framework != "jax" and cell.request().cannot_run() is None)
    ceilings = [(c.framework, c.gpu, c.precision) for c in everything if c.task == "gemm_ceiling"]
    # mxnet and chainer run no bf16 on a CPU: the bench would skip those, and so no ceiling there.
    assert ceilings == [("mxnet", "cpu", "fp32"), ("mxnet", "H100", "fp32")]
    assert everything[len(ceilings):] == cells  # the ceilings first, then the cells as they were
    assert all(c.settings.image_size is None and c.devices == 1 for c in everything[:len(ceilings)])
