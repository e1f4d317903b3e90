"""kronpeft: Kronecker-product adapters for Hugging Face transformers."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> its module, imported on first use: `import kronpeft` (and so `kronpeft --help`) loads no torch.
_EXPORTS = {
    "AdaKronConfig": "config", "AdapterConfig": "config", "BottleneckConfig": "config", "KronABConfig": "config",
    "KronAConfig": "config", "KronModel": "model", "get_model": "model", "match_budget": "budget",
    "kron_linear": "kron", "kron_shapes": "kron", "kron_vectors": "kron",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports each name on first use
    from .budget import match_budget  # noqa: F401
    from .config import AdaKronConfig, AdapterConfig, BottleneckConfig, KronABConfig, KronAConfig  # noqa: F401
    from .kron import kron_linear, kron_shapes, kron_vectors  # noqa: F401
    from .model import KronModel, get_model  # noqa: F401


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kronpeft' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})
