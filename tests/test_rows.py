"""The one view of a result that tables, compare.py and report.py read."""
from __future__ import annotations

from bench.result import Result
from conftest import result_payload
from harness.reference import published_results
from harness.rows import Published, ResultRow


def test_a_row_names_the_device_and_the_headline_time():
    cpu = ResultRow.of(Result.from_dict(result_payload("pytorch", step_times=(0.2, 0.3, 0.4))))
    assert cpu.device == "CPU (Test CPU, 2 cores)" and cpu.headline.median == 0.3
    assert cpu.headline_text() == "300 ms per step" and cpu.launcher == "local" and cpu.published is None
    gpu = ResultRow.of(Result.from_dict(result_payload("jax", device="gpu", gpu_name="NVIDIA H200", cuda="12.8")))
    assert gpu.device == "NVIDIA H200" and gpu.cuda == "12.8"


def test_a_row_says_which_slowdowns_throttled_its_gpus_and_its_examples_per_joule():
    from conftest import GPU_STATE
    reasons = {"gpu_idle": 0.2, "sync_boost": 1.0, "hw_thermal_slowdown": 0.3, "sw_power_cap": 0.5}
    gpu = ResultRow.of(Result.from_dict(result_payload("pytorch", device="gpu", gpu_name="NVIDIA H200",
                                                       gpu_state=dict(GPU_STATE, throttle_reasons=reasons),
                                                       examples_per_joule=12.5)))
    assert gpu.throttled == ("sw_power_cap", "hw_thermal_slowdown") and gpu.examples_per_joule == 12.5
    cpu = ResultRow.of(Result.from_dict(result_payload("pytorch")))
    assert cpu.throttled == () and cpu.examples_per_joule is None


def test_a_cpu_cell_with_a_thread_count_says_so_where_asked():
    payload = result_payload("pytorch")
    payload["cell"]["threads"] = 2
    row = ResultRow.of(Result.from_dict(payload))
    assert row.device == "CPU (Test CPU, 2 cores)" and row.device_label(threads=True) == "CPU (Test CPU, 2 cores, 2 threads)"


def test_results_written_before_the_launcher_was_named_so_read_the_same():
    payload = result_payload("pytorch")
    payload["schema_version"] = 3
    payload["env"]["backend"] = payload["env"].pop("launcher")
    assert ResultRow.of(Result.from_dict(payload)).launcher == "local"


def test_published_numbers_say_where_they_come_from():
    row = ResultRow.of(published_results()[0])
    assert row.published == Published(row.published.source, 2018) and row.launcher is None


def test_the_committed_h200_set_reads_and_its_matrices_hold_its_cells():
    from conftest import REPO
    from harness.backends.base import GpuModel, Inventory
    from harness.matrix import load
    from harness.results import load_results
    folder = REPO / "results" / "nvidia-h200"
    loaded = load_results(folder / "cells")
    assert loaded.problems == [] and len(loaded.results) == 27
    h200 = Inventory("this host", (GpuModel("NVIDIA H200", 1),), cpu_cores=16)
    # By what they measure: the ids of results measured before the compile axis and calibrated
    # timing hash other settings.
    expanded = {(cell.task, cell.framework, cell.precision, cell.devices, cell.settings.mode)
                for name in ("throughput", "full", "keras") for cell in load(folder / f"{name}.yml").cells(h200)}
    assert {(r.cell.task, r.cell.framework, r.cell.precision, r.cell.devices, r.cell.mode)
            for _, r in loaded.results} <= expanded
    assert all(ResultRow.of(result).launcher == "current" for _, result in loaded.results)


def test_every_env_key_the_view_reads_is_one_the_schema_documents():
    import json
    import re

    from bench.result import SCHEMA_PATH
    from conftest import REPO
    env = json.loads(SCHEMA_PATH.read_text())["properties"]["env"]["properties"]
    source = (REPO / "harness" / "rows.py").read_text()
    read = set(re.findall(r'\benv\.get\("([a-z_0-9]+)"', source))
    assert read and read <= set(env)
    assert set(re.findall(r'\bgpu\.get\("([a-z_0-9]+)"', source)) <= set(env["gpu"]["properties"])
