"""`KronModel`: a frozen base model with named adapters — train, switch, merge, save, load."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import AdapterConfig
from .injection import SITE_ATTR, attach, detach, find_places, sites
from .layers import build_adapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


class KronModel(nn.Module):
    """Wraps a `transformers` model; `forward` is the base model's, with the active adapter applied.

    The base model is frozen except `modules_to_save` (by default the task head of a
    `*ForSequenceClassification` model), which are trained and saved with every adapter.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default"):
        super().__init__()
        if sites(model):
            raise ValueError(f"{type(model).__name__} already carries kronpeft adapters; "
                             f"use KronModel.add_adapter to add another")
        self.base_model = model
        self.configs: dict[str, AdapterConfig] = {}
        self.active_adapter: str | None = None
        self.modules_to_save: list[str] = []
        model.requires_grad_(False)
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- adapters -----------------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: AdapterConfig):
        """Add a new adapter (inactive until `set_adapter`)."""
        if not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter name {adapter_name!r} must be non-empty and contain no '.'")
        if adapter_name in self.configs:
            raise ValueError(f"adapter {adapter_name!r} exists already; delete_adapter it first or pick another name")
        places = find_places(self.base_model, config)
        built = []
        for place in places:  # build every adapter before attaching any, so a failure changes nothing
            ref = next(self.base_model.get_submodule(place.owner).parameters())
            try:
                built.append(build_adapter(config, place.out_features, place.in_features, ref.dtype, ref.device))
            except ValueError as err:
                raise ValueError(f"{place.owner}: {err}") from None
        for place, adapter in zip(places, built):
            attach(self.base_model, adapter_name, adapter, place)
        for name in _resolve_modules_to_save(self.base_model, config.modules_to_save):
            if name not in self.modules_to_save:
                self.modules_to_save.append(name)
        for name in self.modules_to_save:
            self.base_model.get_submodule(name).requires_grad_(True)
        self.configs[adapter_name] = config

    def set_adapter(self, adapter_name: str):
        """Make `adapter_name` the one that runs and trains; the others are frozen."""
        self._check_name(adapter_name)
        for _, site in sites(self.base_model):
            site.active = adapter_name
            for name, adapter in site.items():
                adapter.requires_grad_(name == adapter_name)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str):
        self._check_name(adapter_name)
        if self._is_merged(adapter_name):
            self.unmerge_adapter(adapter_name)
        for owner, site in sites(self.base_model):
            if adapter_name in site:
                del site[adapter_name]
                site.reads_span.discard(adapter_name)
            if not len(site):
                detach(owner, site)
        del self.configs[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None
            if self.configs:
                self.set_adapter(next(iter(self.configs)))

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the `with` block (merged weights are taken out meanwhile)."""
        merged = [name for name in self.configs if self._is_merged(name)]
        for name in merged:
            self.unmerge_adapter(name)
        for _, site in sites(self.base_model):
            site.enabled = False
        try:
            yield self
        finally:
            for _, site in sites(self.base_model):
                site.enabled = True
            for name in merged:
                self.merge_adapter(name)

    # -- merging ------------------------------------------------------------------------------------

    def merge_adapter(self, adapter_name: str | None = None):
        """Add `scale · (A ⊗ B)` into each adapted weight; the forward then costs the base model's."""
        adapter_name = self._mergeable(adapter_name)
        with torch.no_grad():
            for owner, site in sites(self.base_model):
                if adapter_name in site and adapter_name not in site.merged:
                    _add_to_weight(owner, site[adapter_name].delta_weight())
                    site.merged.add(adapter_name)

    def unmerge_adapter(self, adapter_name: str | None = None):
        """Subtract a merged adapter from the weights again."""
        adapter_name = adapter_name or self.active_adapter
        with torch.no_grad():
            for owner, site in sites(self.base_model):
                if adapter_name in site.merged:
                    _add_to_weight(owner, -site[adapter_name].delta_weight())
                    site.merged.discard(adapter_name)

    def merge_and_unload(self) -> nn.Module:
        """The plain base model with the active KronA adapter merged in and every adapter removed."""
        self.merge_adapter()
        for owner, site in sites(self.base_model):
            detach(owner, site)
        return self.base_model

    # -- parameters ---------------------------------------------------------------------------------

    def trainable_parameters(self) -> tuple[int, int]:
        """`(trainable, total)` parameter counts."""
        return count_parameters(self)

    def print_trainable_parameters(self):
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # -- saving and loading -------------------------------------------------------------------------

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors (and `modules_to_save`), keyed without the adapter's name."""
        adapter_name = adapter_name or self.active_adapter
        self._check_name(adapter_name)
        marker = f".{SITE_ATTR}.{adapter_name}."
        state = {}
        for key, tensor in self.base_model.state_dict().items():
            if marker in key:
                state[key.replace(marker, f".{SITE_ATTR}.")] = tensor
            elif any(key.startswith(m + ".") for m in self.modules_to_save):
                state[key] = tensor
        return state

    def save_pretrained(self, save_directory: str | os.PathLike, adapter_name: str | None = None):
        """Write `adapter_config.json` + `adapter_model.safetensors` (adapter and `modules_to_save` only).

        Atomic: files are written in a temporary directory and renamed into place, weights first.
        """
        adapter_name = adapter_name or self.active_adapter
        state = {k: v.detach().cpu().contiguous() for k, v in self.adapter_state_dict(adapter_name).items()}
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
            meta = {
                "format_version": FORMAT_VERSION,
                "adapter": self.configs[adapter_name].to_dict(),
                "modules_to_save": self.modules_to_save,
                "base_model": _describe(self.base_model),
                "weights_sha256": _sha256(tmp / WEIGHTS_NAME),
            }
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            for path in (tmp / WEIGHTS_NAME, tmp / CONFIG_NAME):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            if not target.exists():
                os.rename(tmp, target)
            else:
                for name in (WEIGHTS_NAME, CONFIG_NAME):
                    os.replace(tmp / name, target / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default") -> "KronModel":
        """Wrap `model` and load the adapter saved in `adapter_dir` into it."""
        meta, state = read_adapter(adapter_dir, model)
        kron_model = cls(model, AdapterConfig.from_dict(meta["adapter"]), adapter_name)
        kron_model._load_state(adapter_dir, adapter_name, state)
        return kron_model

    def load_adapter(self, adapter_dir: str | os.PathLike, adapter_name: str):
        """Add the adapter saved in `adapter_dir` under `adapter_name` (inactive until `set_adapter`)."""
        meta, state = read_adapter(adapter_dir, self.base_model)
        self.add_adapter(adapter_name, AdapterConfig.from_dict(meta["adapter"]))
        try:
            self._load_state(adapter_dir, adapter_name, state)
        except ValueError:
            self.delete_adapter(adapter_name)
            raise

    def _load_state(self, adapter_dir, adapter_name: str, state: dict[str, torch.Tensor]):
        expected = self.adapter_state_dict(adapter_name)
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"adapter in {adapter_dir} does not fit {type(self.base_model).__name__}: "
                f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}; "
                f"load it into the base model it was trained on"
            )
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise ValueError(
                    f"adapter in {adapter_dir} does not fit {type(self.base_model).__name__}: {key} was saved with "
                    f"shape {tuple(tensor.shape)} but the model needs {tuple(expected[key].shape)}; "
                    f"load it into the base model it was trained on"
                )
        with torch.no_grad():
            for key, tensor in state.items():
                expected[key].copy_(tensor)

    # -- helpers ------------------------------------------------------------------------------------

    def _check_name(self, adapter_name: str | None):
        if adapter_name not in self.configs:
            raise ValueError(f"no adapter named {adapter_name!r}; this model has {sorted(self.configs)}")

    def _is_merged(self, adapter_name: str) -> bool:
        return any(adapter_name in site.merged for _, site in sites(self.base_model))

    def _mergeable(self, adapter_name: str | None) -> str:
        adapter_name = adapter_name or self.active_adapter
        self._check_name(adapter_name)
        for _, site in sites(self.base_model):
            if adapter_name in site and not site[adapter_name].mergeable:
                method = self.configs[adapter_name].method
                raise ValueError(
                    f"adapter {adapter_name!r} ({method}) cannot be merged: it is non-linear in the hidden state "
                    f"or spans a whole feed-forward block, so no single weight matrix equals it. "
                    f"Only KronA (an update of one linear layer) merges; run this adapter unmerged."
                )
        return adapter_name


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts of any module."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def get_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> KronModel:
    """Freeze `model` and add the adapter `config` describes; see `KronModel`."""
    return KronModel(model, config, adapter_name)


def read_adapter(adapter_dir: str | os.PathLike, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and check an adapter directory (no unpickling: JSON + safetensors)."""
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {adapter_dir} is not a kronpeft adapter directory "
                                    f"(it needs {CONFIG_NAME} and {WEIGHTS_NAME}, written by save_pretrained)")
    try:
        meta = json.loads(config_path.read_text())
        meta["adapter"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{config_path} is corrupt ({err}); save the adapter again") from None
    if meta.get("weights_sha256") != _sha256(weights_path):
        raise ValueError(f"{weights_path} is corrupt or does not belong to {config_path} (checksum mismatch); "
                         f"save the adapter again")
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights_path} is corrupt ({err}); save the adapter again") from None
    saved, here = meta.get("base_model", {}).get("model_type"), _describe(model)["model_type"]
    if saved != here:
        raise ValueError(f"adapter in {adapter_dir} was trained on a {saved!r} model, not {here!r} "
                         f"({type(model).__name__}); load it into the base model it was trained on")
    return meta, state


def _resolve_modules_to_save(model: nn.Module, names: list[str] | None) -> list[str]:
    """Full module names for `modules_to_save`; None means the head of a sequence classifier."""
    if names is None:
        if not type(model).__name__.endswith("ForSequenceClassification"):
            return []
        backbone = getattr(model, "base_model_prefix", None)
        return [n for n, m in model.named_children() if n != backbone and any(True for _ in m.parameters())]
    modules = [n for n, _ in model.named_modules() if n]
    resolved = []
    for wanted in names:
        found = [n for n in modules if n == wanted or n.endswith("." + wanted)]
        if not found:
            raise ValueError(f"modules_to_save entry {wanted!r} matches no module of {type(model).__name__}; "
                             f"its top-level modules are {[n for n, _ in model.named_children()]}")
        resolved += found
    return resolved


def _add_to_weight(module: nn.Module, delta: torch.Tensor):
    """`W += delta` for `delta (out, in)`; GPT-2's `Conv1D` stores `W (in, out)`."""
    weight = module.weight
    weight += (delta.T if isinstance(module, Conv1D) else delta).to(weight.dtype)


def _describe(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None),
        "class": type(model).__name__,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
