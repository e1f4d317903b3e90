"""A `KronModel` subclass per base-model class whose `forward` carries the base model's signature.

`transformers.Trainer` reads the signature to choose the dataset columns it keeps and, on the class,
to find the label arguments; PEFT's task wrappers list them by hand for the same reason. `rebuild`
unpickles such an instance (the subclass cannot be found by name).
"""
from __future__ import annotations

import inspect

from torch import nn

_SIGNATURE_CLASSES: dict[tuple[type, type], type] = {}


def with_forward_signature(cls: type, base_class: type) -> type:
    """A subclass of `cls` whose `forward` carries `base_class.forward`'s signature (one per pair)."""
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


def rebuild(cls: type, base_class: type) -> nn.Module:
    """An empty instance of the class `with_forward_signature(cls, base_class)` (unpickling)."""
    return nn.Module.__new__(with_forward_signature(cls, base_class))
