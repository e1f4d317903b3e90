"""kronpeft: Kronecker-product adapters for Hugging Face transformers."""
from .config import AdaKronConfig, AdapterConfig, BottleneckConfig, KronABConfig, KronAConfig
from .budget import match_budget
from .kron import kron_linear, kron_shapes, kron_vectors
from .model import KronModel, get_model

__version__ = "0.1.0"

__all__ = [
    "AdaKronConfig",
    "AdapterConfig",
    "BottleneckConfig",
    "KronABConfig",
    "KronAConfig",
    "KronModel",
    "get_model",
    "kron_linear",
    "kron_shapes",
    "kron_vectors",
    "match_budget",
]
