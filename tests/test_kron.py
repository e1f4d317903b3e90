"""The Kronecker math against the obvious reference, `torch.kron`."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kronpeft import kron_linear, kron_shapes, kron_vectors

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


@settings(max_examples=40, deadline=None)
@given(dims, dims, dims, dims, lead_shapes, st.integers(0, 2**31 - 1))
def test_kron_linear_gradients_exact_float64(a1, a2, b1, b2, lead, seed):
    x, A, B = draw_operands(a1, a2, b1, b2, lead, torch.float64, seed)
    for t in (x, A, B):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(kron_linear, (x, A, B))
    # and the gradients equal the reference's
    g = torch.randn(*lead, a1 * b1, dtype=torch.float64)
    got = torch.autograd.grad(kron_linear(x, A, B), (x, A, B), g)
    want = torch.autograd.grad(reference(x, A, B), (x, A, B), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shapes", [((2, 96), (384, 4)), ((96, 2), (4, 384)), ((24, 24), (32, 32)), ((1, 1), (5, 3))])
def test_kron_linear_both_contraction_orders(shapes):
    """Skewed factors take the other contraction order; both must be exact."""
    (a1, a2), (b1, b2) = shapes
    x, A, B = draw_operands(a1, a2, b1, b2, (3, 5), torch.float64, 0)
    torch.testing.assert_close(kron_linear(x, A, B), reference(x, A, B), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kron_linear_half_precision_stays_in_dtype(dtype):
    x, A, B = draw_operands(8, 6, 4, 5, (2, 3), torch.float32, 1)
    got = kron_linear(x.to(dtype), A.to(dtype), B.to(dtype))
    assert got.dtype == dtype
    want = reference(x, A, B)
    assert torch.linalg.norm(got.float() - want) <= 2e-2 * torch.linalg.norm(want)


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
