"""harness/significance.py: many pairs judged together keep their false discoveries rare and
still find a real change; intervals, the geometric means and the A/A noise floor."""
from __future__ import annotations

import numpy as np
import pytest

from harness import significance

PAIRS = 40
TRIALS = 100
NOISE = 0.03  # a block's or a round's time varies by about 3%


def unpaired_set(rng, shifted: int | None = None, blocks: int = 10) -> list[significance.Ratio]:
    """PAIRS pairs of two sets of timed blocks from the same distribution, but pair ``shifted``,
    whose B is 10% slower."""
    ratios = []
    for index in range(PAIRS):
        a = 0.1 * np.exp(rng.normal(0, NOISE, blocks))
        b = 0.1 * (1.1 if index == shifted else 1.0) * np.exp(rng.normal(0, NOISE, blocks))
        ratios.append(significance.unpaired(a, b))
    return ratios


def paired_set(rng, shifted: int | None = None, rounds: int = 8) -> list[significance.Ratio]:
    """The same as rounds of an interleaved A/B: each round's two runs share the host's drift."""
    ratios = []
    for index in range(PAIRS):
        drift = np.exp(rng.normal(0, 0.2, rounds))  # the host's speed round by round: cancels in a pair
        a = 0.1 * drift * np.exp(rng.normal(0, NOISE, rounds))
        b = 0.1 * (1.1 if index == shifted else 1.0) * drift * np.exp(rng.normal(0, NOISE, rounds))
        ratios.append(significance.paired(a, b))
    return ratios


@pytest.mark.parametrize("make", [unpaired_set, paired_set], ids=["apart", "interleaved"])
def test_forty_pairs_of_identical_distributions_show_no_difference_in_95_of_100_trials(make):
    clean = sum(not any(j.significant for j in significance.judge(make(np.random.default_rng(seed))))
                for seed in range(TRIALS))
    assert clean >= 95


@pytest.mark.parametrize("make, size", [(unpaired_set, 10), (paired_set, 16)], ids=["apart", "interleaved"])
def test_one_real_ten_percent_shift_among_forty_pairs_is_found(make, size):
    """Ten blocks a side measured apart, or sixteen rounds of an A/B (the sign test needs all but
    one round to agree before one pair among 40 stands out), find it every time; the false
    discoveries beside it stay as rare as the correction promises (5% of discoveries)."""
    false_discoveries = 0
    for seed in range(10):
        judged = significance.judge(make(np.random.default_rng(seed), 7, size))
        found = [index for index, j in enumerate(judged) if j.significant]
        assert 7 in found
        low, high = judged[7].interval
        assert 1 < low < 1.1 < high
        false_discoveries += len(found) - 1
    assert false_discoveries <= 1


def test_without_the_correction_forty_null_pairs_would_often_show_a_difference():
    """The check above can fail: judged one by one at 5%, most trials find something."""
    rng = np.random.default_rng(0)
    uncorrected = sum(any(r.p < 0.05 for r in unpaired_set(rng)) for _ in range(20))
    assert uncorrected >= 15


def test_the_noise_floor_calls_a_difference_below_it_noise():
    rng = np.random.default_rng(1)
    a = 0.1 * np.exp(rng.normal(0, 0.001, 12))
    ratio = significance.unpaired(a, a * 1.02)
    assert significance.judge([ratio])[0].significant  # 2%, clear of the blocks' noise...
    held = significance.judge([ratio], [0.05])[0]
    assert held.within_floor and not held.significant  # ...but this host's runs differ by up to 5%


def test_a_paired_ratio_is_taken_round_by_round_so_drift_cancels():
    ratio = significance.paired([1.0, 3.0, 9.0, 27.0, 81.0, 243.0], [2.0, 6.0, 18.0, 54.0, 162.0, 486.0])
    assert ratio.interval() == pytest.approx((2.0, 2.0)) and ratio.p == pytest.approx(2 / 64)
    assert significance.unpaired([1.0, 3.0, 9.0], [2.0, 6.0, 18.0]).interval()[0] < 1  # apart, drift swamps it
    assert significance.paired([1.0], [1.0]).interval() is None
    with pytest.raises(ValueError, match="unequal lengths"):
        significance.paired([1.0, 2.0], [1.0])


def test_intervals_are_seeded_and_need_two_values_a_side():
    assert significance.unpaired([1.0], [1.0, 1.1]).interval() is None
    assert significance.unpaired([1.0], [1.0, 1.1]).p is None
    first, again = (significance.unpaired([1.0, 1.1, 0.9], [2.0, 2.1, 1.9]).interval() for _ in range(2))
    assert first == again


def test_the_geometric_mean_of_a_group_carries_every_pairs_noise():
    rng = np.random.default_rng(2)
    ratios = [significance.unpaired(np.exp(rng.normal(0, NOISE, 10)), factor * np.exp(rng.normal(0, NOISE, 10)))
              for factor in (0.5, 2.0)]
    mean = significance.geometric_mean(ratios)
    assert mean.pairs == 2 and mean.value == pytest.approx(1.0, abs=0.05)
    assert mean.interval[0] < mean.value < mean.interval[1] and mean.interval[1] / mean.interval[0] < 1.2


def test_the_noise_floor_is_what_95_percent_of_a_a_rounds_stay_within():
    ratios = np.exp(np.random.default_rng(3).normal(0, 0.02, 2000))
    assert significance.noise_floor(ratios) == pytest.approx(np.expm1(1.96 * 0.02), rel=0.1)


def test_one_wild_round_counts_as_one_round_and_the_interval_agrees_with_the_test():
    """Measured: 2 threads against 1 on PyTorch's GRU, 8 rounds; a burst of interference made one
    round's B five times slower. The sign test counts it as one round of eight; the interval
    of the median is the test's own, so it includes 1 exactly when the test cannot reject."""
    ratios = [5.281, 0.713, 0.891, 0.804, 0.805, 0.803, 0.899, 0.791]
    ratio = significance.paired([1.0] * 8, ratios)
    assert ratio.value == pytest.approx(0.8045) and ratio.p == pytest.approx(18 / 256)
    assert ratio.interval(0.95) == (0.713, 5.281)  # p > 0.05: includes 1
    assert ratio.interval(0.90) == (0.791, 0.899)  # p < 0.10: excludes it
    unanimous = significance.paired([1.0] * 8, [r if r < 1 else 0.9 for r in ratios])
    assert unanimous.p == pytest.approx(2 / 256) and unanimous.interval()[1] < 1


def test_the_median_interval_is_the_textbook_order_statistics():
    assert significance.median_interval(np.arange(1, 21), 0.95) == (6.0, 15.0)  # coverage 95.9%
    assert significance.median_interval(np.arange(1, 6), 0.95) == (1.0, 5.0)  # too few for 95%: all of them
