"""Adapter configurations: dataclasses validated on construction, round-tripped through JSON.

Every field is type- and range-checked in `__post_init__` (so `from_dict`, and with it a hand-edited
`adapter_config.json`, is checked too); a bad value raises `ValueError` naming the class, the field,
the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

ACTIVATIONS = ("gelu", "relu", "silu", "tanh")
POSITIONS = ("ffn", "attn")
# The reserved adapter name for "no adapter: the base model" (mixed-adapter batches; never a user's adapter).
BASE_ADAPTER_NAME = "__base__"


def _refuse(config, field: str, allowed: str):
    value = getattr(config, field)
    raise ValueError(f"{type(config).__name__}.{field} = {value!r} ({type(value).__name__}) is not allowed: "
                     f"it must be {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_real(config, field: str, low: float | None = None, high: float | None = None, high_open=False):
    """A finite real number (int or float, not bool) in `[low, high]` (`[low, high)` with `high_open`)."""
    value = getattr(config, field)
    bounds = f" in [{low}, {high}{')' if high_open else ']'}" if low is not None else ""
    if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
        _refuse(config, field, f"a finite real number{bounds}")
    if low is not None and (value < low or value > high or (high_open and value == high)):
        _refuse(config, field, f"a finite real number{bounds}")
    setattr(config, field, float(value))


def _check_positive_int(config, field: str):
    if not _is_int(getattr(config, field)) or getattr(config, field) <= 0:
        _refuse(config, field, "a positive int (not a bool)")


def _check_names(config, field: str, lengths: tuple[int, ...] | None = None, optional: bool = True):
    """None (when `optional`) or a list/tuple of non-empty module-name strings; a bare string is refused."""
    value = getattr(config, field)
    if value is None and optional:
        return
    what = "a list of module-name strings" + (f" of length {' or '.join(map(str, lengths))}" if lengths else "")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        _refuse(config, field, what + (" or None" if optional else "") + " (a bare string is not a list)")
    if lengths and len(value) not in lengths:
        _refuse(config, field, what)
    setattr(config, field, list(value))


def _check_a_shape(config):
    value = config.a_shape
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_int(v) and v > 0 for v in value):
        _refuse(config, "a_shape", "None (the balanced split) or two positive ints (a1, a2)")
    config.a_shape = tuple(value)


def _check_choice(config, field: str, choices: tuple[str, ...]):
    if not isinstance(getattr(config, field), str) or getattr(config, field) not in choices:
        _refuse(config, field, f"one of {choices}")


@dataclass
class AdapterConfig:
    """Fields every method shares. `modules_to_save`: names of extra modules trained and saved
    with the adapter, each adapter holding its own copy (None: the task head of a
    `*ForSequenceClassification` model; [] : none)."""

    modules_to_save: list[str] | None = None

    method = ""

    def __post_init__(self):
        _check_names(self, "modules_to_save")

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterConfig":
        """Build the config a `to_dict()` (or `adapter_config.json`) describes; every field is checked."""
        if not isinstance(data, dict):
            raise ValueError(f"an adapter config must be a JSON object (dict), got {type(data).__name__}")
        data = dict(data)
        method = data.pop("method", None)
        config_cls = METHODS.get(method) if isinstance(method, str) else None
        if config_cls is None:
            raise ValueError(f"unknown adapter method {method!r}; known: {sorted(METHODS)}")
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise ValueError(f"{config_cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return config_cls(**data)


@dataclass
class KronAConfig(AdapterConfig):
    """KronA: `y = x Wᵀ + scale · x (A ⊗ B)ᵀ` on each targeted linear layer.

    `target_modules`: module-name suffixes, one regex (full match), or `"all-linear"` (PEFT's meaning:
    every linear layer but the output head — `lm_head`, `classifier`/`score`; on a decoder LM that is
    every linear layer of the blocks); None uses the architecture preset (attention query and value).
    `a_shape`: `(a1, a2)`, None for the balanced split.
    `rank`: the number `k` of Kronecker terms, `ΔW = scale · Σᵢ Aᵢ ⊗ Bᵢ` (1: KronA).
    `init`: `"zero"` (each `Bᵢ` zero) or `"kpsvd"` (the factors start at the nearest `k`-term Kronecker
    sum to the pretrained weight, whose frozen copy is subtracted: the model is unchanged at step 0).
    """

    target_modules: list[str] | str | None = None
    a_shape: tuple[int, int] | None = None
    scale: float = 1.0
    dropout: float = 0.0
    rank: int = 1
    init: str = "zero"

    method = "krona"

    def __post_init__(self):
        super().__post_init__()
        if self.target_modules == "":
            _refuse(self, "target_modules", "a non-empty regex, a list of module names or None")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as err:
                _refuse(self, "target_modules", f"a valid regex ({err}), a list of module names or None")
        else:
            _check_names(self, "target_modules")
            if self.target_modules == []:
                _refuse(self, "target_modules", "a non-empty list of module names (or None for the preset)")
        _check_a_shape(self)
        _check_real(self, "scale")
        _check_real(self, "dropout", 0.0, 1.0, high_open=True)
        _check_positive_int(self, "rank")
        _check_choice(self, "init", ("zero", "kpsvd"))
        if self.init == "kpsvd" and self.scale == 0:
            _refuse(self, "scale", "non-zero with init='kpsvd' (the factors start at weight / scale)")


@dataclass
class KronABConfig(AdapterConfig):
    """KronA^B: `Y = FFN(X) + scale · X (A ⊗ B)ᵀ` beside each feed-forward block;
    `residual=True` (KronA^B_res) adds `s_res · X` with a learnable `s_res` starting at `residual_init`.

    `ffn_modules` names the feed-forward span: `[first]` for one module, or `[first, last]` with
    `last` given relative to `first`'s parent (BERT: `["intermediate", "output.dense"]`).
    """

    a_shape: tuple[int, int] | None = None
    scale: float = 1.0
    residual: bool = False
    residual_init: float = 0.0
    dropout: float = 0.0
    ffn_modules: list[str] | None = None

    method = "kronab"

    def __post_init__(self):
        super().__post_init__()
        _check_a_shape(self)
        _check_real(self, "scale")
        if not isinstance(self.residual, bool):
            _refuse(self, "residual", "true or false (a bool, not a string or number)")
        _check_real(self, "residual_init")
        _check_real(self, "dropout", 0.0, 1.0, high_open=True)
        _check_names(self, "ffn_modules", lengths=(1, 2))


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
        _check_positive_int(self, "r")
        if isinstance(self.positions, str):
            self.positions = (self.positions,)
        allowed = f"a non-empty list of distinct entries of {POSITIONS}"
        if not isinstance(self.positions, (list, tuple)) or not self.positions \
                or not all(isinstance(p, str) and p in POSITIONS for p in self.positions) \
                or len(set(self.positions)) != len(self.positions):
            _refuse(self, "positions", allowed)
        self.positions = tuple(self.positions)
        _check_choice(self, "activation", ACTIVATIONS)
        _check_names(self, "ffn_modules", lengths=(1, 2))
        _check_names(self, "attn_modules")
        if self.attn_modules == []:
            _refuse(self, "attn_modules", "a non-empty list of module names (or None for the preset)")


@dataclass
class AdaKronConfig(BottleneckConfig):
    """AdaKron: `h + W_up · act(v ⊗ u) + b_up` with `u = W1 h + b1 (r/split)`, `v = W2 h + b2 (split)`.

    `init="zero"` (default): `W_up = 0`, so every model is unchanged at step 0. `init="paper"`: all
    weights N(0, 0.02), biases zero (the authors' code, for the reproduction). Near the identity on
    BERT-like models, but `v ⊗ u` is quadratic in the hidden state, whose norm after a pre-norm
    decoder's FFN is 20-640 (SmolLM2): there it wrecks the model (docs/llm.md). On MiniLM's STS-B at lr
    2e-3 it never learns (dev Pearson 0.11) where `init="zero"` reaches 0.84, as does `init="paper"` with
    the regression head started at the mean score (0.85, `--label-mean-bias`; docs/results.md).
    """

    split: int = 4
    init: str = "zero"

    method = "adakron"

    def __post_init__(self):
        super().__post_init__()
        _check_positive_int(self, "split")
        if self.r % self.split:
            _refuse(self, "split", f"a positive int dividing r={self.r}")
        _check_choice(self, "init", ("paper", "zero"))


METHODS: dict[str, type[AdapterConfig]] = {
    cls.method: cls for cls in (KronAConfig, KronABConfig, AdaKronConfig, BottleneckConfig)
}
