"""Calibrated throughput timing (bench/protocol.py) on a model whose steps advance a fake clock:
blocks long enough, repeats until the median settles or the budget is spent, and the first
step timed on its own."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from bench import protocol
from bench.data import Dataset
from bench.result import ResultSettings, Timing
from bench.specs import TASKS, RunOptions

SPEC = TASKS["gru_imdb"]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SteppedModel:
    """A training model whose n-th step lasts ``durations[n]`` seconds of the fake clock."""

    layout = "NTC"

    def __init__(self, clock: Clock, durations):
        self.clock, self.durations, self.steps = clock, iter(durations), 0

    def train_step(self, inputs, labels) -> None:
        self.clock.now += next(self.durations)
        self.steps += 1

    def loss(self) -> float:
        return 0.5


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(protocol.time, "perf_counter", fake)
    return fake


def data() -> Dataset:
    ids = np.zeros((64 * 4, 150), np.int32)
    return Dataset(ids, np.zeros(len(ids), np.int64), ids[:64], np.zeros(64, np.int64), "synthetic")


def run_options() -> RunOptions:
    return RunOptions(device="cpu", devices=1, seed=0, threads=None, batch_size=64, input_shape=(150,),
                      learning_rate=0.001)


def settings(steps: int = 0, repeats: int = 5, **timing) -> ResultSettings:
    asked = dict(min_block_s=1.0, target_ci=0.03, budget_s=12.0, max_repeats=50, steps_calibrated=not steps)
    asked.update(timing)
    return ResultSettings(warmup_steps=2, steps=steps, repeats=repeats, epochs=1, seed=0, timing=Timing(**asked))


def test_steps_are_calibrated_to_fill_a_block_and_a_settled_median_stops_at_the_minimum(clock):
    # The first step compiles (30 s); then every step takes 0.1 s.
    model = SteppedModel(clock, itertools.chain([30.0], itertools.repeat(0.1)))
    asked = settings()
    metrics = protocol.measure_throughput(model, SPEC, data(), asked, run_options())
    assert metrics.first_step_s == pytest.approx(30.0)  # timed alone, in no block
    assert asked.steps == 10 and asked.repeats == 5  # 10 steps of 0.1 s fill the 1 s block
    assert metrics.step_time_s.values == pytest.approx([0.1] * 5)
    assert asked.timing.stopped_by == "target" and asked.timing.ci_half_width == pytest.approx(0.0)
    assert asked.timing.timed_s == pytest.approx(5.0)


def test_a_slow_step_is_a_block_of_its_own(clock):
    blocks = protocol.ThroughputBlocks(SteppedModel(clock, itertools.repeat(2.5)), SPEC, data(), run_options())
    assert protocol.calibrated_steps(blocks, 1.0) == 1


def test_a_noisy_median_gets_more_blocks_until_the_budget_is_spent(clock):
    # Steps alternate between 0.1 and 0.2 s: blocks of one step never settle within ±3%.
    model = SteppedModel(clock, itertools.chain([1.0, 1.0], itertools.cycle([0.1, 0.2])))
    asked = settings(steps=1, budget_s=3.0)
    metrics = protocol.measure_throughput(model, SPEC, data(), asked, run_options())
    assert asked.timing.stopped_by == "budget" and not asked.timing.target_reached
    assert asked.timing.timed_s >= 3.0 and asked.repeats == len(metrics.step_time_s.values) == 20
    assert asked.timing.ci_half_width > 0.03


def test_max_repeats_ends_a_median_that_never_settles(clock):
    model = SteppedModel(clock, itertools.chain([1.0, 1.0], itertools.cycle([0.1, 0.2])))
    asked = settings(steps=1, max_repeats=7, budget_s=1000.0)
    protocol.measure_throughput(model, SPEC, data(), asked, run_options())
    assert asked.timing.stopped_by == "max_repeats" and asked.repeats == 7


def test_without_calibration_the_steps_and_repeats_are_exactly_those_asked(clock):
    model = SteppedModel(clock, itertools.repeat(0.1))
    asked = ResultSettings(warmup_steps=3, steps=4, repeats=3, epochs=1, seed=0)
    metrics = protocol.measure_throughput(model, SPEC, data(), asked, run_options())
    assert (asked.steps, asked.repeats) == (4, 3) and len(metrics.step_time_s.values) == 3
    assert model.steps == 3 + 4 * 3  # warm-up (the first step included), then the blocks


def test_the_interval_width_is_its_larger_side_over_the_median():
    from bench.result import Summary
    summary = Summary.of([1.0, 1.0, 1.0, 1.0, 2.0])
    low, high = summary.ci95
    assert protocol.ci_half_width(summary) == pytest.approx(max(1.0 - low, high - 1.0))


class Recorder:
    """A monitor of the timed blocks that notes what it is told, and the fake clock then."""

    def __init__(self, clock: Clock):
        self.clock, self.told = clock, []

    def block_started(self) -> None:
        self.told.append(("started", self.clock.now))

    def block_ended(self, examples: int) -> None:
        self.told.append(("ended", self.clock.now, examples))


def test_the_monitor_is_told_of_the_timed_blocks_alone_not_of_the_first_step_warm_up_or_calibration(clock):
    model = SteppedModel(clock, itertools.chain([30.0], itertools.repeat(0.1)))
    monitor, asked = Recorder(clock), settings()
    protocol.measure_throughput(model, SPEC, data(), asked, run_options(), monitor)
    starts, ends = monitor.told[::2], monitor.told[1::2]
    assert [event[0] for event in monitor.told] == ["started", "ended"] * asked.repeats and asked.repeats == 5
    assert [examples for _, _, examples in ends] == [10 * 64] * 5  # steps x the global batch
    assert [end[1] - start[1] for start, end in zip(starts, ends)] == pytest.approx([1.0] * 5)  # the blocks alone
