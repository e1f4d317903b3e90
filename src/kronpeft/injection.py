"""One injection mechanism for every method: adapters hang off an `AdapterSite`.

A site is attached to one module of the base model (as attribute `kronpeft`) and rewrites that
module's output with a forward hook: `y' = adapter(x, y)`. `x` is the module's own input, or, for
an adapter beside a whole feed-forward block split over two modules, the input of the block's
first module (kept by a forward pre-hook on it). An adapter's own copy of a module it saves
(`modules_to_save`, e.g. the task head) sits in the same site and replaces the module's output with
`copy(*args, **kwargs)`. The base model's code and weights are untouched.
"""
from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import AdapterConfig, BottleneckConfig, KronABConfig, KronAConfig
from .layers import build_adapter
from .presets import PRESETS, Preset

SITE_ATTR = "kronpeft"
LINEAR_TYPES = (nn.Linear, Conv1D)
# target_modules: every linear layer but the output head (lm_head, classifier, score), as PEFT
ALL_LINEAR = "all-linear"


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """`(out_features, in_features)` of an `nn.Linear` or a GPT-2 `Conv1D` (weight `(in, out)`), from the
    module's attributes, never its weight's shape (a ZeRO-3 / FSDP1 partitioned weight is a shard or empty)."""
    if isinstance(module, Conv1D):
        return module.nf, module.nx
    return module.out_features, module.in_features


def dense_weight(module: nn.Module) -> "torch.Tensor":
    """The `(out, in)` float weight of linear layer `module`, or a ValueError saying why there is none
    (a quantized, sharded or meta-device weight: what `init="kpsvd"` cannot take an SVD of)."""
    weight = module.weight
    if type(weight) not in (nn.Parameter, torch.Tensor) or not weight.is_floating_point() or weight.is_meta:
        kind = "on the meta device" if weight.is_meta else f"{type(weight).__name__} of dtype {weight.dtype}"
        raise ValueError(f"init='kpsvd' needs the layer's dense float weight, but it is {kind} (quantized, "
                         f"sharded or not loaded); load the base model unquantized on one device, or use init='zero'")
    dense = weight.detach().T if isinstance(module, Conv1D) else weight.detach()
    if tuple(dense.shape) != linear_shape(module):
        raise ValueError(f"init='kpsvd' needs the layer's whole {linear_shape(module)} weight, but it holds a "
                         f"{tuple(dense.shape)} part (partitioned by FSDP1 / ZeRO-3); build the adapter before "
                         f"sharding, or use init='zero'")
    return dense


class AdapterSite(nn.ModuleDict):
    """The adapters attached to one module, by adapter name; only `active` runs."""

    def __init__(self, owner_name: str):
        super().__init__()
        self.owner_name = owner_name
        self.active: str | None = None
        self.enabled = True
        self.merged: set[str] = set()
        self.register_buffer("unmerged_weight", None, persistent=False)  # the owner's weight before merging
        self.span_first: str | None = None  # name of the module whose input span adapters read
        self.reads_span: set[str] = set()  # adapter names that read the span input
        self.copies: set[str] = set()  # adapter names whose entry is a copy of the owner module
        self.mixed_names: list[str] | None = None  # a mixed batch: one adapter name per example (see mixed.py)
        self.mixed_expand = False  # generate: the batch may be the examples repeated (beams, samples)
        self._span_input = None
        self._handles = []

    def keep_span_input(self, module, args, kwargs):
        self._span_input = first_input(args, kwargs)

    def rewrite_output(self, module, args, kwargs, output):
        if self.mixed_names is not None and self.enabled:
            return self.rewrite_mixed(args, kwargs, output)
        name = self.active
        if not self.enabled or name is None or name in self.merged or name not in self:
            return output
        if name in self.copies:
            return self[name](*args, **kwargs)
        if name in self.reads_span:
            x, self._span_input = self._span_input, None
        else:
            x = first_input(args, kwargs)
        return self[name](x, output)

    def rewrite_mixed(self, args, kwargs, output):
        """Each example's rows through its own adapter (or copy); the base name's rows, and those of an
        adapter without a place here, keep the module's output."""
        names = self._names_for(output)
        span, self._span_input = self._span_input, None
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            groups.setdefault(name, []).append(row)
        result = output
        for name, rows in groups.items():
            if name not in self:  # the base model's rows, or an adapter that does not adapt this module
                continue
            index = torch.tensor(rows, device=output.device)
            if name in self.copies:
                picked = self[name](*_rows(args, index, len(names)), **_rows(kwargs, index, len(names)))
            else:
                x = span if name in self.reads_span else first_input(args, kwargs)
                picked = self[name](x.index_select(0, index), output.index_select(0, index))
            result = result.index_copy(0, index, picked.to(output.dtype))
        return result

    def _names_for(self, output) -> list[str]:
        names = self.mixed_names
        rows = output.shape[0] if isinstance(output, torch.Tensor) and output.dim() else None
        if rows is not None and self.mixed_expand and rows != len(names) and rows % len(names) == 0:
            names = [name for name in names for _ in range(rows // len(names))]  # HF's repeat_interleave
        if rows != len(names):
            raise ValueError(f"mixed-adapter batch: {self.owner_name} sees {rows} rows, not one per example of the "
                             f"{len(names)} adapter_names; mixed batches need modules called on the batch as is "
                             f"(batch first, not flattened)")
        return names

    def detach_hooks(self):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _rows(values, index: "torch.Tensor", batch: int):
    """`values` (a tuple or dict of call arguments) with every batch-first tensor cut to the rows `index`."""
    def pick(v):
        return v.index_select(0, index) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch else v
    return {k: pick(v) for k, v in values.items()} if isinstance(values, dict) else tuple(pick(v) for v in values)


def first_input(args: tuple, kwargs: dict):
    """The hidden-state argument of a module call: the first positional one, else the first keyword."""
    return args[0] if args else next(iter(kwargs.values()))


@dataclass(frozen=True)
class Place:
    """Where one adapter goes: it rewrites the output of module `owner`, reading the input of
    `span_first` (None: `owner`'s own input); `out_features`/`in_features` size it."""

    owner: str
    span_first: str | None
    out_features: int
    in_features: int


def base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """`model`'s named modules, without the adapters and module copies kronpeft hung into it."""
    return {n: m for n, m in model.named_modules() if SITE_ATTR not in n.split(".")}


def find_places(model: nn.Module, config: AdapterConfig) -> list[Place]:
    """The places `config` puts an adapter into `model`; a `ValueError` when there are none."""
    modules = base_modules(model)
    if isinstance(config, KronAConfig):
        return _linear_places(model, modules, config.target_modules)
    ffn = config.ffn_modules or _preset(model, config, "ffn_modules").ffn
    spans = _ffn_spans(model, modules, ffn)
    if isinstance(config, KronABConfig):
        return [Place(last, first if first != last else None, _last_linear(modules[last])[0],
                      _first_linear(modules[first])[1]) for first, last in spans]
    assert isinstance(config, BottleneckConfig)
    owners = []
    if "ffn" in config.positions:
        owners += [last for _, last in spans]
    if "attn" in config.positions:
        suffixes = config.attn_modules or _preset(model, config, "attn_modules").attn_output
        attn = [name for name in modules if _suffix_match(name, suffixes)]
        if not attn:
            raise ValueError(_no_match(model, f"{type(config).__name__}.attn_modules {list(suffixes)}"))
        owners += attn
    widths = [_last_linear(modules[owner])[0] for owner in owners]
    return [Place(owner, None, d, d) for owner, d in zip(owners, widths)]


def _preset(model: nn.Module, config: AdapterConfig, field: str) -> Preset:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PRESETS:
        raise ValueError(
            f"{type(config).__name__}: no preset for model_type {model_type!r} ({type(model).__name__}); "
            f"name the modules yourself with {field}=[...]. Known presets: {sorted(PRESETS)}. "
            f"{_linear_names(model)}"
        )
    return PRESETS[model_type]


def _suffix_match(name: str, suffixes) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _linear_places(model, modules, targets) -> list[Place]:
    targets = targets or _preset(model, KronAConfig(), "target_modules").attention
    if targets == ALL_LINEAR:
        heads = _head_names(model)
        matched = [n for n, m in modules.items() if isinstance(m, LINEAR_TYPES)
                   and not any(n == h or n.startswith(h + ".") for h in heads)]
    elif isinstance(targets, str):
        matched = [n for n in modules if re.fullmatch(targets, n)]
    else:
        matched = [n for n in modules if _suffix_match(n, targets)]
    not_linear = [n for n in matched if not isinstance(modules[n], LINEAR_TYPES)]
    if not_linear:
        raise ValueError(
            f"KronAConfig.target_modules {targets!r} matched {not_linear[:3]} "
            f"({type(modules[not_linear[0]]).__name__}), but KronA needs nn.Linear or Conv1D layers. "
            f"{_linear_names(model)}"
        )
    if not matched:
        raise ValueError(_no_match(model, f"KronAConfig.target_modules {targets!r}"))
    return [Place(n, None, *linear_shape(modules[n])) for n in matched]


def _head_names(model: nn.Module) -> set[str]:
    """The output head: the output embeddings (`lm_head`), and every top-level module beside the
    backbone (`base_model_prefix`) of a task model (`classifier`, DistilBERT's `pre_classifier`)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = {n for n, m in model.named_modules() if output is not None and m is output}
    children = dict(model.named_children())
    backbone = getattr(model, "base_model_prefix", None)
    if backbone in children:
        heads |= {n for n, child in children.items() if n != backbone and any(True for _ in child.parameters())}
    return heads


def _ffn_spans(model, modules, ffn) -> list[tuple[str, str]]:
    """`(first, last)` module names of every feed-forward block."""
    first_suffix, last_relative = ffn[0], ffn[-1]
    spans = []
    for name in modules:
        if _suffix_match(name, [first_suffix]):
            last = name if len(ffn) == 1 else f"{name.rpartition('.')[0]}.{last_relative}".lstrip(".")
            if last not in modules:
                raise ValueError(f"feed-forward block starting at {name!r} has no module {last!r}; "
                                 f"fix ffn_modules={list(ffn)}")
            spans.append((name, last))
    if not spans:
        raise ValueError(_no_match(model, f"ffn_modules {list(ffn)}"))
    return spans


def _linears(module: nn.Module) -> list[nn.Module]:
    """The linear layers of `module`, not counting those of adapters already attached inside it."""
    found = [m for n, m in module.named_modules() if isinstance(m, LINEAR_TYPES) and SITE_ATTR not in n.split(".")]
    if not found:
        raise ValueError(f"{type(module).__name__} holds no nn.Linear/Conv1D, so its width is unknown")
    return found


def _first_linear(module: nn.Module) -> tuple[int, int]:
    return linear_shape(_linears(module)[0])


def _last_linear(module: nn.Module) -> tuple[int, int]:
    return linear_shape(_linears(module)[-1])


def _linear_names(model: nn.Module) -> str:
    names = sorted({n.rpartition(".")[2] for n, m in base_modules(model).items() if isinstance(m, LINEAR_TYPES)})
    return f"Its linear layers are named: {names}."


def _no_match(model: nn.Module, what: str) -> str:
    return f"{what} matched no module of {type(model).__name__}. {_linear_names(model)}"


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy of `module` (its own parameters) without the kronpeft site it may carry."""
    site = getattr(module, SITE_ATTR, None)
    if site is None:
        return copy.deepcopy(module)
    clone = copy.deepcopy(module, {id(site): site})  # the site (and its hooks' owner) is not copied ...
    del clone._modules[SITE_ATTR]  # ... and is then cut off the copy, with its hooks
    for handle in site._handles:
        for hooks in (clone._forward_hooks, clone._forward_hooks_with_kwargs, clone._forward_pre_hooks,
                      clone._forward_pre_hooks_with_kwargs):
            hooks.pop(handle.id, None)
    return clone


def attach(model: nn.Module, name: str, adapter: nn.Module, place: Place, replaces_owner: bool = False) -> AdapterSite:
    """Put `adapter` under `name` at `place`, creating the site and its hooks on first use.
    `replaces_owner`: `adapter` is a copy of the owner module and runs instead of it."""
    owner = model.get_submodule(place.owner)
    site = getattr(owner, SITE_ATTR, None)
    if site is None:
        site = AdapterSite(place.owner).train(owner.training)
        owner.add_module(SITE_ATTR, site)
        site._handles.append(owner.register_forward_hook(site.rewrite_output, with_kwargs=True))
    if place.span_first is not None:
        if site.span_first is None:
            first = model.get_submodule(place.span_first)
            site._handles.append(first.register_forward_pre_hook(site.keep_span_input, with_kwargs=True))
            site.span_first = place.span_first
        elif site.span_first != place.span_first:
            raise ValueError(f"{place.owner}: adapters read the inputs of both {site.span_first} and "
                             f"{place.span_first}")
        site.reads_span.add(name)
    if replaces_owner:
        site.copies.add(name)
    site[name] = adapter
    return site


def build_adapters(model: nn.Module, config: AdapterConfig, places: list[Place], autocast_adapter_dtype: bool,
                   kpsvd: bool = True) -> list[nn.Module]:
    """One new adapter per place, on its layer's device and in its dtype (fp32 on a bf16/fp16 layer when
    `autocast_adapter_dtype`) and train/eval mode; `kpsvd=False`: `init="kpsvd"` skips the SVD of the base
    weight (the factors are about to be loaded)."""
    built = []
    for place in places:
        owner = model.get_submodule(place.owner)
        ref = next(owner.parameters())
        dtype = ref.dtype if ref.dtype.is_floating_point else torch.float32  # an int-packed weight (bitsandbytes)
        if autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        try:
            weight = None  # init="kpsvd" takes the SVD of the base weight, unless the factors are being loaded
            if getattr(config, "init", None) == "kpsvd" and kpsvd:
                weight = dense_weight(owner)
            adapter = build_adapter(config, place.out_features, place.in_features, dtype, ref.device, weight)
        except ValueError as err:
            raise ValueError(f"{place.owner}: {err}") from None
        built.append(adapter.train(owner.training))  # a new adapter follows its host's train/eval mode
    return built


def remove_adapter(model: nn.Module, name: str):
    """Take adapter `name` (and its copies of modules) out of every site; a site left empty is detached."""
    for owner, site in sites(model):
        if name in site:
            del site[name]
            site.reads_span.discard(name)
            site.copies.discard(name)
        if not len(site):
            detach(owner, site)


def sites(model: nn.Module) -> list[tuple[nn.Module, AdapterSite]]:
    """`(owner module, site)` for every site in `model`."""
    return [(m, s) for m in model.modules() if isinstance(s := getattr(m, SITE_ATTR, None), AdapterSite)]


def detach(owner: nn.Module, site: AdapterSite):
    """Remove a site and its hooks from `owner`."""
    site.detach_hooks()
    delattr(owner, SITE_ATTR)


@contextlib.contextmanager
def unchanged_on_failure(model: nn.Module):
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
