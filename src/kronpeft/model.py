"""`KronModel`: a frozen base model with named adapters — train, switch, merge, save, load.

Every call that adds something (`get_model`, `add_adapter`, `load_adapter`, `from_pretrained`)
validates first and rolls back on failure: afterwards the base model's outputs, trainable
parameters and state-dict keys are exactly what they were.
"""
from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import warnings
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from . import merging, sharding
from .config import AdapterConfig
from .injection import (AdapterSite, Place, attach, build_adapters, copy_module, remove_adapter, sites,
                        unchanged_on_failure)
from .mixed import mixed_batch
from .modules import classifier_head, count_parameters, plan_adapter  # noqa: F401 (classifier_head: as before)
from .names import check_adapter_name, check_path
from .saving import (adapter_meta, adapter_state, config_from, full_states, ignore_missing_frozen_keys, is_loading,
                     keep_trained_state, load_adapter_state, loading, local_adapter_dir, read_adapter, write_adapter)
# The adapter format's names, importable from here as before (they live in saving.py).
from .saving import CONFIG_NAME, FORMAT_VERSION, READABLE_VERSIONS, WEIGHTS_NAME, read_adapter_files  # noqa: F401
from .signature import rebuild, with_forward_signature

_rebuild = rebuild  # pickles written before the split name kronpeft.model._rebuild
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
        return super().__new__(cls if model is None else with_forward_signature(cls, type(model)))

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
        with unchanged_on_failure(model):
            model.requires_grad_(False)
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)
        self.register_state_dict_post_hook(keep_trained_state)
        self.register_load_state_dict_post_hook(ignore_missing_frozen_keys)
        self.register_load_state_dict_post_hook(merging.remerge_loaded)

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
        subclass `signature.with_forward_signature` makes cannot be found by name."""
        base_class = type(self).__dict__.get("_base_class")
        if base_class is None:
            return super().__reduce_ex__(protocol)
        return rebuild, (type(self).__mro__[1], base_class), self.__getstate__()

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
        places, saved = plan_adapter(model, config)
        # build everything before attaching anything; init="kpsvd" skips its SVD when factors are being loaded
        built = build_adapters(model, config, places, self.autocast_adapter_dtype, kpsvd=not is_loading())
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
        merging.remove_sites(self.base_model)
        return self._retire()

    def delete_adapter(self, adapter_name: str):
        self._check_name(adapter_name)
        if self._is_merged(adapter_name):
            self.unmerge_adapter(adapter_name)
        remove_adapter(self.base_model, adapter_name)
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
        unmerging restores it bit-exactly in every dtype (see `merging.write_merged_weight`).
        """
        adapter_name = self._mergeable(adapter_name)
        if adapter_name != self.active_adapter:  # merged, it would act under the active one unseen
            raise ValueError(f"adapter {adapter_name!r} is not the active adapter ({self.active_adapter!r}); merging "
                             f"it would make both act: call set_adapter({adapter_name!r}) first")
        merging.merge(self.base_model, adapter_name)

    def unmerge_adapter(self, adapter_name: str | None = None):
        """Take a merged adapter out of the weights again (the original weights come back exactly)."""
        adapter_name = adapter_name or self.active_adapter
        self._check_name(adapter_name)
        merging.unmerge(self.base_model, adapter_name)

    def merge_and_unload(self) -> nn.Module:
        """The plain base model with the active KronA adapter merged in (and its copies of
        `modules_to_save` in place of the originals), every adapter removed. This wrapper is
        unusable afterwards."""
        adapter_name = self._mergeable(None)
        self.merge_adapter(adapter_name)
        merging.remove_sites(self.base_model, keep_copies_of=adapter_name)
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
        return adapter_state(self.base_model, adapter_name)

    def save_pretrained(self, save_directory: str | os.PathLike, adapter_name: str | None = None,
                        selected_adapters: list[str] | None = None):
        """Write adapters as `adapter_config.json` + the weights file it names (adapter and its
        `modules_to_save`): `adapter_name` alone into `save_directory`; otherwise every adapter (or
        `selected_adapters`) as PEFT does, "default" in `save_directory` and any other in
        `save_directory/<name>`. Each folder is written crash-safe (see `write_adapter`). In a process group
        only rank 0 writes; on a sharded model (FSDP, ZeRO-3) every process must call it, to gather.
        """
        self._check_usable()
        check_path(save_directory, "save_pretrained's save_directory")
        names = [adapter_name] if adapter_name is not None else (
            list(self.configs) if selected_adapters is None else list(selected_adapters))
        for name in names:  # check every name before writing anything
            self._check_name(name)
        states, sharded = full_states(self.base_model, names, self.adapter_state_dict)
        if not sharding.is_main_process():  # the main process alone writes (ZeRO-2, DDP: every process could)
            if sharded:
                sharding.barrier()
            return
        for name in names:
            meta = adapter_meta(self.base_model, name, self.configs[name], self.saved_modules[name])
            alone = adapter_name is not None or name == "default"
            directory = Path(save_directory) if alone else Path(save_directory) / name
            write_adapter(directory, meta, states[name])
        if sharded:
            sharding.barrier()

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
        adapter_dir = local_adapter_dir(adapter_dir, revision, token)
        meta, state = read_adapter(adapter_dir, model)
        config = config_from(meta, adapter_dir)
        with unchanged_on_failure(model), loading():
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
        adapter_dir = local_adapter_dir(adapter_dir, revision, token)
        meta, state = read_adapter(adapter_dir, self.base_model)
        config = config_from(meta, adapter_dir)
        with self._all_or_nothing(), loading():
            self.add_adapter(adapter_name, config)
            self._load_state(adapter_dir, adapter_name, state)
        if not is_trainable:
            self._inference.add(adapter_name)

    def _load_state(self, adapter_dir, adapter_name: str, state: dict[str, torch.Tensor]):
        load_adapter_state(self.adapter_state_dict(adapter_name), state, adapter_dir, type(self.base_model).__name__)

    # -- helpers ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _all_or_nothing(self):
        """Undo every change to the base model and to this wrapper's bookkeeping if the block fails."""
        configs, saved, active = dict(self.configs), dict(self.saved_modules), self.active_adapter
        try:
            with unchanged_on_failure(self.base_model):
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
        return merging.is_merged(self.base_model, adapter_name)

    def _mergeable(self, adapter_name: str | None) -> str:
        adapter_name = adapter_name or self.active_adapter
        self._check_name(adapter_name)
        merging.check_mergeable(self.base_model, adapter_name, self.configs[adapter_name].method)
        return adapter_name


def get_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default",
              autocast_adapter_dtype: bool = True) -> KronModel:
    """Freeze `model` and add the adapter `config` describes; see `KronModel`."""
    return KronModel(model, config, adapter_name, autocast_adapter_dtype)
