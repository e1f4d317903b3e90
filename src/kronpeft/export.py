"""Export a KronA adapter (any Kronecker rank, any init) to a PEFT LoRA adapter, for servers that load LoRA
only (vLLM, TGI), without ever building a layer's dense `ΔW`.

One term: the SVD of `A ⊗ B` is `(U_A ⊗ U_B)(Σ_A ⊗ Σ_B)(V_A ⊗ V_B)ᵀ`, so the best rank-`K` LoRA takes the `K`
largest products `σᵢ(A)·σⱼ(B)` (`kron.kron_svd`); exact at `K = rank(A)·rank(B)`. Several terms (`rank > 1`,
or `init="kpsvd"` whose frozen initial terms are subtracted): a randomised SVD whose products with `ΔW` are
`kron_sum_linear` calls (`kron.kron_sum_svd`). `ΔW ≈ lora_B @ lora_A` with `lora_alpha = r` (scaling 1).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from .atomic import replacing_dir
from .injection import SITE_ATTR
from .kron import kron_svd, kron_sum_linear, kron_sum_norm2, kron_sum_svd
from .saving import WEIGHTS_NAME, read_adapter_files
from .names import check_apart, check_path

PEFT_PREFIX = "base_model.model."
_SITE = f".{SITE_ATTR}."
_RANK_TOL = 1e-10  # singular values below this fraction of the largest count as zero (numerical rank)


@dataclass
class LayerExport:
    """One layer's export: the exact rank of its `ΔW`, the energy kept (`Σ kept σ² / Σ σ²`), and the largest
    absolute change of its output on the probe batch, also relative to the largest output."""

    module: str
    exact_rank: int
    energy: float
    max_change: float
    relative_change: float
    norm2: float  # ‖ΔW‖_F², to weigh the layers' energies into the total


def to_lora(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, rank: int | None = None,
            probe_size: int = 64, seed: int = 0) -> tuple[int, list[LayerExport]]:
    """Write the KronA adapter in `adapter_dir` as a PEFT LoRA adapter of rank `rank` (one `r` for every layer;
    None or more than the largest exact rank: exact) into `out_dir`; returns `(r, per-layer report)`. Task heads
    (`modules_to_save`) are written as PEFT writes them. The probe batch: `probe_size` N(0, 1) inputs per layer."""
    check_apart(check_path(adapter_dir, "to_lora: adapter_dir"), check_path(out_dir, "to_lora: out_dir"),
                "adapter_dir", "out_dir")
    meta, state = read_adapter_files(adapter_dir)
    config = meta["adapter"]
    if config.get("method") != "krona":
        raise ValueError(f"{adapter_dir} holds a {config.get('method')!r} adapter: KronA^B, KronA^B_res, AdaKron and "
                         f"bottleneck adapters are not updates of one linear layer, so no LoRA equals them; only "
                         f"KronA exports to LoRA")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"to_lora: rank={rank!r} must be a positive int (the LoRA rank r), or None for exact")
    scale = float(config.get("scale", 1.0))
    layers = {module: _terms(state, module) for module in _modules(state)}
    exact = {module: _exact_rank(A, B) for module, (A, B) in layers.items()}
    r = max(1, max(exact.values())) if rank is None else min(rank, max(1, max(exact.values())))
    generator = torch.Generator().manual_seed(seed)
    tensors, report = {}, []
    for module, (A, B) in layers.items():
        lora_A, lora_B, energy = _lora_factors(A, B, scale, r, generator)
        change, relative = _probe_change(A, B, scale, lora_A, lora_B, probe_size, generator)
        norm2 = scale ** 2 * float(kron_sum_norm2(A, B))
        report.append(LayerExport(module, exact[module], energy, change, relative, norm2))
        dtype = state[f"{module}{_SITE}A"].dtype
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = lora_A.to(dtype)
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = lora_B.to(dtype)
    tensors.update({PEFT_PREFIX + k: v for k, v in state.items() if _SITE not in k})  # the task heads
    _write(out_dir, tensors, meta, sorted(layers), r)
    return r, report


def _modules(state: dict) -> list[str]:
    return sorted({key.split(_SITE)[0] for key in state if _SITE in key})


def _terms(state: dict, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A (m, a1, a2), B (m, b1, b2))` in float64 with `ΔW / scale = Σ Aᵢ ⊗ Bᵢ` (kpsvd: `[A, -A0]`, `[B, B0]`)."""
    get = lambda name: state[f"{module}{_SITE}{name}"].to(torch.float64)  # noqa: E731
    A, B = get("A"), get("B")
    A, B = A.reshape(-1, *A.shape[-2:]), B.reshape(-1, *B.shape[-2:])
    if f"{module}{_SITE}A0" in state:
        A = torch.cat([A, -get("A0").reshape(A.shape)])
        B = torch.cat([B, get("B0").reshape(B.shape)])
    return A, B


def _exact_rank(A: torch.Tensor, B: torch.Tensor) -> int:
    """The rank of `Σ Aᵢ ⊗ Bᵢ`: `rank(A)·rank(B)` for one term; for several, the rank of a randomised SVD
    wide enough to hold every term's rank (`Σ min(a1, a2)·min(b1, b2)`, at most the layer's width)."""
    (m, a1, a2), (_, b1, b2) = A.shape, B.shape
    if m == 1:
        return _numerical_rank(torch.linalg.svdvals(A[0])) * _numerical_rank(torch.linalg.svdvals(B[0]))
    bound = min(a1 * b1, a2 * b2, m * min(a1, a2) * min(b1, b2))
    _, S, _ = kron_sum_svd(A, B, bound, generator=torch.Generator().manual_seed(0))
    return _numerical_rank(S)


def _numerical_rank(S: torch.Tensor) -> int:
    return int((S > _RANK_TOL * S.max()).sum()) if S.numel() and S.max() > 0 else 0


def _lora_factors(A, B, scale: float, r: int, generator):
    """`(lora_A (r, in), lora_B (out, r), energy kept)`: `lora_B @ lora_A` the best rank-`r` approximation of
    `scale · Σ Aᵢ ⊗ Bᵢ` (zero columns beyond the layer's rank)."""
    (m, a1, a2), (_, b1, b2) = A.shape, B.shape
    width = min(r, a1 * b1, a2 * b2, m * min(a1, a2) * min(b1, b2))
    U, S, Vh = kron_svd(A[0], B[0], width) if m == 1 else kron_sum_svd(A, B, width, generator=generator)
    total = float(kron_sum_norm2(A, B))
    energy = float(S.square().sum()) / total if total > 0 else 1.0
    root = (abs(scale) * S).sqrt()
    lora_A = torch.zeros(r, a2 * b2, dtype=torch.float64)
    lora_B = torch.zeros(a1 * b1, r, dtype=torch.float64)
    lora_A[:width] = root[:, None] * Vh
    lora_B[:, :width] = (1.0 if scale >= 0 else -1.0) * U * root
    return lora_A, lora_B, min(energy, 1.0)


def _probe_change(A, B, scale: float, lora_A, lora_B, probe_size: int, generator) -> tuple[float, float]:
    x = torch.randn(probe_size, A.shape[2] * B.shape[2], dtype=torch.float64, generator=generator)
    want = scale * kron_sum_linear(x, A, B)
    change = float((x @ lora_A.T @ lora_B.T - want).abs().max())
    largest = float(want.abs().max())
    return change, change / largest if largest > 0 else 0.0


def _write(out_dir, tensors: dict, meta: dict, modules: list[str], r: int):
    from peft import LoraConfig

    conv1d = bool(meta.get("conv1d_modules"))
    peft_config = LoraConfig(
        r=r, lora_alpha=r, target_modules=modules, lora_dropout=0.0, fan_in_fan_out=conv1d,
        modules_to_save=list(meta.get("modules_to_save") or []) or None,
        base_model_name_or_path=meta.get("base_model", {}).get("name_or_path"))
    with replacing_dir(out_dir, keep_others=True) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        peft_config.save_pretrained(str(tmp))


def format_report(r: int, report: list[LayerExport], asked: int | None) -> str:
    """The per-layer and total lines `kronpeft convert --to lora` prints."""
    lines = [f"{e.module}: exact rank {e.exact_rank}, energy kept {100 * e.energy:.2f}%, largest output change "
             f"{e.max_change:.3g} ({100 * e.relative_change:.2g}% of the largest output)" for e in report]
    widest = max(e.exact_rank for e in report)
    total = sum(e.norm2 for e in report)
    energy = sum(e.energy * e.norm2 for e in report) / total if total > 0 else 1.0
    lines.append(f"total: LoRA r={r} on {len(report)} layers, energy kept {100 * energy:.2f}%, largest output "
                 f"change {max(e.max_change for e in report):.3g}")
    if asked is not None and asked > widest:
        lines.append(f"note: --rank {asked} is above the largest exact rank {widest}: exported exactly at r={r}")
    elif r >= widest:
        lines.append(f"note: r={r} is exact (the largest exact rank of these layers)")
    return "\n".join(lines)
