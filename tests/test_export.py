"""Export to LoRA against dense references: the SVD of `torch.kron(A, B)` (and of `Σ torch.kron(Aᵢ, Bᵢ)`), and
PEFT's own LoRA loading the exported folder."""
import json

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from conftest import CONFIGS, make_model, model_inputs, outputs, randomize_adapters
from kronpeft import KronAConfig, get_model
from kronpeft.runner.cli import main
from kronpeft.export import to_lora
from kronpeft.kron import kron_sum_svd, kron_svd

pytestmark = pytest.mark.usefixtures("one_thread")
dims = st.integers(1, 6)


@settings(max_examples=60, deadline=None)
@given(dims, dims, dims, dims, st.integers(1, 36), st.integers(0, 2**31 - 1))
def test_kron_svd_is_the_dense_truncated_svd(a1, a2, b1, b2, K, seed):
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(a1, a2, generator=g, dtype=torch.float64), torch.randn(b1, b2, generator=g, dtype=torch.float64)
    K = min(K, min(a1, a2) * min(b1, b2))
    W = torch.kron(A, B)
    U, S, Vh = kron_svd(A, B, K)
    dense = torch.linalg.svdvals(W)
    torch.testing.assert_close(S, dense[:K])
    torch.testing.assert_close(U.T @ U, torch.eye(K, dtype=torch.float64))
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(K, dtype=torch.float64))
    error = torch.linalg.norm(W - U @ torch.diag(S) @ Vh)
    torch.testing.assert_close(error, dense[K:].square().sum().sqrt(), rtol=1e-8, atol=1e-8)  # optimal rank-K error


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 3), dims, dims, dims, dims, st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_kron_sum_svd_matches_the_dense_svd(k, a1, a2, b1, b2, K, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(k, a1, a2, generator=g, dtype=torch.float64)
    B = torch.randn(k, b1, b2, generator=g, dtype=torch.float64)
    W = sum(torch.kron(a, b) for a, b in zip(A, B))
    K = min(K, a1 * b1, a2 * b2)
    U, S, Vh = kron_sum_svd(A, B, K, oversample=40, generator=g)  # sketch = the full width: exact
    dense = torch.linalg.svdvals(W)
    torch.testing.assert_close(S, dense[:K], rtol=1e-8, atol=1e-8)
    error = torch.linalg.norm(W - U @ torch.diag(S) @ Vh)
    torch.testing.assert_close(error, dense[K:].square().sum().sqrt(), rtol=1e-6, atol=1e-8)


def trained(arch, config, seed=1):
    model = get_model(make_model(arch), config)
    randomize_adapters(model, seed=seed)
    return model


@pytest.mark.parametrize("arch, config", [
    ("bert", KronAConfig(scale=0.5)),  # task head saved too
    ("llama", KronAConfig(rank=2, target_modules="all-linear")),
    ("llama", KronAConfig(rank=2, init="kpsvd", target_modules=["q_proj", "down_proj"], scale=-0.7)),
    ("gpt2", KronAConfig(target_modules=["c_attn", "c_fc"])),  # Conv1D: fan_in_fan_out
])
def test_exact_export_loads_in_peft_lora_with_kronpefts_outputs(tmp_path, arch, config):
    model = trained(arch, config)
    inputs = model_inputs(model)
    model.save_pretrained(tmp_path / "a")
    r, report = to_lora(tmp_path / "a", tmp_path / "lora")
    assert r == max(e.exact_rank for e in report)
    assert all(e.energy > 1 - 1e-9 and e.relative_change < 1e-9 for e in report)
    lora = peft.PeftModel.from_pretrained(make_model(arch), tmp_path / "lora").eval()
    torch.testing.assert_close(outputs(lora, inputs), outputs(model, inputs), rtol=1e-4, atol=1e-5)


def test_folder_has_what_vllm_reads(tmp_path):
    """vLLM's LoRA loader reads `r`, `lora_alpha` and `target_modules` and one lora_A/lora_B pair per layer."""
    model = trained("llama", KronAConfig(rank=2, target_modules="all-linear"))
    model.save_pretrained(tmp_path / "a")
    r, _ = to_lora(tmp_path / "a", tmp_path / "lora", rank=4)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == r == 4 and config["lora_alpha"] == 4
    targets = config["target_modules"]
    assert isinstance(targets, list) and len(targets) == 14 and not config["modules_to_save"]
    weights = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    want = {f"base_model.model.{t}.lora_{ab}.weight" for t in targets for ab in "AB"}
    assert set(weights) == want
    assert all(w.shape[0 if k.endswith("lora_A.weight") else 1] == 4 for k, w in weights.items())


def test_truncated_export_keeps_the_top_energy(tmp_path):
    model = trained("bert", KronAConfig(a_shape=(4, 4)))  # 32 x 32 layers: A (4, 4), B (8, 8), exact rank 32
    model.save_pretrained(tmp_path / "a")
    r, report = to_lora(tmp_path / "a", tmp_path / "lora", rank=5)
    assert r == 5 and all(e.exact_rank == 32 for e in report)
    site = model.base_model.bert.encoder.layer[0].attention.self.query.kronpeft["default"]
    S = torch.linalg.svdvals(site.delta_weight().detach().double())
    first = next(e for e in report if e.module.endswith("layer.0.attention.self.query"))
    assert first.energy == pytest.approx(float(S[:5].square().sum() / S.square().sum()), rel=1e-6)
    assert first.max_change > 0


@pytest.mark.parametrize("method", ["kronab", "kronab-res", "adakron", "bottleneck"])
def test_non_linear_adapters_are_refused(tmp_path, method):
    get_model(make_model("bert"), CONFIGS[method]()).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match=r"not updates of one linear layer"):
        to_lora(tmp_path / "a", tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_cli_convert_to_lora(tmp_path, capsys):
    trained("bert", KronAConfig()).save_pretrained(tmp_path / "a")
    assert main(["convert", "--to", "lora", "--rank", "100000", str(tmp_path / "a"), str(tmp_path / "lora")]) == 0
    out = capsys.readouterr().out
    assert "energy kept 100.00%" in out and "--rank 100000 is above the largest exact rank" in out
    assert main(["convert", "--to", "peft", "--rank", "3", str(tmp_path / "a"), str(tmp_path / "p")]) == 2
    assert "kronpeft: error: --rank 3 is the LoRA rank of --to lora" in capsys.readouterr().err


def test_kron_sum_svd_power_iterations_are_exact_on_a_low_rank_sum():
    """A sketch narrower than the matrix (the power-iteration path) still finds a rank-2 sum exactly."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 6, 1, generator=g, dtype=torch.float64)
    A = u @ torch.randn(2, 1, 5, generator=g, dtype=torch.float64)  # rank-1 factors: rank(ΣAᵢ⊗Bᵢ) = 2
    B = torch.randn(2, 7, 1, generator=g, dtype=torch.float64) @ torch.randn(2, 1, 4, generator=g, dtype=torch.float64)
    W = sum(torch.kron(a, b) for a, b in zip(A, B))
    U, S, Vh = kron_sum_svd(A, B, 2, oversample=3, generator=g)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, W)
    torch.testing.assert_close(S, torch.linalg.svdvals(W)[:2])


def test_to_lora_refuses_an_empty_path_and_its_own_source(tmp_path):
    model = get_model(make_model("llama"), KronAConfig(target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "a")
    before = {p: p.read_bytes() for p in (tmp_path / "a").rglob("*")}
    for out in ("", tmp_path / "a", tmp_path / "a" / "inside"):
        with pytest.raises(ValueError, match="out_dir"):
            to_lora(tmp_path / "a", out)
    assert {p: p.read_bytes() for p in (tmp_path / "a").rglob("*")} == before
