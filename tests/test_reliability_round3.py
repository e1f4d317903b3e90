"""Issue 24 on the library: merging a non-active adapter, loading into a merged model, non-float weights,
sizes beyond memory, pickling, deleting inside disable_adapter(), deeply nested JSON, unmerge of an
unknown name, STS-B scores out of range."""
import copy
import io
import json
import pickle

import pytest
import torch
from conftest import make_model, model_inputs, outputs
from safetensors.torch import load_file, save_file

from kronpeft import AdaKronConfig, BottleneckConfig, KronAConfig, KronModel, get_model
from kronpeft.atomic import sha256
from kronpeft.runner.data import load_split
from kronpeft.runner.text2text import parse_stsb


def randomized(config=None, seed=0, name="default"):
    kron = get_model(make_model("bert"), config or KronAConfig(modules_to_save=[]), adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in kron.named_parameters():
            if ".kronpeft." in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return kron


def test_merging_an_inactive_adapter_is_refused():
    kron = randomized()
    kron.add_adapter("b", KronAConfig(modules_to_save=[]))
    inputs = model_inputs(kron.base_model)
    before = outputs(kron, inputs)
    with pytest.raises(ValueError, match=r"'b' is not the active adapter \('default'\).*set_adapter\('b'\)"):
        kron.merge_adapter("b")
    assert torch.equal(outputs(kron, inputs), before) and kron.active_adapters == ["default"]
    kron.set_adapter("b")
    kron.merge_adapter("b")  # the active one merges
    assert kron._is_merged("b") and not kron._is_merged("default")


def test_load_state_dict_into_a_merged_model_remerges():
    kron, other = randomized(seed=1), randomized(seed=2)
    inputs = model_inputs(kron.base_model)
    want = outputs(other, inputs)
    kron.merge_adapter()
    kron.load_state_dict(other.state_dict())
    torch.testing.assert_close(outputs(kron, inputs), want, rtol=1e-5, atol=1e-6)
    kron.unmerge_adapter()
    torch.testing.assert_close(outputs(kron, inputs), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_float_adapter_weights_are_refused(tmp_path, dtype):
    randomized().save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    weights = tmp_path / meta["weights_file"]
    state = {k: (v * 100).to(dtype) for k, v in load_file(weights).items()}
    save_file(state, weights)
    meta["weights_sha256"] = sha256(weights)  # the checksum matches: only the dtype is wrong
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"saved as {dtype}, not a floating-point dtype"):
        KronModel.from_pretrained(make_model("bert"), tmp_path)


@pytest.mark.parametrize("config", [BottleneckConfig(r=2**31 - 1), AdaKronConfig(r=2**31 - 4)])
def test_a_size_beyond_memory_is_refused_before_allocating(config):
    model = make_model("bert")
    keys = sorted(model.state_dict())
    with pytest.raises(ValueError, match=r"need [\d,.]+ GiB for their weights alone, more than the"):
        get_model(model, config)
    assert sorted(model.state_dict()) == keys
    get_model(make_model("bert"), BottleneckConfig())  # the default r = 48 on a width-32 model stays valid


def test_a_kron_model_pickles_and_copies(tmp_path):
    kron = randomized()
    inputs = model_inputs(kron.base_model)
    for copied in (pickle.loads(pickle.dumps(kron)), copy.deepcopy(kron)):
        assert type(copied) is type(kron) and torch.equal(outputs(copied, inputs), outputs(kron, inputs))
    buffer = io.BytesIO()
    torch.save(kron, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(outputs(loaded, inputs), outputs(kron, inputs))
    loaded.add_adapter("b", KronAConfig(modules_to_save=[]))  # a working model, not a frozen copy
    loaded.set_adapter("b")


def test_deleting_the_merged_adapter_inside_disable_adapter():
    kron = randomized()
    kron.add_adapter("b", KronAConfig(modules_to_save=[]))
    kron.merge_adapter()
    with kron.disable_adapter():
        base = outputs(kron, model_inputs(kron.base_model))
        kron.delete_adapter("default")
    assert kron.active_adapters == ["b"] and not any(s.merged for s in kron.base_model.modules()
                                                     if hasattr(s, "merged"))
    kron.delete_adapter("b")  # no adapter left: the base model's outputs
    assert torch.equal(outputs(kron.base_model, model_inputs(kron.base_model)), base)


def test_switching_adapters_inside_disable_adapter():
    kron = randomized()
    kron.add_adapter("b", KronAConfig(modules_to_save=[]))
    kron.merge_adapter()
    with kron.disable_adapter():
        kron.set_adapter("b")
    assert kron.active_adapters == ["b"] and not kron._is_merged("default")


def test_deeply_nested_adapter_config_is_a_clear_error(tmp_path):
    randomized().save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="adapter_config.json is corrupt"):
        KronModel.from_pretrained(make_model("bert"), tmp_path)


def test_unmerge_of_an_unknown_adapter_is_refused():
    kron = randomized()
    kron.merge_adapter()
    with pytest.raises(ValueError, match="no adapter named 'typo'"):
        kron.unmerge_adapter("typo")
    assert kron._is_merged("default")


@pytest.mark.parametrize("score", ["100", "-3", "5.0001", "-0.5"])
def test_stsb_scores_outside_0_5_are_refused(tmp_path, score):
    folder = tmp_path / "STS-B"
    folder.mkdir()
    rows = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
            "0\tg\tf\t2012\t0\ts\ts\tA man.\tA person.\t4.2", f"1\tg\tf\t2012\t1\ts\ts\tA cat.\tA dog.\t{score}"]
    (folder / "train.tsv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=rf"line 3: score '{score}' is outside STS-B's range \[0, 5\]"):
        load_split("stsb", "train", tmp_path)
    (folder / "train.tsv").write_text("\n".join(rows[:2]) + "\n0\tg\tf\t2012\t1\ts\ts\tA.\tB.\t5\n")
    assert [e.label for e in load_split("stsb", "train", tmp_path)] == [4.2, 5.0]


def test_parse_stsb_reads_the_sign():
    assert parse_stsb("-1") == 0.0 and parse_stsb(" -0.4") == 0.0
    assert parse_stsb("3.4") == 3.4 and parse_stsb("7") == 5.0
