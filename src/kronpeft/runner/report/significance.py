"""Statistics for the study's claims (issue 23): a paired test across seeds, a paired bootstrap over dev
examples, Holm's correction across a table of claims, and the rule that flags a collapsed run.

Seeds of two methods share data order and head initialisation (the run seed sets both), so seed s of one
method is paired with seed s of the other. Per-example dev predictions (kept with every run of the selection
protocol) let a bootstrap resample the dev examples: every resample is scored for both methods on the same
examples, seeds averaged, so the interval is that of the difference of the two methods' mean scores.
"""
from __future__ import annotations

import math
import statistics
from typing import Callable, Sequence

import numpy as np
from scipy import stats as sps

STSB_COLLAPSE_FRACTION = 0.5  # an STS-B run below this fraction of its task's median Pearson has collapsed


def paired_test(better: Sequence[float], worse: Sequence[float]) -> tuple[float, float]:
    """(mean of `better[s] - worse[s]` over seeds s, two-sided p of the paired t-test); p is nan with fewer
    than two pairs, 1.0 when every difference is the same zero, 0.0 when they are the same non-zero."""
    if len(better) != len(worse):
        raise ValueError(f"paired test needs one score per seed on both sides, got {len(better)} and {len(worse)}")
    diffs = np.asarray(better, float) - np.asarray(worse, float)
    mean = float(diffs.mean()) if len(diffs) else math.nan
    if len(diffs) < 2:
        return mean, math.nan
    if np.ptp(diffs) == 0:
        return mean, 1.0 if mean == 0 else 0.0
    return mean, float(sps.ttest_rel(better, worse).pvalue)


def paired_bootstrap(metric: Callable[[np.ndarray, np.ndarray], np.ndarray], better: Sequence[np.ndarray],
                     worse: Sequence[np.ndarray], labels: np.ndarray, resamples: int = 2000,
                     seed: int = 0) -> tuple[float, tuple[float, float], float]:
    """Paired bootstrap over examples of the difference of mean scores (seeds averaged).

    `better[s]`, `worse[s]`: seed s's predictions on the n examples whose gold labels are `labels` (n,);
    `metric(predictions (R, n), labels (R, n))` scores R sets at once, (R,) (`metrics.batched_metric`).
    Returns (observed difference, 95 % percentile interval, two-sided p: twice the share of resamples on the
    far side of 0, at most 1)."""
    if len(better) != len(worse) or not better:
        raise ValueError("paired bootstrap needs the same seeds, at least one, on both sides")
    labels = np.asarray(labels)

    def diff(idx):  # idx (R, n) -> (R,)
        gold = labels[idx]
        return np.mean([metric(np.asarray(b)[idx], gold) - metric(np.asarray(w)[idx], gold)
                        for b, w in zip(better, worse)], axis=0)

    n = len(labels)
    observed = float(diff(np.arange(n)[None])[0])
    rng = np.random.default_rng(seed)
    draws = diff(np.stack([rng.integers(0, n, n) for _ in range(resamples)]))
    low, high = np.percentile(draws, [2.5, 97.5])
    far = np.mean(draws <= 0) if observed > 0 else np.mean(draws >= 0) if observed < 0 else 1.0
    return observed, (float(low), float(high)), float(min(1.0, 2 * far))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order: the k-th smallest p times (m - k + 1),
    made non-decreasing in that order, capped at 1. nan p-values (no test) stay nan and do not count in m."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(tested)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for k, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - k) * p))
        out[i] = running
    return out


def collapsed(score: float, main_metric: str, majority: float | None, task_scores: Sequence[float]) -> bool:
    """The collapse rule: a classification run at or below the majority-class score of its metric (what a
    constant prediction scores: F1 0.812 on MRPC, Matthews 0 on CoLA, accuracy 0.527 on RTE); an STS-B run
    (Pearson) below half the median Pearson of its task's runs (`task_scores`, this one included)."""
    if main_metric == "pearson":
        return bool(task_scores) and score < STSB_COLLAPSE_FRACTION * statistics.median(task_scores)
    return majority is not None and score <= majority + 1e-9


def median(scores: Sequence[float]) -> float:
    return float(statistics.median(scores))


# -- the report's use of them ---------------------------------------------------------------------------

def by_seed(rows: list[dict]) -> dict[int, dict]:
    return {r["seed"]: r for r in rows}


def paired_cells(better: list[list[dict]], worse: list[list[dict]]) -> tuple[float, float]:
    """Paired test of a claim over one or more tasks (lists of rows per task, at the chosen rates): per seed
    that every cell ran, the mean over tasks of better - worse; (mean difference, two-sided p)."""
    b, w = [by_seed(rows) for rows in better], [by_seed(rows) for rows in worse]
    seeds = sorted(set.intersection(*(set(c) for c in b + w)))
    return paired_test([statistics.fmean(c[s]["score"] for c in b) for s in seeds],
                       [statistics.fmean(c[s]["score"] for c in w) for s in seeds])


BOOTSTRAP_RESAMPLES = 1000  # the claims table's paired bootstrap: its smallest non-zero p is 2 / 1000


def bootstrap_cells(task: str, main_metric: str, better: list[dict], worse: list[dict], folder,
                    resamples: int = BOOTSTRAP_RESAMPLES) -> float | None:
    """Paired bootstrap p of a claim on one task from the rows' kept dev predictions (`folder`: where the
    results file is); None unless every paired seed has predictions on both sides."""
    from pathlib import Path

    from ..metrics import batched_metric
    from ..selection import load_predictions

    b, w = by_seed(better), by_seed(worse)
    seeds = sorted(set(b) & set(w))
    if not seeds or any(not r.get("predictions") for s in seeds for r in (b[s], w[s])):
        return None
    try:
        loaded = {id(r): load_predictions(Path(folder) / r["predictions"]) for s in seeds for r in (b[s], w[s])}
    except (OSError, ValueError):
        return None
    labels = loaded[id(b[seeds[0]])]["dev_labels"]
    dev = lambda side: [loaded[id(side[s])]["dev"] for s in seeds]  # noqa: E731
    return paired_bootstrap(batched_metric(task, main_metric), dev(b), dev(w), labels, resamples)[2]
