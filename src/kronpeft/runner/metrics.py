"""Evaluation metrics per task; the metric names and main metric live in ``data.TASKS``."""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.stats import pearsonr, rankdata, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from .data import get_task


def _correlation(fn: Callable) -> Callable[[np.ndarray, np.ndarray], float]:
    """Wrap a scipy correlation; an undefined one (constant input) counts as 0, like sklearn's MCC."""

    def metric(predictions: np.ndarray, labels: np.ndarray) -> float:
        if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
            return 0.0
        return float(fn(predictions, labels)[0])

    return metric


_pearson = _correlation(pearsonr)
_spearman = _correlation(spearmanr)

_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda p, y: float(np.mean(p == y)),
    "f1": lambda p, y: float(f1_score(y, p, average="binary", pos_label=1, zero_division=0)),
    "macro_f1": lambda p, y: float(f1_score(y, p, average="macro", zero_division=0)),
    "matthews_correlation": lambda p, y: float(matthews_corrcoef(y, p)),
    "pearson": _pearson,
    "spearmanr": _spearman,
    "combined": lambda p, y: (_pearson(p, y) + _spearman(p, y)) / 2,
}


def _batched_f1(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    tp, fp, fn = ((p == 1) & (y == 1)).sum(1), ((p == 1) & (y != 1)).sum(1), ((p != 1) & (y == 1)).sum(1)
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def _batched_matthews(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """sklearn's multiclass Matthews from class counts: (c s - t.q) / sqrt((s^2 - q.q)(s^2 - t.t)), 0 if undefined."""
    classes = np.union1d(np.unique(p), np.unique(y))
    t = np.stack([(y == k).sum(1) for k in classes], 1).astype(float)  # (R, K) true counts
    q = np.stack([(p == k).sum(1) for k in classes], 1).astype(float)  # (R, K) predicted counts
    c, s = (p == y).sum(1).astype(float), float(p.shape[1])
    denominator = (s * s - (q * q).sum(1)) * (s * s - (t * t).sum(1))
    return np.where(denominator > 0, (c * s - (t * q).sum(1)) / np.sqrt(np.maximum(denominator, 1e-300)), 0.0)


def _batched_pearson(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    pc, yc = p - p.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    denominator = np.sqrt((pc * pc).sum(1) * (yc * yc).sum(1))
    constant = (np.ptp(p, 1) == 0) | (np.ptp(y, 1) == 0)
    return np.where(constant, 0.0, np.clip((pc * yc).sum(1) / np.where(constant, 1.0, denominator), -1.0, 1.0))


def _batched_spearman(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _batched_pearson(rankdata(p, axis=1), rankdata(y, axis=1))


_BATCHED: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "accuracy": lambda p, y: (p == y).mean(1),
    "f1": _batched_f1,
    "matthews_correlation": _batched_matthews,
    "pearson": _batched_pearson,
    "spearmanr": _batched_spearman,
    "combined": lambda p, y: (_batched_pearson(p, y) + _batched_spearman(p, y)) / 2,
}


def batched_metric(task: str, name: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Metric `name` of `task` on many prediction sets at once: (predictions (R, n), labels (R, n)) -> scores (R,),
    row r the score `compute_metrics` gives row r (vectorised where it can be; a bootstrap scores thousands)."""
    spec = get_task(task)
    if name not in spec.metric_names:
        raise ValueError(f"task {task!r} has no metric {name!r}; its metrics: {', '.join(spec.metric_names)}")
    dtype = float if spec.is_regression else np.int64
    one = _BATCHED.get(name) or (lambda p, y: np.array([_METRICS[name](a, b) for a, b in zip(p, y)]))
    return lambda predictions, labels: one(np.asarray(predictions).astype(dtype), np.asarray(labels).astype(dtype))


def main_metric(task: str) -> str:
    """Name of the metric used for model selection on ``task``."""
    return get_task(task).main_metric


def compute_metrics(task: str, predictions, labels) -> dict[str, float]:
    """Score 1-D ``predictions`` (class ids, or floats for STS-B) against ``labels``."""
    spec = get_task(task)
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim != 1 or predictions.shape != labels.shape or predictions.size == 0:
        raise ValueError(f"predictions and labels must be non-empty 1-D arrays of the same length, "
                         f"got shapes {predictions.shape} and {labels.shape}")
    dtype = float if spec.is_regression else np.int64
    if not spec.is_regression and not np.array_equal(predictions, predictions.astype(dtype)):
        raise ValueError(f"task {task!r} needs class ids as predictions, got values like "
                         f"{predictions[:3].tolist()}")
    predictions, labels = predictions.astype(dtype), labels.astype(dtype)
    return {name: _METRICS[name](predictions, labels) for name in spec.metric_names}


def constant_baseline(task: str, labels) -> dict[str, float]:
    """The metrics of always predicting the most frequent label of ``labels`` (smallest id on a tie),
    or their mean for a regression task: the score a model must beat to have learned anything."""
    spec = get_task(task)
    labels = np.asarray(labels)
    if spec.is_regression:
        constant = float(labels.mean())
    else:
        ids, counts = np.unique(labels.astype(np.int64), return_counts=True)
        constant = ids[np.argmax(counts)]
    return compute_metrics(task, np.full(labels.shape, constant), labels)
