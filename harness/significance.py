"""Is B's time different from A's, over many pairs at once? The statistics compare.py reports.

Each pair gets a ratio (B's time over A's), a p-value from a distribution-free test and an
interval. The p-values of all pairs judged together are corrected with Benjamini–Hochberg's
false-discovery control; the pairs it selects get intervals at the level that keeps the
false-coverage rate (Benjamini & Yekutieli, 2005) at the same α, so a pair called different has
an interval that excludes 1 at the level its selection was made.

Two designs:
- unpaired: two sets of timed blocks, measured apart (two runs, two hosts). Ratio of medians;
  Mann–Whitney U test on the blocks; a percentile bootstrap interval (SciPy's, seeded), both
  sides resampled on their own.
- paired: an interleaved A/B, round by round (each round a fresh process a side, side by side
  in time). The ratio of each round's two medians, and their median; the sign test (how many
  rounds B was faster in) and the interval of the median its order statistics give, which
  excludes 1 exactly when the sign test rejects. One round that a burst of interference made
  five times slower counts as one round against, and moves neither (a t-test on the rounds
  would call the pair noise, a bootstrap of so few rounds too sure).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

RESAMPLES = 10_000
SEED = 0
ALPHA = 0.05  # the false-discovery rate the correction keeps
METHOD = "Benjamini–Hochberg false-discovery control"
# The fewest rounds with which the sign test can reject at ALPHA (all agreeing: p = 2 / 2**6).
SIGN_TEST_ROUNDS = 6


@dataclass(eq=False)  # its arrays have no single truth value
class Ratio:
    """B's time over A's for one pair: the estimate, the test's p-value, and the values its
    bootstrap resamples (drawn when an interval is first asked for: most pairs of a large
    comparison never need one)."""

    value: float
    p: float | None  # None: too few values to test
    samples: tuple[np.ndarray, ...] = ()  # what is resampled: (a, b) apart, (ratios,) paired
    paired: bool = False

    @functools.cached_property
    def resampled(self) -> np.ndarray | None:
        """The ratio in each bootstrap resample; None without a test (too few values). A paired
        ratio's interval is its order statistics'; its resamples serve the geometric means."""
        if self.p is None:
            return None
        statistic = _median if self.paired else _median_ratio
        result = stats.bootstrap(self.samples, statistic, n_resamples=RESAMPLES, paired=self.paired,
                                 vectorized=True, method="percentile", random_state=np.random.default_rng(SEED))
        return np.asarray(result.bootstrap_distribution)

    def interval(self, level: float = 1 - ALPHA) -> tuple[float, float] | None:
        """The interval its test is judged with: the order statistics' for paired rounds, else
        the bootstrap's."""
        if self.p is None:
            return None
        return median_interval(self.samples[0], level) if self.paired else self.bootstrap_interval(level)

    def bootstrap_interval(self, level: float = 1 - ALPHA) -> tuple[float, float] | None:
        """The percentile bootstrap interval of the ratio."""
        if self.resampled is None:
            return None
        tail = (1 - level) / 2 * 100
        low, high = np.percentile(self.resampled, [tail, 100 - tail])
        return float(low), float(high)


def median_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """The distribution-free interval of a median: the k-th smallest and k-th largest values,
    k the largest whose binomial tail stays within (1 − level) / 2 (the sign test's dual); with
    too few values for the level, the smallest and the largest."""
    ordered = np.sort(np.asarray(values, float))
    tails = stats.binom.cdf(np.arange(len(ordered)), len(ordered), 0.5)  # P(at most j values below the median)
    k = max(1, int(np.sum(tails <= (1 - level) / 2)))
    return float(ordered[k - 1]), float(ordered[-k])


def _median_ratio(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.median(b, axis=axis) / np.median(a, axis=axis)


def _median(values: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.median(values, axis=axis)


def unpaired(a: Sequence[float], b: Sequence[float]) -> Ratio:
    """Two sets of timed blocks measured apart."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    value = float(np.median(b) / np.median(a))
    if len(a) < 2 or len(b) < 2:
        return Ratio(value, None)
    return Ratio(value, float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue), (a, b))


def paired(a: Sequence[float], b: Sequence[float]) -> Ratio:
    """Rounds of an interleaved A/B: a[i] and b[i] measured side by side in time."""
    if len(a) != len(b):
        raise ValueError(f"paired measurements of unequal lengths: {len(a)} and {len(b)}")
    ratios = np.asarray(b, float) / np.asarray(a, float)
    value = float(np.median(ratios))
    if len(ratios) < 2:
        return Ratio(value, None)
    faster, slower = int(np.sum(ratios < 1)), int(np.sum(ratios > 1))  # rounds with no difference tell nothing
    p = float(stats.binomtest(slower, faster + slower).pvalue) if faster + slower else 1.0
    return Ratio(value, p, (ratios,), paired=True)


@dataclass
class Judged:
    """A pair after the correction over all pairs."""

    ratio: Ratio
    q: float | None  # the p-value adjusted for the number of pairs
    level: float  # the confidence level of its interval: 1 − α, or the selected pairs' FCR level
    floor: float | None  # the host's noise floor for this cell (A/A), as a fraction

    @property
    def interval(self) -> tuple[float, float] | None:
        return self.ratio.interval(self.level)

    @property
    def within_floor(self) -> bool:
        return self.floor is not None and abs(self.ratio.value - 1) < self.floor

    @property
    def significant(self) -> bool:
        """Selected by the correction, its interval excludes 1, and above the host's floor."""
        if self.q is None or self.q > ALPHA or self.within_floor:
            return False
        low, high = self.interval
        return low > 1 or high < 1


def judge(ratios: Sequence[Ratio], floors: Sequence[float | None] | None = None) -> list[Judged]:
    """Correct the pairs' p-values together; selected pairs get FCR-adjusted intervals."""
    floors = list(floors) if floors is not None else [None] * len(ratios)
    tested = [index for index, ratio in enumerate(ratios) if ratio.p is not None]
    q = [None] * len(ratios)
    if tested:
        adjusted = stats.false_discovery_control([ratios[i].p for i in tested], method="bh")
        for index, value in zip(tested, adjusted):
            q[index] = float(value)
    selected = sum(value is not None and value <= ALPHA for value in q)
    selected_level = 1 - selected * ALPHA / max(1, len(tested))
    return [Judged(ratio, q[index], selected_level if q[index] is not None and q[index] <= ALPHA else 1 - ALPHA,
                   floors[index])
            for index, ratio in enumerate(ratios)]


@dataclass
class GroupMean:
    """The geometric mean of a group of pairs' ratios (per framework, per task) with its 95%
    interval: each pair's bootstrap resamples combined resample by resample, so the interval is
    the measurements' noise, not how much the pairs differ from each other."""

    pairs: int
    value: float
    interval: tuple[float, float] | None


def geometric_mean(ratios: Sequence[Ratio]) -> GroupMean:
    value = float(np.exp(np.mean(np.log([ratio.value for ratio in ratios]))))
    if any(ratio.resampled is None for ratio in ratios):
        return GroupMean(len(ratios), value, None)
    combined = np.exp(np.mean(np.log(np.stack([ratio.resampled for ratio in ratios])), axis=0))
    tail = ALPHA / 2 * 100
    low, high = np.percentile(combined, [tail, 100 - tail])
    return GroupMean(len(ratios), value, (float(low), float(high)))


def noise_floor(ratios: Sequence[float]) -> float:
    """From A/A rounds (the same cell twice, side by side): the difference between two runs
    of the same thing that 95% of them stay within, as a fraction (0.04: ±4%)."""
    return float(np.expm1(np.percentile(np.abs(np.log(np.asarray(ratios, float))), 95)))
