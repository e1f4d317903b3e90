"""The adapter life cycle on tiny models of every supported architecture."""
import copy

import pytest
import torch
from conftest import TINY_MODELS, make_model, model_inputs, outputs

from kronpeft import AdaKronConfig, BottleneckConfig, KronABConfig, KronAConfig, KronModel, get_model

CONFIGS = {
    "krona": lambda: KronAConfig(),
    "kronab": lambda: KronABConfig(),
    "kronab-res": lambda: KronABConfig(residual=True),
    "adakron": lambda: AdaKronConfig(r=8, positions=("ffn", "attn"), init="paper"),
    "adakron-zero": lambda: AdaKronConfig(r=8, init="zero"),
    "bottleneck": lambda: BottleneckConfig(r=8, positions=("ffn", "attn")),
}
ARCHS = list(TINY_MODELS)


def randomize_adapters(kron_model, seed=1):
    """Give every adapter tensor random values, so a zero-initialised factor cannot hide a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in kron_model.named_parameters():
            if ".kronpeft." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def adapter_names(kron_model):
    return {n for n, _ in kron_model.named_parameters() if ".kronpeft." in n}


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
def test_one_step_moves_only_adapter_and_saved_parameters(arch, method):
    model = get_model(make_model(arch), CONFIGS[method]())
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapter_names(model) == trainable  # adapters and the adapter's own copies of modules_to_save
    for m in model.modules_to_save:
        assert any(n.startswith(f"base_model.{m}.kronpeft.default.") for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**model_inputs(model.base_model)).logits.square().mean().backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable
    assert moved & adapter_names(model)


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
    for key, value in base_weights.items():
        torch.testing.assert_close(model.base_model.state_dict()[key], value, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outputs(model, inputs), want, rtol=1e-6, atol=1e-6)

    plain = model.merge_and_unload()
    assert type(plain) is type(make_model(arch))
    assert not any(".kronpeft" in k for k in plain.state_dict())
    torch.testing.assert_close(outputs(plain, inputs), want, rtol=1e-5, atol=1e-5)


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
    inputs = model_inputs(model.base_model)
    want = outputs(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = make_model(arch)  # same seed: same base weights, a fresh object
    loaded = KronModel.from_pretrained(fresh, tmp_path / "adapter")
    assert torch.equal(outputs(loaded, inputs), want)


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
        torch.testing.assert_close(outputs(model, inputs), plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs(model, inputs), out_first, rtol=1e-5, atol=1e-5)
    model.delete_adapter("first")
    assert model.active_adapter == "second"
    torch.testing.assert_close(outputs(model, inputs), out_second, rtol=1e-5, atol=1e-5)
    model.delete_adapter("second")
    assert not any(".kronpeft" in k for k in model.state_dict())
    torch.testing.assert_close(outputs(model, inputs), plain, rtol=1e-5, atol=1e-5)


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
    model = get_model(make_model("gpt2"), KronAConfig())
    assert model.config is model.base_model.config  # attributes fall through to the base model
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_modules_to_save_empty_counts_adapter_parameters_only():
    model = get_model(make_model("bert"), KronAConfig(modules_to_save=[]))
    trainable, total = model.trainable_parameters()
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if ".kronpeft." in n)
    assert trainable == 2 * 2 * (4 * 4 + 8 * 8)  # 2 layers x (query, value) x (A 4x4 + B 8x8) for d=32
    assert total == sum(p.numel() for p in model.parameters())
