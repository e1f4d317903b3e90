"""kronpeft <-> PEFT LoKr: conversions keep outputs, and foreign adapters are named, not called corrupt."""
import peft
import pytest
import torch

from conftest import make_model, model_inputs, outputs
from kronpeft import KronAConfig, KronModel, get_model
from kronpeft.runner.cli import main
from kronpeft.interop import from_peft, to_peft


def _trained_krona(config=None, seed=0):
    model = get_model(make_model("bert"), config or KronAConfig(scale=0.3))
    torch.manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.fixture
def base_folder(tmp_path):
    """The tiny base's config on disk, standing for the model folder a real adapter names."""
    make_model("bert").save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_round_trip_through_peft_keeps_outputs(tmp_path, base_folder):
    model = _trained_krona()
    inputs = model_inputs(model)
    want = outputs(model, inputs)
    model.save_pretrained(tmp_path / "kron")
    to_peft(tmp_path / "kron", tmp_path / "peft")

    peft_model = peft.PeftModel.from_pretrained(make_model("bert"), str(tmp_path / "peft")).eval()
    assert torch.allclose(outputs(peft_model, inputs), want, atol=1e-5)  # PEFT materialises A ⊗ B: rounding differs
    peft_model.save_pretrained(tmp_path / "peft-resaved")  # PEFT's own writer

    from_peft(tmp_path / "peft-resaved", tmp_path / "back", base_model=str(base_folder))
    back = KronModel.from_pretrained(make_model("bert"), tmp_path / "back")
    assert torch.equal(outputs(back, inputs), want)
    assert back.configs["default"].scale == 0.3


def test_square_a_shape_converts_with_decompose_factor(tmp_path, base_folder):
    model = _trained_krona(KronAConfig(a_shape=(8, 8)))
    inputs = model_inputs(model)
    model.save_pretrained(tmp_path / "kron")
    to_peft(tmp_path / "kron", tmp_path / "peft")
    peft_model = peft.PeftModel.from_pretrained(make_model("bert"), str(tmp_path / "peft")).eval()
    assert peft_model.peft_config["default"].decompose_factor == 8
    assert torch.allclose(outputs(peft_model, inputs), outputs(model, inputs), atol=1e-5)


def test_native_peft_lokr_converts(tmp_path, base_folder):
    lokr = peft.get_peft_model(make_model("bert"), peft.LoKrConfig(
        target_modules=["query", "value"], r=16, alpha=8, decompose_both=False, modules_to_save=["classifier"]))
    torch.manual_seed(1)
    for name, p in lokr.named_parameters():
        if "lokr_" in name:
            torch.nn.init.normal_(p, std=0.1)
    lokr.eval()
    inputs = model_inputs(lokr)
    lokr.save_pretrained(tmp_path / "peft")
    from_peft(tmp_path / "peft", tmp_path / "kron", base_model=str(base_folder))
    kron = KronModel.from_pretrained(make_model("bert"), tmp_path / "kron")
    assert kron.configs["default"].scale == 0.5
    assert torch.allclose(outputs(kron, inputs), outputs(lokr, inputs), atol=1e-5)


def test_low_rank_lokr_is_refused_naming_the_option(tmp_path, base_folder):
    lokr = peft.get_peft_model(make_model("bert"), peft.LoKrConfig(target_modules=["query"], r=2, decompose_both=True))
    lokr.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match=r"decompose_both=False"):
        from_peft(tmp_path / "peft", tmp_path / "kron", base_model=str(base_folder))
    assert not (tmp_path / "kron").exists()


def test_a_shape_without_lokr_equivalent_is_refused(tmp_path):
    _trained_krona(KronAConfig(a_shape=(2, 8))).save_pretrained(tmp_path / "kron")
    with pytest.raises(ValueError, match=r"a_shape=\(2, 8\) has no PEFT LoKr equivalent"):
        to_peft(tmp_path / "kron", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_peft_adapter_loaded_by_kronpeft_is_named_not_corrupt(tmp_path):
    lora = peft.get_peft_model(make_model("bert"), peft.LoraConfig(target_modules=["query"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match=r"holds a PEFT LORA adapter .* peft.PeftModel.from_pretrained") as err:
        KronModel.from_pretrained(make_model("bert"), tmp_path / "lora")
    assert "corrupt" not in str(err.value)
    lokr = peft.get_peft_model(make_model("bert"), peft.LoKrConfig(target_modules=["query"], r=8))
    lokr.save_pretrained(tmp_path / "lokr")
    with pytest.raises(ValueError, match=r"PEFT LOKR adapter .*kronpeft convert --to kronpeft"):
        KronModel.from_pretrained(make_model("bert"), tmp_path / "lokr")


def test_cli_convert_both_ways(tmp_path, base_folder, capsys):
    model = _trained_krona()
    inputs = model_inputs(model)
    model.save_pretrained(tmp_path / "kron")
    assert main(["convert", "--to", "peft", str(tmp_path / "kron"), str(tmp_path / "peft")]) == 0
    assert main(["convert", "--to", "kronpeft", str(tmp_path / "peft"), str(tmp_path / "back"),
                 "--model", str(base_folder)]) == 0
    assert torch.equal(outputs(KronModel.from_pretrained(make_model("bert"), tmp_path / "back"), inputs),
                       outputs(model, inputs))
    capsys.readouterr()
    assert main(["convert", "--to", "kronpeft", str(tmp_path / "kron"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kronpeft: error: ") and "kronpeft adapter already" in err[0]
    assert main(["convert", "--to", "peft", str(tmp_path / "kron"), str(tmp_path / "peft")]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    (tmp_path / "peft" / "README.md").write_text("the user's notes")  # --overwrite replaces the adapter only
    assert main(["convert", "--to", "peft", str(tmp_path / "kron"), str(tmp_path / "peft"), "--overwrite"]) == 0
    assert (tmp_path / "peft" / "README.md").read_text() == "the user's notes"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    peft_model = peft.PeftModel.from_pretrained(make_model("bert"), str(tmp_path / "peft"))
    assert torch.allclose(outputs(peft_model, inputs), outputs(model, inputs), atol=1e-6)


def test_gpt2_conv1d_adapter_is_refused_before_writing(tmp_path):
    """PEFT's LoKr refuses GPT-2's Conv1D (TypeError at load), so to_peft says so and writes nothing."""
    model = get_model(make_model("gpt2"), KronAConfig())
    model.save_pretrained(tmp_path / "kron")
    with pytest.raises(ValueError, match=r"Conv1D layers \(transformer\.h\.0\.attn\.c_attn.*no PEFT equivalent"):
        to_peft(tmp_path / "kron", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    with pytest.raises(TypeError, match="Conv1D"):  # what PEFT itself does with LoKr on GPT-2's Conv1D
        peft.get_peft_model(make_model("gpt2"), peft.LoKrConfig(target_modules=["c_attn"], r=8))
