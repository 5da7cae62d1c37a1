"""The GPU peak table and the work figures the tables show beside every time."""
from __future__ import annotations

import pytest

from bench.result import Result
from conftest import result_payload
from harness.matrix import MatrixError
from harness.peaks import load_peaks
from harness.tables import build_tables


@pytest.mark.parametrize("nvml_name, fp32, bf16", [
    ("NVIDIA H200", 67, 989), ("NVIDIA H100 80GB HBM3", 67, 989), ("NVIDIA H100 PCIe", 51, 756),
    ("NVIDIA A100-SXM4-80GB", 19.5, 312), ("NVIDIA A10", 31.2, 125), ("Tesla V100-PCIE-32GB", 14.0, None),
    ("Tesla K80", 4.37, None), ("NVIDIA L4", 30.3, 121), ("NVIDIA L40S", 91.6, 362),
])
def test_each_gpu_gets_its_own_variants_peak(nvml_name, fp32, bf16):
    peaks = load_peaks()
    assert peaks.peak(nvml_name, "fp32") == fp32 and peaks.peak(nvml_name, "bf16") == bf16


def test_an_unknown_gpu_has_no_peak():
    assert load_peaks().peak("NVIDIA A10G", "fp32") is None


def test_a_bad_peak_table_names_the_line(tmp_path):
    bad = tmp_path / "peaks.yml"
    bad.write_text("gpus:\n  - {model: X1, fp32: -3, source: none}\n")
    with pytest.raises(MatrixError, match=r"peaks.yml:2: gpus\[0\]\.fp32"):
        load_peaks.__wrapped__(bad)


def test_tables_show_achieved_tflops_and_the_fraction_of_peak():
    gpu = result_payload("pytorch", device="gpu", gpu_name="NVIDIA H100 80GB HBM3", cuda="12.8", cudnn="9",
                         step_times=(0.010, 0.010, 0.010))
    cpu = result_payload("pytorch", step_times=(0.30, 0.30, 0.30))
    (table,), _ = build_tables([Result.from_dict(gpu), Result.from_dict(cpu)])
    # 64 images per 10 ms, 373,585,920 FLOPs each: 2.39 TFLOP/s of the H100's 67 in fp32.
    row = table.display.loc["pytorch"]
    assert row["NVIDIA H100 80GB HBM3 / CUDA 12.8 / cuDNN 9"].endswith("6,400 images/s, 2.39 TFLOP/s (4% of fp32 datasheet peak)")
    assert row["CPU (Test CPU, 2 cores)"].endswith("213 images/s, 0.0797 TFLOP/s")
