"""The Kronecker math against the obvious reference, `torch.kron`."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from kronpeft import kron_linear, kron_shapes, kron_vectors
from kronpeft.kron import _b_first

dims = st.integers(min_value=1, max_value=7)
lead_shapes = st.lists(st.integers(min_value=1, max_value=4), min_size=0, max_size=3)


def reference(x, A, B):
    return x @ torch.kron(A, B).T


def draw_operands(a1, a2, b1, b2, lead, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, a2 * b2, generator=g, dtype=dtype)
    A = torch.randn(a1, a2, generator=g, dtype=dtype)
    B = torch.randn(b1, b2, generator=g, dtype=dtype)
    return x, A, B


@settings(max_examples=150, deadline=None)
@given(dims, dims, dims, dims, lead_shapes, st.integers(0, 2**31 - 1))
def test_kron_linear_matches_torch_kron_float32(a1, a2, b1, b2, lead, seed):
    x, A, B = draw_operands(a1, a2, b1, b2, lead, torch.float32, seed)
    got, want = kron_linear(x, A, B), reference(x, A, B)
    assert got.shape == (*lead, a1 * b1)
    assert got.dtype == torch.float32
    assert torch.linalg.norm(got - want) <= 1e-5 * torch.linalg.norm(want) + 1e-6


# which of (x, A, B) require a gradient: each subset autograd can ask `_KronLinear.backward` for
GRAD_MASKS = [(True, True, True), (False, True, True), (True, False, False), (False, True, False), (False, False, True)]


@settings(max_examples=40, deadline=None)
@given(dims, dims, dims, dims, lead_shapes, st.sampled_from(GRAD_MASKS), st.integers(0, 2**31 - 1))
def test_kron_linear_gradients_exact_float64(a1, a2, b1, b2, lead, mask, seed):
    x, A, B = draw_operands(a1, a2, b1, b2, lead, torch.float64, seed)
    for t, wanted in zip((x, A, B), mask):
        t.requires_grad_(wanted)
    assert torch.autograd.gradcheck(kron_linear, (x, A, B))
    # and the gradients equal the reference's
    g = torch.randn(*lead, a1 * b1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    asked = [t for t, wanted in zip((x, A, B), mask) if wanted]
    got = torch.autograd.grad(kron_linear(x, A, B), asked, g)
    want = torch.autograd.grad(reference(x, A, B), asked, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


class MatmulRecorder(TorchDispatchMode):
    """The names of the matrix products that run, in order."""

    def __init__(self):
        super().__init__()
        self.products = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("mm", "bmm"):
            self.products.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# Multiply-adds per token of forward + backward (see `_b_first`), worked out by hand:
#   B first 4·a2·b1·b2 + 3·a1·a2·b1,  A first 4·a1·a2·b2 + 3·a1·b1·b2
@pytest.mark.parametrize("shapes, b_first", [
    (((2, 96), (384, 4)), False),  # B first 589,824 + 221,184 = 811,008; A first 3,072 + 9,216 = 12,288
    (((96, 2), (4, 384)), True),  # B first 12,288 + 2,304 = 14,592; A first 294,912 + 442,368 = 737,280
    (((24, 24), (32, 32)), False),  # B first 98,304 + 55,296 = 153,600; A first 73,728 + 73,728 = 147,456
    (((32, 32), (24, 24)), True),  # B first 73,728 + 73,728 = 147,456; A first 98,304 + 55,296 = 153,600
    (((1, 1), (5, 3)), False),  # B first 60 + 15 = 75; A first 12 + 45 = 57
])
def test_kron_linear_both_contraction_orders(shapes, b_first):
    """The cost model picks the cheaper order, that order is the one that runs, and both are exact."""
    (a1, a2), (b1, b2) = shapes
    assert _b_first(a1, a2, b1, b2) is b_first
    x, A, B = draw_operands(a1, a2, b1, b2, (3, 5), torch.float64, 0)
    recorder = MatmulRecorder()
    with recorder:
        got = kron_linear(x, A, B)
    # B first: `X Bᵀ` is one mm over all rows, then a bmm against A; A first: the bmm, then the mm
    assert recorder.products == (["mm", "bmm"] if b_first else ["bmm", "mm"])
    torch.testing.assert_close(got, reference(x, A, B), rtol=1e-12, atol=1e-12)


def test_kron_linear_non_contiguous_input():
    x, A, B = draw_operands(4, 6, 3, 5, (5, 7), torch.float64, 2)
    xt = x.transpose(0, 1)  # (7, 5, 30), not contiguous
    torch.testing.assert_close(kron_linear(xt, A, B), reference(xt, A, B))


def test_kron_linear_wrong_width_names_shapes():
    with pytest.raises(ValueError, match=r"x has 10 features.*a2\*b2 = 12"):
        kron_linear(torch.zeros(2, 10), torch.zeros(3, 3), torch.zeros(2, 4))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), lead_shapes, st.integers(0, 2**31 - 1))
def test_kron_vectors_is_torch_kron_per_token(p, q, lead, seed):
    g = torch.Generator().manual_seed(seed)
    v, u = torch.randn(*lead, p, generator=g), torch.randn(*lead, q, generator=g)
    got = kron_vectors(v, u)
    flat_v, flat_u = v.reshape(-1, p), u.reshape(-1, q)
    want = torch.stack([torch.kron(a, b) for a, b in zip(flat_v, flat_u)]).reshape(*lead, p * q)
    torch.testing.assert_close(got, want)


def test_kron_shapes_balanced_default():
    assert kron_shapes(768, 768) == ((24, 24), (32, 32))
    assert kron_shapes(3072, 768) == ((48, 24), (64, 32))
    assert kron_shapes(4096, 4096) == ((64, 64), (64, 64))
    assert kron_shapes(7, 5) == ((1, 1), (7, 5))  # primes: only the trivial split


def test_kron_shapes_user_a_shape():
    assert kron_shapes(768, 768, (32, 32)) == ((32, 32), (24, 24))
    assert kron_shapes(3072, 768, (2, 96)) == ((2, 96), (1536, 8))


@pytest.mark.parametrize("a_shape", [(5, 32), (32, 7), (0, 4), (-2, 4)])
def test_kron_shapes_error_names_dims(a_shape):
    with pytest.raises(ValueError, match=r"768 out x 768 in"):
        kron_shapes(768, 768, a_shape)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 512), st.integers(1, 512))
def test_kron_shapes_always_factor(out_features, in_features):
    (a1, a2), (b1, b2) = kron_shapes(out_features, in_features)
    assert a1 * b1 == out_features and a2 * b2 == in_features
