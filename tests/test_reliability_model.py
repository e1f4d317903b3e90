"""§1-§3 of issue 8 on the library: tied weights, train/eval mode, nested disable_adapter, configs
copied at add time, one task head per adapter, the unloaded wrapper, failed calls change nothing,
format_version and meta-device loading."""
import copy
import json

import pytest
import torch
import transformers as T
from conftest import make_model, model_inputs, outputs

from kronpeft import AdaKronConfig, BottleneckConfig, KronABConfig, KronAConfig, KronModel, get_model
from kronpeft.injection import sites


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".kronpeft." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def snapshot(model):
    return (sorted(model.state_dict()), {n for n, p in model.named_parameters() if p.requires_grad},
            outputs(model, model_inputs(model)))


def assert_unchanged(model, before):
    keys, trainable, logits = snapshot(model)
    assert keys == before[0] and trainable == before[1] and torch.equal(logits, before[2])
    assert not sites(model)


# -- §1 silent wrong results -------------------------------------------------------------------------

def test_tied_lm_head_is_refused_at_add_adapter():
    model = make_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to transformer.wte.weight"):
        get_model(model, KronAConfig(target_modules=["lm_head"], modules_to_save=[]))
    assert_unchanged(model, before)


def test_tied_module_to_save_is_refused():
    model = make_model("gpt2")
    with pytest.raises(ValueError, match="modules_to_save: lm_head.weight is tied"):
        get_model(model, KronAConfig(modules_to_save=["lm_head"]))


def test_untied_lm_head_merges_exactly():
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100,
                                           tie_word_embeddings=False)).eval()
    inputs = model_inputs(model)
    kron = get_model(model, KronAConfig(target_modules=["lm_head"], modules_to_save=[]))
    randomize(kron)
    want = outputs(kron, inputs)
    merged = kron.merge_and_unload()
    torch.testing.assert_close(outputs(merged, inputs), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [KronAConfig(dropout=0.5), KronABConfig(dropout=0.5)])
def test_new_adapters_follow_the_host_mode(config, tmp_path):
    kron = get_model(make_model("bert"), config)  # make_model returns eval mode, as from_pretrained does
    randomize(kron)
    assert all(not m.training for _, s in sites(kron.base_model) for m in s.modules())
    inputs = model_inputs(kron.base_model)
    assert torch.equal(outputs(kron, inputs), outputs(kron, inputs))
    kron.save_pretrained(tmp_path / "a")
    loaded = KronModel.from_pretrained(make_model("bert"), tmp_path / "a")
    assert torch.equal(outputs(loaded, inputs), outputs(loaded, inputs))
    train_host = make_model("bert").train()
    assert all(m.training for _, s in sites(get_model(train_host, config).base_model) for m in s.modules())


def test_nested_disable_adapter_is_reentrant_and_exception_safe():
    kron = get_model(make_model("bert"), KronAConfig(modules_to_save=[]))
    randomize(kron)
    inputs = model_inputs(kron.base_model)
    adapted, base = outputs(kron, inputs), outputs(make_model("bert"), inputs)
    with kron.disable_adapter():
        with kron.disable_adapter():
            pass
        assert torch.equal(outputs(kron, inputs), base)  # still disabled after the inner block
        with pytest.raises(KeyError):
            with kron.disable_adapter():
                raise KeyError("boom")
        assert torch.equal(outputs(kron, inputs), base)
    assert torch.equal(outputs(kron, inputs), adapted)
    with pytest.raises(KeyError):
        with kron.disable_adapter():
            raise KeyError("boom")
    assert torch.equal(outputs(kron, inputs), adapted)


def test_nested_disable_with_a_merged_adapter():
    kron = get_model(make_model("bert"), KronAConfig(modules_to_save=[]))
    randomize(kron)
    inputs = model_inputs(kron.base_model)
    adapted = outputs(kron, inputs)
    kron.merge_adapter()
    with kron.disable_adapter():
        with kron.disable_adapter():
            pass
        torch.testing.assert_close(outputs(kron, inputs), outputs(make_model("bert"), inputs))
    torch.testing.assert_close(outputs(kron, inputs), adapted)


def test_config_is_copied_at_add_time(tmp_path):
    config = KronAConfig(scale=1.0, modules_to_save=[])
    kron = get_model(make_model("bert"), config)
    config.scale = 100.0
    config.modules_to_save.append("classifier")
    assert kron.configs["default"].scale == 1.0 and kron.configs["default"].modules_to_save == []
    kron.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["adapter"]
    assert saved["scale"] == 1.0 and saved["modules_to_save"] == []


# -- §2 one task head per adapter, the unloaded wrapper ------------------------------------------------

def train_head(kron, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in kron.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_each_adapter_has_its_own_head_switched_with_it(tmp_path):
    base = make_model("bert")
    inputs = model_inputs(base)
    original = outputs(base, inputs)
    kron = get_model(base, KronAConfig())
    train_head(kron, 1)
    a_out = outputs(kron, inputs)
    kron.add_adapter("b", BottleneckConfig(r=4))
    kron.set_adapter("b")
    train_head(kron, 2)  # training b must not touch a
    b_out = outputs(kron, inputs)
    kron.set_adapter("default")
    assert torch.equal(outputs(kron, inputs), a_out)
    kron.set_adapter("b")
    assert torch.equal(outputs(kron, inputs), b_out)
    with kron.disable_adapter():
        assert torch.equal(outputs(kron, inputs), original)  # the original head
    kron.save_pretrained(tmp_path / "a", "default")
    kron.save_pretrained(tmp_path / "b", "b")
    again = KronModel.from_pretrained(make_model("bert"), tmp_path / "a")
    again.load_adapter(tmp_path / "b", "b")  # must not overwrite a's head
    assert torch.equal(outputs(again, inputs), a_out)
    again.set_adapter("b")
    assert torch.equal(outputs(again, inputs), b_out)
    again.set_adapter("default")
    assert torch.equal(outputs(again, inputs), a_out)


def test_headless_adapter_beside_a_headed_one_saves_and_loads_exactly_its_own(tmp_path):
    kron = get_model(make_model("bert"), KronAConfig())
    kron.add_adapter("plain", KronAConfig(modules_to_save=[]))
    kron.save_pretrained(tmp_path / "plain", "plain")
    keys = kron.adapter_state_dict("plain")
    assert keys and not any(k.startswith("classifier") for k in keys)
    assert any(k.startswith("classifier.") for k in kron.adapter_state_dict("default"))
    other = KronModel.from_pretrained(make_model("bert"), tmp_path / "plain")
    other.load_adapter(tmp_path / "plain", "again")


def test_merge_and_unload_keeps_the_adapters_head_and_leaves_the_wrapper_unusable(tmp_path):
    base = make_model("bert")
    inputs = model_inputs(base)
    kron = get_model(base, KronAConfig())
    train_head(kron, 3)
    want = outputs(kron, inputs)
    kron.save_pretrained(tmp_path / "a")
    before = (tmp_path / "a" / "adapter_config.json").read_bytes()
    merged = kron.merge_and_unload()
    torch.testing.assert_close(outputs(merged, inputs), want, rtol=1e-5, atol=1e-5)
    assert not sites(merged)
    for call in (lambda: kron.save_pretrained(tmp_path / "a"), lambda: kron(**inputs),
                 lambda: kron.add_adapter("x", KronAConfig()), lambda: kron.set_adapter("default"),
                 lambda: kron.merge_and_unload(), lambda: kron.disable_adapter().__enter__()):
        with pytest.raises(RuntimeError, match="merged and unloaded"):
            call()
    with pytest.raises(AttributeError, match="merged and unloaded"):
        kron.config
    assert (tmp_path / "a" / "adapter_config.json").read_bytes() == before
    KronModel.from_pretrained(make_model("bert"), tmp_path / "a")


# -- §3 a failed call changes nothing ------------------------------------------------------------------

FAILING = {
    "bad modules_to_save": lambda m: get_model(m, KronAConfig(modules_to_save=["nope"])),
    "name 'active'": lambda m: get_model(m, KronAConfig(), adapter_name="active"),
    "name 'training'": lambda m: get_model(m, KronAConfig(), adapter_name="training"),
    "bad a_shape": lambda m: get_model(m, KronAConfig(a_shape=(5, 5))),
    "saved module holds a target": lambda m: get_model(m, KronAConfig(modules_to_save=["bert"])),
    "kronab_res not square": lambda m: get_model(m, KronABConfig(residual=True, ffn_modules=["intermediate"])),
}


@pytest.mark.parametrize("case", list(FAILING))
def test_failed_get_model_changes_nothing_and_the_model_can_be_wrapped_again(case):
    model = make_model("bert")
    before = snapshot(model)
    with pytest.raises(ValueError):
        FAILING[case](model)
    assert_unchanged(model, before)
    get_model(model, KronAConfig())


def test_failed_add_adapter_changes_nothing():
    kron = get_model(make_model("bert"), AdaKronConfig(r=8))
    randomize(kron)
    before = snapshot(kron.base_model)
    for name, config in [("active", KronAConfig()), ("x", KronAConfig(modules_to_save=["nope"])),
                         ("y", KronAConfig(a_shape=(5, 5))), ("default", KronAConfig())]:
        with pytest.raises(ValueError):
            kron.add_adapter(name, config)
        keys, trainable, logits = snapshot(kron.base_model)
        assert (keys, trainable) == before[:2] and torch.equal(logits, before[2])
    assert list(kron.configs) == ["default"]


def wrong_depth_bert():
    torch.manual_seed(0)
    return T.BertForSequenceClassification(T.BertConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        num_labels=3)).eval()


def test_failed_from_pretrained_and_load_adapter_change_nothing(tmp_path):
    kron = get_model(make_model("bert"), KronAConfig())
    kron.save_pretrained(tmp_path / "a")
    deeper = wrong_depth_bert()
    before = snapshot(deeper)
    with pytest.raises(ValueError, match="does not fit"):
        KronModel.from_pretrained(deeper, tmp_path / "a")
    assert_unchanged(deeper, before)
    get_model(deeper, KronAConfig())  # can be wrapped again

    host = get_model(wrong_depth_bert(), BottleneckConfig(r=4))
    before = snapshot(host.base_model)
    with pytest.raises(ValueError, match="does not fit"):
        host.load_adapter(tmp_path / "a", "other")
    keys, trainable, logits = snapshot(host.base_model)
    assert (keys, trainable) == before[:2] and torch.equal(logits, before[2])
    assert list(host.configs) == ["default"]


def test_future_format_version_is_refused(tmp_path):
    kron = get_model(make_model("bert"), KronAConfig())
    kron.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    for version, message in [(99, "upgrade kronpeft"), ("2", "format_version '2'"), (None, "format_version None")]:
        meta = json.loads(path.read_text())
        meta["format_version"] = version
        path.write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=message):
            KronModel.from_pretrained(make_model("bert"), tmp_path / "a")


def test_hand_edited_config_is_checked_on_load(tmp_path):
    kron = get_model(make_model("bert"), KronABConfig())
    kron.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    meta = json.loads(path.read_text())
    meta["adapter"]["residual"] = "False"
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"adapter_config.json: KronABConfig.residual = 'False'"):
        KronModel.from_pretrained(make_model("bert"), tmp_path / "a")


def test_loading_into_a_meta_device_model_is_refused(tmp_path):
    kron = get_model(make_model("bert"), KronAConfig())
    kron.save_pretrained(tmp_path / "a")
    with torch.device("meta"):
        meta_model = copy.deepcopy(make_model("bert").to("meta"))
    with pytest.raises(ValueError, match="meta device"):
        KronModel.from_pretrained(meta_model, tmp_path / "a")
    assert not sites(meta_model)
