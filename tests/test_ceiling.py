"""The matrix-multiply ceiling (bench/ceiling.py) over a framework whose products advance a fake
clock: the sizes timed, best of several calls, the fastest size's rate."""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from bench import ceiling
from bench.specs import GEMM_CEILING, RunOptions


def test_sizes_are_fractions_of_the_cells_size_in_tiles_of_64():
    assert ceiling.sizes(2048) == [1024, 1536, 2048]
    assert ceiling.sizes(100) == [64]


def test_the_ceiling_is_the_fastest_call_of_the_fastest_size(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(ceiling.time, "perf_counter", lambda: now[0])
    # Small products run at 1 TFLOP/s, the largest at 2; every size's second timed call is slow.
    rate = {1024: 1e12, 1536: 1e12, 2048: 2e12}
    calls = {}

    def gemm(size: int, run: RunOptions):
        slow = itertools.cycle([1.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0])  # 2 untimed, then 5 timed

        def product():
            calls[size] = calls.get(size, 0) + 1
            now[0] += next(slow) * ceiling.product_flops(size) / rate[size]
        return product

    run = RunOptions(device="cpu", devices=1, seed=0, threads=None, batch_size=1,
                     input_shape=GEMM_CEILING.input_shape_at(2048), learning_rate=0.0)
    model, metrics = ceiling.measure(SimpleNamespace(gemm=gemm), run)
    assert calls == {size: ceiling.WARMUP_CALLS + ceiling.TIMED_CALLS for size in (1024, 1536, 2048)}
    assert metrics.tflops_per_s == pytest.approx(2.0)
    assert metrics.gemm_tflops_per_s == pytest.approx({"1024": 1.0, "1536": 1.0, "2048": 2.0})
    assert model.flops_per_example == 2 * 2048 ** 3 and len(metrics.step_time_s.values) == ceiling.TIMED_CALLS
    assert metrics.throughput_per_s * model.flops_per_example / 1e12 == pytest.approx(metrics.tflops_per_s)
