"""The study's selection protocol: a selection split carved from a task's training set.

Under `--selection-split SEED` a run trains on 90 % of the training set and chooses its best epoch on the
other 10 % (the selection split); the dev set is evaluated at every epoch too but chooses nothing, so it
is reported as a test set. The split is a pure function of (SEED, the training examples): the same for
every method and every run seed, so rates chosen on it compare like with like. Classification tasks are
split per class (stratified), so the selection split keeps the training set's class balance.

Per-example dev predictions of a run's chosen epoch are kept in `predictions.npz` (`save_predictions`):
the study copies it beside its results, with its sha256 in the row, for paired tests over examples.
"""
from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

SELECTION_FRACTION = 0.1
SELECTION = "selection"  # the split's name in metrics (`f1_selection`) and in data digests
PREDICTIONS = "predictions.npz"


def selection_indices(labels: Sequence, seed: int, fraction: float = SELECTION_FRACTION) -> list[int]:
    """Sorted indices of the selection split of a training set with these `labels`: `fraction` of each
    class (rounded, at least one of a class with two or more examples) drawn with `random.Random(seed)`;
    for float labels (regression) one draw over all examples. A pure function of (labels, seed, fraction)."""
    if not 0 < fraction < 1:
        raise ValueError(f"selection fraction must be in (0, 1), got {fraction}")
    regression = any(isinstance(y, float) for y in labels)
    groups = defaultdict(list)
    for i, y in enumerate(labels):
        groups[None if regression else y].append(i)
    rng = random.Random(seed)
    chosen = []
    for key in sorted(groups, key=repr):  # a fixed order of classes: the draw does not depend on dict order
        members = groups[key]
        take = max(round(fraction * len(members)), 1 if len(members) > 1 else 0)
        chosen += rng.sample(members, take)
    return sorted(chosen)


def split_train(examples: Sequence, seed: int, fraction: float = SELECTION_FRACTION) -> tuple[list, list]:
    """(the examples trained on, the selection split): disjoint, together the whole training set, in order."""
    picked = set(selection_indices([e.label for e in examples], seed, fraction))
    fit = [e for i, e in enumerate(examples) if i not in picked]
    return fit, [examples[i] for i in sorted(picked)]


def save_predictions(path: Path, predictions: dict[str, np.ndarray], labels: dict[str, list]):
    """Write `{split: predictions}` and `{split: labels}` (arrays `<split>` and `<split>_labels`) to a
    compressed .npz, atomically (a crash leaves the previous file or the new one)."""
    from ..atomic import write_atomic

    arrays = {}
    for split, preds in predictions.items():
        arrays[split] = np.asarray(preds)
        arrays[f"{split}_labels"] = np.asarray(labels[split])

    def write(tmp: Path):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    write_atomic(path, write)


def load_predictions(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a predictions file (no pickles: `allow_pickle=False`)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def choice_score(row: dict) -> float:
    """The score a study chooses a learning rate by: the selection split's under the selection protocol
    (the chosen epoch's), dev's under the old one (rows without a protocol)."""
    return row["selection_score"] if row.get("protocol") == SELECTION else row["score"]


def keep_predictions(run_dir: Path, results: Path, grid: str, key: str) -> dict:
    """Copy a finished run's predictions file beside the study's results file, to
    `predictions/<grid>/<key>.npz`, atomically; the row's fields naming it (path relative to the results
    file's folder, and sha256), or {} when the run wrote none."""
    from ..atomic import sha256, write_atomic

    source = run_dir / PREDICTIONS
    if not source.is_file():
        return {}
    relative = Path("predictions") / grid / f"{key}.npz"
    target = results.parent / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, lambda tmp: tmp.write_bytes(source.read_bytes()))
    return {"predictions": str(relative), "predictions_sha256": sha256(target)}
