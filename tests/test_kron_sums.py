"""Sums of Kronecker products (`KronAConfig(rank=k)`), the Kronecker-SVD initialisation (`init="kpsvd"`) and
`match_budget`, against the obvious references: `Σ torch.kron(Aᵢ, Bᵢ)` and a rearrangement built by loops."""
import json

import pytest
import torch
import transformers as T
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_model, model_inputs, outputs, randomize_adapters
from kronpeft import KronAConfig, KronModel, get_model
from kronpeft.runner import baselines
from kronpeft.budget import match_budget
from kronpeft.runner.cli import main
from kronpeft.interop import to_peft
from kronpeft.kron import kron_sum_linear, kron_sum_matrix, kron_sum_norm2, nearest_kron_sum, rearrange
from kronpeft.layers import KronDelta

pytestmark = pytest.mark.usefixtures("one_thread")
dims = st.integers(1, 6)
terms = st.integers(1, 4)
lead_shapes = st.lists(st.integers(1, 4), min_size=0, max_size=2)


def dense(A, B):
    return sum(torch.kron(a, b) for a, b in zip(A, B))


def operands(k, a1, a2, b1, b2, lead, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*lead, a2 * b2, generator=g, dtype=dtype), torch.randn(k, a1, a2, generator=g, dtype=dtype),
            torch.randn(k, b1, b2, generator=g, dtype=dtype))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@settings(max_examples=80, deadline=None)
@given(terms, dims, dims, dims, dims, lead_shapes, st.integers(0, 2**31 - 1))
def test_kron_sum_linear_and_matrix_match_torch_kron(dtype, tol, k, a1, a2, b1, b2, lead, seed):
    x, A, B = operands(k, a1, a2, b1, b2, lead, dtype, seed)
    want = x @ dense(A, B).T
    got = kron_sum_linear(x, A, B)
    assert got.shape == (*lead, a1 * b1) and got.dtype == dtype
    assert torch.linalg.norm(got - want) <= tol * (torch.linalg.norm(want) + 1)
    torch.testing.assert_close(kron_sum_matrix(A, B), dense(A, B), rtol=tol, atol=tol)
    torch.testing.assert_close(kron_sum_norm2(A, B), dense(A, B).square().sum(), rtol=tol * 10, atol=tol * 10)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 4), dims, dims, dims, dims, lead_shapes, st.integers(0, 2**31 - 1))
def test_kron_sum_linear_gradients_match_torch_kron_float64(k, a1, a2, b1, b2, lead, seed):
    x, A, B = operands(k, a1, a2, b1, b2, lead, torch.float64, seed)
    for t in (x, A, B):
        t.requires_grad_(True)
    g = torch.randn(*lead, a1 * b1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    got = torch.autograd.grad(kron_sum_linear(x, A, B), (x, A, B), g)
    want = torch.autograd.grad(x @ dense(A, B).T, (x, A, B), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shapes", [((2, 24), (48, 3)), ((24, 2), (3, 48))])  # one per contraction order
def test_kron_sum_linear_both_orders(shapes):
    (a1, a2), (b1, b2) = shapes
    x, A, B = operands(3, a1, a2, b1, b2, (5,), torch.float64, 0)
    torch.testing.assert_close(kron_sum_linear(x, A, B), x @ dense(A, B).T)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("init", ["zero", "kpsvd"])
def test_kron_delta_forward_backward_merge(dtype, k, init):
    g = torch.Generator().manual_seed(k)
    W = torch.randn(12, 20, generator=g, dtype=torch.float64)
    layer = KronDelta(12, 20, (3, 4), scale=0.7, dtype=dtype, rank=k, init=init, weight=W if init == "kpsvd" else None)
    assert layer.A.shape == ((3, 4) if k == 1 else (k, 3, 4))
    x, y = torch.randn(5, 20, generator=g, dtype=dtype), torch.randn(5, 12, generator=g, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x, y), y, **tol)  # step 0: zero delta
    with torch.no_grad():
        layer.A.add_(torch.randn(layer.A.shape, generator=g, dtype=dtype))
        layer.B.add_(torch.randn(layer.B.shape, generator=g, dtype=dtype))
    A, B = layer.A.view(-1, 3, 4), layer.B.view(-1, 4, 5)
    initial = dense(layer.A0.view(-1, 3, 4), layer.B0.view(-1, 4, 5)) if init == "kpsvd" else 0
    want = dense(A, B) - initial
    torch.testing.assert_close(layer.delta_weight().to(dtype), 0.7 * want, **tol)
    out = layer(x, y)
    torch.testing.assert_close(out, y + 0.7 * x @ want.T, **tol)
    out.square().sum().backward()
    A_ref, B_ref = layer.A.detach().clone().requires_grad_(), layer.B.detach().clone().requires_grad_()
    ref_w = dense(A_ref.view(-1, 3, 4), B_ref.view(-1, 4, 5)) - initial
    (y + 0.7 * x @ ref_w.T).square().sum().backward()
    for got, ref in ((layer.A.grad, A_ref.grad), (layer.B.grad, B_ref.grad)):
        assert torch.linalg.norm(got - ref) <= tol["rtol"] * torch.linalg.norm(ref)
    assert layer.A0 is None or layer.A0.grad is None


def rearrange_by_loops(W, a1, a2):
    b1, b2 = W.shape[0] // a1, W.shape[1] // a2
    return torch.stack([W[i * b1:(i + 1) * b1, j * b2:(j + 1) * b2].flatten() for i in range(a1) for j in range(a2)])


@settings(max_examples=40, deadline=None)
@given(dims, dims, dims, dims, st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_nearest_kron_sum_is_optimal_with_the_tail_as_error(a1, a2, b1, b2, k, seed):
    k = min(k, a1 * a2, b1 * b2)
    W = torch.randn(a1 * b1, a2 * b2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    R = rearrange_by_loops(W, a1, a2)
    torch.testing.assert_close(rearrange(W, (a1, a2)), R)
    A, B, S = nearest_kron_sum(W, (a1, a2), k)
    torch.testing.assert_close(S, torch.linalg.svdvals(R))
    error = torch.linalg.norm(W - dense(A, B))
    torch.testing.assert_close(error, S[k:].square().sum().sqrt(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rearrange(dense(A, B), (a1, a2)), rearrange_by_loops(dense(A, B), a1, a2))
    assert torch.linalg.matrix_rank(rearrange(dense(A, B), (a1, a2))) <= k


def test_nearest_kron_sum_recovers_an_exact_sum():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    B = torch.randn(2, 5, 2, generator=g, dtype=torch.float64)
    A2, B2, S = nearest_kron_sum(dense(A, B), (3, 4), 2)
    torch.testing.assert_close(dense(A2, B2), dense(A, B))
    assert S[2:].abs().max() < 1e-10


def test_rank_k_model_step0_merge_save_load(tmp_path):
    torch.manual_seed(0)
    model = get_model(make_model("bert"), KronAConfig(rank=3, scale=0.5))
    inputs = model_inputs(model)
    with model.disable_adapter():
        base = outputs(model, inputs)
    torch.testing.assert_close(outputs(model, inputs), base)  # every Bᵢ zero
    randomize_adapters(model)
    adapted = outputs(model, inputs)
    assert (adapted - base).abs().max() > 1e-4
    model.merge_adapter()
    torch.testing.assert_close(outputs(model, inputs), adapted, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    model.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["adapter"]["rank"] == 3
    loaded = KronModel.from_pretrained(make_model("bert"), tmp_path / "a")
    torch.testing.assert_close(outputs(loaded, inputs), adapted)


def test_adapter_saved_before_rank_loads_unchanged(tmp_path):
    """A rank-1 adapter keeps its 2-D `A`/`B` tensors, and a config without `rank`/`init` (older kronpeft) loads."""
    model = get_model(make_model("bert"), KronAConfig(scale=0.5))
    randomize_adapters(model)
    inputs = model_inputs(model)
    model.save_pretrained(tmp_path / "a")
    factors = {k: t for k, t in model.adapter_state_dict().items() if k.endswith((".kronpeft.A", ".kronpeft.B"))}
    assert len(factors) == 8 and all(t.dim() == 2 for t in factors.values())
    path = tmp_path / "a" / "adapter_config.json"
    meta = json.loads(path.read_text())
    del meta["adapter"]["rank"], meta["adapter"]["init"]
    path.write_text(json.dumps(meta))
    loaded = KronModel.from_pretrained(make_model("bert"), tmp_path / "a")
    assert loaded.peft_config["default"].rank == 1
    torch.testing.assert_close(outputs(loaded, inputs), outputs(model, inputs))


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_bad_rank_is_refused(value):
    with pytest.raises(ValueError, match=r"KronAConfig\.rank"):
        KronAConfig(rank=value)


def test_bad_init_is_refused():
    with pytest.raises(ValueError, match=r"KronAConfig\.init = 'svd'.*'kpsvd'"):
        KronAConfig(init="svd")


@pytest.mark.parametrize("config", [KronAConfig(rank=2), KronAConfig(init="kpsvd")])
def test_lokr_conversion_refuses_sums_and_kpsvd(tmp_path, config):
    get_model(make_model("bert"), config).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match=r"rank=.*init=.*convert --to lora"):
        to_peft(tmp_path / "a", tmp_path / "p")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kpsvd_starts_at_the_base_model_and_leaves_it_untouched(arch, tmp_path, monkeypatch):
    base_model = make_model(arch)
    inputs = model_inputs(base_model)
    base = outputs(base_model, inputs)
    weights = {k: v.clone() for k, v in base_model.state_dict().items()}
    model = get_model(base_model, KronAConfig(rank=2, init="kpsvd", target_modules="all-linear"))
    torch.testing.assert_close(outputs(model, inputs), base, rtol=1e-5, atol=1e-5)
    site = next(s for _, s in __import__("kronpeft.injection").injection.sites(model.base_model) if "default" in s)
    assert site["default"].A.abs().sum() > 0 and site["default"].A0.requires_grad is False
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    adapted = outputs(model, inputs)
    with model.disable_adapter():
        torch.testing.assert_close(outputs(model, inputs), base)
    model.save_pretrained(tmp_path / "a")
    import kronpeft.layers
    monkeypatch.setattr(kronpeft.layers, "nearest_kron_sum", lambda *a: pytest.fail("loading ran an SVD"))
    loaded = KronModel.from_pretrained(make_model(arch), tmp_path / "a")
    torch.testing.assert_close(outputs(loaded, inputs), adapted)
    plain = model.unload()
    assert all(torch.equal(v, weights[k]) for k, v in plain.state_dict().items())
    torch.testing.assert_close(outputs(plain, inputs), base)


def test_kpsvd_on_a_quantized_weight_is_refused_and_changes_nothing():
    model = make_model("llama")
    q = model.model.layers[0].self_attn.q_proj
    q.weight = torch.nn.Parameter(torch.zeros(q.weight.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.self_attn\.q_proj: init='kpsvd' needs the layer's "
                                         r"dense float weight.*int8"):
        get_model(model, KronAConfig(init="kpsvd", target_modules=["q_proj"]))
    assert not any(".kronpeft" in n for n, _ in model.named_modules())


def minilm_shaped():
    return T.BertForSequenceClassification(T.BertConfig(
        hidden_size=384, num_hidden_layers=2, num_attention_heads=12, intermediate_size=96, vocab_size=50))


def factor_count(kron_model):
    return sum(t.numel() for k, t in kron_model.adapter_state_dict().items() if k.endswith((".A", ".B")))


@pytest.mark.parametrize("r", [1, 3, 12])
def test_match_budget_hits_the_lora_budget(r):
    """384 -> (16, 24) x (24, 16): one term costs 768 = LoRA r=1 on a 384 x 384 layer, so k = r exactly."""
    model = minilm_shaped()
    config, n = match_budget(model, lora_rank=r)
    assert n == r * 2 * 2 * 768 and config.rank == r
    assert factor_count(get_model(model, config)) == n


def test_match_budget_below_or_between_budgets():
    model = minilm_shaped()
    config, n = match_budget(model, params=4000)
    assert 0 < n <= 4000 and n == factor_count(get_model(model, config))
    with pytest.raises(ValueError, match=r"budget of 10 parameters is below the smallest KronA"):
        match_budget(minilm_shaped(), params=10)
    with pytest.raises(ValueError, match=r"exactly one of params= and lora_rank="):
        match_budget(model)
    with pytest.raises(ValueError, match=r"lora_rank=0 must be a positive int"):
        match_budget(model, lora_rank=0)


def test_train_builds_a_kpsvd_sum_and_refuses_rank_for_other_methods(tmp_path, capsys):
    model = baselines.build("krona", make_model("bert"), rank=2, init="kpsvd")
    assert model.peft_config["default"].rank == 2 and model.peft_config["default"].init == "kpsvd"
    assert main(["train", "--method", "lora", "--rank", "2", "--task", "rte", "--output-dir", str(tmp_path)]) == 2
    assert "kronpeft: error: --rank does not apply to --method lora (it applies to krona)" in capsys.readouterr().err


def test_kpsvd_delete_adapter_gives_the_base_model_back():
    model = get_model(make_model("llama"), KronAConfig(target_modules=["q_proj"]), adapter_name="a")
    inputs = model_inputs(model)
    with model.disable_adapter():
        base = outputs(model, inputs)
    model.add_adapter("b", KronAConfig(rank=2, init="kpsvd", target_modules=["q_proj", "o_proj"]))
    model.set_adapter("b")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    assert (outputs(model, inputs) - base).abs().max() > 1e-4
    model.delete_adapter("b")
    model.delete_adapter("a")
    torch.testing.assert_close(outputs(model, inputs), base)


def test_kpsvd_with_more_terms_than_the_rearrangement_has_is_refused():
    """32 x 32 layers, a_shape (2, 2): R(W) is 4 x 256, so at most 4 independent terms."""
    with pytest.raises(ValueError, match=r"query: a 5-term Kronecker sum .* at most min\(a1\*a2, b1\*b2\) = 4"):
        get_model(make_model("bert"), KronAConfig(rank=5, init="kpsvd", a_shape=(2, 2)))
