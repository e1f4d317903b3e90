"""Parameter counts against the papers' formulas, and every bad input against its documented error."""
import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from conftest import make_model, model_inputs, outputs, randomize_adapters

from kronpeft import AdaKronConfig, AdapterConfig, BottleneckConfig, KronABConfig, KronAConfig, KronModel, get_model


def bert_base_shaped():
    """A BERT-base-shaped encoder (d=768, 12 layers, FFN 3072) on the meta device: shapes only."""
    with torch.device("meta"):
        return T.BertModel(T.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                        intermediate_size=3072), add_pooling_layer=False)


def adapter_count(config):
    return get_model(bert_base_shaped(), config).trainable_parameters()[0]


def test_adakron_bert_base_matches_paper():
    # per layer: d*k + k + 4*d + 4 + r*d + d with d=768, r=48, k=12 -> 49,936; x12 layers
    assert adapter_count(AdaKronConfig(r=48, modules_to_save=[])) == 12 * 49_936 == 599_232


def test_pfeiffer_bert_base_matches_paper():
    # per layer: (d*r + r) + (r*d + d) = 36,912 + 37,632 = 74,544; x12 layers
    assert adapter_count(BottleneckConfig(r=48, modules_to_save=[])) == 894_528


def test_krona_qv_bert_base():
    # 12 layers x (query, value) x (A 32x32 + B 24x24)
    assert adapter_count(KronAConfig(a_shape=(32, 32), modules_to_save=[])) == 12 * 2 * (32 * 32 + 24 * 24) == 38_400


def test_kronab_bert_base():
    # 12 layers x (A 24x24 + B 32x32) on the FFN's 768 -> 768 map; the residual adds one scalar per layer
    assert adapter_count(KronABConfig(modules_to_save=[])) == 12 * (24 * 24 + 32 * 32)
    assert adapter_count(KronABConfig(residual=True, modules_to_save=[])) == 12 * (24 * 24 + 32 * 32 + 1)


def test_sequence_classifier_head_is_trained_and_saved_by_default():
    model = get_model(make_model("distilbert"), KronAConfig())
    assert model.modules_to_save == ["pre_classifier", "classifier"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # each adapter trains its own copy of the head
    heads = {"base_model.classifier.kronpeft.default.weight", "base_model.pre_classifier.kronpeft.default.bias"}
    assert heads <= trainable
    assert "base_model.classifier.weight" not in trainable


def t5_classifier():
    return T.T5ForSequenceClassification(T.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                                                    vocab_size=100, num_labels=2))


@pytest.mark.parametrize("make", [t5_classifier, lambda: make_model("distilbert"), lambda: make_model("bert")],
                         ids=["t5", "distilbert", "bert"])
@pytest.mark.parametrize("method", ["lora", "lokr"])
def test_peft_baselines_train_the_same_head_as_kronpeft(make, method):
    """PEFT's SEQ_CLS default trains the modules whose names end in `classifier`/`score`: T5's
    `classification_head` would stay random and frozen without modules_to_save."""
    from kronpeft.runner import baselines

    def head_trained(model):
        return sorted({n.split("base_model.model.")[-1].split(".modules_to_save")[0].split(".kronpeft")[0]
                       .removeprefix("base_model.").split(".")[0]
                       for n, p in model.named_parameters() if p.requires_grad and not any(
                           k in n for k in ("lora_", "lokr_", ".A", ".B"))})

    ours = head_trained(baselines.build("krona", make()))
    assert ours and ours == head_trained(baselines.build(method, make()))


# -- configs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    KronAConfig(target_modules=["query"], a_shape=(4, 8), scale=2.0, dropout=0.1),
    KronAConfig(target_modules=r".*\.(query|value)"),
    KronABConfig(residual=True, residual_init=1.0),
    AdaKronConfig(r=16, split=2, positions=("ffn", "attn"), activation="relu", init="zero"),
    BottleneckConfig(r=12, modules_to_save=["classifier"]),
])
def test_config_json_round_trip(config):
    assert AdapterConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("make, message", [
    (lambda: KronAConfig(a_shape=(0, 4)), r"KronAConfig.a_shape = \(0, 4\).*two positive ints"),
    (lambda: KronAConfig(dropout=1.5), r"KronAConfig.dropout = 1.5.*in \[0.0, 1.0\)"),
    (lambda: KronAConfig(target_modules="(unclosed"), r"KronAConfig.target_modules = '\(unclosed'.*valid regex"),
    (lambda: KronAConfig(target_modules=[]), r"KronAConfig.target_modules = \[\].*non-empty list"),
    (lambda: AdaKronConfig(r=10, split=4), r"AdaKronConfig.split = 4.*dividing r=10"),
    (lambda: AdaKronConfig(init="xavier"), r"AdaKronConfig.init = 'xavier'.*one of \('paper', 'zero'\)"),
    (lambda: BottleneckConfig(positions=("ffn", "embeddings")),
     r"BottleneckConfig.positions = .*non-empty list of distinct entries"),
    (lambda: BottleneckConfig(activation="swish"), r"BottleneckConfig.activation = 'swish'.*one of"),
    (lambda: AdapterConfig.from_dict({"method": "krona", "rnak": 4}), r"unknown field\(s\) \['rnak'\]"),
    (lambda: AdapterConfig.from_dict({"method": "lora"}), "unknown adapter method 'lora'"),
])
def test_bad_configs_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# -- injection ------------------------------------------------------------------------------------------


def test_shape_that_does_not_divide_names_module_and_dims():
    with pytest.raises(ValueError, match=r"query: a_shape=\(5, 4\) does not divide a \(32 out x 32 in\) weight"):
        get_model(make_model("bert"), KronAConfig(a_shape=(5, 4)))


def test_targets_matching_nothing_list_the_models_layers():
    with pytest.raises(ValueError, match=r"matched no module of BertForSequenceClassification.*'query'"):
        get_model(make_model("bert"), KronAConfig(target_modules=["q_proj"]))


def test_targets_that_are_not_linear_are_refused():
    with pytest.raises(ValueError, match="KronA needs nn.Linear or Conv1D"):
        get_model(make_model("bert"), KronAConfig(target_modules=["attention"]))


def test_unknown_architecture_asks_for_module_names():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    with pytest.raises(ValueError, match="no preset for model_type None.*ffn_modules"):
        get_model(Block(), KronABConfig())
    model = get_model(Block(), KronABConfig(ffn_modules=["up", "down"], scale=0.5, residual=True, residual_init=1.0))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    up, down = model.base_model.up, model.base_model.down
    ffn = F.linear(torch.relu(F.linear(x, up.weight, up.bias)), down.weight, down.bias)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ffn + x)  # B = 0 at step 0: only the residual s_res * x acts
        randomize_adapters(model)
        adapter = down.kronpeft["default"]
        term = 0.5 * x @ torch.kron(adapter.A, adapter.B).T
        assert term.abs().max() > 0.1
        torch.testing.assert_close(model(x), ffn + term + adapter.s_res * x)
    # A (4, 2), B (4, 4) for 8 -> 16
    assert get_model(Block(), KronAConfig(target_modules=["up"])).trainable_parameters()[0] == 4 * 2 + 4 * 4


def test_failed_add_adapter_changes_nothing():
    model = get_model(make_model("bert"), KronAConfig())
    state = set(model.state_dict())
    with pytest.raises(ValueError, match="does not divide"):
        model.add_adapter("bad", KronAConfig(target_modules=["query", "dense"], a_shape=(3, 2)))
    assert set(model.state_dict()) == state and list(model.configs) == ["default"]


def test_get_model_twice_is_refused():
    base = make_model("bert")
    get_model(base, KronAConfig())
    with pytest.raises(ValueError, match="already carries kronpeft adapters"):
        get_model(base, KronAConfig())


# -- loading --------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = get_model(make_model("bert"), KronAConfig())
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_adapter_for_other_widths_is_refused(saved):
    wider = T.BertForSequenceClassification(T.BertConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100, num_labels=3))
    with pytest.raises(ValueError, match=r"does not fit BertForSequenceClassification.*saved with shape"):
        KronModel.from_pretrained(wider, saved)


def test_adapter_for_other_architecture_is_refused(saved):
    with pytest.raises(ValueError, match="trained on a 'bert' model, not 'roberta'"):
        KronModel.from_pretrained(make_model("roberta"), saved)


def test_adapter_with_other_targets_is_refused(saved):
    meta = json.loads((saved / "adapter_config.json").read_text())
    meta["adapter"]["target_modules"] = ["query", "key", "value"]
    (saved / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"does not fit.*missing \['bert.encoder.layer.0.attention.self.key"):
        KronModel.from_pretrained(make_model("bert"), saved)


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_adapter_file(saved, missing):
    (saved / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"{missing} not found"):
        KronModel.from_pretrained(make_model("bert"), saved)


def test_corrupt_weights_are_detected(saved):
    weights = saved / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        KronModel.from_pretrained(make_model("bert"), saved)


def test_corrupt_config_is_detected(saved):
    (saved / "adapter_config.json").write_text('{"adapter": {"method": "krona"')
    with pytest.raises(ValueError, match="adapter_config.json is corrupt"):
        KronModel.from_pretrained(make_model("bert"), saved)


class UnpickleTrap:
    """Unpickling this object creates the file `path`: the trace of a loader that ran pickle."""

    def __init__(self, path):
        self.path = Path(path)

    def __reduce__(self):
        return Path.touch, (self.path,)


@pytest.mark.parametrize("write", [torch.save, lambda obj, path: Path(path).write_bytes(pickle.dumps(obj))],
                         ids=["torch.save", "pickle"])
def test_loading_never_unpickles(saved, tmp_path, write):
    marker = tmp_path / "unpickled"
    weights = saved / "adapter_model.safetensors"
    write({"bert.encoder.layer.0.attention.self.query.kronpeft.A": UnpickleTrap(marker)}, weights)
    meta = json.loads((saved / "adapter_config.json").read_text())
    meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()  # the checksum passes: the file is read
    (saved / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="adapter_model.safetensors is corrupt"):
        KronModel.from_pretrained(make_model("bert"), saved)
    assert not marker.exists()
    with open(weights, "rb") as f:  # the trap works: a loader that unpickles would have created the marker
        torch.load(f, weights_only=False) if write is torch.save else pickle.load(f)
    assert marker.exists()


# -- atomic saves ---------------------------------------------------------------------------------------


def crash_after_partial_write(tensors, path, *args, **kwargs):
    with open(path, "wb") as f:
        f.write(b"half a file")
    raise OSError("disk full")


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    model = get_model(make_model("bert"), KronAConfig())
    monkeypatch.setattr("kronpeft.atomic.save_file", crash_after_partial_write)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_previous_adapter(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model = get_model(make_model("bert", seed=5), KronAConfig())
    monkeypatch.setattr("kronpeft.atomic.save_file", crash_after_partial_write)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert [p.name for p in saved.parent.iterdir()] == ["adapter"]
    inputs = model_inputs(make_model("bert"))
    outputs(KronModel.from_pretrained(make_model("bert"), saved), inputs)
