"""compare.py: cells matched across two result sets on everything but the axes that differ,
the ratio of their times with a bootstrap interval, a verdict judged over all pairs together,
a one-screen summary, Markdown, JSON and a chart, and a regression guard."""
from __future__ import annotations

import json

import pytest

from bench.result import Result
from conftest import result_payload
from harness.compare import as_json, compare, main, markdown, render
from harness.rows import ResultRow


def gpu_result(framework="pytorch", cuda="12.8", gpu="NVIDIA H100 80GB HBM3", times=(0.010, 0.0101, 0.0099, 0.0100, 0.0102),
               precision="fp32"):
    payload = result_payload(framework, device="gpu", gpu_name=gpu, cuda=cuda, cudnn="9", step_times=times,
                             cell_id=f"cnn_cifar10.{framework}.cuda-{cuda}.{precision}", precision=precision)
    return payload


def row(payload):
    return ResultRow.of(Result.from_dict(payload))


def write_set(folder, *payloads):
    folder.mkdir(parents=True)
    for number, payload in enumerate(payloads):
        (folder / f"{number}.json").write_text(json.dumps(payload))
    return folder


def test_a_cuda_upgrade_that_costs_20_percent_is_a_significant_slowdown():
    a = [row(gpu_result("pytorch", "12.8")), row(gpu_result("jax", "12.8"))]
    b = [row(gpu_result("pytorch", "13.0", times=(0.0120, 0.0121, 0.0119, 0.0122, 0.0120))),
         row(gpu_result("jax", "13.0", times=(0.0101, 0.0099, 0.0100, 0.0102, 0.0100)))]
    comparison = compare(a, b)
    assert comparison.differing == {"cuda": (["12.8"], ["13.0"])}
    by_framework = {pair.a.cell.framework: pair for pair in comparison.pairs}
    slower, same = by_framework["pytorch"], by_framework["jax"]
    assert slower.ratio == pytest.approx(1.2) and slower.significant and slower.interval[0] > 1.15
    assert slower.verdict() == "slower by 20.0%"
    assert not same.significant and same.verdict() == "no significant difference"


def test_sets_with_several_gpus_match_gpu_to_gpu_when_cuda_is_what_differs():
    h100, a100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"
    a = [row(gpu_result(cuda="12.8", gpu=h100)), row(gpu_result(cuda="12.8", gpu=a100, times=(0.02,) * 5))]
    b = [row(gpu_result(cuda="13.0", gpu=h100)), row(gpu_result(cuda="13.0", gpu=a100, times=(0.02,) * 5))]
    comparison = compare(a, b)
    assert list(comparison.differing) == ["cuda"]
    assert sorted(p.ratio for p in comparison.pairs) == pytest.approx([1.0, 1.0])


def test_comparing_two_gpus_matches_the_same_cells_on_each():
    comparison = compare([row(gpu_result(gpu="NVIDIA A100-SXM4-80GB", times=(0.02,) * 5))],
                         [row(gpu_result(gpu="NVIDIA H100 80GB HBM3"))])
    assert list(comparison.differing) == ["device"]
    (pair,) = comparison.pairs
    assert pair.ratio == pytest.approx(0.5, rel=0.01) and pair.verdict().startswith("faster by 50")


def test_a_mixed_precision_set_is_compared_with_an_fp32_set_framework_by_framework():
    a = [row(gpu_result(f)) for f in ("pytorch", "jax")]
    b = [row(gpu_result(f, precision="bf16", times=(0.005, 0.0051, 0.0049, 0.005, 0.0052)))
         for f in ("pytorch", "jax")]
    comparison = compare(a, b)
    assert comparison.differing == {"precision": (["fp32"], ["bf16"]),
                                    "math modes": (["float32 compute"], ["bfloat16 compute"])}
    assert sorted(p.a.cell.framework for p in comparison.pairs) == ["jax", "pytorch"]
    assert [p.verdict() for p in comparison.pairs] == ["faster by 50.0%"] * 2


def test_a_compiled_run_is_compared_with_the_default_run_framework_by_framework():
    a = [row(gpu_result("pytorch"))]
    compiled = gpu_result("pytorch", times=(0.008, 0.0081, 0.0079, 0.008, 0.0082))
    compiled["cell"]["compile"] = "compiled"
    compiled["env"]["math_modes"]["compiler"] = "torch.compile (TorchInductor)"
    comparison = compare(a, [row(compiled)])
    assert comparison.differing == {"compile": (["default"], ["compiled"]),
                                    "math modes": (["float32 compute"], ["float32 compute, torch.compile (TorchInductor)"])}
    (pair,) = comparison.pairs
    assert pair.verdict() == "faster by 20.0%"


def test_the_command_guards_against_regressions(tmp_path, capsys):
    a = write_set(tmp_path / "a", gpu_result(cuda="12.8"))
    b = write_set(tmp_path / "b", gpu_result(cuda="13.0", times=(0.0120, 0.0121, 0.0119, 0.0122, 0.0120)))
    assert main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "they differ in: cuda 12.8 → 13.0" in out and "slower by 20.0%" in out
    assert "1 pair judged together (Benjamini–Hochberg false-discovery control at 5%): 0 faster, 1 slower" in out
    assert main([str(a), str(b), "--fail-above", "10"]) == 1
    assert "regression: cnn_cifar10 pytorch (throughput, NVIDIA H100 80GB HBM3): B/A 1.200, above 1.100" in \
        capsys.readouterr().err
    assert main([str(a), str(b), "--fail-above", "25"]) == 0


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    a = write_set(tmp_path / "a", gpu_result())
    assert main([str(a), str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'missing'}: no such results folder")
    other = write_set(tmp_path / "other", result_payload("tensorflow"))
    assert main([str(a), str(other)]) == 2
    assert "no successful cell in common" in capsys.readouterr().err
    assert main([str(a), str(a), "--fail-above", "-1"]) == 2


def test_the_summary_comes_first_with_counts_and_geometric_means_and_a_throttled_side_is_flagged(tmp_path):
    from conftest import GPU_STATE

    faster = (0.0080, 0.0081, 0.0079, 0.0080, 0.0082)
    throttled = gpu_result("jax", "13.0", times=(0.0100, 0.0101, 0.0099, 0.0100, 0.0102))
    throttled["metrics"]["gpu_state"] = {**GPU_STATE, "throttle_reasons": {"hw_thermal_slowdown": 0.4, "gpu_idle": 0.1}}
    comparison = compare([row(gpu_result("pytorch")), row(gpu_result("jax"))],
                         [row(gpu_result("pytorch", "13.0", times=faster)), row(throttled)])
    text = render(comparison, "cuda-12.8", "cuda-13.0").splitlines()
    assert text[0] == "B (cuda-13.0) against A (cuda-12.8); they differ in: cuda 12.8 → 13.0"
    assert text[1].endswith("2 pairs judged together (Benjamini–Hochberg false-discovery control at 5%): "
                            "1 faster, 0 slower, 1 no significant difference")
    assert text[3].startswith("  per framework: jax 1.000 [") and "pytorch 0.800 [" in text[3]
    assert text[4].startswith("  per task: cnn_cifar10 0.894 [") and text[4].endswith("(2 pairs)")
    assert text[5] == ("warning: cnn_cifar10 jax (throughput, NVIDIA H100 80GB HBM3): only B was throttled "
                       "(hw_thermal_slowdown); its time measures the GPU's cooling or power limit as well")
    written = as_json(comparison, "cuda-12.8", "cuda-13.0")
    assert written["counts"] == {"faster": 1, "slower": 0, "no difference": 1, "within the noise floor": 0}
    assert written["geometric_mean"]["framework"]["pytorch"]["ratio"] == pytest.approx(0.8)
    assert [p["verdict"] for p in written["pairs"]] == ["no significant difference", "faster by 20.0%"]
    assert json.loads(json.dumps(written)) == written  # plain JSON
    assert "| cnn_cifar10 | pytorch" in markdown(comparison, "cuda-12.8", "cuda-13.0")
