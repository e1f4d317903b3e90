"""A torchao weight-only quantized frozen base (int8, int4): every method trains its full-precision
adapter and leaves the base as it was; merging into a quantized weight is refused before anything
changes (issue 27)."""
import importlib.util

import pytest
import torch
import transformers as T
from conftest import CONFIGS, adapter_names

from kronpeft import KronAConfig, get_model
from kronpeft.injection import sites
from kronpeft.runner.scale import quantize_base

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                 reason="torchao not installed (pip install 'kronpeft[quant]')")]


def tiny_decoder(hidden=64):
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=100, pad_token_id=0, bos_token_id=0, eos_token_id=0)).train()


IDS = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(1))


def base_logits(model):
    with torch.no_grad(), model.disable_adapter():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_every_method_trains_on_a_quantized_base(kind, method):
    base = tiny_decoder()
    quantized = quantize_base(base, kind)
    assert "model.layers.0.mlp.down_proj" in quantized and "lm_head" not in quantized
    assert type(base.model.layers[0].mlp.down_proj.weight).__name__ != "Parameter"  # really quantized
    model = get_model(base, CONFIGS[method]())
    before = base_logits(model)
    trained = adapter_names(model)
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW([params[n] for n in trained], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
        grads = {n: params[n].grad for n in trained}
        optimizer.zero_grad()
    assert losses[-1] < losses[0], losses
    assert all(g is not None and g.abs().max() > 0 for g in grads.values()), [n for n, g in grads.items()
                                                                          if g is None or not g.abs().max() > 0]
    assert all(p.dtype == torch.float32 for n, p in params.items() if n in trained)
    assert not any(p.requires_grad for n, p in params.items() if n not in trained)
    assert torch.equal(base_logits(model), before)  # the quantized base did not change


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_merging_into_a_quantized_weight_is_refused_and_changes_nothing(kind):
    base = tiny_decoder()
    quantize_base(base, kind)
    model = get_model(base, KronAConfig(target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_()
        before = model(input_ids=IDS).logits
    with pytest.raises(ValueError, match=r"cannot merge adapter 'default': model\.layers\.0\.self_attn\.q_proj\.weight "
                                         r"is quantized \(.*Tensor\).*merge_and_unload"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="is quantized"):
        model.merge_and_unload()
    assert not any(site.merged or site.unmerged_weight is not None for _, site in sites(base))
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, before)


def test_int4_refuses_a_width_the_group_size_does_not_divide():
    base = tiny_decoder(hidden=48)
    before = {n: type(p) for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match=r"quantize int4: model\.layers\.0\.self_attn\.q_proj has 48 input features, "
                                         r"not a multiple of the int4 group size 32; use int8"):
        quantize_base(base, "int4")
    assert {n: type(p) for n, p in base.named_parameters()} == before  # nothing half-converted


def train_steps(model, trained: list, steps: int) -> list[float]:
    """`steps` AdamW steps (lr 1e-2) of the `trained` parameters on the LM loss of IDS; the losses."""
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def bnb_decoder(kind: str):
    """`tiny_decoder()` with its backbone linears swapped for bitsandbytes' (what transformers'
    `BitsAndBytesConfig` loading does), on its CPU backend."""
    import bitsandbytes.nn as bnb

    base = tiny_decoder()
    for layer in base.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in [(n, m) for n, m in parent.named_children() if isinstance(m, torch.nn.Linear)]:
                if kind == "8bit":
                    new = bnb.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False)
                else:
                    new = bnb.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                         compute_dtype=torch.float32, quant_type="nf4")
                new.load_state_dict(linear.state_dict())
                setattr(parent, name, new.to("cpu"))  # .to() quantizes
    return base


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_a_bitsandbytes_base_trains_fp32_adapters(kind):
    base = bnb_decoder(kind)
    assert not base.model.layers[0].mlp.down_proj.weight.dtype.is_floating_point  # int8 / packed uint8
    model = get_model(base, KronAConfig(target_modules="all-linear"))
    trained = [p for n, p in model.named_parameters() if n in adapter_names(model)]
    assert trained and all(p.dtype == torch.float32 for p in trained)  # not the int8/uint8 of the weight
    losses = train_steps(model, trained, steps=3)
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match=r"down_proj\.weight is quantized|q_proj\.weight is quantized"):
        model.merge_adapter()


@pytest.mark.skipif(importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None,
                    reason="optimum-quanto not installed")
@pytest.mark.parametrize("kind", ["qint8", "qint4"])
def test_an_optimum_quanto_base_trains(kind):
    from optimum import quanto

    base = tiny_decoder()
    quanto.quantize(base.model, weights=getattr(quanto, kind))
    quanto.freeze(base.model)
    model = get_model(base, KronAConfig(target_modules="all-linear"))
    before = base_logits(model)
    trained = [p for n, p in model.named_parameters() if n in adapter_names(model)]
    losses = train_steps(model, trained, steps=3)
    assert losses[-1] < losses[0]
    assert torch.equal(base_logits(model), before)
    with pytest.raises(ValueError, match="is quantized"):
        model.merge_adapter()
