"""Statistics and scores the protocols compute, checked against reference implementations."""
from __future__ import annotations

import statistics

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bench.protocol import mean_roc_auc
from bench.result import Summary


@pytest.mark.parametrize("values", [[3.0], [2.0, 1.0], [0.3, 0.1, 0.2, 0.5], [5, 1, 4, 2, 3, 9, 7]])
def test_summary_quartiles_match_the_standard_library(values):
    summary = Summary.of(values)
    assert summary.median == statistics.median(values)
    if len(values) > 1:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        assert (summary.q1, summary.q3) == pytest.approx((q1, q3))
    assert summary.min <= summary.q1 <= summary.median <= summary.q3 <= summary.max


def test_summary_spread_and_interval():
    values = [0.101, 0.098, 0.104, 0.099, 0.250]  # one outlier
    summary = Summary.of(values)
    assert summary.mean == pytest.approx(statistics.mean(values))
    assert summary.cv == pytest.approx(statistics.stdev(values) / statistics.mean(values))
    low, high = summary.ci95
    assert min(values) <= low <= summary.median <= high <= max(values)
    assert Summary.of(values).ci95 == summary.ci95  # seeded: the same values, the same interval
    single = Summary.of([1.5])
    assert (single.cv, single.ci95, single.mean) == (None, None, 1.5)


def test_the_median_interval_agrees_with_scipys_percentile_bootstrap():
    from scipy.stats import bootstrap
    values = list(np.random.default_rng(1).lognormal(0.0, 0.2, size=40))
    ours = Summary.of(values).ci95
    theirs = bootstrap((values,), np.median, method="percentile", n_resamples=20000,
                       random_state=np.random.default_rng(2)).confidence_interval
    assert ours == pytest.approx([theirs.low, theirs.high], rel=0.03)


def test_mean_roc_auc_matches_scikit_learn_with_ties_and_a_constant_label():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 5)) < 0.3).astype(np.float32)
    scores = np.round(labels * 0.3 + rng.random((200, 5)), 1)  # rounded: many ties
    labels[:, 4] = 0.0  # no positive example: left out, as scikit-learn cannot score it either
    expected = np.mean([roc_auc_score(labels[:, j], scores[:, j]) for j in range(4)])
    assert mean_roc_auc(scores, labels) == pytest.approx(expected)


def test_mean_roc_auc_needs_a_label_with_both_classes():
    with pytest.raises(ValueError, match="both positive and negative"):
        mean_roc_auc(np.zeros((3, 2)), np.ones((3, 2)))
