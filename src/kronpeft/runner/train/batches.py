"""Examples as batches: encoding (`Encoded`, `PromptedSet`), the order of an epoch's batches (a pure
function of seed and epoch, `epoch_batches`), one process's share of a batch (`shard`), and evaluation."""
from __future__ import annotations

import random

import numpy as np
import torch

from ..errors import UsageError
from ..feedback import batches
from ..metrics import compute_metrics
from ..run_checks import check_truncated
from ..text2text import PromptedSet

GROUP_BATCHES = 50  # --group-by-length sorts runs of this many batches (transformers' megabatch)


class Encoded:
    """Tokenised examples (lists of ids, unpadded) and their labels."""

    def __init__(self, tokenizer, examples, max_length: int, regression: bool):
        if not examples:
            raise UsageError("no examples to use (check --max-train-samples/--max-eval-samples and the data)")
        a = [e.text_a for e in examples]
        b = [e.text_b for e in examples] if examples[0].text_b is not None else None
        self.features = tokenizer(a, b, truncation=True, max_length=max_length)
        check_truncated([len(ids) for ids in self.features["input_ids"]], max_length, tokenizer, b is not None)
        self.labels = [float(e.label) if regression else int(e.label) for e in examples]
        self.regression = regression
        self.tokenizer = tokenizer

    def __len__(self):
        return len(self.labels)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.features["input_ids"]]

    def batch(self, indices) -> dict[str, torch.Tensor]:
        feats = [{k: v[i] for k, v in self.features.items()} for i in indices]
        out = dict(self.tokenizer.pad(feats, return_tensors="pt"))
        out["labels"] = torch.tensor([self.labels[i] for i in indices],
                                     dtype=torch.float32 if self.regression else torch.long)
        return out


def encode(tokenizer, spec, examples, max_length: int, text_to_text: bool):
    """`PromptedSet` (prompt -> label words) for a decoder LM, `Encoded` (ids + class) otherwise."""
    if not text_to_text:
        return Encoded(tokenizer, examples, max_length, spec.is_regression)
    try:
        return PromptedSet(tokenizer, spec, examples, max_length)
    except ValueError as err:
        raise UsageError(str(err)) from None


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, world: int,
                  lengths: list[int] | None = None) -> list[list[int]]:
    """The global batches of one epoch: a (seed, epoch)-seeded shuffle cut into `batch_size` chunks.
    A short last batch is kept when every process gets the same share of it, dropped otherwise.

    With `lengths` (tokens per example), batches are grouped by length as `transformers`'
    `group_by_length` does: each run of GROUP_BATCHES batches of the shuffle is sorted by length
    (longest first) before it is cut, and the batches are then shuffled, so that a batch pads to
    about its own examples' length instead of the longest of a random draw."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(n))
    rng.shuffle(order)
    if lengths is not None:
        group = batch_size * GROUP_BATCHES
        order = [i for g in range(0, n, group) for i in sorted(order[g:g + group], key=lambda i: -lengths[i])]
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if batches and len(batches[-1]) % world:
        batches.pop()
    if lengths is not None:
        rng.shuffle(batches)
    return batches


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    k = len(batch) // world
    return batch[rank * k:(rank + 1) * k]


# -- evaluation -----------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model, data, batch_size: int, device) -> np.ndarray:
    if isinstance(data, PromptedSet):
        return data.predict(model, batch_size, device)
    was_training = model.training
    model.eval()
    order = np.argsort([-n for n in data.lengths], kind="stable")  # batches of similar length pad little
    preds = []
    for start in batches(range(0, len(data), batch_size)):
        batch = data.batch(order[start:start + batch_size])
        batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
        preds.append(logits[:, 0] if data.regression else logits.argmax(-1))
    model.train(was_training)
    out = np.empty(len(data), dtype=np.float32 if data.regression else np.int64)
    out[order] = torch.cat(preds).cpu().numpy()
    return out


def split_suffix(task_spec, split: str) -> str:
    """Key suffix for metrics of an extra eval split (MNLI mismatched -> `_mm`)."""
    if split == task_spec.eval_splits[0]:
        return ""
    return "_mm" if split == "dev_mismatched" else f"_{split}"


def evaluate(model, task_spec, eval_sets: dict, batch_size: int, device, keep: dict | None = None) -> dict[str, float]:
    """All eval splits' GLUE metrics, flat: `accuracy`, and `accuracy_mm` for MNLI mismatched (and
    `accuracy_selection` for the selection split); `keep`, when given, receives {split: predictions}."""
    out = {}
    for split, data in eval_sets.items():
        preds = predict(model, data, batch_size, device)
        if keep is not None:
            keep[split] = preds
        metrics = compute_metrics(task_spec.name, preds, data.labels)
        out.update({f"{k}{split_suffix(task_spec, split)}": v for k, v in metrics.items()})
    return out
