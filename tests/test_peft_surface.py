"""The PEFT-style surface: save every adapter, is_trainable, "all-linear", get_base_model/unload,
read-only configs and the active adapter, push_to_hub and loading from a Hub id (mocked hub)."""
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import LocalEntryNotFoundError
import pytest
import torch
from torch import nn

from conftest import make_model, model_inputs, outputs
from kronpeft import BottleneckConfig, KronAConfig, KronModel, get_model
from kronpeft.injection import sites


def _randomized(model):
    torch.manual_seed(3)
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.1)
    return model


def _two_adapters():
    model = _randomized(get_model(make_model("bert"), KronAConfig(modules_to_save=[])))
    model.add_adapter("side", BottleneckConfig(r=4, modules_to_save=[]))
    model.set_adapter("side")
    _randomized(model)
    model.set_adapter("default")
    return model


def test_save_pretrained_writes_every_adapter_in_peft_layout(tmp_path):
    model = _two_adapters()
    inputs = model_inputs(model)
    want = {name: (model.set_adapter(name), outputs(model, inputs))[1] for name in ("default", "side")}
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "side" / "adapter_config.json").is_file()

    loaded = KronModel.from_pretrained(make_model("bert"), tmp_path)
    loaded.load_adapter(tmp_path / "side", "side")
    for name in ("default", "side"):
        loaded.set_adapter(name)
        assert torch.equal(outputs(loaded, inputs), want[name])

    model.save_pretrained(tmp_path / "only", selected_adapters=["side"])
    assert sorted(p.name for p in (tmp_path / "only").iterdir()) == ["side"]
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model.save_pretrained(tmp_path / "bad", selected_adapters=["side", "nope"])
    assert not (tmp_path / "bad").exists()  # names checked before anything is written


def test_from_pretrained_is_for_inference_unless_trainable(tmp_path):
    get_model(make_model("bert"), KronAConfig()).save_pretrained(tmp_path)
    frozen = KronModel.from_pretrained(make_model("bert").train(), tmp_path)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    frozen.set_adapter("default")
    assert not any(p.requires_grad for p in frozen.parameters())  # stays frozen when re-activated

    trainable = KronModel.from_pretrained(make_model("bert"), tmp_path, is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names and all(".kronpeft.default." in n or ".classifier." in n for n in names)
    assert any(".classifier." in n for n in names)

    model = get_model(make_model("bert"), BottleneckConfig(r=4))
    model.load_adapter(tmp_path, "loaded")
    model.set_adapter("loaded")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".kronpeft.loaded." in n)
    model.load_adapter(tmp_path, "again", is_trainable=True)
    model.set_adapter("again")
    assert all(p.requires_grad for n, p in model.named_parameters() if ".kronpeft.again." in n)


@pytest.mark.parametrize("arch, head", [("bert", "classifier"), ("gpt2", "lm_head"), ("llama", "lm_head"),
                                        ("distilbert", "classifier")])
def test_all_linear_targets_every_linear_but_the_head(arch, head):
    from kronpeft.injection import LINEAR_TYPES

    base = make_model(arch)
    linears = {n for n, m in base.named_modules() if isinstance(m, LINEAR_TYPES)}
    model = get_model(base, KronAConfig(target_modules="all-linear", modules_to_save=[]))
    adapted = {site.owner_name for _, site in sites(model.base_model)}
    heads = {n for n in linears if n == head or n.startswith(head + ".")}
    assert heads and adapted == linears - heads - ({"pre_classifier"} if arch == "distilbert" else set())


def test_get_base_model_and_unload(tmp_path):
    base = make_model("bert")
    inputs = model_inputs(base)
    plain = outputs(base, inputs)
    model = _randomized(get_model(base, KronAConfig(modules_to_save=[])))
    assert model.get_base_model() is base
    assert not torch.equal(outputs(model, inputs), plain)
    model.merge_adapter()
    unloaded = model.unload()
    assert unloaded is base and not sites(base)
    assert not any(".kronpeft" in k for k in base.state_dict())
    torch.testing.assert_close(outputs(base, inputs), plain, rtol=0, atol=1e-6)  # merged delta taken out again
    assert model.active_adapters == []


def test_configs_view_is_read_only_and_active_is_reported():
    model = _two_adapters()
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    assert set(model.peft_config) == {"default", "side"} and model.configs["side"].r == 4
    with pytest.raises(TypeError):
        model.peft_config["x"] = KronAConfig()
    view = model.peft_config["default"]
    view.scale = 99.0
    assert model.configs["default"].scale == 1.0  # a copy: the model's own config is unchanged
    model.set_adapter("side")
    assert model.active_adapters == ["side"]


class _FakeHub:
    """Stands in for the Hub: repositories are folders under `root`."""

    def __init__(self, root: Path):
        self.root, self.created = root, []

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None, **kwargs):
        self.created.append((repo_id, private))
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None, repo_type=None, **kwargs):
        import shutil

        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        return f"commit: {commit_message}"

    def snapshot_download(self, repo_id, revision=None, token=None, allow_patterns=None, **kwargs):
        if not (self.root / repo_id).is_dir():
            raise LocalEntryNotFoundError(f"{repo_id} not on the fake hub")
        return str(self.root / repo_id)


def test_push_to_hub_and_load_by_hub_id(tmp_path, monkeypatch):
    hub = _FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: hub.create_repo(repo_id, **kw))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: hub.upload_folder(**kw))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)

    model = _two_adapters()
    inputs = model_inputs(model)
    want = outputs(model, inputs)
    assert model.push_to_hub("someone/kron-adapter", private=True) == "commit: Upload kronpeft adapter"
    assert hub.created == [("someone/kron-adapter", True)]
    assert (hub.root / "someone/kron-adapter/side/adapter_model.safetensors").is_file()

    loaded = KronModel.from_pretrained(make_model("bert"), "someone/kron-adapter")
    assert torch.equal(outputs(loaded, inputs), want)
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a Hub repository"):
        KronModel.from_pretrained(make_model("bert"), "someone/missing")
