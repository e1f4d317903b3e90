"""Layer level: one frozen `nn.Linear` plus an adapter, forward + backward, input requiring grad.

Every variant wraps a copy of the same frozen `nn.Linear(in, out)` as child `proj`, so kronpeft
and PEFT both inject the way users get it (kronpeft: forward hook; PEFT: module replacement).
"""
from __future__ import annotations

import copy
import math

import peft
import torch
from torch import nn

import kronpeft
from harness import interleaved_medians, peak_bytes

# ((out, in), tokens): every shape at 512 and 4096 tokens, except 4096x4096 at 1024 and 4096 (the
# targets' range) and 4096->11008 at 512 and 2048 (one 4096-token call alone takes ~40 s on 2 cores).
CASES = [(shape, tokens) for shape in [(768, 768), (3072, 768), (768, 3072), (2048, 2048)] for tokens in (512, 4096)]
CASES += [((4096, 4096), 1024), ((4096, 4096), 4096), ((11008, 4096), 512), ((11008, 4096), 2048)]
QUICK_CASES = [((768, 768), 512), ((3072, 768), 1024), ((4096, 4096), 1024)]


class OneLinear(nn.Module):
    def __init__(self, out_features: int, in_features: int, dtype, device):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, dtype=dtype, device=device)

    def forward(self, x):
        return self.proj(x)


class KronReference(nn.Module):
    """The materialising reference: `proj(x) + x @ torch.kron(A, B).T`."""

    def __init__(self, base: OneLinear, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        self.proj = base.proj
        self.A, self.B = nn.Parameter(A.clone()), nn.Parameter(B.clone())

    def forward(self, x):
        return self.proj(x) + x @ torch.kron(self.A, self.B).T


def lora_rank_matching(out_features: int, in_features: int, kron_params: int) -> int:
    """The LoRA rank whose `r·(m + n)` parameters come closest to KronA's (at least 1)."""
    return max(1, round(kron_params / (out_features + in_features)))


def build_variants(out_features: int, in_features: int, dtype, device) -> tuple[dict[str, nn.Module], dict]:
    """The adapted layers to compare, all around the same frozen weight, and facts about them."""
    torch.manual_seed(0)
    base = OneLinear(out_features, in_features, dtype, device).requires_grad_(False)
    krona = kronpeft.get_model(copy.deepcopy(base), kronpeft.KronAConfig(target_modules=["proj"]))
    delta = krona.base_model.proj.kronpeft["default"]
    nn.init.normal_(delta.B, std=1 / math.sqrt(in_features))  # non-zero, so the outputs check something
    A, B = delta.A.detach(), delta.B.detach()
    r_full = max(*A.shape, *B.shape)  # LoKr keeps w1, w2 full when r >= max(w2 dims) / 2
    lokr = peft.get_peft_model(copy.deepcopy(base), peft.LoKrConfig(
        r=r_full, alpha=r_full, target_modules=["proj"], decompose_both=False))
    lokr_layer = lokr.base_model.model.proj
    w1, w2 = lokr_layer.lokr_w1["default"], lokr_layer.lokr_w2["default"]
    assert w1.shape == A.shape and w2.shape == B.shape, (w1.shape, w2.shape, A.shape, B.shape)
    with torch.no_grad():
        w1.copy_(A)
        w2.copy_(B)
    kron_params = A.numel() + B.numel()
    r_same = lora_rank_matching(out_features, in_features, kron_params)
    variants = {
        "base": base,
        "krona": krona,
        "lokr": lokr,
        "lora_r8": _lora(base, 8),
        "lora_same": _lora(base, r_same),
        "kron_ref": KronReference(base, A, B),
    }
    facts = {"A": list(A.shape), "B": list(B.shape), "kron_params": kron_params, "lora_same_r": r_same,
             "lokr_r": r_full}
    return variants, facts


def _lora(base: OneLinear, r: int) -> nn.Module:
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=r, target_modules=["proj"]))
    nn.init.normal_(model.base_model.model.proj.lora_B["default"].weight, std=0.02)
    return model


def check_identical_math(variants: dict[str, nn.Module], x: torch.Tensor):
    """KronA, PEFT LoKr with the copied factors, and `torch.kron` give the same output."""
    with torch.no_grad():
        want = variants["kron_ref"](x).float()
        for name in ("krona", "lokr"):
            got = variants[name](x).float()
            err = (torch.linalg.norm(got - want) / torch.linalg.norm(want)).item()
            tol = 1e-4 if x.dtype == torch.float32 else 2e-2
            assert err <= tol, f"{name} differs from torch.kron by {err:.2e} (relative)"


def run_case(out_features: int, in_features: int, tokens: int, reps: int, dtype, device) -> dict:
    variants, facts = build_variants(out_features, in_features, dtype, device)
    x = torch.randn(tokens, in_features, dtype=dtype, device=device)
    check_identical_math(variants, x)
    x.requires_grad_(True)
    grad_out = torch.randn(tokens, out_features, dtype=dtype, device=device)

    def step_of(module):
        params = [p for p in module.parameters() if p.requires_grad]

        def step():
            x.grad = None
            for p in params:
                p.grad = None
            module(x).backward(grad_out)
        return step

    steps = {name: step_of(module) for name, module in variants.items()}
    times = interleaved_medians(steps, reps, device)
    peaks = {name: peak_bytes(step, device) for name, step in steps.items()}
    return {"out": out_features, "in": in_features, "tokens": tokens, **facts,
            "time_s": times, "peak_bytes": peaks,
            "extra_bytes": {name: peaks[name] - peaks["base"] for name in peaks}}


def cases(quick: bool):
    return QUICK_CASES if quick else CASES


def reps_for(out_features: int, in_features: int, tokens: int, quick: bool) -> int:
    """Fewer repetitions for the big cases, where one call already takes seconds on a CPU."""
    work = out_features * in_features * tokens
    reps = 9 if work <= 2**32 else 5 if work <= 2**35 else 3
    return max(3, reps // 2) if quick else reps
