"""The precision axis inside the bench: which cells run, which are skipped and why, the switch
that keeps cuBLAS and cuDNN out of TF32, and the math modes every framework records."""
from __future__ import annotations

import json
import types

import pytest

from bench import __main__ as bench_main
from bench import environment
from bench.precision import PRECISIONS, check_tensor_cores, math_modes, set_tf32_override
from bench.request import Request
from bench.result import SCHEMA_PATH
from bench.specs import FRAMEWORK_SPECS, Unsupported
from conftest import REPO



@pytest.mark.parametrize("framework, precision, device, reason", [
    ("pytorch", "tf32", "cpu", "pytorch does not run tf32 on cpu: TF32 is a tensor-core format of NVIDIA GPUs "
                               "(it runs fp32, bf16 there)"),
    ("jax", "fp16", "cpu", "jax does not run fp16 on cpu: float16 arithmetic is a GPU format; CPUs take bf16 "
                           "(it runs fp32, bf16 there)"),
    ("chainer", "bf16", "gpu", "chainer does not run bf16 on gpu (it runs fp32, tf32, fp16 there)"),
    ("cntk", "fp16", "gpu", "cntk does not run fp16 on gpu (it runs fp32 there)"),
])
def test_a_precision_the_framework_lacks_on_the_device_is_refused_saying_why(framework, precision, device, reason):
    assert Request(framework, "cnn_cifar10", device=device, precision=precision).cannot_run() == reason


@pytest.mark.parametrize("framework, precision, device", [
    ("pytorch", "fp32", "cpu"), ("pytorch", "bf16", "cpu"), ("mxnet", "fp16", "gpu"), ("jax", "tf32", "gpu"),
])
def test_what_each_framework_offers_runs(framework, precision, device):
    assert Request(framework, "cnn_cifar10", device=device, precision=precision).cannot_run() is None


@pytest.mark.parametrize("precision, capability", [("tf32", "7.0"), ("bf16", "7.5")])
def test_a_gpu_older_than_ampere_is_refused_tf32_and_bf16(precision, capability):
    with pytest.raises(Unsupported, match=f"^{precision} needs the tensor cores of compute capability 8.0 "
                                          rf"\(Ampere\) or newer; this GPU's is {capability}$"):
        check_tensor_cores(precision, capability)


@pytest.mark.parametrize("precision, capability", [
    ("fp16", "6.0"), ("fp32", "3.7"), ("tf32", "8.0"), ("bf16", "9.0"), ("bf16", "10.0"), ("tf32", None)])
def test_tensor_core_formats_pass_on_newer_gpus(precision, capability):
    check_tensor_cores(precision, capability)


def test_tf32_is_kept_out_of_cublas_and_cudnn_for_every_precision_but_tf32():
    environ = {"NVIDIA_TF32_OVERRIDE": "1"}
    for precision in ("fp32", "fp16", "bf16"):
        set_tf32_override(precision, environ)
        assert environ == {"NVIDIA_TF32_OVERRIDE": "0"}
    set_tf32_override("tf32", environ)
    assert environ == {}  # an inherited value cannot turn it off unseen


def test_math_modes_have_the_schemas_keys():
    schema = json.loads(SCHEMA_PATH.read_text())["properties"]["env"]["properties"]["math_modes"]
    modes = math_modes("fp16", tf32_matmul=False, tf32_convolutions=False, loss_scaling="dynamic",
                       autotuner=True, xla=False, compiler=None)
    # compiler came with schema 5: results written before it are valid without it.
    assert sorted(modes) == sorted(schema["required"] + ["compiler"]) == sorted(schema["properties"])
    assert modes["compute_dtype"] == "float16" and modes["weights_dtype"] == "float32"


def test_every_framework_says_what_it_runs_and_records_its_math_modes():
    for name, spec in FRAMEWORK_SPECS.items():
        assert set(spec.precisions) == {"cpu", "gpu"}
        for precisions in spec.precisions.values():
            assert precisions[0] == "fp32" and list(precisions) == [p for p in PRECISIONS if p in precisions]
        assert "tf32" not in spec.precisions["cpu"]
        module = REPO / "bench" / "frameworks" / f"{name.split('-')[0]}.py"
        assert "precision.math_modes(" in module.read_text()


def fake_framework(configured):
    return types.SimpleNamespace(configure=configured.append)


def test_the_bench_records_a_skipped_cell_before_configuring_the_framework(tmp_path, monkeypatch):
    configured = []
    monkeypatch.setattr(bench_main.frameworks, "load", lambda name: fake_framework(configured))
    out = tmp_path / "cell.json"
    assert bench_main.main(["--framework", "mxnet", "--task", "cnn_cifar10",
                            "--precision", "bf16", "--out", str(out)]) == 1
    result = json.loads(out.read_text())
    assert result["status"] == "skipped" and result["cell"]["precision"] == "bf16"
    assert result["cell"]["id"] == "cnn_cifar10-mxnet-cpu-bf16-default"
    assert result["error"] == "mxnet does not run bf16 on cpu (it runs fp32 there)"
    assert configured == []


def test_a_gpu_cell_sets_the_tf32_override_and_checks_the_gpu_before_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "1")
    loaded = []
    monkeypatch.setattr(bench_main.frameworks, "load", loaded.append)
    monkeypatch.setattr(bench_main.environment, "gpu_info",
                        lambda nvml, visible: {"name": "Tesla V100-SXM2-16GB", "compute_capability": "7.0"})
    out = tmp_path / "cell.json"
    bench_main.main(["--framework", "pytorch", "--task", "cnn_cifar10", "--device", "gpu",
                     "--precision", "bf16", "--out", str(out)])
    assert environment.os.environ.get("NVIDIA_TF32_OVERRIDE") == "0" and loaded == []
    result = json.loads(out.read_text())
    assert result["status"] == "skipped" and "compute capability 8.0" in result["error"]
