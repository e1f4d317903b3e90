"""Tests for kronpeft.runner.metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kronpeft.runner.data import TASKS
from kronpeft.runner.metrics import batched_metric, compute_metrics, main_metric


def test_keys_follow_the_task_registry():
    for name, spec in TASKS.items():
        predictions = [0.5, 1.5, 2.0] if spec.is_regression else [0, 1, 1]
        result = compute_metrics(name, predictions, [1.0, 1.0, 2.0] if spec.is_regression else [0, 1, 0])
        assert tuple(result) == spec.metric_names
        assert all(type(v) is float for v in result.values())
        assert main_metric(name) == spec.main_metric
    assert [main_metric(t) for t in ("cola", "stsb", "mrpc", "qqp", "rte", "bbc-news")] == [
        "matthews_correlation", "pearson", "f1", "f1", "accuracy", "accuracy"]


def test_cola_matthews_correlation():
    # pred  1 0 1 1 0 0
    # label 1 0 0 1 1 0  ->  TP = 2 (i=0,3), TN = 2 (i=1,5), FP = 1 (i=2), FN = 1 (i=4)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / sqrt(3*3*3*3) = 3/9 = 1/3
    result = compute_metrics("cola", [1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0])
    assert result == {"matthews_correlation": pytest.approx(1 / 3)}
    # A constant prediction makes the denominator 0; the convention is MCC = 0.
    assert compute_metrics("cola", [1, 1, 1], [1, 0, 1]) == {"matthews_correlation": 0.0}


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_accuracy_and_f1(task):
    # pred  1 1 1 1 0 0
    # label 1 1 0 0 1 0  ->  TP = 2, FP = 2, FN = 1, TN = 1
    # accuracy = (2 + 1) / 6 = 1/2; precision = 2/4 = 1/2, recall = 2/3
    # F1 = 2PR / (P + R) = (2 * 1/2 * 2/3) / (1/2 + 2/3) = (2/3) / (7/6) = 4/7
    result = compute_metrics(task, np.array([1, 1, 1, 1, 0, 0]), np.array([1, 1, 0, 0, 1, 0]))
    assert result == {"accuracy": pytest.approx(0.5), "f1": pytest.approx(4 / 7)}
    # No positive predicted and none true: F1 is 0 (zero_division), not an error.
    assert compute_metrics(task, [0, 0], [0, 0]) == {"accuracy": 1.0, "f1": 0.0}


@pytest.mark.parametrize("task", ["sst2", "rte", "qnli", "wnli"])
def test_accuracy_only(task):
    # 3 of 4 right -> 0.75
    assert compute_metrics(task, [0, 1, 1, 0], [0, 1, 0, 0]) == {"accuracy": 0.75}


def test_mnli_three_classes():
    # 4 of 6 right -> 2/3
    assert compute_metrics("mnli", [0, 1, 2, 2, 1, 0], [0, 1, 2, 1, 2, 0]) == {"accuracy": pytest.approx(2 / 3)}


def test_stsb_pearson_and_spearman():
    # x = 1 2 3, y = 1 2 4: mean x = 2, mean y = 7/3
    # dx = -1 0 1, dy = -4/3 -1/3 5/3: sum dx*dy = 4/3 + 5/3 = 3, sum dx^2 = 2, sum dy^2 = 42/9 = 14/3
    # pearson = 3 / sqrt(2 * 14/3) = sqrt(27/28); both orders are the same, so spearman = 1
    result = compute_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    r = math.sqrt(27 / 28)
    assert result == {"pearson": pytest.approx(r), "spearmanr": pytest.approx(1.0),
                      "combined": pytest.approx((r + 1) / 2)}
    # ranks 1 2 3 4 vs 1 3 2 4: d = 0 -1 1 0, sum d^2 = 2, spearman = 1 - 6*2 / (4*(16-1)) = 0.8
    # pearson on the same values: dx = -1.5 -0.5 0.5 1.5, dy = -1.5 0.5 -0.5 1.5,
    # sum dx*dy = 2.25 - 0.25 - 0.25 + 2.25 = 4, sum dx^2 = sum dy^2 = 5 -> pearson = 4/5
    result = compute_metrics("stsb", [1, 2, 3, 4], [1, 3, 2, 4])
    assert result == {"pearson": pytest.approx(0.8), "spearmanr": pytest.approx(0.8),
                      "combined": pytest.approx(0.8)}
    # Spearman differs from Pearson when the relation is monotone but not linear: x = 1 2 3, y = 1 4 9
    # ranks agree -> spearman = 1; mean y = 14/3, dy = -11/3 -2/3 13/3 -> sum dx*dy = 11/3 + 13/3 = 8,
    # sum dy^2 = (121 + 4 + 169)/9 = 294/9 -> pearson = 8 / sqrt(2 * 294/9) = 24 / sqrt(588) ~ 0.9897
    result = compute_metrics("stsb", [1, 2, 3], [1, 4, 9])
    assert result["spearmanr"] == pytest.approx(1.0)
    assert result["pearson"] == pytest.approx(24 / math.sqrt(588))


def test_stsb_constant_predictions_score_zero():
    # Correlation with a constant is undefined (0/0); like MCC it counts as 0 rather than NaN.
    assert compute_metrics("stsb", [2.5, 2.5, 2.5], [1.0, 2.0, 4.0]) == {
        "pearson": 0.0, "spearmanr": 0.0, "combined": 0.0}


def test_bbc_news_accuracy_and_macro_f1():
    # pred  0 1 2 3 4
    # label 0 1 2 3 3  -> accuracy 4/5
    # per class F1: 0, 1, 2 -> 1 each; 3: P = 1/1, R = 1/2 -> F1 = 2/3; 4: TP = 0 -> F1 = 0
    # macro F1 = (1 + 1 + 1 + 2/3 + 0) / 5 = 11/15
    result = compute_metrics("bbc-news", [0, 1, 2, 3, 4], [0, 1, 2, 3, 3])
    assert result == {"accuracy": pytest.approx(0.8), "macro_f1": pytest.approx(11 / 15)}


def test_float_class_ids_are_accepted():
    assert compute_metrics("rte", np.array([0.0, 1.0]), [0, 1]) == {"accuracy": 1.0}


@pytest.mark.parametrize("predictions, labels", [
    ([0, 1], [0, 1, 1]),             # lengths differ
    ([], []),                        # empty
    ([[0.2, 0.8], [0.9, 0.1]], [1, 0]),  # logits, not class ids
    ([0.2, 0.8], [0, 1]),            # probabilities, not class ids
])
def test_bad_inputs(predictions, labels):
    with pytest.raises(ValueError):
        compute_metrics("rte", predictions, labels)


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        compute_metrics("glue", [0], [0])


# -- batched_metric: the bootstrap's vectorised scores, each row against compute_metrics (sklearn/scipy) --------

@st.composite
def prediction_sets(draw, regression: bool, classes: int = 2):
    """(predictions (R, n), labels (R, n)): small integer or few-valued float sets, so ties, constant rows and
    empty classes (zero division) all occur."""
    rows, n = draw(st.integers(1, 6)), draw(st.integers(1, 12))
    values = st.sampled_from([0.0, 0.5, 1.0, 2.5, 4.0, 5.0]) if regression else st.integers(0, classes - 1)
    shape = st.lists(st.lists(values, min_size=n, max_size=n), min_size=rows, max_size=rows)
    return np.array(draw(shape)), np.array(draw(shape))


@pytest.mark.parametrize("task, name, classes", [
    ("mrpc", "accuracy", 2), ("mrpc", "f1", 2), ("cola", "matthews_correlation", 2),
    ("mnli", "accuracy", 3), ("bbc-news", "macro_f1", 5)])
@pytest.mark.filterwarnings("ignore:A single label was found")
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_batched_classification_metrics_match_compute_metrics(task, name, classes, data):
    predictions, labels = data.draw(prediction_sets(False, classes))
    expected = [compute_metrics(task, p, y)[name] for p, y in zip(predictions, labels)]
    assert batched_metric(task, name)(predictions, labels) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", ["pearson", "spearmanr", "combined"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_batched_correlations_match_compute_metrics(name, data):
    predictions, labels = data.draw(prediction_sets(True))
    expected = [compute_metrics("stsb", p, y)[name] for p, y in zip(predictions, labels)]
    assert batched_metric("stsb", name)(predictions, labels) == pytest.approx(expected, abs=1e-12)


def test_batched_matthews_multiclass_by_hand():
    # one row, 3 classes: pred 0 1 2 2, label 0 1 1 2 -> c = 3, s = 4, t = (1, 2, 1), q = (1, 1, 2)
    # (c s - t.q) / sqrt((s^2 - q.q)(s^2 - t.t)) = (12 - 5) / sqrt((16 - 6)(16 - 6)) = 7 / 10
    score = batched_metric("cola", "matthews_correlation")(np.array([[0, 1, 2, 2]]), np.array([[0, 1, 1, 2]]))
    assert score == pytest.approx([0.7])


def test_batched_metric_names_the_task_and_its_metrics():
    with pytest.raises(ValueError, match="'rte' has no metric 'f1'; its metrics: accuracy"):
        batched_metric("rte", "f1")
