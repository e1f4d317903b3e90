"""The Kronecker math, in one place.

`kron_linear(x, A, B)` computes `x @ torch.kron(A, B).T` without building the `(a1*b1, a2*b2)`
matrix: with a token `x` reshaped row-major to `X (a2, b2)`, `(A ⊗ B) vec(X) = vec(A X Bᵀ)`,
which is two ordinary matrix multiplications over all tokens at once.
"""
from __future__ import annotations

import math

import torch


def kron_shapes(out_features: int, in_features: int, a_shape: tuple[int, int] | None = None):
    """Factor shapes `((a1, a2), (b1, b2))` with `a1*b1 = out_features`, `a2*b2 = in_features`.

    By default each dimension is split at its divisor nearest `sqrt(dim)` (768 -> 24 x 32);
    `a_shape` fixes `(a1, a2)` and `B` takes the rest.
    """
    if a_shape is None:
        a_shape = (_balanced_divisor(out_features), _balanced_divisor(in_features))
    a1, a2 = (int(v) for v in a_shape)
    if a1 <= 0 or a2 <= 0 or out_features % a1 or in_features % a2:
        raise ValueError(
            f"a_shape=({a1}, {a2}) does not divide a ({out_features} out x {in_features} in) weight: "
            f"a1 must divide {out_features} and a2 must divide {in_features}; "
            f"pick divisors of each, or leave a_shape=None for the balanced split "
            f"{(_balanced_divisor(out_features), _balanced_divisor(in_features))}"
        )
    return (a1, a2), (out_features // a1, in_features // a2)


def _balanced_divisor(n: int) -> int:
    """The divisor of `n` nearest `sqrt(n)` (the smaller one on a tie)."""
    root = math.sqrt(n)
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - root), d))


def kron_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """`x @ torch.kron(A, B).T` for `x (..., a2*b2)`, `A (a1, a2)`, `B (b1, b2)` -> `(..., a1*b1)`.

    Two matmuls on reshaped views, in the cheaper order for these shapes; autograd-exact.
    """
    (a1, a2), (b1, b2) = A.shape, B.shape
    if x.shape[-1] != a2 * b2:
        raise ValueError(
            f"kron_linear: x has {x.shape[-1]} features but A {tuple(A.shape)} ⊗ B {tuple(B.shape)} "
            f"expects a2*b2 = {a2 * b2}"
        )
    lead = x.shape[:-1]
    X = x.reshape(-1, a2, b2)  # (N, a2, b2)
    if b1 * a2 * (b2 + a1) <= a1 * b2 * (a2 + b1):
        # B first: (N*a2, b2) @ (b2, b1) -> (N, a2, b1); then A over a2 -> (N, b1, a1).
        T = (X.reshape(-1, b2) @ B.T).reshape(-1, a2, b1)
        Y = T.transpose(1, 2) @ A.T  # (N, b1, a1)
        Y = Y.transpose(1, 2)  # (N, a1, b1)
    else:
        # A first: (N, b2, a2) @ (a2, a1) -> (N, b2, a1); then B over b2 -> (N, a1, b1).
        T = X.transpose(1, 2) @ A.T  # (N, b2, a1)
        Y = T.transpose(1, 2) @ B.T  # (N, a1, b1)
    return Y.reshape(*lead, a1 * b1)


def kron_matrix(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The full `(a1*b1, a2*b2)` matrix `A ⊗ B`, built only to merge it into a weight."""
    return torch.kron(A, B)


def kron_vectors(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-token Kronecker product of vectors: `v (..., p)`, `u (..., q)` -> `(..., p*q)`,
    entry `i*q + j` being `v[i] * u[j]` (`torch.kron` of each token's pair)."""
    return (v.unsqueeze(-1) * u.unsqueeze(-2)).flatten(-2)
