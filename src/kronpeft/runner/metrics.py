"""Evaluation metrics per task; the metric names and main metric live in ``data.TASKS``."""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.stats import pearsonr, spearmanr
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
