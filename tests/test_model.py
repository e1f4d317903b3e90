"""The adapter life cycle on tiny models of every supported architecture."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, TINY_MODELS, adapter_names, make_model, model_inputs, outputs, randomize_adapters

from kronpeft import AdaKronConfig, BottleneckConfig, KronABConfig, KronAConfig, KronModel, get_model

ARCHS = list(TINY_MODELS)
# The task heads each tiny model trains and saves beside the adapter (written out, not asked of the code):
# module to save -> its tensors. Each adapter trains its own copy, under `<module>.kronpeft.<adapter>.`.
HEADS = {"bert": {"classifier": ["weight", "bias"]},
         "roberta": {"classifier": ["dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"]},
         "mpnet": {"classifier": ["dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"]},
         "distilbert": {"pre_classifier": ["weight", "bias"], "classifier": ["weight", "bias"]},
         "t5": {}, "gpt2": {}, "llama": {}}


def head_names(arch, adapter="default"):
    return {f"base_model.{module}.kronpeft.{adapter}.{tensor}" for module, tensors in HEADS[arch].items()
            for tensor in tensors}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", list(CONFIGS))
def test_outputs_unchanged_at_step_zero(arch, method):
    base = make_model(arch)
    inputs = model_inputs(base)
    want = outputs(base, inputs)
    got = outputs(get_model(copy.deepcopy(base), CONFIGS[method]()), inputs)
    if method == "adakron":  # the authors' N(0, 0.02) init: near, not exactly, the identity
        assert not torch.equal(got, want)
        torch.testing.assert_close(got, want, rtol=0, atol=5e-3)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", list(CONFIGS))
def test_one_step_moves_exactly_the_adapter_and_head(arch, method):
    model = get_model(make_model(arch), CONFIGS[method]())
    randomize_adapters(model)  # from the zero-initialised factors some gradients are zero by construction
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapter_names(model) | head_names(arch)  # the head: the adapter's own copy
    assert model.modules_to_save == list(HEADS[arch])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # no weight decay: AdamW's decay moves every parameter it holds, even one whose gradient is zero
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model(**model_inputs(model.base_model)).logits.square().mean().backward()
    without_gradient = sorted(n for n, p in model.named_parameters() if n in trainable and not p.grad.any())
    assert not without_gradient
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    optimizer.step()
    assert {n for n, p in model.named_parameters() if not torch.equal(p, before[n])} == trainable


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_unload_equals_unmerged(arch):
    base = make_model(arch)
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    inputs = model_inputs(base)
    model = get_model(base, KronAConfig(scale=0.5))
    randomize_adapters(model)
    want = outputs(model, inputs)
    assert not torch.allclose(want, outputs(make_model(arch), inputs))  # the adapter does something

    model.merge_adapter()
    torch.testing.assert_close(outputs(model, inputs), want, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    for key, value in base_weights.items():  # the original weights come back bit for bit
        assert torch.equal(model.base_model.state_dict()[key], value), key
    assert torch.equal(outputs(model, inputs), want)

    plain = model.merge_and_unload()
    assert type(plain) is type(make_model(arch))
    assert not any(".kronpeft" in k for k in plain.state_dict())
    torch.testing.assert_close(outputs(plain, inputs), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])  # nn.Linear, and GPT-2's Conv1D with its (in, out) weight
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merge_and_disable_restore_weights_bit_exactly(arch, dtype):
    base = make_model(arch).to(dtype)
    inputs = model_inputs(base)
    plain = outputs(base, inputs)
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_model(base, KronAConfig(scale=0.1))
    randomize_adapters(model)
    model.merge_adapter()
    merged = {k: model.base_model.state_dict()[k].clone() for k in base_weights}
    assert any(not torch.equal(merged[k], base_weights[k]) for k in base_weights)
    for _ in range(3):  # each `with disable_adapter()` unmerges and merges again
        with model.disable_adapter():
            assert torch.equal(outputs(model, inputs), plain)
        for key, value in merged.items():
            assert torch.equal(model.base_model.state_dict()[key], value), key
    model.unmerge_adapter()
    for key, value in base_weights.items():
        assert torch.equal(model.base_model.state_dict()[key], value), key


def test_set_adapter_unmerges_the_merged_adapter():
    base = make_model("bert")
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    inputs = model_inputs(base)
    model = get_model(base, KronAConfig(), "first")
    model.add_adapter("second", KronAConfig(target_modules=["query", "key"]))  # one layer shared, one not
    randomize_adapters(model)
    model.set_adapter("second")
    want = outputs(model, inputs)
    model.set_adapter("first")
    model.merge_adapter()
    with pytest.warns(UserWarning, match="'first' is merged into the weights; unmerging it before activating 'second'"):
        model.set_adapter("second")
    assert torch.equal(outputs(model, inputs), want)
    for key, value in base_weights.items():  # the original head too: each adapter trains its own copy
        assert torch.equal(model.base_model.state_dict()[key], value), key


@pytest.mark.parametrize("method", ["kronab", "kronab-res", "adakron", "bottleneck"])
def test_non_mergeable_methods_say_why(method):
    model = get_model(make_model("bert"), CONFIGS[method]())
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["krona", "kronab-res", "adakron", "bottleneck"])
def test_save_then_load_into_fresh_base_is_identical(arch, method, tmp_path):
    model = get_model(make_model(arch), CONFIGS[method]())
    randomize_adapters(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a trained head, unlike the fresh model's: loading must restore it
        for name in HEADS[arch]:  # the adapter's own copy is what trains and what is saved
            for p in model.base_model.get_submodule(f"{name}.kronpeft.default").parameters():
                p.add_(torch.randn(p.shape, generator=g))
    inputs = model_inputs(model.base_model)
    want = outputs(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert saved == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = make_model(arch)  # same seed: same base weights, a fresh object
    loaded = KronModel.from_pretrained(fresh, tmp_path / "adapter")
    assert torch.equal(outputs(loaded, inputs), want)


FFN_ARCHS = ["bert", "t5", "gpt2", "llama"]  # a block split over two modules (BERT), and one module


def written_ffn(arch, model):
    """`(first module, last module, FFN)` of the first feed-forward block, `FFN(x)` written out from its weights."""
    if arch == "bert":
        layer = model.bert.encoder.layer[0]
        up, down = layer.intermediate.dense, layer.output.dense
        block = lambda x: F.linear(F.gelu(F.linear(x, up.weight, up.bias)), down.weight, down.bias)  # noqa: E731
        return layer.intermediate, down, block
    if arch == "t5":
        block = model.encoder.block[0].layer[1].DenseReluDense
        return block, block, lambda x: F.relu(x @ block.wi.weight.T) @ block.wo.weight.T
    if arch == "gpt2":  # Conv1D: y = x W + b with W (in, out); gelu_new is the tanh approximation
        mlp = model.transformer.h[0].mlp
        hidden = lambda x: F.gelu(x @ mlp.c_fc.weight + mlp.c_fc.bias, approximate="tanh")  # noqa: E731
        return mlp, mlp, lambda x: hidden(x) @ mlp.c_proj.weight + mlp.c_proj.bias
    mlp = model.model.layers[0].mlp
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    return mlp, mlp, lambda x: (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


@pytest.mark.parametrize("arch", FFN_ARCHS)
@pytest.mark.parametrize("residual", [False, True])
def test_kronab_is_ffn_plus_kronecker_term(arch, residual):
    """KronA^B(_res) on random factors: `FFN(x) + s·x(A ⊗ B)ᵀ [+ s_res·x]`, A ⊗ B from `torch.kron`."""
    model = get_model(make_model(arch), KronABConfig(scale=0.5, residual=residual))
    randomize_adapters(model)
    first, last, ffn = written_ffn(arch, model.base_model)
    seen = {}
    first.register_forward_pre_hook(lambda module, args: None if "x" in seen else seen.update(x=args[0]))
    last.register_forward_hook(lambda module, args, out: None if "y" in seen else seen.update(y=out))
    outputs(model, model_inputs(model.base_model))
    adapter = last.kronpeft["default"]
    x = seen["x"]
    term = 0.5 * x @ torch.kron(adapter.A, adapter.B).T
    assert term.abs().max() > 0.1  # the adapter's own term is far from zero
    want = ffn(x) + term + (adapter.s_res * x if residual else 0)
    torch.testing.assert_close(seen["y"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["adakron", "bottleneck"])
@pytest.mark.parametrize("owner", ["output.dense", "attention.output.dense"])
def test_sequential_adapters_follow_their_formulas(method, owner):
    """On random weights, at a BERT FFN and attention output `y = W x + b`:
    bottleneck `y + W_up gelu(W_down y + b_down) + b_up`; AdaKron the same with `z = v ⊗ u`,
    `u = W1 y + b1`, `v = W2 y + b2`, per token, in place of `W_down y + b_down`."""
    model = get_model(make_model("bert"), CONFIGS[method]())  # positions ffn and attn
    randomize_adapters(model)
    linear = model.base_model.bert.encoder.layer[0].get_submodule(owner)
    seen = {}
    linear.register_forward_hook(lambda module, args, out: None if seen else seen.update(x=args[0], got=out))
    outputs(model, model_inputs(model.base_model))
    adapter = linear.kronpeft["default"]
    x, got = seen["x"], seen["got"]
    y = x @ linear.weight.T + linear.bias
    if method == "bottleneck":
        z = y @ adapter.down.weight.T + adapter.down.bias
    else:
        u = (y @ adapter.u.weight.T + adapter.u.bias).reshape(-1, adapter.u.out_features)
        v = (y @ adapter.v.weight.T + adapter.v.bias).reshape(-1, adapter.v.out_features)
        z = torch.stack([torch.kron(v_t, u_t) for v_t, u_t in zip(v, u)]).reshape(*y.shape[:-1], -1)
    update = F.gelu(z) @ adapter.up.weight.T + adapter.up.bias
    assert update.abs().max() > 0.1
    torch.testing.assert_close(got, y + update, rtol=1e-5, atol=1e-5)


def test_saved_file_holds_adapter_and_head_only(tmp_path):
    from safetensors.torch import load_file

    model = get_model(make_model("bert"), KronAConfig())
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {k for k in keys if ".kronpeft." in k or k.startswith("classifier.")}
    assert {"classifier.weight", "classifier.bias"} <= keys
    assert len(keys) == 2 * 2 * 2 + 2  # 2 layers x (query, value) x (A, B) + head


def test_two_adapters_switch_and_disable():
    base = make_model("llama")
    inputs = model_inputs(base)
    plain = outputs(base, inputs)
    model = get_model(base, KronAConfig(), "first")
    model.add_adapter("second", AdaKronConfig(r=8))
    randomize_adapters(model)
    assert model.active_adapter == "first"
    out_first = outputs(model, inputs)
    model.set_adapter("second")
    out_second = outputs(model, inputs)
    assert not torch.allclose(out_first, out_second)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".first." in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".second." in n)
    model.set_adapter("first")
    assert torch.equal(outputs(model, inputs), out_first)
    with model.disable_adapter():
        assert torch.equal(outputs(model, inputs), plain)
    model.merge_adapter()
    with model.disable_adapter():
        assert torch.equal(outputs(model, inputs), plain)
    torch.testing.assert_close(outputs(model, inputs), out_first, rtol=1e-5, atol=1e-5)
    model.delete_adapter("first")
    assert model.active_adapter == "second"
    assert torch.equal(outputs(model, inputs), out_second)
    model.delete_adapter("second")
    assert not any(".kronpeft" in k for k in model.state_dict())
    assert torch.equal(outputs(model, inputs), plain)


def test_load_second_adapter_from_disk(tmp_path):
    model = get_model(make_model("bert"), KronAConfig(modules_to_save=[]))
    randomize_adapters(model)
    inputs = model_inputs(model.base_model)
    want = outputs(model, inputs)
    model.save_pretrained(tmp_path)
    other = get_model(make_model("bert"), BottleneckConfig(r=4, modules_to_save=[]), "other")
    other.load_adapter(tmp_path, "krona")
    other.set_adapter("krona")
    assert torch.equal(outputs(other, inputs), want)


def test_model_forward_is_the_base_models():
    model = get_model(make_model("gpt2"), KronAConfig(scale=10.0))  # strong enough to change the tokens
    randomize_adapters(model)
    assert model.config is model.base_model.config  # attributes fall through to the base model
    prompt = torch.tensor([[5, 6, 7]])
    out = model.generate(prompt, max_new_tokens=3, do_sample=False)  # with the key-value cache
    ids = prompt
    for _ in range(3):  # greedy decoding by hand, through the adapted forward, without a cache
        ids = torch.cat([ids, outputs(model, {"input_ids": ids})[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)
    assert not torch.equal(out, make_model("gpt2").generate(prompt, max_new_tokens=3, do_sample=False))


def test_modules_to_save_empty_counts_adapter_parameters_only():
    model = get_model(make_model("bert"), KronAConfig(modules_to_save=[]))
    d, ff, vocab, positions, layers, labels = 32, 64, 100, 512, 2, 3
    embeddings = (vocab + positions + 2) * d + 2 * d  # word, position, token-type embeddings; LayerNorm
    layer = 4 * (d * d + d) + 2 * d + (d * ff + ff) + (ff * d + d) + 2 * d  # q, k, v, o; LN; FFN up, down; LN
    base = embeddings + layers * layer + (d * d + d) + (d * labels + labels)  # + pooler + classifier
    krona = layers * 2 * (4 * 4 + 8 * 8)  # 2 layers x (query, value) x (A 4x4 + B 8x8) for d=32
    assert model.trainable_parameters() == (krona, base + krona)
