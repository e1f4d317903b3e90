"""Mixed precision: every method trains under `torch.autocast` (bf16, fp16) with fp32 adapter weights,
and `kron_linear` under autocast equals the materialised reference under the same autocast."""
import pytest
import torch

from conftest import make_model, model_inputs
from kronpeft import AdaKronConfig, BottleneckConfig, KronABConfig, KronAConfig, get_model, kron_linear

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]
CONFIGS = {
    "krona": lambda: KronAConfig(),
    "kronab": lambda: KronABConfig(),
    "kronab_res": lambda: KronABConfig(residual=True, residual_init=0.1),
    "adakron": lambda: AdaKronConfig(r=8, split=2),
    "bottleneck": lambda: BottleneckConfig(r=8),
}
# bf16 keeps 8 mantissa bits, fp16 11: relative tolerances for one product of that precision
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _close(got, want, dtype):
    return torch.linalg.norm(got.float() - want.float()) <= TOLERANCE[dtype] * torch.linalg.norm(want.float())


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("shapes", [((4, 6), (8, 3)), ((16, 2), (3, 24))], ids=["a-first", "b-first"])
def test_kron_linear_under_autocast_matches_reference(dtype, shapes):
    g = torch.Generator().manual_seed(0)
    (a1, a2), (b1, b2) = shapes
    leaves = [torch.randn(5, 7, a2 * b2, generator=g), torch.randn(a1, a2, generator=g),
              torch.randn(b1, b2, generator=g)]
    results = []
    for fn in (kron_linear, lambda x, A, B: x @ torch.kron(A, B).T):
        x, A, B = (t.clone().requires_grad_(True) for t in leaves)
        with torch.autocast("cpu", dtype=dtype):
            y = fn(x, A, B)
        y.float().square().sum().backward()
        results.append((y, x.grad, A.grad, B.grad))
    (y, gx, gA, gB), (y_ref, gx_ref, gA_ref, gB_ref) = results
    assert y.dtype == y_ref.dtype == dtype  # computes in the autocast dtype, as the reference does
    assert gx.dtype == gA.dtype == gB.dtype == torch.float32  # gradients in each input's dtype
    for got, want in ((y, y_ref), (gx, gx_ref), (gA, gA_ref), (gB, gB_ref)):
        assert _close(got, want, dtype)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("method", list(CONFIGS))
def test_every_method_trains_under_autocast(method, dtype):
    """A training step under autocast: finite loss, fp32 gradients on fp32 adapter weights, logits and
    gradients within tolerance of the fp32 step, and the optimizer moves the weights. (Eval mode: no
    dropout, so the two steps see the same function.)"""
    model = get_model(make_model("bert"), CONFIGS[method]())
    for p in model.parameters():  # non-zero adapter deltas, so the adapters shape the outputs
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    inputs = {**model_inputs(model), "labels": torch.tensor([0, 2])}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    reference = model(**inputs)
    reference.loss.backward()
    reference_grads = {n: p.grad.clone() for n, p in trainable.items()}
    model.zero_grad()
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    with torch.autocast("cpu", dtype=dtype):
        out = model(**inputs)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert _close(out.logits, reference.logits.detach(), dtype)
    for name, p in trainable.items():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
    grads = torch.cat([p.grad.flatten() for p in trainable.values()])
    assert _close(grads, torch.cat([g.flatten() for g in reference_grads.values()]), dtype)
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in trainable.items())


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_base_keeps_fp32_adapters_unless_asked(base_dtype):
    base = make_model("bert").to(base_dtype)
    model = get_model(base, KronAConfig())
    adapter = model.base_model.bert.encoder.layer[0].attention.self.query.kronpeft["default"]
    assert adapter.A.dtype == adapter.B.dtype == torch.float32
    assert model.base_model.bert.encoder.layer[0].attention.self.query.weight.dtype == base_dtype
    inputs = {**model_inputs(model), "labels": torch.tensor([0, 2])}
    loss = model(**inputs).loss  # no autocast: the adapter runs in fp32 and casts its output back
    loss.backward()
    assert adapter.A.grad.dtype == torch.float32

    same = get_model(make_model("bert").to(base_dtype), KronAConfig(), autocast_adapter_dtype=False)
    kept = same.base_model.bert.encoder.layer[0].attention.self.query.kronpeft["default"]
    assert kept.A.dtype == kept.B.dtype == base_dtype


def test_fp32_base_is_untouched_by_autocast_adapter_dtype():
    model = get_model(make_model("bert").to(torch.float64), KronAConfig())
    adapter = model.base_model.bert.encoder.layer[0].attention.self.query.kronpeft["default"]
    assert adapter.A.dtype == torch.float64  # only half bases get fp32 adapters


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_cuda_autocast_training_step(dtype):
    model = get_model(make_model("bert"), KronAConfig()).cuda()
    inputs = {k: v.cuda() for k, v in {**model_inputs(model), "labels": torch.tensor([0, 2])}.items()}
    with torch.autocast("cuda", dtype=dtype):
        loss = model(**inputs).loss
    loss.backward()
    assert torch.isfinite(loss)
