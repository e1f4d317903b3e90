"""The training batches (`epoch_batches`, with and without --group-by-length) and evaluation in
length order (`predict` gives every prediction back at its example's place)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kronpeft.runner.train.batches import GROUP_BATCHES, Encoded, epoch_batches, predict


def padded_tokens(batches, lengths):
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 700), batch_size=st.integers(1, 40), world=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 5), data=st.data())
def test_grouped_batches_are_a_reshuffle_of_the_same_batch_sizes(n, batch_size, world, seed, epoch, data):
    lengths = data.draw(st.lists(st.integers(1, 128), min_size=n, max_size=n))
    plain = epoch_batches(n, batch_size, seed, epoch, world)
    grouped = epoch_batches(n, batch_size, seed, epoch, world, lengths)
    assert grouped == epoch_batches(n, batch_size, seed, epoch, world, list(lengths))  # f(seed, epoch)
    assert sorted(map(len, grouped)) == sorted(map(len, plain))  # same step count, same batch sizes
    flat = [i for b in grouped for i in b]
    assert len(flat) == len(set(flat)) and set(flat) <= set(range(n))
    assert len(flat) >= n - batch_size  # at most the last batch is dropped
    if n <= batch_size * GROUP_BATCHES:  # one group: the batches are slices of one length order
        spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in grouped)
        assert all(hi_prev <= lo for (_, hi_prev), (lo, _) in zip(spans, spans[1:]))


def test_grouping_removes_most_padding_and_keeps_epochs_different():
    rng = random.Random(0)
    lengths = [min(128, max(3, int(rng.lognormvariate(3.5, 0.6)))) for _ in range(3668)]  # like MRPC's
    plain = epoch_batches(len(lengths), 32, 0, 0, 1)
    grouped = epoch_batches(len(lengths), 32, 0, 0, 1, lengths)
    real = sum(lengths)
    assert padded_tokens(plain, lengths) / real > 1.3
    assert padded_tokens(grouped, lengths) / real < 1.05
    assert grouped != epoch_batches(len(lengths), 32, 0, 1, 1, lengths)
    # not ordered by length across the epoch: the batches are shuffled after grouping
    means = [np.mean([lengths[i] for i in b]) for b in grouped]
    assert means != sorted(means) and means != sorted(means, reverse=True)


class TinyTokenizer:
    """Pads `input_ids` / `attention_mask` lists on the right, as an HF tokenizer's `pad` does."""

    def pad(self, feats, return_tensors="pt"):
        width = max(len(f["input_ids"]) for f in feats)
        ids = [f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in feats]
        mask = [[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in feats]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


class MeanModel(torch.nn.Module):
    """Logits from the masked mean of an embedding: a prediction depends on its own example only."""

    def __init__(self, outputs):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, outputs)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return type("Out", (), {"logits": (self.emb(input_ids) * m).sum(1) / m.sum(1)})


@pytest.mark.parametrize("regression", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_predict_in_length_order_returns_predictions_in_example_order(regression, batch_size):
    rng = random.Random(1)
    data = Encoded.__new__(Encoded)
    data.features = {"input_ids": [[rng.randrange(1, 50) for _ in range(rng.randrange(1, 20))] for _ in range(23)]}
    data.features["attention_mask"] = [[1] * len(ids) for ids in data.features["input_ids"]]
    data.labels = [0.0] * 23 if regression else [0] * 23
    data.regression, data.tokenizer = regression, TinyTokenizer()
    model = MeanModel(1 if regression else 3)
    with torch.no_grad():
        one_by_one = [model(**{k: torch.tensor([v[i]]) for k, v in data.features.items()}).logits[0]
                      for i in range(23)]
    expected = np.array([float(row[0]) if regression else int(row.argmax()) for row in one_by_one])
    got = predict(model, data, batch_size, "cpu")
    assert got.shape == (23,)
    if regression:
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    else:
        assert got.tolist() == expected.tolist()
