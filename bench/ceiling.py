"""The device's achievable dense matrix-multiply rate: the ceiling beside the datasheet's peak.

Datasheet peaks assume boost clocks, no power limit and operands already in registers; no
network reaches them, and memory-bound layers stay far below. So each run measures, once per
device kind and precision (the harness adds a ``gemm_ceiling`` cell for each), what the
framework's own matrix multiply achieves: products of square matrices of the cell's size and
of two smaller sizes, in the precision's compute dtype, each size called a few times untimed
and then timed call by call. A size's rate is its fastest call's; the ceiling is the fastest
size's. Each framework offers ``gemm(size, run)``: a function computing one product of two
``size`` x ``size`` matrices already on the device, returning once the device has finished.

Standard library and numpy only, valid Python 3.6, like the rest of the bench outside frameworks/.
"""
import time
from types import ModuleType
from typing import Dict, List, Tuple

from .result import Metrics, Model, Summary
from .specs import RunOptions

SIZE_FRACTIONS = (0.5, 0.75, 1.0)  # of the cell's size (GEMM_CEILING's input shape)
WARMUP_CALLS = 2  # untimed: allocation, kernel selection, compilation
TIMED_CALLS = 5


def product_flops(size: int) -> int:
    """A multiply-add per element of the inner products: 2 n^3 operations."""
    return 2 * size ** 3


def sizes(largest: int) -> List[int]:
    """The sizes timed: fractions of the largest, rounded to multiples of 64 (as libraries tile)."""
    return sorted({max(64, int(largest * fraction) // 64 * 64) for fraction in SIZE_FRACTIONS})


def time_calls(product, calls: int = TIMED_CALLS) -> List[float]:
    """Seconds of each of ``calls`` calls of ``product``, after the untimed ones."""
    for _ in range(WARMUP_CALLS):
        product()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        product()
        times.append(time.perf_counter() - start)
    return times


def measure(framework: ModuleType, run: RunOptions) -> Tuple[Model, Metrics]:
    """The ceiling, as a result's model (the fastest size's work per product) and metrics (its
    calls' times, its rate, and every size's rate)."""
    per_size = {}  # type: Dict[int, List[float]]
    for size in sizes(run.input_shape[-1]):
        per_size[size] = time_calls(framework.gemm(size, run))
    rates = {size: product_flops(size) / min(times) for size, times in per_size.items()}
    best = max(rates, key=lambda size: rates[size])
    model = Model(parameters=0, expected_parameters=0, layout="{0}x{0} by {0}x{0}".format(best),
                  flops_per_example=product_flops(best))
    metrics = Metrics(step_time_s=Summary.of(per_size[best]), throughput_per_s=1 / min(per_size[best]),
                      tflops_per_s=rates[best] / 1e12,
                      gemm_tflops_per_s={str(size): rate / 1e12 for size, rate in sorted(rates.items())})
    return model, metrics
