"""The Kronecker math, in one place.

`kron_linear(x, A, B)` computes `x @ torch.kron(A, B).T` without building the `(a1*b1, a2*b2)`
matrix: with a token `x` reshaped row-major to `X (a2, b2)`, `(A ⊗ B) vec(X) = vec(A X Bᵀ)`,
which is two ordinary matrix multiplications over all tokens at once.
"""
from __future__ import annotations

import contextlib
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

    Two matmuls on reshaped views, in the cheaper order for these shapes, with no transposed
    copies of the activations; autograd saves only `x`, `A`, `B` (see `_KronLinear`).
    """
    (a1, a2), (b1, b2) = A.shape, B.shape
    if x.shape[-1] != a2 * b2:
        raise ValueError(
            f"kron_linear: x has {x.shape[-1]} features but A {tuple(A.shape)} ⊗ B {tuple(B.shape)} "
            f"expects a2*b2 = {a2 * b2}"
        )
    lead = x.shape[:-1]
    y = _KronLinear.apply(x.reshape(-1, a2, b2), A, B)
    return y.reshape(*lead, a1 * b1)


def _b_first(a1: int, a2: int, b1: int, b2: int) -> bool:
    """Whether contracting with `B` first is cheaper, counting the multiply-adds of forward and backward.

    B first: forward `T = X Bᵀ`, `Y = A T`; backward recomputes `T` and runs three more products.
    A first is the mirror image. Per token: B first `4·a2·b1·b2 + 3·a1·a2·b1`, A first
    `4·a1·a2·b2 + 3·a1·b1·b2`.
    """
    return 4 * a2 * b1 * b2 + 3 * a1 * a2 * b1 <= 4 * a1 * a2 * b2 + 3 * a1 * b1 * b2


class _KronLinear(torch.autograd.Function):
    """`Y[n] = A X[n] Bᵀ` for `X (N, a2, b2)` -> `Y (N, a1, b1)`.

    Every product is either one GEMM over all `N·a2` (or `N·a1`) rows, or a batched GEMM against the
    broadcast factor (`A.expand(N, ...)`), so no activation is ever transposed or copied. The
    intermediate (`X Bᵀ` or `A X`, as large as an activation) is recomputed in backward instead of
    saved: autograd keeps `X`, `A`, `B` only, which is what LoRA keeps too.
    """

    @staticmethod
    def forward(ctx, X, A, B):
        ctx.input_dtypes = X.dtype, A.dtype, B.dtype
        compute_dtype = _autocast_dtype(X.device.type)
        if compute_dtype is not None:  # under autocast: compute in its dtype, as its matmuls would
            X, A, B = X.to(compute_dtype), A.to(compute_dtype), B.to(compute_dtype)
        ctx.save_for_backward(X, A, B)
        N, (a1, a2), (b1, b2) = X.shape[0], A.shape, B.shape
        with _autocast_off(X.device.type):
            if _b_first(a1, a2, b1, b2):
                T = (X.reshape(-1, b2) @ B.T).view(N, a2, b1)
                return torch.bmm(A.expand(N, a1, a2), T)
            U = torch.bmm(A.expand(N, a1, a2), X)  # (N, a1, b2)
            return (U.view(-1, b2) @ B.T).view(N, a1, b1)

    @staticmethod
    def backward(ctx, G):
        X, A, B = ctx.saved_tensors
        with _autocast_off(X.device.type):
            grads = _KronLinear._grads(ctx, G.to(X.dtype).contiguous(), X, A, B)
        # each gradient in its input's dtype (fp32 adapter weights stay fp32 under bf16 autocast)
        return tuple(g if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.input_dtypes))

    @staticmethod
    def _grads(ctx, G, X, A, B):
        N, (a1, a2), (b1, b2) = X.shape[0], A.shape, B.shape
        need_x, need_a, need_b = ctx.needs_input_grad
        gX = gA = gB = None
        if _b_first(a1, a2, b1, b2):
            if need_a:  # gA = Σ_n G[n] T[n]ᵀ, T recomputed
                T = (X.reshape(-1, b2) @ B.T).view(N, a2, b1)
                gA = torch.bmm(G, T.transpose(1, 2)).sum(0)
                del T
            if need_x or need_b:  # gT = Aᵀ G[n]; gX = gT B; gB = Σ gT[n]ᵀ X[n]
                gT = torch.bmm(A.T.expand(N, a2, a1), G).view(-1, b1)
                gB = gT.T @ X.reshape(-1, b2) if need_b else None
                gX = (gT @ B).view(N, a2, b2) if need_x else None
        else:
            if need_a or need_x:  # gU = G[n] B; gX = Aᵀ gU[n]; gA = Σ gU[n] X[n]ᵀ
                gU = (G.view(-1, b1) @ B).view(N, a1, b2)
                gA = torch.bmm(gU, X.transpose(1, 2)).sum(0) if need_a else None
                gX = torch.bmm(A.T.expand(N, a2, a1), gU) if need_x else None
                del gU
            if need_b:  # gB = Σ G[n]ᵀ U[n], U recomputed
                U = torch.bmm(A.expand(N, a1, a2), X)
                gB = G.view(-1, b1).T @ U.view(-1, b2)
        return gX, gA, gB


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype `torch.autocast` computes matmuls in on `device_type`, None when it is off."""
    if device_type not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast_off(device_type: str):
    """Autocast disabled inside: the function casts its inputs itself, once."""
    return torch.autocast(device_type, enabled=False) if device_type in _AUTOCAST_DEVICES else contextlib.nullcontext()


def kron_matrix(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The full `(a1*b1, a2*b2)` matrix `A ⊗ B`, built only to merge it into a weight."""
    return torch.kron(A, B)


def kron_vectors(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-token Kronecker product of vectors: `v (..., p)`, `u (..., q)` -> `(..., p*q)`,
    entry `i*q + j` being `v[i] * u[j]` (`torch.kron` of each token's pair)."""
    return (v.unsqueeze(-1) * u.unsqueeze(-2)).flatten(-2)


# -- sums of Kronecker products: ΔW = Σᵢ Aᵢ ⊗ Bᵢ, A (k, a1, a2), B (k, b1, b2) ---------------------


def kron_sum_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """`x @ (Σᵢ torch.kron(A[i], B[i])).T` for `x (..., a2*b2)`, `A (k, a1, a2)`, `B (k, b1, b2)` -> `(..., a1*b1)`.

    All `k` terms in two products: B first, `T = X [B₁;…;Bₖ]ᵀ` (one GEMM), then `[A₁ … Aₖ] T` (one batched
    GEMM summing over the terms); or A first, `U = [A₁;…;Aₖ] X`, then `U [B₁ᵀ;…;Bₖᵀ]`. The order is the
    one with fewer multiply-adds (per token, B first `k·b1·a2·(b2 + a1)`, A first `k·a1·b2·(a2 + b1)`).
    k = 1 is `kron_linear`. Autograd saves the `(k·a2·b1)`- or `(k·a1·b2)`-wide intermediate.
    """
    (k, a1, a2), (_, b1, b2) = A.shape, B.shape
    if k == 1:
        return kron_linear(x, A[0], B[0])
    if x.shape[-1] != a2 * b2 or B.shape[0] != k:
        raise ValueError(f"kron_sum_linear: x has {x.shape[-1]} features, A {tuple(A.shape)}, B {tuple(B.shape)}: "
                         f"needs a2*b2 = {a2 * b2} features and as many A as B terms")
    lead = x.shape[:-1]
    X = x.reshape(-1, a2, b2)
    N = X.shape[0]
    if b1 * a2 * (b2 + a1) <= a1 * b2 * (a2 + b1):
        T = (X.reshape(-1, b2) @ B.reshape(k * b1, b2).T).view(N, a2, k, b1)  # T[n, :, i] = X[n] Bᵢᵀ
        T = T.permute(0, 2, 1, 3).reshape(N, k * a2, b1)
        Y = torch.bmm(A.permute(1, 0, 2).reshape(a1, k * a2).expand(N, a1, k * a2), T)  # Σᵢ Aᵢ X[n] Bᵢᵀ
    else:
        U = torch.bmm(A.reshape(k * a1, a2).expand(N, k * a1, a2), X).view(N, k, a1, b2)  # U[n, i] = Aᵢ X[n]
        U = U.permute(0, 2, 1, 3).reshape(N * a1, k * b2)
        Y = (U @ B.transpose(1, 2).reshape(k * b2, b1)).view(N, a1, b1)  # Σᵢ Aᵢ X[n] Bᵢᵀ
    return Y.reshape(*lead, a1 * b1)


def kron_sum_matrix(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The full `(a1*b1, a2*b2)` matrix `Σᵢ A[i] ⊗ B[i]`, built only to merge it into a weight."""
    (_, a1, a2), (_, b1, b2) = A.shape, B.shape
    return torch.einsum("kij,kpq->ipjq", A, B).reshape(a1 * b1, a2 * b2)


def kron_sum_norm2(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """`‖Σᵢ A[i] ⊗ B[i]‖_F²` without the matrix: `Σᵢⱼ ⟨Aᵢ, Aⱼ⟩ ⟨Bᵢ, Bⱼ⟩`."""
    return ((A.flatten(1) @ A.flatten(1).T) * (B.flatten(1) @ B.flatten(1).T)).sum()


def rearrange(W: torch.Tensor, a_shape: tuple[int, int]) -> torch.Tensor:
    """Van Loan–Pitsianis rearrangement `R(W) (a1*a2, b1*b2)`: row `(i, j)` is the `(i, j)` block of `W`
    flattened, so `R(A ⊗ B) = vec(A) vec(B)ᵀ` and `R(Σᵢ Aᵢ ⊗ Bᵢ)` has rank at most `k`."""
    (a1, a2), (out_features, in_features) = a_shape, W.shape
    b1, b2 = out_features // a1, in_features // a2
    return W.reshape(a1, b1, a2, b2).permute(0, 2, 1, 3).reshape(a1 * a2, b1 * b2)


def nearest_kron_sum(W: torch.Tensor, a_shape: tuple[int, int], k: int):
    """The `k`-term `Σᵢ Aᵢ ⊗ Bᵢ` nearest `W` in Frobenius norm, `A (k, a1, a2)`, `B (k, b1, b2)`, and all
    singular values `σ` of `R(W)`: the error is `sqrt(Σ_{i>=k} σᵢ²)`. `Aᵢ = √σᵢ uᵢ`, `Bᵢ = √σᵢ vᵢ` (balanced).
    Computed in float64; needs `k <= min(a1*a2, b1*b2)` (the rank of `R(W)` at most)."""
    a1, a2 = a_shape
    b1, b2 = W.shape[0] // a1, W.shape[1] // a2
    if k > min(a1 * a2, b1 * b2):
        raise ValueError(f"a {k}-term Kronecker sum of A ({a1}, {a2}) and B ({b1}, {b2}) factors is over-complete: "
                         f"at most min(a1*a2, b1*b2) = {min(a1 * a2, b1 * b2)} terms are independent; lower rank")
    U, S, Vh = torch.linalg.svd(rearrange(W.detach().to(torch.float64), a_shape), full_matrices=False)
    root = S[:k].sqrt()
    A = (U[:, :k] * root).T.reshape(k, a1, a2)
    B = (Vh[:k].T * root).T.reshape(k, b1, b2)
    return A, B, S


# -- SVD of a Kronecker product (sum) without the matrix ----------------------------------------------


def kron_svd(A: torch.Tensor, B: torch.Tensor, K: int):
    """Top-`K` SVD `(U (a1*b1, K), S (K), Vh (K, a2*b2))` of `A ⊗ B` from the SVDs of `A` and `B`: its
    singular triplets are `(u_A ⊗ u_B, σ_A·σ_B, v_A ⊗ v_B)`; `K` may be at most `min(a1,a2)·min(b1,b2)`."""
    Ua, Sa, Vha = torch.linalg.svd(A, full_matrices=False)
    Ub, Sb, Vhb = torch.linalg.svd(B, full_matrices=False)
    S, order = torch.outer(Sa, Sb).flatten().topk(K)
    i, j = order // Sb.numel(), order % Sb.numel()
    U = (Ua[:, i].unsqueeze(1) * Ub[:, j].unsqueeze(0)).reshape(-1, K)  # column t: Ua[:, i_t] ⊗ Ub[:, j_t]
    Vh = (Vha[i].unsqueeze(2) * Vhb[j].unsqueeze(1)).reshape(K, -1)
    return U, S, Vh


def kron_sum_svd(A: torch.Tensor, B: torch.Tensor, K: int, oversample: int = 10, n_iter: int = 4,
                 generator: torch.Generator | None = None):
    """Top-`K` SVD of `Σᵢ A[i] ⊗ B[i]` by a randomised range finder (Halko et al.) whose every product with
    the matrix is a `kron_sum_linear` (`(ΣAᵢ⊗Bᵢ)ᵀ = ΣAᵢᵀ⊗Bᵢᵀ`): the dense matrix is never formed. Exact
    (to rounding) when the sketch `K + oversample` reaches the matrix's rank; at the full width, one pass."""
    (_, a1, a2), (_, b1, b2) = A.shape, B.shape
    At, Bt = A.transpose(1, 2), B.transpose(1, 2)
    apply = lambda X: kron_sum_linear(X.T, A, B).T  # noqa: E731  (ΣAᵢ⊗Bᵢ) X
    apply_t = lambda Y: kron_sum_linear(Y.T, At, Bt).T  # noqa: E731  (ΣAᵢ⊗Bᵢ)ᵀ Y
    sketch = min(K + oversample, a1 * b1, a2 * b2)
    Q = torch.linalg.qr(apply(torch.randn(a2 * b2, sketch, dtype=A.dtype, generator=generator))).Q
    full = sketch == min(a1 * b1, a2 * b2)  # Q already holds the whole range: power iterations add nothing
    for _ in range(0 if full else n_iter):
        Q = torch.linalg.qr(apply(torch.linalg.qr(apply_t(Q)).Q)).Q
    Ub, S, Vh = torch.linalg.svd(apply_t(Q).T, full_matrices=False)  # Qᵀ (ΣAᵢ⊗Bᵢ) = Ub S Vh
    return (Q @ Ub)[:, :K], S[:K], Vh[:K]
