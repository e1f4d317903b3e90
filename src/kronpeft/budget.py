"""Equal-budget comparisons in one call: the KronA factor shapes and Kronecker rank `k` for a target
parameter count (or for the count of a LoRA of rank `r` on the same layers).

A `k`-term adapter on a layer costs `k·(a1·a2 + b1·b2)`; LoRA of rank `r` costs `r·(out + in)`. The
candidates are the balanced split (`a_shape=None`) and every `(a1, a2)` dividing all targeted layers;
the pick is the most parameters not above the budget (ties: more terms, then the more balanced shape).
"""
from __future__ import annotations

import dataclasses
import math

from torch import nn

from .config import KronAConfig, _is_int
from .injection import find_places
from .kron import kron_shapes


def adapter_parameters(shapes: list[tuple[int, int]], a_shape, rank: int) -> int:
    """Parameters of a `rank`-term KronA on layers of `(out, in)` shapes `shapes`."""
    total = 0
    for out_features, in_features in shapes:
        (a1, a2), (b1, b2) = kron_shapes(out_features, in_features, a_shape)
        total += rank * (a1 * a2 + b1 * b2)
    return total


def match_budget(model: nn.Module, params: int | None = None, lora_rank: int | None = None,
                 config: KronAConfig | None = None) -> tuple[KronAConfig, int]:
    """`(config, n)`: a copy of `config` (default `KronAConfig()`; its `target_modules` pick the layers) with
    `a_shape` and `rank` chosen so its `n` parameters come nearest `params` from below; `lora_rank=r` sets
    `params` to a rank-`r` LoRA's count on the same layers. A ValueError when no factorisation fits."""
    config = config or KronAConfig()
    if (params is None) == (lora_rank is None):
        raise ValueError(f"match_budget: give exactly one of params= and lora_rank= (got params={params!r}, "
                         f"lora_rank={lora_rank!r})")
    for name, value in (("params", params), ("lora_rank", lora_rank)):
        if value is not None and (not _is_int(value) or value <= 0):
            raise ValueError(f"match_budget: {name}={value!r} must be a positive int")
    shapes = [(p.out_features, p.in_features) for p in find_places(model, config)]
    if lora_rank is not None:
        params = lora_rank * sum(o + i for o, i in shapes)
    best = None
    for a_shape in _candidate_shapes(shapes):
        per_term = adapter_parameters(shapes, a_shape, 1)
        rank = params // per_term
        if rank < 1:
            continue
        rank = min(rank, _max_rank(shapes, a_shape))  # more terms than that are linearly dependent
        key = (rank * per_term, rank, -_imbalance(shapes, a_shape))
        if best is None or key > best[0]:
            best = key, a_shape, rank
    if best is None:
        smallest = min(adapter_parameters(shapes, s, 1) for s in _candidate_shapes(shapes))
        raise ValueError(f"match_budget: a budget of {params:,} parameters is below the smallest KronA on these "
                         f"{len(shapes)} layers (one term costs at least {smallest:,}); raise params/lora_rank "
                         f"or target fewer layers")
    (n, _, _), a_shape, rank = best
    return dataclasses.replace(config, a_shape=a_shape, rank=rank), n


def _candidate_shapes(shapes: list[tuple[int, int]]) -> list:
    """None (each layer's balanced split) and every `(a1, a2)` that divides all the layers."""
    outs = math.gcd(*(o for o, _ in shapes))
    ins = math.gcd(*(i for _, i in shapes))
    divisors = lambda n: [d for d in range(1, n + 1) if n % d == 0]  # noqa: E731
    return [None] + [(a1, a2) for a1 in divisors(outs) for a2 in divisors(ins)]


def _max_rank(shapes: list[tuple[int, int]], a_shape) -> int:
    """The most independent terms on every layer: `min(a1·a2, b1·b2)`, the rank of the rearranged weight."""
    ranks = []
    for out_features, in_features in shapes:
        (a1, a2), (b1, b2) = kron_shapes(out_features, in_features, a_shape)
        ranks.append(min(a1 * a2, b1 * b2))
    return min(ranks)


def _imbalance(shapes: list[tuple[int, int]], a_shape) -> float:
    """How far the factors are from square-root sizes (0 for a perfectly balanced split)."""
    total = 0.0
    for out_features, in_features in shapes:
        (a1, a2), _ = kron_shapes(out_features, in_features, a_shape)
        total += abs(math.log(a1 * a1 / out_features)) + abs(math.log(a2 * a2 / in_features))
    return total
