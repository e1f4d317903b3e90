"""Mixed-adapter batches: `model(**batch, adapter_names=[...])` runs each example through its own adapter
(and its own copies of `modules_to_save`), or through the base model under `BASE_ADAPTER_NAME`.

Every site routes the rows of each adapter name through that adapter (`AdapterSite.rewrite_mixed`), so the
outputs equal running each adapter on its own examples. Checked before anything runs: one name per example,
every name known, nothing merged (a merged adapter would act on every example).
"""
from __future__ import annotations

import contextlib

import torch

from .config import BASE_ADAPTER_NAME
from .injection import sites


def batch_size(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a model call: the first dimension of `input_ids`/`inputs_embeds` or the first tensor."""
    for key in ("input_ids", "inputs_embeds"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key].shape[0]
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim()]
    return tensors[0].shape[0] if tensors else None


def check_names(kron_model, adapter_names, batch: int | None) -> list[str]:
    """`adapter_names` as a list, or a ValueError naming the bad value and the fix."""
    known = sorted(kron_model.configs)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)) \
            or not all(isinstance(n, str) for n in adapter_names):
        raise ValueError(f"adapter_names must be a list of adapter-name strings, one per example, got "
                         f"{type(adapter_names).__name__}; this model has {known} (and {BASE_ADAPTER_NAME!r} for "
                         f"the base model)")
    if batch is not None and len(adapter_names) != batch:
        raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {batch} examples; give one "
                         f"name per example")
    for i, name in enumerate(adapter_names):
        if name != BASE_ADAPTER_NAME and name not in kron_model.configs:
            raise ValueError(f"adapter_names[{i}] = {name!r} is not an adapter of this model; it has {known}, and "
                             f"{BASE_ADAPTER_NAME!r} runs the base model")
    merged = [name for name in known if kron_model._is_merged(name)]
    if merged:
        raise ValueError(f"adapter {merged[0]!r} is merged into the weights, so it would act on every example of a "
                         f"mixed batch; call unmerge_adapter({merged[0]!r}) first")
    return list(adapter_names)


@contextlib.contextmanager
def mixed_batch(kron_model, adapter_names, args: tuple, kwargs: dict, expand: bool = False):
    """Inside: every site routes examples by `adapter_names`; `expand` (generate) lets a batch be the examples
    each repeated (beams, `num_return_sequences`)."""
    names = check_names(kron_model, adapter_names, batch_size(args, kwargs))
    model_sites = [site for _, site in sites(kron_model.base_model)]
    for site in model_sites:
        site.mixed_names, site.mixed_expand = names, expand
    try:
        yield
    finally:
        for site in model_sites:
            site.mixed_names, site.mixed_expand = None, False
