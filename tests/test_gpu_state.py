"""The GPUs' state and energy over a cell's timed blocks (bench/gpu_state.py), read from a
stand-in for pynvml whose clocks fall, whose temperature rises into a thermal slowdown midway
and whose energy counters advance as the test says."""
from __future__ import annotations

import time

import numpy as np
import pytest

from bench import protocol
from bench.data import Dataset
from bench.gpu_state import CLOCK_EVENT_REASONS, GpuStateSampler
from bench.result import SCHEMA_PATH, Metrics, Result, ResultSettings
from bench.specs import TASKS, RunOptions
from conftest import GPU_STATE, StandInNvml, result_payload
from harness.results import schema_problem
from harness.rows import ResultRow


def two_blocks(nvml: StandInNvml, sampler: GpuStateSampler) -> None:
    """A cool block, statistics between blocks, then a block in which the GPUs heat up and slow down."""
    nvml.reasons = nvml.nvmlClocksThrottleReasonApplicationsClocksSetting
    sampler.block_started()
    nvml.spend(5_000)
    sampler.block_ended(640)
    nvml.spend(100_000)  # between the blocks: not counted
    nvml.sm_clock, nvml.temperature, nvml.power_mw = 1500, 88, 450_000
    nvml.reasons |= nvml.nvmlClocksThrottleReasonHwThermalSlowdown | nvml.nvmlClocksThrottleReasonHwSlowdown
    sampler.block_started()
    nvml.spend(5_000)
    sampler.block_ended(640)


def test_the_blocks_give_the_gpus_clocks_temperatures_power_reasons_and_energy():
    nvml = StandInNvml()
    with GpuStateSampler(nvml, "0,1", interval_s=60) as sampler:  # one reading per GPU, at each block's end
        two_blocks(nvml, sampler)
    metrics = Metrics()
    sampler.record(metrics)
    state = metrics.gpu_state
    assert state.samples == 4 and nvml.shutdowns == 1
    assert (state.sm_clock_mhz_min, state.sm_clock_mhz_median, state.sm_clock_mhz_max) == (1500, 1740, 1980)
    assert (state.max_sm_clock_mhz, state.memory_clock_mhz_median) == (1980, 3201)
    assert (state.temperature_c_min, state.temperature_c_median, state.temperature_c_max) == (60, 74, 88)
    assert (state.power_w_median, state.power_w_max, state.power_limit_w) == (425, 450, 700)
    assert state.throttle_reasons == {"applications_clocks_setting": 1.0, "hw_slowdown": 0.5,
                                      "hw_thermal_slowdown": 0.5}
    assert state.energy_j == 20.0  # 5 J per GPU and block; the 100 J between the blocks left out
    assert metrics.examples_per_joule == 1280 / 20 and metrics.energy_j_per_example == 20 / 1280
    # Power cap, heat and the board's slowdown signals throttle; clocks set by hand do not.
    payload = result_payload("pytorch", device="gpu", gpu_name="NVIDIA H200")
    payload["metrics"]["gpu_state"] = vars(state)
    assert ResultRow.of(Result.from_dict(payload)).throttled == ("hw_slowdown", "hw_thermal_slowdown")


def test_the_gpus_are_read_while_a_block_runs_and_not_between_blocks():
    nvml = StandInNvml()
    with GpuStateSampler(nvml, "0,1", interval_s=0.01) as sampler:
        sampler.block_started()
        time.sleep(0.2)
        sampler.block_ended(64)
        during = len(sampler.readings)
        time.sleep(0.1)
        assert len(sampler.readings) == during
    assert during >= 10 and during % 2 == 0  # every GPU each time
    assert sampler.examples == 64


@pytest.mark.parametrize("energy", ["missing", "unsupported"])
def test_without_an_energy_counter_there_is_no_energy_and_the_rest_is_read(energy):
    nvml = StandInNvml(energy=energy)
    with GpuStateSampler(nvml, "0,1", interval_s=60) as sampler:
        two_blocks(nvml, sampler)
    metrics = Metrics()
    sampler.record(metrics)
    assert metrics.gpu_state.energy_j is None and metrics.gpu_state.samples == 4
    assert metrics.gpu_state.throttle_reasons["hw_thermal_slowdown"] == 0.5
    assert metrics.examples_per_joule is None and metrics.energy_j_per_example is None


def test_a_module_lacking_a_reason_or_a_driver_lacking_the_newer_call_still_decodes_the_rest():
    nvml = StandInNvml(event_reasons=True)  # the newer call fails: the older one answers
    del nvml.nvmlClocksThrottleReasonDisplayClockSetting
    with GpuStateSampler(nvml, "0", interval_s=60) as sampler:
        nvml.reasons = nvml.nvmlClocksThrottleReasonSwPowerCap | 0x100  # display clock: unknown to this module
        sampler.block_started()
        sampler.block_ended(64)
    assert sampler.state().throttle_reasons == {"sw_power_cap": 1.0}


def test_without_nvml_or_a_gpu_nothing_is_read_and_nothing_breaks():
    class NoDriver(StandInNvml):
        def nvmlInit(self):
            raise self.NVMLError("driver not loaded")

    for nvml in (None, NoDriver()):
        with GpuStateSampler(nvml, "0") as sampler:
            sampler.block_started()
            sampler.block_ended(64)
        metrics = Metrics()
        sampler.record(metrics)
        assert (metrics.gpu_state, metrics.examples_per_joule, metrics.energy_j_per_example) == (None, None, None)


class InstantModel:
    layout = "NTC"

    def train_step(self, inputs, labels) -> None:
        pass

    def loss(self) -> float:
        return 0.5


def test_throughput_mode_counts_the_examples_and_energy_of_the_timed_blocks_alone():
    spec = TASKS["gru_imdb"]
    ids = np.zeros((64 * 4, 150), np.int32)
    data = Dataset(ids, np.zeros(len(ids), np.int64), ids[:64], np.zeros(64, np.int64), "synthetic")
    run = RunOptions(device="gpu", devices=1, seed=0, threads=None, batch_size=64, input_shape=(150,),
                     learning_rate=0.001)
    settings = ResultSettings(warmup_steps=3, steps=4, repeats=3, epochs=1, seed=0)
    nvml = StandInNvml()
    with GpuStateSampler(nvml, "0,1", interval_s=60) as sampler:
        metrics = protocol.measure_throughput(InstantModel(), spec, data, settings, run, sampler)
    sampler.record(metrics)
    # The first step and the warm-up are in no block: 3 blocks of 4 steps of 64 examples.
    assert sampler.examples == 3 * 4 * 64 and metrics.gpu_state.samples == 3 * 2
    assert metrics.gpu_state.energy_j == 0 and metrics.examples_per_joule is None  # the counters did not move


def test_a_result_with_the_gpus_state_is_valid_and_reads_back():
    payload = result_payload("pytorch", device="gpu", gpu_name="NVIDIA H200", examples_per_joule=12.5,
                             gpu_state=dict(GPU_STATE, throttle_reasons={"sw_power_cap": 0.25}))
    assert payload["schema_version"] == 6 and schema_problem(payload) is None
    result = Result.from_dict(payload)
    assert result.metrics.gpu_state.throttle_reasons == {"sw_power_cap": 0.25}
    assert result.to_dict()["metrics"]["gpu_state"] == payload["metrics"]["gpu_state"]
    payload["metrics"]["gpu_state"]["throttle_reasons"] = {"too_hot": 0.5}  # a reason NVML has not
    assert "too_hot" in schema_problem(payload)


def test_the_schema_names_every_reason_the_sampler_decodes():
    import json
    state = json.loads(SCHEMA_PATH.read_text())["properties"]["metrics"]["properties"]["gpu_state"]
    assert state["properties"]["throttle_reasons"]["propertyNames"]["enum"] == [name for name, _ in CLOCK_EVENT_REASONS]
    from bench.result import GpuState
    assert state["required"] == list(GpuState.__dataclass_fields__) == list(state["properties"])
