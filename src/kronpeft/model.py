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
import os
import tempfile
import warnings
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from . import merging, sharding
from .config import AdapterConfig, KronAConfig
from .injection import AdapterSite, Place, attach, copy_module, dense_weight, detach, find_places, sites, unchanged_on_failure
from .layers import build_adapter
from .memory import adapter_bytes, check_fits
from .mixed import mixed_batch
from .modules import check_saved_modules, check_untied, count_parameters, resolve_modules_to_save
from .names import check_adapter_name, check_path
from .saving import (adapter_meta, adapter_state, config_from, ignore_missing_frozen_keys, keep_trained_state,
                     load_adapter_state, local_adapter_dir, read_adapter, write_adapter)
# The adapter format's names, importable from here as before (they live in saving.py).
from .saving import CONFIG_NAME, FORMAT_VERSION, READABLE_VERSIONS, WEIGHTS_NAME, read_adapter_files  # noqa: F401
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
        saved = resolve_modules_to_save(model, config.modules_to_save)
        check_saved_modules(model, places, saved)
        if isinstance(config, KronAConfig):  # mergeable: its weight must belong to its layer alone
            check_untied(model, [p.owner for p in places], f"{type(config).__name__}.target_modules")
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
        merging.remove_sites(self.base_model)
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
        with unchanged_on_failure(model), _loading():
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
        with self._all_or_nothing(), _loading():
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


def _rebuild(cls: type, base_class: type) -> "KronModel":
    """An empty instance of the class `_with_forward_signature(cls, base_class)` (unpickling)."""
    return nn.Module.__new__(_with_forward_signature(cls, base_class))


@contextlib.contextmanager
def _loading():
    """Adapters built inside are about to receive saved tensors: skip data-dependent initialisation."""
    token = _LOADING.set(True)
    try:
        yield
    finally:
        _LOADING.reset(token)
