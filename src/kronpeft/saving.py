"""The adapter folder format: `adapter_config.json` + the safetensors weights file it names.

Free functions, as PEFT's `get_peft_model_state_dict` / `set_peft_model_state_dict`: what to write
(`adapter_state`, `adapter_meta`), how to write and read a folder (`write_adapter`, `read_adapter`,
`read_adapter_files`: JSON and safetensors only, never unpickling), how to put saved tensors into a
model (`load_adapter_state`), and the state-dict hooks that keep a `KronModel`'s `state_dict()` to
what is trained. `KronModel.save_pretrained` / `from_pretrained` / `load_adapter` orchestrate them.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import sharding
from .atomic import commit, replacing_dir, sha256, write_tensors
from .config import AdapterConfig
from .injection import SITE_ATTR, sites

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_STEM = "adapter_model"
FORMAT_VERSION = 2  # 2: `weights_file` names the weights (versioned, crash-safe overwrite); 1: always WEIGHTS_NAME
READABLE_VERSIONS = (1, 2)
_LOADING = contextvars.ContextVar("kronpeft_loading", default=False)  # adapters built to be loaded: no kpsvd SVD


# -- what is saved ------------------------------------------------------------------------------

def adapter_state(base_model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed without the adapter's name (`<module>.kronpeft.<tensor>`), and its
    copies of `modules_to_save` under the original modules' keys."""
    state = {}
    for _, site in sites(base_model):
        if adapter_name not in site:
            continue
        prefix = f"{site.owner_name}." if site.owner_name else ""
        if adapter_name not in site.copies:
            prefix += f"{SITE_ATTR}."
        for key, tensor in site[adapter_name].state_dict().items():
            state[prefix + key] = tensor
    return state


def full_states(base_model: nn.Module, names: list[str], state_of) -> tuple[dict[str, dict[str, torch.Tensor]], bool]:
    """`({name: state_of(name), copied, whole}, sharded)`: on a sharded model (FSDP1, ZeRO-3, FSDP2) every
    process takes part in gathering the full tensors; `sharded` says so (then only the main process writes)."""
    with sharding.full_params(base_model) as gathered:  # FSDP1, ZeRO-3: the full tensors, copied
        states = {name: {k: t.clone() for k, t in state_of(name).items()} for name in names}
    sharded = gathered or sharding.is_sharded(t for state in states.values() for t in state.values())
    if sharded:  # every process gathers (collectives; FSDP2 here)
        states = {name: sharding.gather_full(state) for name, state in states.items()}
    return states, sharded


def adapter_meta(base_model: nn.Module, adapter_name: str, config: AdapterConfig, saved_modules: list[str]) -> dict:
    """The `adapter_config.json` entries of one adapter (`write_adapter` adds the weights' name and checksum)."""
    return {
        "format_version": FORMAT_VERSION,
        "adapter": config.to_dict(),
        "modules_to_save": saved_modules,
        "base_model": _describe(base_model),
        "conv1d_modules": _conv1d_modules(base_model, adapter_name),
    }


def _conv1d_modules(base_model: nn.Module, adapter_name: str) -> list[str]:
    """Adapted layers that are GPT-2 `Conv1D`s (weight `(in, out)`), which PEFT's LoKr cannot adapt."""
    return sorted(name for name, m in base_model.named_modules()
                  if isinstance(m, Conv1D) and adapter_name in getattr(m, SITE_ATTR, {}))


def _describe(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None),
        "class": type(model).__name__,
    }


# -- writing ------------------------------------------------------------------------------------

def write_adapter(save_directory: str | os.PathLike, meta: dict, state: dict[str, torch.Tensor]):
    """Write `meta` as `adapter_config.json` (plus the weights' file name and checksum) and `state`.

    Crash-safe overwrite: new weights go under a name the current config does not use, then the
    config is atomically replaced (see `atomic.py`); after a crash at any point the old or the new
    adapter loads. A first save appears whole or not at all.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"cannot save the adapter to {target}: it is a file; pass a folder path")
    if target.exists():
        _write_adapter(target, state, meta)
        return
    with replacing_dir(target) as tmp:  # a first save: written beside the target, renamed in whole
        _write_adapter(tmp, state, meta)


def _write_adapter(directory: Path, state: dict[str, torch.Tensor], meta: dict):
    overwrite = (directory / CONFIG_NAME).exists()
    weights_file, digest = write_tensors(directory, WEIGHTS_STEM, state, overwrite)
    commit(directory, CONFIG_NAME,
           lambda names: {**meta, "weights_file": names[WEIGHTS_STEM], "weights_sha256": digest},
           {WEIGHTS_STEM: weights_file})


# -- reading ------------------------------------------------------------------------------------

def local_adapter_dir(adapter_dir: str | os.PathLike, revision: str | None, token: str | None) -> Path:
    """`adapter_dir` itself when it exists locally, else the Hub repository of that id, downloaded."""
    if Path(adapter_dir).exists() or not _looks_like_repo_id(str(adapter_dir)):
        return Path(adapter_dir)
    from .hub import download_adapter

    return download_adapter(str(adapter_dir), revision=revision, token=token)


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "~"))


def read_adapter(adapter_dir: str | os.PathLike, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and check an adapter directory for `model` (no unpickling: JSON + safetensors)."""
    meta, state = read_adapter_files(adapter_dir)
    described = meta.get("base_model")
    saved, here = (described.get("model_type") if isinstance(described, dict) else None), _describe(model)["model_type"]
    if saved != here:
        raise ValueError(f"adapter in {adapter_dir} was trained on a {saved!r} model, not {here!r} "
                         f"({type(model).__name__}); load it into the base model it was trained on")
    return meta, state


def read_adapter_files(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """`(meta, tensors)` of a kronpeft adapter directory, checked against its checksum; a foreign
    adapter (PEFT's, or any other `adapter_config.json`) is named as such, with how to convert it."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / CONFIG_NAME
    meta = _read_meta(adapter_dir, config_path)
    weights_file = meta.get("weights_file", WEIGHTS_NAME)
    if not isinstance(weights_file, str) or Path(weights_file).name != weights_file or not weights_file:
        raise ValueError(f"{config_path} is corrupt (weights_file {weights_file!r} is not a file name); "
                         f"save the adapter again")
    weights_path = adapter_dir / weights_file
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found: the weights {config_path} names are missing; "
                                f"save the adapter again")
    if meta.get("weights_sha256") != sha256(weights_path):
        raise ValueError(f"{weights_path} is corrupt or does not belong to {config_path} (checksum mismatch); "
                         f"save the adapter again")
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights_path} is corrupt ({err}); save the adapter again") from None
    return meta, state


def _read_meta(adapter_dir: Path, config_path: Path) -> dict:
    """The parsed `adapter_config.json` of a kronpeft adapter of a readable format version."""
    if not config_path.is_file() and (adapter_dir / "model.safetensors").is_file():
        raise FileNotFoundError(_trainer_folder_message(adapter_dir))
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {adapter_dir} is not a kronpeft adapter directory "
                                f"(it needs {CONFIG_NAME} and its weights file, written by save_pretrained)")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{config_path} is corrupt ({err}); save the adapter again") from None
    if isinstance(meta, dict) and "peft_type" in meta:
        raise ValueError(_peft_adapter_message(adapter_dir, meta))
    if not isinstance(meta, dict) or not isinstance(meta.get("adapter"), dict):
        keys = sorted(meta)[:6] if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{adapter_dir} is not a kronpeft adapter: its {CONFIG_NAME} has {keys}, not the "
                         f"'adapter' entry KronModel.save_pretrained writes; load it with the library that wrote it")
    version = meta.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        newer = type(version) is int and version > FORMAT_VERSION
        raise ValueError(f"{config_path} has format_version {version!r}; this kronpeft reads {list(READABLE_VERSIONS)}"
                         + ("; upgrade kronpeft to load it" if newer else "; save the adapter again"))
    return meta


def _trainer_folder_message(adapter_dir: Path) -> str:
    return (f"{adapter_dir} holds transformers.Trainer's model.safetensors but no {CONFIG_NAME}: Trainer saves a "
            f"KronModel's trained tensors only. Give the Trainer callbacks=[KronSaveCallback()] (from "
            f"kronpeft.integrations.trainer; then trainer.save_model() and every checkpoint write the adapter) or call "
            f"model.save_pretrained(folder) after training; to rescue this folder, rebuild the model with "
            f"get_model(base, <the same config>) and call model.load_state_dict(safetensors.torch.load_file("
            f"'{adapter_dir / 'model.safetensors'}'))")


def _peft_adapter_message(adapter_dir: Path, meta: dict) -> str:
    peft_type = meta["peft_type"]
    how = ("convert it with `kronpeft convert --to kronpeft` (or kronpeft.interop.from_peft) when its factors "
           "are full (decompose_both=False), or load it with peft.PeftModel.from_pretrained"
           if str(peft_type).upper() == "LOKR" else "load it with peft.PeftModel.from_pretrained; only PEFT LoKr "
           "adapters convert to kronpeft (KronA)")
    version = meta.get("peft_version", "?")
    return f"{adapter_dir} holds a PEFT {peft_type} adapter (peft {version}), not a kronpeft one: {how}"


def config_from(meta: dict, adapter_dir) -> AdapterConfig:
    """The adapter's config from its `adapter_config.json` entries, errors naming the file."""
    try:
        return AdapterConfig.from_dict(meta["adapter"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{Path(adapter_dir) / CONFIG_NAME}: {err}") from None


# -- loading into a model -----------------------------------------------------------------------

@contextlib.contextmanager
def loading():
    """Adapters built inside are about to receive saved tensors: skip data-dependent initialisation."""
    token = _LOADING.set(True)
    try:
        yield
    finally:
        _LOADING.reset(token)


def is_loading() -> bool:
    """Inside `loading()`: adapters being built will receive saved tensors (no `init="kpsvd"` SVD)."""
    return _LOADING.get()


def load_adapter_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], adapter_dir,
                       model_name: str):
    """Copy the saved `state` into the adapter's tensors `expected` (`adapter_state`'s), after checking
    that the keys, shapes and dtypes fit and that nothing is on the meta device. `model_name`: errors say it."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter in {adapter_dir} does not fit {model_name}: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}; "
            f"load it into the base model it was trained on"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"adapter in {adapter_dir} does not fit {model_name}: {key} was saved with "
                f"shape {tuple(tensor.shape)} but the model needs {tuple(expected[key].shape)}; "
                f"load it into the base model it was trained on"
            )
        if not tensor.is_floating_point():
            raise ValueError(
                f"adapter in {adapter_dir} is corrupt: {key} is saved as {tensor.dtype}, not a floating-point "
                f"dtype (adapter weights are float32/bf16/fp16); save the adapter again"
            )
        if expected[key].is_meta:
            raise ValueError(
                f"cannot load the adapter in {adapter_dir}: {model_name} is on the meta "
                f"device (no storage; {key} would silently load nothing); load the base model's weights first "
                f"(e.g. from_pretrained without device 'meta', or to_empty() and load_state_dict)"
            )
    with torch.no_grad():
        for key, tensor in state.items():
            expected[key].copy_(tensor)


# -- state-dict hooks: a KronModel's state_dict() holds only what is trained ----------------------

def is_trained_key(key: str) -> bool:
    """Adapters and the adapters' copies of `modules_to_save` all live under `.kronpeft.` sites."""
    return f".{SITE_ATTR}." in key


def keep_trained_state(kron_model: nn.Module, state_dict: dict, prefix: str, local_metadata):
    """State-dict post-hook: drop every key that is not trained (the frozen base)."""
    for key in [k for k in state_dict if k.startswith(prefix) and not is_trained_key(k[len(prefix):])]:
        del state_dict[key]


def ignore_missing_frozen_keys(kron_model: nn.Module, incompatible_keys):
    """A state dict of the trained tensors alone loads strictly: frozen base keys are not missing."""
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if is_trained_key(k)]
