"""The claims' statistics (issue 23) against numbers computed by hand."""
import math

import numpy as np
import pytest

from kronpeft.runner.metrics import batched_metric, compute_metrics
from kronpeft.runner.report.significance import collapsed, holm, paired_bootstrap, paired_test

accuracy = batched_metric("rte", "accuracy")  # (R, n) sets -> (R,) scores


def test_holm_by_hand():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> non-decreasing: 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    adjusted = holm([0.01, math.nan, 0.02])  # no test: not counted in m
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)


def test_paired_test_by_hand():
    # differences 0.02, 0.01, 0.04: mean 0.02333, sd sqrt(0.000233) = 0.015275, t = 0.02333 / (0.015275 / sqrt 3)
    # = sqrt 7; with 2 degrees of freedom the two-sided p is 1 - t / sqrt(t^2 + 2) = 1 - sqrt 7 / 3
    mean, p = paired_test([0.85, 0.86, 0.84], [0.83, 0.85, 0.80])
    assert mean == pytest.approx(0.07 / 3)
    assert p == pytest.approx(1 - math.sqrt(7) / 3)
    assert paired_test([0.8, 0.9], [0.8, 0.9]) == (0.0, 1.0)
    assert math.isnan(paired_test([0.8], [0.7])[1])
    with pytest.raises(ValueError, match="one score per seed"):
        paired_test([0.8, 0.9], [0.7])


def test_paired_test_pairs_by_seed_unlike_an_unpaired_test():
    # seed effects shared by both methods: every pair differs by +0.01, so the paired test is certain
    better, worse = [0.61, 0.81, 0.71], [0.60, 0.80, 0.70]
    assert paired_test(better, worse) == (pytest.approx(0.01), 0.0)


def test_paired_bootstrap_by_hand():
    labels = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    right, wrong = labels.copy(), 1 - labels
    diff, (low, high), p = paired_bootstrap(accuracy, [right], [wrong], labels, resamples=200)
    assert (diff, low, high) == (1.0, 1.0, 1.0) and p == 0.0  # every resample: 1 - 0
    same, (low, high), p = paired_bootstrap(accuracy, [right, wrong], [right, wrong], labels, resamples=200)
    assert (same, low, high, p) == (0.0, 0.0, 0.0, 1.0)
    one_off = right.copy()
    one_off[0] = 0  # better misses one example of 8: observed difference over 2 seeds = (7/8 - 1 + 1 - 1) / 2
    diff, (low, high), p = paired_bootstrap(accuracy, [one_off, right], [right, right], labels, resamples=500)
    assert diff == pytest.approx(-1 / 16) and low <= diff <= high <= 0 and 0 < p <= 1
    assert paired_bootstrap(accuracy, [one_off], [right], labels, resamples=50, seed=3) == \
        paired_bootstrap(accuracy, [one_off], [right], labels, resamples=50, seed=3)


def test_paired_bootstrap_equals_scoring_each_resample_alone():
    # the slow obvious bootstrap: the same resamples (same generator, drawn one by one), each scored by
    # compute_metrics (sklearn's F1) alone; the vectorised one must give the same difference, interval and p
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 60)
    better = [np.where(rng.random(60) < 0.8, labels, 1 - labels) for _ in range(3)]
    worse = [np.where(rng.random(60) < 0.7, labels, 1 - labels) for _ in range(3)]

    def f1(idx):
        score = lambda preds: compute_metrics("mrpc", preds[idx], labels[idx])["f1"]  # noqa: E731
        return np.mean([score(b) - score(w) for b, w in zip(better, worse)])

    draws_rng = np.random.default_rng(5)
    draws = np.array([f1(draws_rng.integers(0, 60, 60)) for _ in range(300)])
    observed = f1(np.arange(60))
    far = np.mean(draws <= 0) if observed > 0 else np.mean(draws >= 0)
    diff, (low, high), p = paired_bootstrap(batched_metric("mrpc", "f1"), better, worse, labels, resamples=300, seed=5)
    assert diff == pytest.approx(observed, abs=1e-12)
    assert (low, high) == pytest.approx(tuple(np.percentile(draws, [2.5, 97.5])), abs=1e-12)
    assert p == pytest.approx(min(1.0, 2 * far))


def test_collapse_rule():
    assert collapsed(0.812, "f1", 0.812, [0.85, 0.812])  # MRPC: at the majority-class F1
    assert not collapsed(0.8125, "f1", 0.812, [0.85, 0.8125])
    assert collapsed(0.0, "matthews_correlation", 0.0, [0.2, 0.0])  # CoLA: Matthews 0 is a constant guess
    # STS-B: LoRA r = 8's seeds 0.850, 0.849, 0.198: median 0.849, threshold 0.4245
    scores = [0.850, 0.849, 0.198]
    assert [collapsed(s, "pearson", None, scores) for s in scores] == [False, False, True]
    assert not collapsed(0.629, "pearson", None, [0.629, 0.691, 0.85, 0.84])  # low, but learning
