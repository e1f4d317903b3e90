"""`KronModel`: a frozen base model with named adapters — train, switch, merge, save, load.

Every call that adds something (`get_model`, `add_adapter`, `load_adapter`, `from_pretrained`)
validates first and rolls back on failure: afterwards the base model's outputs, trainable
parameters and state-dict keys are exactly what they were.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
import json
import os
import tempfile
import warnings
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .atomic import commit, replacing_dir, sha256, write_tensors
from .config import AdapterConfig, KronAConfig
from . import sharding
from .injection import (SITE_ATTR, AdapterSite, Place, attach, base_modules, copy_module, dense_weight, detach,
                        find_places, linear_shape, sites)
from .layers import build_adapter
from .memory import adapter_bytes, check_fits
from .mixed import mixed_batch
from .names import check_adapter_name, check_path

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_STEM = "adapter_model"
FORMAT_VERSION = 2  # 2: `weights_file` names the weights (versioned, crash-safe overwrite); 1: always WEIGHTS_NAME
READABLE_VERSIONS = (1, 2)
_LOADING = contextvars.ContextVar("kronpeft_loading", default=False)  # adapters built to be loaded: no kpsvd SVD
UNLOADED = ("this KronModel was merged and unloaded (merge_and_unload); use the model that call returned, "
            "or wrap a base model again with get_model")


class KronModel(nn.Module):
    """Wraps a `transformers` model; `forward` is the base model's, with the active adapter applied.

    The base model is frozen. Each adapter trains and saves its own copy of its `modules_to_save`
    (by default the task head of a `*ForSequenceClassification` model), switched with the adapter;
    `disable_adapter()` runs the original modules.
    `autocast_adapter_dtype=True`: on a bf16/fp16 base the adapters are kept in fp32 (as PEFT's
    option of that name); False keeps them in the base's dtype.

    For `transformers.Trainer` as-is: `forward` advertises the base model's named parameters (so
    the Trainer keeps the input columns and finds `labels`), and `state_dict()` / `load_state_dict()`
    hold only what is trained -- every adapter and its copies of `modules_to_save` -- so Trainer and
    accelerate checkpoints are adapter-sized and load back (the frozen base: `base_model.state_dict()`).
    """

    def __new__(cls, model: nn.Module | None = None, *args, **kwargs):
        return super().__new__(cls if model is None else _with_forward_signature(cls, type(model)))

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        if sites(model):
            raise ValueError(f"{type(model).__name__} already carries kronpeft adapters; "
                             f"use KronModel.add_adapter to add another")
        self.base_model = model
        self.configs: dict[str, AdapterConfig] = {}
        self.saved_modules: dict[str, list[str]] = {}  # adapter -> full names of the modules it copies
        self.active_adapter: str | None = None
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self._inference: set[str] = set()  # adapters loaded with is_trainable=False
        self._disabled = 0  # depth of nested disable_adapter() blocks
        self._remerge: list[str] = []  # adapters the outermost disable_adapter() unmerged
        self._unloaded = False
        with _unchanged_on_failure(model):
            model.requires_grad_(False)
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)
        self.register_state_dict_post_hook(_keep_trained_state)
        self.register_load_state_dict_post_hook(_ignore_missing_frozen_keys)
        self.register_load_state_dict_post_hook(_remerge_loaded)

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The base model's forward with the active adapter; `adapter_names`: one adapter per example (mixed.py)."""
        return self._run(None, args, kwargs, adapter_names)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The base model's `generate`; `adapter_names`: one adapter per example (mixed.py)."""
        return self._run("generate", args, kwargs, adapter_names, expand=True)

    def _run(self, method: str | None, args, kwargs, adapter_names, expand=False):
        """`base_model(*args, **kwargs)` (or its `method`), routing examples by `adapter_names` when given."""
        self._check_usable()
        call = self.base_model if method is None else getattr(self.base_model, method)
        if adapter_names is None:
            return call(*args, **kwargs)
        with mixed_batch(self, adapter_names, args, kwargs, expand):
            return call(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        """Pickle (`torch.save(model)`, multiprocessing) through the base model's class: the per-class
        subclass `_with_forward_signature` makes cannot be found by name."""
        base_class = type(self).__dict__.get("_base_class")
        if base_class is None:
            return super().__reduce_ex__(protocol)
        return _rebuild, (type(self).__mro__[1], base_class), self.__getstate__()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if self.__dict__.get("_unloaded"):
                raise AttributeError(f"{name!r}: {UNLOADED}") from None
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def modules_to_save(self) -> list[str]:
        """Full names of the modules the active adapter trains and saves its own copy of."""
        return list(self.saved_modules.get(self.active_adapter, []))

    # -- adapters -----------------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: AdapterConfig):
        """Add a new adapter (inactive and frozen until `set_adapter`). `config` is copied: changing it
        later changes neither this adapter nor what is saved."""
        self._check_usable()
        self._check_new_name(adapter_name)
        if not isinstance(config, AdapterConfig):
            raise TypeError(f"add_adapter needs a kronpeft AdapterConfig, got {type(config).__name__}")
        config = copy.deepcopy(config)
        model = self.base_model
        places = find_places(model, config)
        saved = _resolve_modules_to_save(model, config.modules_to_save)
        _check_saved_modules(model, places, saved)
        if isinstance(config, KronAConfig):  # mergeable: its weight must belong to its layer alone
            _check_untied(model, [p.owner for p in places], f"{type(config).__name__}.target_modules")
        ref = next(model.parameters())
        shapes = {p.owner: (p.out_features, p.in_features) for p in places}
        check_fits(adapter_bytes(config, shapes, ref.dtype), ref.device, f"the {len(places)} {config.method} adapters")
        built = []
        for place in places:  # build everything before attaching anything
            owner = model.get_submodule(place.owner)
            ref = next(owner.parameters())
            dtype = ref.dtype if ref.dtype.is_floating_point else torch.float32  # an int-packed weight (bitsandbytes)
            if self.autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
                dtype = torch.float32
            try:
                weight = None  # init="kpsvd" takes the SVD of the base weight, unless the factors are being loaded
                if getattr(config, "init", None) == "kpsvd" and not _LOADING.get():
                    weight = dense_weight(owner)
                adapter = build_adapter(config, place.out_features, place.in_features, dtype, ref.device, weight)
            except ValueError as err:
                raise ValueError(f"{place.owner}: {err}") from None
            built.append(adapter.train(owner.training))  # a new adapter follows its host's train/eval mode
        copies = [copy_module(model.get_submodule(name)) for name in saved]
        with self._all_or_nothing():
            for place, adapter in zip(places, built):
                attach(model, adapter_name, adapter, place)
            for name, module in zip(saved, copies):
                attach(model, adapter_name, module, Place(name, None, 0, 0), replaces_owner=True)
            for _, site in sites(model):
                site.enabled = self._disabled == 0
                if adapter_name in site:
                    site[adapter_name].requires_grad_(adapter_name == self.active_adapter)
            self.configs[adapter_name] = config
            self.saved_modules[adapter_name] = saved

    def set_adapter(self, adapter_name: str):
        """Make `adapter_name` (and its copies of `modules_to_save`) the one that runs and trains;
        the others are frozen.

        Any other adapter merged into the weights is unmerged first (with a warning, as PEFT does):
        left merged, it would keep acting underneath the newly active one.
        """
        self._check_name(adapter_name)
        for other in self.configs:
            if other != adapter_name and self._is_merged(other):
                warnings.warn(f"adapter {other!r} is merged into the weights; unmerging it before activating "
                              f"{adapter_name!r}", stacklevel=2)
                self.unmerge_adapter(other)
        trainable = adapter_name not in self._inference
        for _, site in sites(self.base_model):
            site.active = adapter_name
            for name, adapter in site.items():
                adapter.requires_grad_(name == adapter_name and trainable)
        self.active_adapter = adapter_name

    @property
    def peft_config(self) -> MappingProxyType:
        """The adapters' configs by name: a read-only mapping of copies (changing one changes nothing)."""
        return MappingProxyType({name: copy.deepcopy(config) for name, config in self.configs.items()})

    @property
    def active_adapters(self) -> list[str]:
        """The adapter that runs, as a list (PEFT's interface; kronpeft runs one at a time)."""
        return [self.active_adapter] if self.active_adapter is not None else []

    def get_base_model(self) -> nn.Module:
        """The wrapped `transformers` model (adapters attached; `unload()` removes them)."""
        self._check_usable()
        return self.base_model

    def unload(self) -> nn.Module:
        """Remove every adapter without merging (merged ones are taken out first): the original base
        model, original `modules_to_save` included. This wrapper is unusable afterwards."""
        self._check_usable()
        for name in list(self.configs):
            if self._is_merged(name):
                self.unmerge_adapter(name)
        model = self.base_model
        for owner, site in sites(model):
            detach(owner, site)
        return self._retire()

    def delete_adapter(self, adapter_name: str):
        self._check_name(adapter_name)
        if self._is_merged(adapter_name):
            self.unmerge_adapter(adapter_name)
        for owner, site in sites(self.base_model):
            if adapter_name in site:
                del site[adapter_name]
                site.reads_span.discard(adapter_name)
                site.copies.discard(adapter_name)
            if not len(site):
                detach(owner, site)
        del self.configs[adapter_name]
        del self.saved_modules[adapter_name]
        self._inference.discard(adapter_name)
        if self.active_adapter == adapter_name:
            self.active_adapter = None
            if self.configs:
                self.set_adapter(next(iter(self.configs)))

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone (original `modules_to_save` too) inside the `with` block; merged
        weights are taken out meanwhile. Reentrant: only the outermost block re-enables, also on an error."""
        self._check_usable()
        if self._disabled == 0:
            merged = [name for name in self.configs if self._is_merged(name)]
            for name in merged:
                self.unmerge_adapter(name)
            self._remerge = merged
            for _, site in sites(self.base_model):
                site.enabled = False
        self._disabled += 1
        try:
            yield self
        finally:
            self._disabled -= 1
            if self._disabled == 0:
                for _, site in sites(self.base_model):
                    site.enabled = True
                for name in self._remerge:  # unless deleted or switched away from inside the block
                    if name == self.active_adapter:
                        self.merge_adapter(name)
                self._remerge = []

    # -- merging ------------------------------------------------------------------------------------

    def merge_adapter(self, adapter_name: str | None = None):
        """Add `scale · (A ⊗ B)` into each adapted weight; the forward then costs the base model's.

        While merged, each adapted layer also keeps its original weight (one extra copy), so that
        unmerging restores it bit-exactly in every dtype (see `_write_merged_weight`).
        """
        adapter_name = self._mergeable(adapter_name)
        if adapter_name != self.active_adapter:  # merged, it would act under the active one unseen
            raise ValueError(f"adapter {adapter_name!r} is not the active adapter ({self.active_adapter!r}); merging "
                             f"it would make both act: call set_adapter({adapter_name!r}) first")
        with torch.no_grad():
            for owner, site in sites(self.base_model):
                if adapter_name in site and adapter_name not in site.merged and adapter_name not in site.copies:
                    site.merged.add(adapter_name)
                    _write_merged_weight(owner, site)

    def unmerge_adapter(self, adapter_name: str | None = None):
        """Take a merged adapter out of the weights again (the original weights come back exactly)."""
        adapter_name = adapter_name or self.active_adapter
        self._check_name(adapter_name)
        with torch.no_grad():
            for owner, site in sites(self.base_model):
                if adapter_name in site.merged:
                    site.merged.discard(adapter_name)
                    _write_merged_weight(owner, site)

    def merge_and_unload(self) -> nn.Module:
        """The plain base model with the active KronA adapter merged in (and its copies of
        `modules_to_save` in place of the originals), every adapter removed. This wrapper is
        unusable afterwards."""
        adapter_name = self._mergeable(None)
        self.merge_adapter(adapter_name)
        model = self.base_model
        for owner, site in sites(model):
            clone = site[adapter_name] if adapter_name in site.copies else None
            detach(owner, site)
            if clone is not None:
                parent, _, child = site.owner_name.rpartition(".")
                setattr(model.get_submodule(parent), child, clone)
        return self._retire()

    # -- parameters ---------------------------------------------------------------------------------

    def trainable_parameters(self) -> tuple[int, int]:
        """`(trainable, total)` parameter counts."""
        self._check_usable()
        return count_parameters(self)

    def print_trainable_parameters(self):
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # -- saving and loading -------------------------------------------------------------------------

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed without the adapter's name (`<module>.kronpeft.<tensor>`), and its
        copies of `modules_to_save` under the original modules' keys."""
        adapter_name = adapter_name or self.active_adapter
        self._check_name(adapter_name)
        state = {}
        for _, site in sites(self.base_model):
            if adapter_name not in site:
                continue
            prefix = f"{site.owner_name}." if site.owner_name else ""
            if adapter_name not in site.copies:
                prefix += f"{SITE_ATTR}."
            for key, tensor in site[adapter_name].state_dict().items():
                state[prefix + key] = tensor
        return state

    def save_pretrained(self, save_directory: str | os.PathLike, adapter_name: str | None = None,
                        selected_adapters: list[str] | None = None):
        """Write adapters as `adapter_config.json` + the weights file it names (adapter and its
        `modules_to_save`): `adapter_name` alone into `save_directory`; otherwise every adapter (or
        `selected_adapters`) as PEFT does, "default" in `save_directory` and any other in
        `save_directory/<name>`. Each folder is written crash-safe (see `write_adapter`).
        """
        self._check_usable()
        check_path(save_directory, "save_pretrained's save_directory")
        names = [adapter_name] if adapter_name is not None else (
            list(self.configs) if selected_adapters is None else list(selected_adapters))
        for name in names:  # check every name before writing anything
            self._check_name(name)
        with sharding.full_params(self.base_model) as gathered:  # FSDP1, ZeRO-3: the full tensors, copied
            states = {name: {k: t.clone() for k, t in self.adapter_state_dict(name).items()} for name in names}
        sharded = gathered or sharding.is_sharded(t for state in states.values() for t in state.values())
        if sharded:  # every process gathers (collectives; FSDP2 here); the main process alone writes
            states = {name: sharding.gather_full(state) for name, state in states.items()}
            if not sharding.is_main_process():
                sharding.barrier()
                return
        for name in names:
            meta = {
                "format_version": FORMAT_VERSION,
                "adapter": self.configs[name].to_dict(),
                "modules_to_save": self.saved_modules[name],
                "base_model": _describe(self.base_model),
                "conv1d_modules": self._conv1d_modules(name),
            }
            alone = adapter_name is not None or name == "default"
            directory = Path(save_directory) if alone else Path(save_directory) / name
            write_adapter(directory, meta, states[name])
        if sharded:
            sharding.barrier()

    def _conv1d_modules(self, adapter_name: str) -> list[str]:
        """Adapted layers that are GPT-2 `Conv1D`s (weight `(in, out)`), which PEFT's LoKr cannot adapt."""
        return sorted(name for name, m in self.base_model.named_modules()
                      if isinstance(m, Conv1D) and adapter_name in getattr(m, SITE_ATTR, {}))

    def push_to_hub(self, repo_id: str, selected_adapters: list[str] | None = None, private: bool | None = None,
                    token: str | None = None, revision: str | None = None,
                    commit_message: str = "Upload kronpeft adapter"):
        """Upload `save_pretrained`'s files to the Hugging Face Hub repository `repo_id` (created if needed)."""
        from .hub import upload_folder

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, selected_adapters=selected_adapters)
            return upload_folder(tmp, repo_id, private=private, token=token, revision=revision,
                                 commit_message=commit_message)

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, autocast_adapter_dtype: bool = True,
                        revision: str | None = None, token: str | None = None) -> "KronModel":
        """Wrap `model` and load the adapter saved in `adapter_dir` (a folder, or a Hub repository id).

        `is_trainable=False` (as in PEFT): inference -- everything frozen, `eval()` mode;
        `is_trainable=True` goes on training the adapter (in `model`'s train/eval mode).
        """
        adapter_dir = _local_adapter_dir(adapter_dir, revision, token)
        meta, state = read_adapter(adapter_dir, model)
        config = _config_from(meta, adapter_dir)
        with _unchanged_on_failure(model), _loading():
            kron_model = cls(model, config, adapter_name, autocast_adapter_dtype)
            kron_model._load_state(adapter_dir, adapter_name, state)
        if not is_trainable:
            kron_model._inference.add(adapter_name)
            kron_model.set_adapter(adapter_name)
            kron_model.eval()
        return kron_model

    def load_adapter(self, adapter_dir: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     revision: str | None = None, token: str | None = None):
        """Add the adapter saved in `adapter_dir` (folder or Hub id) under `adapter_name`, inactive until
        `set_adapter`; frozen when it runs unless `is_trainable=True`."""
        self._check_usable()
        self._check_new_name(adapter_name)
        adapter_dir = _local_adapter_dir(adapter_dir, revision, token)
        meta, state = read_adapter(adapter_dir, self.base_model)
        config = _config_from(meta, adapter_dir)
        with self._all_or_nothing(), _loading():
            self.add_adapter(adapter_name, config)
            self._load_state(adapter_dir, adapter_name, state)
        if not is_trainable:
            self._inference.add(adapter_name)

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
            if not tensor.is_floating_point():
                raise ValueError(
                    f"adapter in {adapter_dir} is corrupt: {key} is saved as {tensor.dtype}, not a floating-point "
                    f"dtype (adapter weights are float32/bf16/fp16); save the adapter again"
                )
            if expected[key].is_meta:
                raise ValueError(
                    f"cannot load the adapter in {adapter_dir}: {type(self.base_model).__name__} is on the meta "
                    f"device (no storage; {key} would silently load nothing); load the base model's weights first "
                    f"(e.g. from_pretrained without device 'meta', or to_empty() and load_state_dict)"
                )
        with torch.no_grad():
            for key, tensor in state.items():
                expected[key].copy_(tensor)

    # -- helpers ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _all_or_nothing(self):
        """Undo every change to the base model and to this wrapper's bookkeeping if the block fails."""
        configs, saved, active = dict(self.configs), dict(self.saved_modules), self.active_adapter
        try:
            with _unchanged_on_failure(self.base_model):
                yield
        except BaseException:
            self.configs, self.saved_modules, self.active_adapter = configs, saved, active
            raise

    def _retire(self) -> nn.Module:
        """Hand back the base model and make this wrapper refuse further use."""
        model = self.base_model
        del self.base_model
        self.configs.clear()
        self.saved_modules.clear()
        self.active_adapter = None
        self._unloaded = True
        return model

    def _check_usable(self):
        if self._unloaded:
            raise RuntimeError(UNLOADED)

    def _check_new_name(self, adapter_name):
        check_adapter_name(adapter_name)  # a safe path component: it becomes save_directory/<name>
        if hasattr(AdapterSite(""), adapter_name):  # methods, attributes and buffers alike
            raise ValueError(f"adapter name {adapter_name!r} collides with an attribute of kronpeft's adapter "
                             f"sites; pick another name (e.g. {adapter_name + '_adapter'!r})")
        if adapter_name in self.configs:
            raise ValueError(f"adapter {adapter_name!r} exists already; delete_adapter it first or pick another name")

    def _check_name(self, adapter_name: str | None):
        self._check_usable()
        if adapter_name not in self.configs:
            raise ValueError(f"no adapter named {adapter_name!r}; this model has {sorted(self.configs)}")

    def _is_merged(self, adapter_name: str) -> bool:
        return any(adapter_name in site.merged for _, site in sites(self.base_model))

    def _mergeable(self, adapter_name: str | None) -> str:
        adapter_name = adapter_name or self.active_adapter
        self._check_name(adapter_name)
        for owner, site in sites(self.base_model):
            if adapter_name in site and adapter_name not in site.copies and not site[adapter_name].mergeable:
                method = self.configs[adapter_name].method
                raise ValueError(
                    f"adapter {adapter_name!r} ({method}) cannot be merged: it is non-linear in the hidden state "
                    f"or spans a whole feed-forward block, so no single weight matrix equals it. "
                    f"Only KronA (an update of one linear layer) merges; run this adapter unmerged."
                )
            if adapter_name in site and adapter_name not in site.copies and adapter_name not in site.merged:
                shape = linear_shape(owner)[::-1] if isinstance(owner, Conv1D) else linear_shape(owner)
                reason = (sharding.partitioned_adapter(site.owner_name, site[adapter_name])
                          or sharding.unmergeable_weight(site.owner_name, owner.weight, shape))
                if reason:
                    raise ValueError(f"cannot merge adapter {adapter_name!r}: {reason}")
        return adapter_name


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts of any module."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def get_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default",
              autocast_adapter_dtype: bool = True) -> KronModel:
    """Freeze `model` and add the adapter `config` describes; see `KronModel`."""
    return KronModel(model, config, adapter_name, autocast_adapter_dtype)


_SIGNATURE_CLASSES: dict[tuple[type, type], type] = {}


def _with_forward_signature(cls: type, base_class: type) -> type:
    """A subclass of `cls` whose `forward` carries `base_class.forward`'s signature (one per pair).

    `transformers.Trainer` reads the signature to choose the dataset columns it keeps and, on the
    class, to find the label arguments; PEFT's task wrappers list them by hand for the same reason.
    """
    key = (cls, base_class)
    if key not in _SIGNATURE_CLASSES:
        def forward(self, *args, adapter_names=None, **kwargs):
            return self._run(None, args, kwargs, adapter_names)

        forward.__signature__ = inspect.signature(base_class.forward)
        forward.__doc__ = f"`{base_class.__name__}.forward` with the active adapter applied."
        _SIGNATURE_CLASSES[key] = type(cls.__name__, (cls,), {
            "forward": forward, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "_base_class": base_class})
    return _SIGNATURE_CLASSES[key]


def _is_trained_key(key: str) -> bool:
    """Adapters and the adapters' copies of `modules_to_save` all live under `.kronpeft.` sites."""
    return f".{SITE_ATTR}." in key


def _keep_trained_state(kron_model: "KronModel", state_dict: dict, prefix: str, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix) and not _is_trained_key(k[len(prefix):])]:
        del state_dict[key]


def _ignore_missing_frozen_keys(kron_model: "KronModel", incompatible_keys):
    """A state dict of the trained tensors alone loads strictly: frozen base keys are not missing."""
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if _is_trained_key(k)]


def _remerge_loaded(kron_model: "KronModel", incompatible_keys):
    """After `load_state_dict`, recompute every merged weight from the adapters just loaded (else it stays
    the merge of the adapters' old values)."""
    with torch.no_grad():
        for owner, site in sites(kron_model.base_model):
            if site.merged:
                _write_merged_weight(owner, site)


def _rebuild(cls: type, base_class: type) -> "KronModel":
    """An empty instance of the class `_with_forward_signature(cls, base_class)` (unpickling)."""
    return nn.Module.__new__(_with_forward_signature(cls, base_class))


def _local_adapter_dir(adapter_dir: str | os.PathLike, revision: str | None, token: str | None) -> Path:
    """`adapter_dir` itself when it exists locally, else the Hub repository of that id, downloaded."""
    if Path(adapter_dir).exists() or not _looks_like_repo_id(str(adapter_dir)):
        return Path(adapter_dir)
    from .hub import download_adapter

    return download_adapter(str(adapter_dir), revision=revision, token=token)


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "~"))


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


def _write_adapter(directory: Path, state: dict[str, torch.Tensor], meta: dict):
    overwrite = (directory / CONFIG_NAME).exists()
    weights_file, digest = write_tensors(directory, WEIGHTS_STEM, state, overwrite)
    commit(directory, CONFIG_NAME,
           lambda names: {**meta, "weights_file": names[WEIGHTS_STEM], "weights_sha256": digest},
           {WEIGHTS_STEM: weights_file})


def _config_from(meta: dict, adapter_dir) -> AdapterConfig:
    try:
        return AdapterConfig.from_dict(meta["adapter"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{Path(adapter_dir) / CONFIG_NAME}: {err}") from None


@contextlib.contextmanager
def _loading():
    """Adapters built inside are about to receive saved tensors: skip data-dependent initialisation."""
    token = _LOADING.set(True)
    try:
        yield
    finally:
        _LOADING.reset(token)


@contextlib.contextmanager
def _unchanged_on_failure(model: nn.Module):
    """If the block raises, remove the adapters, sites and hooks it added to `model` and restore every
    parameter's `requires_grad`."""
    grads = [(p, p.requires_grad) for p in model.parameters()]
    before = {id(site): (set(site.keys()), site.span_first, len(site._handles), set(site.reads_span), set(site.copies))
              for _, site in sites(model)}
    try:
        yield
    except BaseException:
        for owner, site in sites(model):
            if id(site) not in before:
                detach(owner, site)
                continue
            names, span_first, n_handles, reads_span, copies = before[id(site)]
            for name in set(site.keys()) - names:
                del site[name]
            for handle in site._handles[n_handles:]:
                handle.remove()
            del site._handles[n_handles:]
            site.span_first, site.reads_span, site.copies = span_first, reads_span, copies
        for param, requires_grad in grads:
            param.requires_grad_(requires_grad)
        raise


def classifier_head(model: nn.Module) -> list[str]:
    """Top-level modules of a sequence classifier beside its backbone (`classifier`, T5's
    `classification_head`, DistilBERT's `pre_classifier`); [] for any other model."""
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return []
    backbone = getattr(model, "base_model_prefix", None)
    return [n for n, m in model.named_children() if n != backbone and any(True for _ in m.parameters())]


def _resolve_modules_to_save(model: nn.Module, names: list[str] | None) -> list[str]:
    """Full module names for `modules_to_save`; None means the head of a sequence classifier."""
    if names is None:
        return classifier_head(model)
    modules = [n for n in base_modules(model) if n]
    resolved = []
    for wanted in names:
        found = [n for n in modules if n == wanted or n.endswith("." + wanted)]
        if not found:
            raise ValueError(f"modules_to_save entry {wanted!r} matches no module of {type(model).__name__}; "
                             f"its top-level modules are {[n for n, _ in model.named_children()]}")
        resolved += [n for n in found if n not in resolved]
    nested = [(a, b) for a in resolved for b in resolved if b.startswith(a + ".")]
    if nested:
        raise ValueError(f"modules_to_save names both {nested[0][0]!r} and {nested[0][1]!r}, which is inside it; "
                         f"name only the outer module")
    return resolved


def _check_saved_modules(model: nn.Module, places: list[Place], saved: list[str]):
    """A module is either adapted or saved whole: refuse a module to save that holds an adapted module,
    and one whose parameters are shared (tied) with modules outside it (a copy would untie them)."""
    existing = [s for _, s in sites(model)]
    for name in saved:
        inside = [p.owner for p in places if p.owner == name or p.owner.startswith(name + ".")]
        inside += [s.owner_name for s in existing if s.owner_name.startswith(name + ".")
                   or (s.owner_name == name and s.copies != set(s.keys()))]
        if inside:
            raise ValueError(f"modules_to_save entry {name!r} holds the adapted module {inside[0]!r}; an adapter "
                             f"cannot both adapt a module and train a whole copy of it: drop one of the two")
    _check_untied(model, saved, "modules_to_save")


def _check_untied(model: nn.Module, names: list[str], field: str):
    """Refuse modules whose parameters are also reachable from outside them (tied weights)."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if SITE_ATTR not in name.split("."):
            owners.setdefault(id(param), []).append(name)
    for module_name in names:
        for pname, param in model.get_submodule(module_name).named_parameters(remove_duplicate=False):
            if SITE_ATTR in pname.split("."):
                continue
            full = f"{module_name}.{pname}" if module_name else pname
            outside = [n for n in owners[id(param)] if not n.startswith(module_name + ".")]
            if outside:
                raise ValueError(
                    f"{field}: {full} is tied to {outside[0]} (one shared parameter, e.g. tie_word_embeddings); "
                    f"adapting or copying {module_name!r} would silently change or untie {outside[0]} too. "
                    f"Pick untied modules, or load the base model untied (e.g. tie_word_embeddings=False)")


def _write_merged_weight(module: nn.Module, site):
    """`W = W0 + Σ delta` over the adapters in `site.merged`, `W0` being the weight before the first merge.

    `W0` is kept in `site.unmerged_weight` while anything is merged, and written back when nothing
    is: adding and then subtracting a delta in bf16/fp16 would round twice and drift. The sum is
    taken in fp32 (or wider) and rounded once. GPT-2's `Conv1D` stores `W (in, out)`, the delta is `(out, in)`.
    """
    weight = module.weight
    if site.unmerged_weight is None:
        site.unmerged_weight = weight.detach().clone()
    if not site.merged:
        weight.copy_(site.unmerged_weight)
        site.unmerged_weight = None
        return
    total = site.unmerged_weight.to(torch.promote_types(weight.dtype, torch.float32))
    for name in sorted(site.merged):  # a fixed order: the same set of merged adapters gives the same bits
        delta = site[name].delta_weight()
        total = total + (delta.T if isinstance(module, Conv1D) else delta).to(total.dtype)
    weight.copy_(total)


def _describe(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None),
        "class": type(model).__name__,
    }
