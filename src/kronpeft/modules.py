"""The base model's modules as adapters see them, apart from the wrapper: which ones an adapter trains a
whole copy of (`modules_to_save`, by default a sequence classifier's head), which it may not adapt or
copy (tied weights), the plan of a new adapter checked before anything changes, and parameter counts."""
from __future__ import annotations

from torch import nn

from .config import AdapterConfig, KronAConfig
from .injection import SITE_ATTR, Place, base_modules, find_places, sites
from .memory import adapter_bytes, check_fits


def plan_adapter(model: nn.Module, config: AdapterConfig) -> tuple[list[Place], list[str]]:
    """`(places, modules to save)` of a new adapter `config` in `model`, checked: no module both adapted
    and copied, no tied weight adapted or copied, and the adapters fit in the device's memory."""
    places = find_places(model, config)
    saved = resolve_modules_to_save(model, config.modules_to_save)
    check_saved_modules(model, places, saved)
    if isinstance(config, KronAConfig):  # mergeable: its weight must belong to its layer alone
        check_untied(model, [p.owner for p in places], f"{type(config).__name__}.target_modules")
    ref = next(model.parameters())
    shapes = {p.owner: (p.out_features, p.in_features) for p in places}
    check_fits(adapter_bytes(config, shapes, ref.dtype), ref.device, f"the {len(places)} {config.method} adapters")
    return places, saved


def classifier_head(model: nn.Module) -> list[str]:
    """Top-level modules of a sequence classifier beside its backbone (`classifier`, T5's
    `classification_head`, DistilBERT's `pre_classifier`); [] for any other model."""
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return []
    backbone = getattr(model, "base_model_prefix", None)
    return [n for n, m in model.named_children() if n != backbone and any(True for _ in m.parameters())]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts of any module."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def resolve_modules_to_save(model: nn.Module, names: list[str] | None) -> list[str]:
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


def check_saved_modules(model: nn.Module, places: list[Place], saved: list[str]):
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
    check_untied(model, saved, "modules_to_save")


def check_untied(model: nn.Module, names: list[str], field: str):
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
