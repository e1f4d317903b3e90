"""Adapter configurations: dataclasses validated on construction, round-tripped through JSON."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

ACTIVATIONS = ("gelu", "relu", "silu", "tanh")
POSITIONS = ("ffn", "attn")


@dataclass
class AdapterConfig:
    """Fields every method shares. `modules_to_save`: names of extra modules trained and saved
    with the adapter (None: the task head of a `*ForSequenceClassification` model; [] : none)."""

    modules_to_save: list[str] | None = None

    method = ""

    def __post_init__(self):
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise ValueError(f"{type(self).__name__}: modules_to_save must be a list of module names, got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterConfig":
        """Build the config a `to_dict()` (or `adapter_config.json`) describes."""
        data = dict(data)
        method = data.pop("method", None)
        config_cls = METHODS.get(method)
        if config_cls is None:
            raise ValueError(f"unknown adapter method {method!r}; known: {sorted(METHODS)}")
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{config_cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return config_cls(**data)


def _check_a_shape(owner: str, a_shape):
    if a_shape is None:
        return None
    if len(a_shape) != 2 or not all(isinstance(v, int) and v > 0 for v in a_shape):
        raise ValueError(f"{owner}: a_shape must be two positive ints (a1, a2), got {a_shape!r}")
    return tuple(a_shape)


def _check_dropout(owner: str, p):
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{owner}: dropout must be in [0, 1), got {p}")


def _check_module_pair(owner: str, ffn_modules):
    """`ffn_modules` names the feed-forward span: `[first]` for one module, or `[first, last]`
    with `last` given relative to `first`'s parent (BERT: `["intermediate", "output.dense"]`)."""
    if ffn_modules is None:
        return None
    if isinstance(ffn_modules, str) or len(ffn_modules) not in (1, 2):
        raise ValueError(f"{owner}: ffn_modules must be [module] or [first, last], got {ffn_modules!r}")
    return list(ffn_modules)


@dataclass
class KronAConfig(AdapterConfig):
    """KronA: `y = x Wᵀ + scale · x (A ⊗ B)ᵀ` on each targeted linear layer.

    `target_modules`: module-name suffixes or one regex (full match); None uses the architecture
    preset (attention query and value). `a_shape`: `(a1, a2)`, None for the balanced split.
    """

    target_modules: list[str] | str | None = None
    a_shape: tuple[int, int] | None = None
    scale: float = 1.0
    dropout: float = 0.0

    method = "krona"

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ValueError(f"{name}: target_modules {self.target_modules!r} is not a valid regex: {err}") from None
        elif self.target_modules is not None:
            if not self.target_modules:
                raise ValueError(f"{name}: target_modules is empty; give module names or None for the preset")
            self.target_modules = list(self.target_modules)
        self.a_shape = _check_a_shape(name, self.a_shape)
        _check_dropout(name, self.dropout)


@dataclass
class KronABConfig(AdapterConfig):
    """KronA^B: `Y = FFN(X) + scale · X (A ⊗ B)ᵀ` beside each feed-forward block;
    `residual=True` (KronA^B_res) adds `s_res · X` with a learnable `s_res` starting at `residual_init`."""

    a_shape: tuple[int, int] | None = None
    scale: float = 1.0
    residual: bool = False
    residual_init: float = 0.0
    dropout: float = 0.0
    ffn_modules: list[str] | None = None

    method = "kronab"

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        self.a_shape = _check_a_shape(name, self.a_shape)
        _check_dropout(name, self.dropout)
        self.ffn_modules = _check_module_pair(name, self.ffn_modules)


@dataclass
class BottleneckConfig(AdapterConfig):
    """Pfeiffer bottleneck adapter: `h + W_up · act(W_down h + b_down) + b_up` after the FFN
    (and after attention with `positions=("ffn", "attn")`). `W_up` starts at zero."""

    r: int = 48
    positions: tuple[str, ...] = ("ffn",)
    activation: str = "gelu"
    ffn_modules: list[str] | None = None
    attn_modules: list[str] | None = None

    method = "bottleneck"

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"{name}: r must be a positive int, got {self.r!r}")
        self.positions = tuple(self.positions) if not isinstance(self.positions, str) else (self.positions,)
        if not self.positions or set(self.positions) - set(POSITIONS):
            raise ValueError(f"{name}: positions must be a non-empty subset of {POSITIONS}, got {self.positions!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{name}: activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        self.ffn_modules = _check_module_pair(name, self.ffn_modules)
        if self.attn_modules is not None:
            self.attn_modules = list(self.attn_modules)


@dataclass
class AdaKronConfig(BottleneckConfig):
    """AdaKron: `h + W_up · act(v ⊗ u) + b_up` with `u = W1 h + b1 (r/split)`, `v = W2 h + b2 (split)`.

    `init="paper"`: all weights N(0, 0.02), biases zero (the authors' code; near, not exactly,
    the identity at step 0). `init="zero"`: `W_up = 0`, so the model is unchanged at step 0.
    """

    split: int = 4
    init: str = "paper"

    method = "adakron"

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if not isinstance(self.split, int) or self.split <= 0 or self.r % self.split:
            raise ValueError(f"{name}: split={self.split!r} must be a positive int dividing r={self.r}")
        if self.init not in ("paper", "zero"):
            raise ValueError(f"{name}: init must be 'paper' or 'zero', got {self.init!r}")


METHODS: dict[str, type[AdapterConfig]] = {
    cls.method: cls for cls in (KronAConfig, KronABConfig, AdaKronConfig, BottleneckConfig)
}
