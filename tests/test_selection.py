"""The selection protocol (`--selection-split`, `[study] protocol = "selection"`): the split is disjoint from
what is trained on, the same for every method and run seed, and a pure function of the split seed and the
data; the best epoch is chosen on it; the chosen epoch's dev predictions are stored."""
import json
from collections import Counter

import pytest
from conftest import GLUE_DIR as GLUE
from conftest import needs_glue, needs_minilm

from kronpeft.runner import cli
from kronpeft.runner.data import Example, limit, load_split
from kronpeft.runner.metrics import compute_metrics
from kronpeft.runner.selection import load_predictions, selection_indices, split_train
from kronpeft.runner.train.checkpoints import data_digest

pytestmark = pytest.mark.usefixtures("one_thread")


def examples(n=200, classes=2):
    return [Example(f"a{i}", f"b{i}", i % classes if classes else i / n) for i in range(n)]


def test_split_is_disjoint_covers_the_training_set_and_is_a_pure_function_of_the_seed():
    data = examples()
    fit, sel = split_train(data, seed=0)
    assert len(sel) == 20 and len(fit) == 180
    assert not {e.text_a for e in fit} & {e.text_a for e in sel}
    assert sorted(fit + sel, key=lambda e: int(e.text_a[1:])) == data
    assert split_train(list(data), seed=0) == (fit, sel)  # a pure function: same data, same seed, same split
    assert split_train(data, seed=1)[1] != sel  # another split seed draws another split


def test_split_is_stratified_for_classes_and_plain_for_scores():
    data = [Example(str(i), None, 1 if i < 150 else 0) for i in range(200)]  # 150 ones, 50 zeros
    _, sel = split_train(data, seed=3)
    assert Counter(e.label for e in sel) == {1: 15, 0: 5}
    scores = examples(classes=0)
    assert len(selection_indices([e.label for e in scores], 3)) == 20


@needs_glue
def test_split_of_real_mrpc_is_disjoint_by_content_too():
    train = load_split("mrpc", "train", GLUE)
    fit, sel = split_train(train, seed=0)
    assert len(sel) == round(0.1 * sum(e.label == 1 for e in train)) + round(0.1 * sum(e.label == 0 for e in train))
    pairs = lambda xs: {(e.text_a, e.text_b) for e in xs}  # noqa: E731
    assert pairs(fit) & pairs(sel) <= _duplicated_pairs(train)  # only a pair the file itself repeats


def _duplicated_pairs(train):
    counts = Counter((e.text_a, e.text_b) for e in train)
    return {p for p, n in counts.items() if n > 1}


SMALL = ["--max-train-samples", "16", "--max-eval-samples", "15", "--max-length", "32", "--max-steps", "4",
         "--eval-every", "2", "--batch-size", "8", "--no-eval-before"]


def train(out, *extra, method="krona", seed=0):
    return cli.main(["train", "--task", "rte", "--method", method, "--data-dir", str(GLUE), "--output-dir", str(out),
                     "--seed", str(seed), "--selection-split", "0", *SMALL, *extra])


@needs_glue
@needs_minilm
def test_runs_choose_their_epoch_on_the_selection_split_and_keep_dev_predictions(tmp_path):
    assert train(tmp_path / "a", method="krona", seed=0) == 0
    assert train(tmp_path / "b", method="lora", seed=5) == 0
    full = load_split("rte", "train", GLUE)
    fit, sel = split_train(full, 0)
    states = [json.loads((tmp_path / r / "checkpoint" / "state.json").read_text()) for r in "ab"]
    for state in states:  # every method and run seed: the same selection split, trained on part of the rest
        assert state["data_sha256"]["selection"] == data_digest(limit(sel, 15, 0))  # --max-eval-samples 15
        assert state["data_sha256"]["train"] != data_digest(full)
    for run, seed in (("a", 0), ("b", 5)):
        trained = {(e.text_a, e.text_b, e.label) for e in _limit(fit, seed)}
        assert not trained & {(e.text_a, e.text_b, e.label) for e in sel}
        assert json.loads((tmp_path / run / "checkpoint" / "state.json").read_text())["data_sha256"]["train"] \
            == data_digest(_limit(fit, seed))
        m = json.loads((tmp_path / run / "metrics.json").read_text())
        assert m["chosen_on"] == "accuracy_selection"
        evals = [e for e in m["evals"] if e["step"] > 0]
        first_best = max(evals, key=lambda e: (e["accuracy_selection"], -e["step"]))
        assert m["best_step"] == first_best["step"]  # chosen on selection, whatever dev says
        preds = load_predictions(tmp_path / run / "predictions.npz")
        dev = compute_metrics("rte", preds["dev"], preds["dev_labels"].tolist())
        assert dev["accuracy"] == pytest.approx(m["best"]["accuracy"])
        assert len(preds["selection"]) == 15


def _limit(examples, seed):
    return limit(examples, 16, seed)
