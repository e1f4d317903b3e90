"""Build every method the CLI compares, on the same base model.

Ours (`krona`, `kronab`, `kronab-res`, `adakron`, `bottleneck`) come from kronpeft configs;
`lora` and `lokr` from the real `peft` library (the anchors); `full` trains everything.
LoKr is built with full (not low-rank) factors of exactly KronA's shapes and `alpha = r`
(scaling 1), so its update `w1 ⊗ w2` is KronA's `A ⊗ B` with the same parameter count.

Every trained model is saved to a directory `kronpeft eval` can load back: a kronpeft adapter
(`KronModel.save_pretrained`), a peft adapter (`PeftModel.save_pretrained`) or a whole model
(`save_pretrained`, for `full` and merged exports); `kronpeft_run.json` beside it names the
method, base model and task.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .. import sharding
from ..atomic import replacing_dir, write_json_atomic
from ..choices import DEFAULT_LR, DEFAULT_R, METHODS, OURS, PEFT_METHODS  # noqa: F401 (still importable here)
from ..config import AdaKronConfig, BottleneckConfig, KronABConfig, KronAConfig
from ..injection import find_places
from ..kron import kron_shapes
from ..memory import check_fits
from ..model import KronModel, get_model
from ..modules import classifier_head

RUN_FILE = "kronpeft_run.json"


class MethodError(ValueError):
    """A method cannot be built with the options given (bad --a-shape, --targets, ...)."""


def build(method: str, model: nn.Module, *, a_shape=None, scale: float = 1.0, r: int | None = None,
          targets: list[str] | str | None = None, init: str | None = None, causal_lm: bool = False,
          rank: int = 1) -> nn.Module:
    """Wrap `model` (a `*ForSequenceClassification`, or a `*ForCausalLM` with `causal_lm=True`) for
    `method`; returns the model to train."""
    if method not in METHODS:
        raise MethodError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    r = r if r is not None else DEFAULT_R.get(method)
    try:
        if method == "krona":
            return get_model(model, KronAConfig(target_modules=targets, a_shape=a_shape, scale=scale, rank=rank,
                                                init=init or "zero"))
        if method in ("kronab", "kronab-res"):
            return get_model(model, KronABConfig(a_shape=a_shape, scale=scale, residual=method == "kronab-res"))
        if method == "adakron":
            return get_model(model, AdaKronConfig(r=r) if init is None else AdaKronConfig(r=r, init=init))
        if method == "bottleneck":
            return get_model(model, BottleneckConfig(r=r))
    except ValueError as err:
        raise MethodError(f"cannot build {method}: {err}") from None
    if method == "full":
        model.requires_grad_(True)
        return model
    return _build_peft(method, model, a_shape=a_shape, r=r, targets=targets,
                       task_type="CAUSAL_LM" if causal_lm else "SEQ_CLS")


def _build_peft(method: str, model: nn.Module, *, a_shape, r, targets, task_type: str) -> nn.Module:
    try:
        import peft
    except ImportError:
        raise MethodError(f"method {method!r} needs the peft library: pip install peft") from None
    # The very layers KronA adapts (same targets, same preset, same errors), named in full for peft;
    # --a-shape concerns LoKr only.
    a_shape = a_shape if method == "lokr" else None
    try:
        places = find_places(model, KronAConfig(target_modules=targets, a_shape=a_shape))
        shapes = {p.owner: kron_shapes(p.out_features, p.in_features, a_shape) for p in places}
        if method == "lora":  # A (r, in) and B (out, r) per layer, in the base's dtype
            ref = next(model.parameters())
            check_fits(sum((p.out_features + p.in_features) * r for p in places) * ref.element_size(), ref.device,
                       f"the {len(places)} LoRA adapters of rank {r}")
    except ValueError as err:
        raise MethodError(f"cannot build {method}: {err}") from None
    target_modules = list(shapes)
    head = classifier_head(model) or None  # peft's SEQ_CLS default trains only `classifier`/`score`
    if method == "lora":
        config = peft.LoraConfig(task_type=task_type, r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                 target_modules=target_modules, modules_to_save=head)
        return peft.get_peft_model(model, config)
    # LoKr with KronA's factor shapes. peft factors each dimension with `factorization(dim, f)`;
    # `decompose_factor = a1` gives (a1, dim/a1) when a1 divides dim, and `-1` the balanced split,
    # which for the square projections of BERT-like models equals kron_shapes' default.
    (a1, a2), (b1, b2) = next(iter(shapes.values()))
    if a_shape is not None and a1 != a2:
        raise MethodError(f"lokr: peft factors both dimensions with one factor, so --a-shape must be square "
                          f"(a1 == a2), got {a1},{a2}")
    rank = max(max(b1, b2) for _, (b1, b2) in shapes.values())  # >= max/2: peft keeps w2 full
    config = peft.LoKrConfig(task_type=task_type, r=rank, alpha=rank, decompose_both=False,
                             decompose_factor=a1 if a_shape is not None else -1,
                             target_modules=target_modules, rank_dropout=0.0, module_dropout=0.0,
                             modules_to_save=head)
    wrapped = peft.get_peft_model(model, config)
    for name, module in wrapped.named_modules():
        if hasattr(module, "lokr_w1") and "default" in module.lokr_w1:
            key = name.split("base_model.model.", 1)[-1]
            want = shapes.get(key)
            got = (tuple(module.lokr_w1["default"].shape), tuple(module.lokr_w2["default"].shape))
            if want is not None and got != tuple(tuple(s) for s in want):
                raise MethodError(f"lokr: peft built factors {got} for {key}, not KronA's {want}; "
                                  f"pick an --a-shape peft can express (a1 == a2 dividing the width)")
    return wrapped


# -- parameter bookkeeping ----------------------------------------------------------------------------

def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by parameter name (what a resume checkpoint stores)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]):
    params = dict(model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(state) != wanted:
        raise ValueError(f"checkpoint does not fit this model ({len(set(state) ^ wanted)} tensors differ); "
                         f"resume with the same --method/--model/options, or start over with --overwrite")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(sharding.shard_like(t, params[n]))


# -- saving and loading -------------------------------------------------------------------------------

def save_trained(model: nn.Module, method: str, directory: str | os.PathLike, run: dict, tokenizer=None):
    """Save the trained part of `model` to `directory` with `kronpeft_run.json` describing it; the folder
    is written whole and swapped in (a crash leaves the previous save). A sharded (FSDP2) model: call it
    on every process; they gather the full tensors and the main process writes."""
    kind = "kronpeft" if isinstance(model, KronModel) else "peft" if method in PEFT_METHODS else "model"
    sharded = sharding.is_sharded(model.parameters())
    full = _full_state_dict(model) if sharded and kind != "kronpeft" else None
    if not sharding.is_main_process():
        if sharded and kind == "kronpeft":
            model.save_pretrained(directory)  # gathers with the main process, which alone writes
        return
    with replacing_dir(directory) as tmp:
        model.save_pretrained(tmp, **({} if full is None else {"state_dict": full}))
        if kind == "model" and tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / RUN_FILE, {**run, "method": method, "kind": kind})


def _full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of a sharded model on the main process (empty on the others), gathered one
    tensor at a time into CPU memory: PyTorch's `get_model_state_dict`. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def read_run(directory: str | os.PathLike) -> dict:
    """What `kronpeft_run.json` says about a saved directory; guessed from its files without it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} not found; pass the adapter/ folder of a "
                                f"kronpeft train run (or a merged export)")
    path = directory / RUN_FILE
    if path.is_file():
        try:
            run = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise ValueError(f"{path} is corrupt ({err}); train again or pass --model/--task explicitly") from None
        if not isinstance(run, dict) or run.get("kind") not in ("kronpeft", "peft", "model") \
                or not all(isinstance(run.get(k), (str, type(None))) for k in ("task", "model", "method")):
            raise ValueError(f"{path} is not a kronpeft run file (a JSON object with kind kronpeft/peft/model and "
                             f"string task/model/method); train again, or delete it and pass --model/--task")
        return run
    config = directory / "adapter_config.json"
    if config.is_file():
        meta = json.loads(config.read_text())
        if "peft_type" in meta:
            return {"kind": "peft", "method": str(meta["peft_type"]).lower(),
                    "model": meta.get("base_model_name_or_path")}
        if "adapter" in meta:
            return {"kind": "kronpeft", "method": meta["adapter"].get("method"),
                    "model": meta.get("base_model", {}).get("name_or_path")}
    if (directory / "config.json").is_file():
        return {"kind": "model", "method": "full", "model": str(directory)}
    raise ValueError(f"{directory} holds neither an adapter nor a model; pass the adapter/ folder of a "
                     f"kronpeft train run (or a merged export)")


def load_trained(directory: str | os.PathLike, base: nn.Module | None, run: dict) -> nn.Module:
    """Load what `save_trained` wrote: adapters into `base`; whole models ignore `base`."""
    kind = run.get("kind")
    if kind == "kronpeft":
        return KronModel.from_pretrained(base, directory)
    if kind == "peft":
        import peft

        if not (Path(directory) / "adapter_model.safetensors").is_file():
            raise ValueError(f"{directory} holds no adapter_model.safetensors (pickled adapter_model.bin is not "
                             f"loaded: kronpeft loads safetensors only); save the peft adapter with "
                             f"safe_serialization=True")

        try:
            return peft.PeftModel.from_pretrained(base, str(directory))
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"peft adapter in {directory} does not fit the base model ({first}); "
                             f"load it into the base model it was trained on") from None
    raise ValueError(f"{directory}: unknown saved kind {kind!r}")

