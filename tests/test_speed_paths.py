"""The fast paths of the adapter: torch.compile, dtypes, no needless copies, what autograd keeps."""
import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BertConfig, BertModel

import kronpeft
from kronpeft import kron_linear
from kronpeft.layers import KronDelta

# (a1, a2), (b1, b2): balanced, and skewed both ways so both contraction orders run
FACTORS = [((4, 6), (5, 3)), ((2, 12), (9, 2)), ((12, 2), (2, 9))]


def tiny_bert_with_krona():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = kronpeft.get_model(BertModel(config), kronpeft.KronAConfig(target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(std=0.1)  # B starts at zero; make the adapter do something
    return model


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_fullgraph_matches_eager_forward_and_backward(fresh_dynamo):
    model = tiny_bert_with_krona()
    ids = torch.randint(0, 64, (2, 10))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    outputs, grads = [], []
    for run in (model, compiled):
        model.zero_grad(set_to_none=True)
        out = run(input_ids=ids).last_hidden_state
        out.pow(2).mean().backward()
        outputs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(outputs[1], outputs[0])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want)


def test_compile_does_not_recompile_per_sequence_length(fresh_dynamo):
    model = tiny_bert_with_krona().eval()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=None)
    with torch.no_grad():
        for length in (8, 12):  # the first length compiles static, the second marks it dynamic
            compiled(input_ids=torch.randint(0, 64, (2, length)))
        settled = counter.frame_count
        for length in (16, 23, 40):
            out = compiled(input_ids=torch.randint(0, 64, (2, length))).last_hidden_state
            assert out.shape == (2, length, 32)
    assert settled <= 2
    assert counter.frame_count == settled, "a new sequence length recompiled the model"


class DtypeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.dtypes.add(t.dtype)
        return out


def seeded_delta(out_features, in_features, dtype=None, seed=0):
    """A `KronDelta` whose `A` and `B` are drawn from a seeded generator (B is no longer zero)."""
    delta = KronDelta(out_features, in_features, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (delta.A, delta.B):
            p.copy_(torch.randn(p.shape, generator=g))
    return delta


def seeded_randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_in_dtype_through_forward_and_backward(dtype):
    delta = seeded_delta(24, 30, dtype)
    x = seeded_randn(3, 5, 30, seed=1, dtype=dtype).requires_grad_(True)
    y = seeded_randn(3, 5, 24, seed=2, dtype=dtype)
    recorder = DtypeRecorder()
    with recorder:
        out = delta(x, y)
        out.sum().backward()
    assert out.dtype == dtype and x.grad.dtype == dtype and delta.A.grad.dtype == dtype
    assert recorder.dtypes == {dtype}, f"the adapter computed in {recorder.dtypes}"
    want = y.float() + x.detach().float() @ torch.kron(delta.A.float(), delta.B.float()).T  # fp32 reference
    assert torch.linalg.norm(out.detach().float() - want) <= 2e-2 * torch.linalg.norm(want)


def test_fp32_adapter_on_bf16_input_returns_bf16():
    delta = seeded_delta(24, 30)  # fp32 factors: the user asked for fp32 adapters
    x, y = seeded_randn(4, 30, seed=1, dtype=torch.bfloat16), seeded_randn(4, 24, seed=2, dtype=torch.bfloat16)
    with torch.no_grad():
        out = delta(x, y)
        want = y.float() + x.float() @ torch.kron(delta.A, delta.B).T
    assert out.dtype == torch.bfloat16
    assert torch.linalg.norm(out.float() - want) <= 1e-2 * torch.linalg.norm(want)


def test_dropout_zero_passes_the_input_itself(monkeypatch):
    delta = KronDelta(24, 30, dropout=0.0)
    assert isinstance(delta.dropout, nn.Identity)
    seen = []

    def spy(x, A, B):
        seen.append(x.data_ptr())
        return kron_linear(x, A, B)

    monkeypatch.setattr("kronpeft.layers.kron_linear", spy)
    x = seeded_randn(4, 30, seed=0)
    delta(x, torch.zeros(4, 24))
    assert seen == [x.data_ptr()]


@pytest.mark.parametrize("factors", FACTORS)
def test_autograd_keeps_only_x_a_b(factors):
    """No activation-sized intermediate is saved for backward (it is recomputed), like LoRA."""
    (a1, a2), (b1, b2) = factors
    x = seeded_randn(64, a2 * b2, seed=0).requires_grad_(True)
    A, B = seeded_randn(a1, a2, seed=1).requires_grad_(True), seeded_randn(b1, b2, seed=2).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = kron_linear(x, A, B)
    assert sum(t.numel() for t in saved) <= x.numel() + A.numel() + B.numel()
    want = x @ torch.kron(A, B).T
    torch.testing.assert_close(y, want)
