"""Adapter modules. Each one maps `(x, y) -> y'`: `x` is the input of the place it sits at (a
linear layer, or the first module of a feed-forward block) and `y` that place's output."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import AdaKronConfig, BottleneckConfig, KronABConfig, KronAConfig
from .kron import (kron_linear, kron_matrix, kron_shapes, kron_sum_linear, kron_sum_matrix, kron_vectors,
                   nearest_kron_sum)

ACTIVATION_FUNCTIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _input_dropout(p: float) -> nn.Module:
    """Dropout on the adapter input; `nn.Identity` at p = 0 so no copy of `x` is made."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class KronDelta(nn.Module):
    """`y + scale · x (Σᵢ Aᵢ ⊗ Bᵢ)ᵀ` over `rank` terms; mergeable into the weight.

    `rank=1`: `A (a1, a2)`, `B (b1, b2)` (KronA); `rank=k>1`: `A (k, a1, a2)`, `B (k, b1, b2)`.
    `init="zero"`: each `Aᵢ` Kaiming-uniform, `Bᵢ` zero. `init="kpsvd"` (needs `weight`, the base layer's
    `(out, in)` weight): `scale · Σ Aᵢ ⊗ Bᵢ` starts at the nearest `k`-term Kronecker sum to `weight`, and
    frozen copies `A0`, `B0` of those factors are subtracted, so the delta is zero at step 0.
    """

    mergeable = True

    def __init__(self, out_features: int, in_features: int, a_shape=None, scale: float = 1.0, dropout: float = 0.0,
                 dtype=None, device=None, rank: int = 1, init: str = "zero", weight: torch.Tensor | None = None):
        super().__init__()
        (a1, a2), (b1, b2) = kron_shapes(out_features, in_features, a_shape)
        lead = () if rank == 1 else (rank,)
        self.A = nn.Parameter(torch.empty(*lead, a1, a2, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(*lead, b1, b2, dtype=dtype, device=device))
        for A in self.A.view(-1, a1, a2):
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.scale = scale
        self.dropout = _input_dropout(dropout)
        self.register_buffer("A0", None)
        self.register_buffer("B0", None)
        if init == "kpsvd":
            self.A0, self.B0 = torch.zeros_like(self.A), torch.zeros_like(self.B)
            if weight is not None:  # None: the factors are about to be loaded (no SVD needed)
                A, B, _ = nearest_kron_sum(weight / scale, (a1, a2), rank)
                with torch.no_grad():
                    for t, v in ((self.A, A), (self.B, B), (self.A0, A), (self.B0, B)):
                        t.copy_(v.reshape(t.shape))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(A (m, a1, a2), B (m, b1, b2))` with `s · Σ Aᵢ ⊗ Bᵢ` the delta: with `init="kpsvd"`
        the `2k` terms `[A, -A0]`, `[B, B0]`."""
        A, B = self.A.view(-1, *self.A.shape[-2:]), self.B.view(-1, *self.B.shape[-2:])
        if self.A0 is None:
            return A, B
        return torch.cat([A, -self.A0.view_as(A)]), torch.cat([B, self.B0.view_as(B)])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x).to(self.A.dtype)
        if self.A.dim() == 2 and self.A0 is None:  # KronA: one term
            return y.add(kron_linear(x, self.A, self.B).to(y.dtype), alpha=self.scale)  # scale fused into the add
        return y.add(kron_sum_linear(x, *self.factors()).to(y.dtype), alpha=self.scale)

    def delta_weight(self) -> torch.Tensor:
        """`scale · Σ Aᵢ ⊗ Bᵢ` (minus the frozen initial terms), shape `(out_features, in_features)`,
        in fp32 (or wider) for merging."""
        dtype = torch.promote_types(self.A.dtype, torch.float32)
        if self.A.dim() == 2 and self.A0 is None:
            return self.scale * kron_matrix(self.A.to(dtype), self.B.to(dtype))
        A, B = self.factors()
        return self.scale * kron_sum_matrix(A.to(dtype), B.to(dtype))

    def extra_repr(self) -> str:
        kpsvd = ", init=kpsvd" if self.A0 is not None else ""
        return f"A={tuple(self.A.shape)}, B={tuple(self.B.shape)}, scale={self.scale}{kpsvd}"


class KronParallel(KronDelta):
    """KronA^B(_res): `FFN(X) + scale · X (A ⊗ B)ᵀ [+ s_res · X]` beside a feed-forward block.

    Not mergeable: the block is non-linear, so the map cannot be folded into one weight.
    """

    mergeable = False

    def __init__(self, out_features: int, in_features: int, a_shape=None, scale: float = 1.0, dropout: float = 0.0,
                 residual: bool = False, residual_init: float = 0.0, dtype=None, device=None):
        super().__init__(out_features, in_features, a_shape, scale, dropout, dtype, device)
        if residual and out_features != in_features:
            raise ValueError(f"KronA^B_res needs a square block, got {in_features} -> {out_features}")
        self.s_res = nn.Parameter(torch.tensor(float(residual_init), dtype=dtype, device=device)) if residual else None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = super().forward(x, y)
        return y if self.s_res is None else y + (self.s_res * x).to(y.dtype)


class SequentialAdapter(nn.Module):
    """A bottleneck adapter on a hidden state `y (..., d)`: `y + up(act(bottleneck(y)))`.

    Not mergeable: it is non-linear in `y`.
    """

    mergeable = False

    def __init__(self, d: int, r: int, activation: str, dtype=None, device=None):
        super().__init__()
        self.act = ACTIVATION_FUNCTIONS[activation]()
        self.up = nn.Linear(r, d, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = y.to(self.up.weight.dtype)
        return y + self.up(self.act(self.bottleneck(h))).to(y.dtype)


class Bottleneck(SequentialAdapter):
    """Pfeiffer adapter: bottleneck `down(y) (r)`; `down` ~ N(0, 0.02), `up` zero, so it starts as the identity."""

    def __init__(self, d: int, r: int, activation: str = "gelu", dtype=None, device=None):
        super().__init__(d, r, activation, dtype, device)
        self.down = nn.Linear(d, r, dtype=dtype, device=device)
        nn.init.normal_(self.down.weight, std=0.02)
        for tensor in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(tensor)

    def bottleneck(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(h)


class AdaKron(SequentialAdapter):
    """AdaKron: bottleneck `z = v ⊗ u (r)` of two small projections, `u = W1 h + b1 (r/split)`,
    `v = W2 h + b2 (split)`. `init="paper"`: weights N(0, 0.02), biases 0; `"zero"`: `up` starts at 0."""

    def __init__(self, d: int, r: int, split: int = 4, activation: str = "gelu", init: str = "zero",
                 dtype=None, device=None):
        super().__init__(d, r, activation, dtype, device)
        self.u = nn.Linear(d, r // split, dtype=dtype, device=device)
        self.v = nn.Linear(d, split, dtype=dtype, device=device)
        for linear in (self.u, self.v, self.up):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        if init == "zero":
            nn.init.zeros_(self.up.weight)

    def bottleneck(self, h: torch.Tensor) -> torch.Tensor:
        return kron_vectors(self.v(h), self.u(h))


def build_adapter(config, out_features: int, in_features: int, dtype=None, device=None,
                  weight: torch.Tensor | None = None) -> nn.Module:
    """The adapter module `config` describes, for a place mapping `in_features -> out_features`;
    `weight`: the base layer's `(out, in)` weight, for `KronAConfig(init="kpsvd")` (None when loading)."""
    if isinstance(config, KronAConfig):
        return KronDelta(out_features, in_features, config.a_shape, config.scale, config.dropout, dtype, device,
                         config.rank, config.init, weight)
    if isinstance(config, KronABConfig):
        return KronParallel(out_features, in_features, config.a_shape, config.scale, config.dropout,
                            config.residual, config.residual_init, dtype, device)
    if isinstance(config, AdaKronConfig):
        return AdaKron(out_features, config.r, config.split, config.activation, config.init, dtype, device)
    if isinstance(config, BottleneckConfig):
        return Bottleneck(out_features, config.r, config.activation, dtype, device)
    raise TypeError(f"not a kronpeft config: {type(config).__name__}")
