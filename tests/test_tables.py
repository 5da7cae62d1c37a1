"""Merging result folders into the comparison tables."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd

from bench.precision import math_modes
from bench.result import Result, write_json_atomic
from conftest import REPO, result_payload
from harness.results import load_results
from harness.rows import describe_math_modes
from harness.reference import published_results
from harness.tables import annotate, build_tables, comparable, pivot, results_frame, with_published, write_tables


def results(*payloads):
    return [Result.from_dict(p) for p in payloads]


def test_one_row_per_framework_one_column_per_device_median_and_spread():
    tables, _ = build_tables(results(
        result_payload("pytorch", step_times=(0.300, 0.310, 0.290, 0.305, 0.295)),
        result_payload("tensorflow", step_times=(0.20, 0.20, 0.20)),
        result_payload("pytorch", device="gpu", gpu_name="NVIDIA H100 80GB HBM3", cuda="12.8",
                       cudnn="91002", step_times=(0.010, 0.011, 0.012)),
    ))
    assert len(tables) == 1
    table = tables[0]
    assert list(table.display.index) == ["pytorch", "tensorflow"]
    assert list(table.display.columns) == ["CPU (Test CPU, 2 cores)",
                                           "NVIDIA H100 80GB HBM3 / CUDA 12.8 / cuDNN 91002"]
    assert table.display.loc["pytorch", "CPU (Test CPU, 2 cores)"] == "300.0 ms [295.0–305.0], 213 images/s, 0.0797 TFLOP/s"
    assert table.display.loc["tensorflow", "NVIDIA H100 80GB HBM3 / CUDA 12.8 / cuDNN 91002"] == "–"
    assert table.numbers.loc["tensorflow", "CPU (Test CPU, 2 cores)"] == 0.20
    assert "over 3/5 timed blocks of 20 steps" in table.description and "batch 64; inputs 3×32×32; synthetic data" in table.description


def test_gpu_columns_keep_the_asked_cuda_when_frameworks_bring_different_versions():
    gpu = dict(device="gpu", gpu_name="NVIDIA A100")
    tables, _ = build_tables(results(result_payload("pytorch", cuda="12.8", cudnn="9.1", **gpu),
                                     result_payload("tensorflow", cuda="12.5", cudnn="9.3", **gpu)))
    assert list(tables[0].display.columns) == ["NVIDIA A100 / CUDA auto"]


def test_failed_cells_and_parameter_mismatches_are_marked_with_notes():
    tables, _ = build_tables(results(
        result_payload("pytorch", parameters=3_441_000),
        result_payload("tensorflow", status="timeout", error="the cell process timed out\nlog tail"),
    ))
    table = tables[0]
    assert table.display.loc["pytorch"].iloc[0].endswith(" †")
    assert table.display.loc["tensorflow"].iloc[0] == "timeout"
    assert "† pytorch: 3,441,000 trainable parameters, the task specifies 3,441,592" in table.notes
    assert any(n.startswith("tensorflow, CPU (Test CPU, 2 cores): timeout: the cell process timed out")
               for n in table.notes)
    assert "log tail" not in table.markdown()


def test_cells_that_ran_beside_others_are_marked():
    gpu = dict(device="gpu", gpu_name="NVIDIA H100 80GB HBM3", cuda="12.8", cudnn="91002")
    beside = result_payload("pytorch", **gpu)
    beside["env"]["cells_at_once"] = 4
    alone = result_payload("jax", **gpu)
    alone["env"]["cells_at_once"] = 1
    table = build_tables(results(beside, alone, result_payload("tensorflow", **gpu)))[0][0]
    assert table.display.loc["pytorch"].iloc[0].endswith(" ‡")
    assert not table.display.loc["jax"].iloc[0].endswith("‡")
    assert not table.display.loc["tensorflow"].iloc[0].endswith("‡")  # older results: alone
    assert table.notes == ["‡ pytorch, NVIDIA H100 80GB HBM3 / CUDA 12.8 / cuDNN 91002: ran with up to 4 "
                           "cells at once on its host, one per GPU, sharing its CPUs (--serial runs one at a time)"]


def test_gpu_code_compiled_from_ptx_is_marked():
    gpu = dict(device="gpu", gpu_name="NVIDIA H100 80GB HBM3", cuda="11.7", cudnn="8500")
    jit = result_payload("mxnet", **gpu)
    jit["env"]["image"] = {"tag": "dlbench/mxnet:cuda11.7-abc", "gpu_code": "ptx-jit"}
    native = result_payload("pytorch", **gpu)
    native["env"]["image"] = {"tag": "dlbench/pytorch:cuda12.8-abc", "gpu_code": "native"}
    table = build_tables(results(jit, native))[0][0]
    assert table.display.loc["mxnet"].iloc[0].endswith(" §")
    assert not table.display.loc["pytorch"].iloc[0].endswith("§")
    assert table.notes == ["§ mxnet, NVIDIA H100 80GB HBM3 / CUDA 11.7 / cuDNN 8500: its image has no native code "
                           "for this GPU; the driver compiled the build's PTX when the cell started (in its time "
                           "to the first step)"]


def test_full_mode_shows_training_time_and_accuracy():
    tables, _ = build_tables(results(result_payload("pytorch", mode="full", step_times=(120.0,))))
    assert tables[0].display.iloc[0, 0] == "120.0 s, acc 0.770, 0.374 TFLOP/s"  # 1,000 images/s at 374 MFLOP each
    assert "full mode" in tables[0].title


def test_the_newest_of_two_results_for_the_same_place_is_shown():
    old = result_payload("pytorch", step_times=(0.5,), finished="2026-01-01T00:00:00+00:00", cell_id="a")
    new = result_payload("pytorch", step_times=(0.1,), finished="2026-02-01T00:00:00+00:00", cell_id="b")
    tables, dropped = build_tables(results(new, old))
    assert tables[0].numbers.iloc[0, 0] == 0.1
    assert dropped == ["a: an older duplicate, not shown"]


def test_corrupt_and_foreign_files_are_reported_and_skipped(tmp_path):
    write_json_atomic(tmp_path / "cells" / "good.json", result_payload())
    (tmp_path / "cells" / "truncated.json").write_text('{"schema_version": 1, "cell"')
    (tmp_path / "cells" / "foreign.json").write_text(json.dumps({"name": "package.json"}))
    (tmp_path / "cells" / ".staging").mkdir()
    (tmp_path / "cells" / ".staging" / "half.json").write_text("{")
    loaded = load_results(tmp_path)
    assert [p.name for p, _ in loaded.results] == ["good.json"]
    assert len(loaded.problems) == 2
    assert any("truncated.json: skipped, not readable JSON" in p for p in loaded.problems)
    assert any("foreign.json: skipped, not a cell result" in p for p in loaded.problems)


def test_tables_are_written_as_markdown_and_csv(tmp_path):
    loaded = results(result_payload("pytorch"), result_payload("tensorflow"))
    tables, _ = build_tables(loaded)
    summary = write_tables(tables, loaded, tmp_path / "tables")
    assert "| pytorch" in summary.read_text()
    csv = pd.read_csv(tmp_path / "tables" / "cnn_cifar10-throughput-synthetic-batch64-3x32x32.csv", index_col=0)
    assert csv.loc["pytorch", "CPU (Test CPU, 2 cores)"] == 0.30
    cells = pd.read_csv(tmp_path / "tables" / "cells.csv")
    assert sorted(cells["framework"]) == ["pytorch", "tensorflow"]


def test_the_tables_of_a_folder_survive_a_corrupt_file(tmp_path):
    write_json_atomic(tmp_path / "run" / "cells" / "a.json", result_payload("pytorch"))
    (tmp_path / "run" / "cells" / "b.json").write_text("not json")
    done = subprocess.run([sys.executable, str(REPO / "harness" / "report.py"), str(tmp_path / "run"),
                           "--no-charts"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| pytorch" in done.stdout and "b.json: skipped" in done.stderr
    assert (tmp_path / "run" / "tables" / "README.md").is_file()  # where the run itself writes them
    assert not (tmp_path / "run" / "charts").exists() and not (tmp_path / "run" / "report.html").exists()


def test_cells_that_set_threads_get_a_column_of_their_own():
    one = result_payload("pytorch")
    one["cell"]["threads"] = 1
    tables, _ = build_tables(results(one, result_payload("pytorch", cell_id="b")))
    assert list(tables[0].display.columns) == ["CPU (Test CPU, 2 cores, 1 threads)", "CPU (Test CPU, 2 cores)"]


def test_results_of_other_bench_code_are_not_compared_unless_asked():
    old = result_payload("pytorch", step_times=(0.5,), finished="2026-01-01T00:00:00+00:00", cell_id="old")
    old["env"]["bench_hash"] = "1" * 64
    new = result_payload("tensorflow", step_times=(0.1,), finished="2026-02-01T00:00:00+00:00", cell_id="new")
    tables, dropped = build_tables(results(new, old))
    assert list(tables[0].display.index) == ["tensorflow"]
    assert dropped == [f"old: measured by other bench code (hash {'1' * 12}, the newest result's is {'0' * 12}), "
                       f"not compared; pass --mixed-bench to compare anyway"]
    tables, dropped = build_tables(results(new, old), mixed_bench=True)
    assert list(tables[0].display.index) == ["pytorch", "tensorflow"] and not dropped


def test_results_of_two_backends_get_a_column_each():
    local = result_payload("pytorch", step_times=(0.5,), cell_id="a")
    docker = result_payload("pytorch", step_times=(0.4,), cell_id="b")
    docker["env"]["launcher"] = "docker"
    tables, dropped = build_tables(results(local, docker))
    assert list(tables[0].display.columns) == ["CPU (Test CPU, 2 cores), local backend",
                                               "CPU (Test CPU, 2 cores), docker backend"]
    assert not dropped
    (alone,), _ = build_tables(results(local))
    assert list(alone.display.columns) == ["CPU (Test CPU, 2 cores)"]


def test_unstable_timings_are_marked_with_their_variation_and_interval():
    steady = result_payload("pytorch", step_times=(0.100, 0.101, 0.099, 0.100, 0.102))
    noisy = result_payload("tensorflow", step_times=(0.100, 0.140, 0.095, 0.180, 0.101))
    table = build_tables(results(steady, noisy))[0][0]
    assert not table.display.loc["pytorch"].iloc[0].endswith("⚠")
    assert table.display.loc["tensorflow"].iloc[0].endswith(" ⚠")
    (note,) = table.notes
    assert note.startswith("⚠ tensorflow, CPU (Test CPU, 2 cores): unstable: the 5 timings vary by 30% "
                           "(coefficient of variation; above 5%), 95% interval of the median ")


def test_precisions_get_a_row_each_with_their_math_modes():
    gpu = dict(device="gpu", gpu_name="NVIDIA H100 80GB HBM3", cuda="12.8", cudnn="91002")
    frame_results = results(
        result_payload("pytorch", precision="bf16", step_times=(0.004,), **gpu),
        result_payload("jax", **gpu),
        result_payload("pytorch", step_times=(0.010,), **gpu),
        result_payload("pytorch", precision="fp16", step_times=(0.005,), **gpu))
    table = build_tables(frame_results)[0][0]
    assert list(table.display.index) == ["pytorch, fp32", "pytorch, fp16", "pytorch, bf16", "jax, fp32"]
    assert table.numbers.loc["pytorch, bf16"].iloc[0] == 0.004
    # The fraction of peak is of the row's precision: 5.98 of the H100 SXM's 989 TFLOP/s in bf16.
    assert "5.98 TFLOP/s (1% of bf16 datasheet peak)" in table.display.loc["pytorch, bf16"].iloc[0]
    cells = pd.DataFrame([{"precision": r.cell.precision, "math": describe_math_modes(r.env["math_modes"])}
                          for r in frame_results])
    assert list(cells["math"]) == ["bfloat16 compute", "float32 compute", "float32 compute",
                                   "float16 compute, dynamic loss scaling"]


def test_math_modes_in_words():
    modes = math_modes("fp32", tf32_matmul=False, tf32_convolutions=True, loss_scaling=None, autotuner=True, xla=False,
                       compiler=None)
    assert describe_math_modes(modes) == "float32 compute, TF32 matmul off, TF32 convolutions on, autotuner on"
    modes = math_modes("tf32", tf32_matmul=True, tf32_convolutions=True, loss_scaling=None, autotuner=True, xla=True,
                       compiler=None)
    assert describe_math_modes(modes) == "float32 compute, TF32 on, autotuner on, XLA"
    modes["compiler"] = "XLA (jax.jit)"  # schema 5 names the compiler
    assert describe_math_modes(modes) == "float32 compute, TF32 on, autotuner on, XLA (jax.jit)"
    assert describe_math_modes(None) == ""


def test_results_gathered_from_several_nodes_say_which_node_ran_what():
    on = []
    for framework, node, gpu in (("pytorch", "gpu01", "h100"), ("tensorflow", "gpu02", "h100"),
                                 ("pytorch", "gpu07", "a100")):
        payload = result_payload(framework, device="gpu", gpu_name=None, cell_id=f"cnn.{node}", cuda="12.8",
                                 cudnn="91002")
        payload["cell"]["gpu"], payload["env"]["hostname"] = gpu, node
        on.append(payload)
    [table], _ = build_tables(results(*on))
    h100, a100 = "h100 / CUDA 12.8 / cuDNN 91002", "a100 / CUDA 12.8 / cuDNN 91002"
    assert list(table.display.columns) == [h100, a100]
    assert f"ran on {h100}: gpu01, gpu02; {a100}: gpu07" in table.notes
    [alone], _ = build_tables(results(result_payload("pytorch")))
    assert not any(note.startswith("ran on") for note in alone.notes)


def frame_of(*payloads):
    return results_frame(results(*payloads))


def test_filter_keeps_the_newest_result_of_each_place_and_says_why_others_left():
    older = result_payload("pytorch", step_times=(0.5,) * 3, finished="2026-11-25T09:00:00+00:00", cell_id="old")
    other_code = result_payload("jax", finished="2026-11-25T08:00:00+00:00", cell_id="jax-old")
    other_code["env"]["bench_hash"] = "1" * 64
    kept, dropped = comparable(frame_of(older, result_payload("pytorch"), other_code))
    assert list(kept["framework"]) == ["pytorch"] and kept["median_s"].iloc[0] == 0.3
    assert dropped[0].startswith("jax-old: measured by other bench code") and dropped[1] == "old: an older duplicate, not shown"
    assert len(comparable(frame_of(other_code, result_payload("pytorch")), mixed_bench=True)[0]) == 2


def test_join_adds_the_published_rows_of_the_same_protocol_only():
    full = result_payload("pytorch", mode="full")
    full["settings"]["train_examples"] = 50_000  # the seed's work: 10 epochs of CIFAR-10
    fresh = frame_of(full)
    published = results_frame(list(published_results()))
    joined = with_published(fresh, published)
    added = joined[joined["published_year"].notna()]
    assert len(added) and set(added["task"]) == {"cnn_cifar10"} and set(added["batch_size"]) == {64}
    assert len(with_published(frame_of(result_payload("pytorch")), published)) == 1  # none in throughput mode


def test_annotate_marks_each_flag_and_writes_its_note():
    unstable = result_payload("jax", step_times=(0.1, 0.3, 0.2, 0.25, 0.15))
    shared = result_payload("tensorflow")
    shared["env"]["cells_at_once"] = 2
    group = frame_of(unstable, shared).assign(row=lambda f: f["framework"])
    labels = {key: "CPU" for key in group["device_key"]}
    display, notes = annotate(group, labels, "images")
    assert display.iloc[0].endswith(" ⚠") and display.iloc[1].endswith(" ‡")
    assert notes[0].startswith("⚠ jax, CPU: unstable") and notes[1].startswith("‡ tensorflow, CPU: ran with up to 2")


def test_pivot_orders_rows_as_the_specs_list_frameworks_and_precisions():
    group = frame_of(result_payload("jax"), result_payload("pytorch", precision="bf16"), result_payload("pytorch"))
    group = group.assign(row=group["framework"] + ", " + group["precision"], display="text")
    shown, numbers, q1, q3 = pivot(group, {key: "CPU" for key in group["device_key"]})
    assert list(shown.index) == ["pytorch, fp32", "pytorch, bf16", "jax, fp32"] and list(shown.columns) == ["CPU"]
    assert numbers.loc["jax, fp32", "CPU"] == 0.3 and q1.loc["jax, fp32", "CPU"] <= q3.loc["jax, fp32", "CPU"]


def test_the_measured_ceiling_gets_a_table_and_every_cell_its_fraction():
    cell = result_payload("pytorch", step_times=(0.30, 0.30, 0.30))
    # Its calls vary by 30%: the ceiling is their fastest, not a median, and is not marked unstable.
    ceiling = result_payload("pytorch", step_times=(0.02, 0.03, 0.02), cell_id="gemm_ceiling.pytorch.cpu")
    ceiling["cell"].update(task="gemm_ceiling", batch_size=1, input_shape=[2048, 2048])
    ceiling["model"].update(parameters=0, expected_parameters=0, flops_per_example=2 * 2048 ** 3)
    ceiling["metrics"].update(tflops_per_s=0.8, throughput_per_s=50.0, gemm_tflops_per_s={"1024": 0.6, "2048": 0.8})
    tables = {table.name.split("-")[0]: table for table in build_tables(results(cell, ceiling))[0]}
    assert tables["gemm_ceiling"].display.loc["pytorch"].iloc[0] == "0.8 TFLOP/s"
    text = tables["cnn_cifar10"].display.loc["pytorch"].iloc[0]
    achieved = float(text.split(", ")[2].split()[0])  # the cell's TFLOP/s
    assert f"({achieved / 0.8:.0%} of measured ceiling)" in text


def test_compiled_cells_get_rows_of_their_own_and_a_framework_that_always_compiles_says_so():
    compiled = result_payload("pytorch", step_times=(0.2, 0.2, 0.2), cell_id="cnn.pytorch.compiled")
    compiled["cell"]["compile"] = "compiled"
    table = build_tables(results(result_payload("pytorch"), compiled, result_payload("jax")))[0][0]
    assert list(table.display.index) == ["pytorch, default", "pytorch, compiled", "jax, compiled by default"]
    assert table.numbers.loc["pytorch, compiled"].iloc[0] == 0.2


def test_calibrated_results_are_unstable_when_their_interval_missed_the_target():
    def timed(framework: str, reached: float, stopped_by: str, step_times) -> dict:
        payload = result_payload(framework, step_times=step_times)
        payload["settings"]["timing"] = dict(min_block_s=1.0, target_ci=0.03, budget_s=12.0, max_repeats=50,
                                             steps_calibrated=True, ci_half_width=reached, stopped_by=stopped_by,
                                             timed_s=12.5)
        return payload

    # tensorflow's blocks vary (a CV over 5%), but enough of them pin the median within ±3%.
    table = build_tables(results(timed("pytorch", 0.06, "budget", (0.30, 0.32, 0.29, 0.33, 0.31)),
                                 timed("tensorflow", 0.02, "target", (0.2, 0.23, 0.2, 0.2, 0.17, 0.2, 0.2))))[0][0]
    assert table.display.loc["pytorch"].iloc[0].endswith(" ⚠")
    assert not table.display.loc["tensorflow"].iloc[0].endswith("⚠")
    (note,) = table.notes
    assert note.startswith("⚠ pytorch, CPU (Test CPU, 2 cores): unstable: 95% interval of the median ")
    assert "after 5 timed blocks (budget reached), wider than the ±3% asked" in note


def test_a_single_timed_block_has_no_interval_and_is_not_marked():
    payload = result_payload("pytorch", step_times=(0.3,))
    payload["settings"]["timing"] = dict(min_block_s=1.0, target_ci=0.03, budget_s=12.0, max_repeats=1,
                                         steps_calibrated=False, ci_half_width=None, stopped_by="max_repeats",
                                         timed_s=6.0)
    table = build_tables(results(payload))[0][0]
    assert not table.display.loc["pytorch"].iloc[0].endswith("⚠") and table.notes == []


def test_a_throttled_gpu_cell_is_marked_with_its_slowdowns_and_its_clock():
    from conftest import GPU_STATE
    gpu = dict(device="gpu", gpu_name="NVIDIA H200", cuda="12.8", cudnn="91002")
    hot = dict(GPU_STATE, sm_clock_mhz_median=1410, throttle_reasons={"gpu_idle": 0.1, "hw_slowdown": 0.4,
                                                                      "hw_thermal_slowdown": 0.4})
    set_clocks = dict(GPU_STATE, throttle_reasons={"applications_clocks_setting": 1.0, "sync_boost": 1.0})
    table = build_tables(results(result_payload("pytorch", gpu_state=hot, **gpu),
                                 result_payload("jax", gpu_state=set_clocks, **gpu)))[0][0]
    assert table.display.loc["pytorch"].iloc[0].endswith(" ♨")
    assert not table.display.loc["jax"].iloc[0].endswith("♨")  # neither idle nor chosen clocks throttle
    assert table.notes == ["♨ pytorch, NVIDIA H200 / CUDA 12.8 / cuDNN 91002: throttled while timed: hw slowdown in "
                           "40% of readings, hw thermal slowdown in 40% of readings; "
                           "SM clock median 1,410 of 1,980 MHz"]


def test_results_with_their_gpus_energy_get_a_table_of_examples_per_joule_after_their_task():
    from conftest import GPU_STATE
    gpu = dict(device="gpu", gpu_name="NVIDIA H200", cuda="12.8", cudnn="91002")
    tables, _ = build_tables(results(result_payload("pytorch", gpu_state=GPU_STATE, examples_per_joule=12.5, **gpu),
                                     result_payload("jax", gpu_state=GPU_STATE, **gpu),  # no energy counter
                                     result_payload("tensorflow")))
    assert [table.name for table in tables] == ["cnn_cifar10-throughput-synthetic-batch64-3x32x32",
                                                "cnn_cifar10-throughput-synthetic-batch64-3x32x32-energy"]
    energy = tables[1]
    assert energy.title == "cnn_cifar10: images per joule (images/s per W), throughput mode"
    assert list(energy.display.index) == ["pytorch"]
    assert list(energy.display.columns) == ["NVIDIA H200 / CUDA 12.8 / cuDNN 91002"]
    assert energy.display.iloc[0, 0] == "12.5 images/J, 80 mJ each, 412 W median"
    assert energy.numbers.iloc[0, 0] == 12.5 and energy.q1.isna().all().all() and energy.q3.isna().all().all()
    assert energy.unit == "images per joule (images/s per W)" and energy.notes == []
    (alone,), _ = build_tables(results(result_payload("pytorch")))  # CPU cells: no energy
    assert not alone.name.endswith("energy")
