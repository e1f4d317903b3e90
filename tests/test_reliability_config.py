"""§1 config values: every field of every config is type- and range-checked, at construction and in
`from_dict`; a property test over random JSON-like values."""
import json
import math

import pytest
import torch
from conftest import make_model, model_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kronpeft import AdaKronConfig, AdapterConfig, BottleneckConfig, KronABConfig, KronAConfig, get_model
from kronpeft.config import METHODS

BAD_VALUES = [
    (KronAConfig, "scale", float("nan")), (KronAConfig, "scale", float("inf")), (KronAConfig, "scale", "2"),
    (KronAConfig, "scale", True), (KronAConfig, "dropout", float("nan")), (KronAConfig, "dropout", -0.1),
    (KronAConfig, "dropout", False), (KronAConfig, "target_modules", "query"[0:0]),
    (KronAConfig, "target_modules", ["query", 3]), (KronAConfig, "a_shape", (True, 4)), (KronAConfig, "a_shape", 4),
    (KronAConfig, "a_shape", (2.0, 4)), (KronAConfig, "modules_to_save", "classifier"),
    (KronAConfig, "modules_to_save", [""]),
    (KronABConfig, "residual", "False"), (KronABConfig, "residual", 1), (KronABConfig, "residual_init", float("nan")),
    (KronABConfig, "residual_init", "0"), (KronABConfig, "ffn_modules", "intermediate"),
    (KronABConfig, "ffn_modules", ["a", "b", "c"]), (KronABConfig, "scale", -float("inf")),
    (BottleneckConfig, "r", True), (BottleneckConfig, "r", 8.0), (BottleneckConfig, "r", 0),
    (BottleneckConfig, "positions", ["ffn", "ffn"]), (BottleneckConfig, "positions", []),
    (BottleneckConfig, "activation", 3), (BottleneckConfig, "attn_modules", "attention.output.dense"),
    (BottleneckConfig, "attn_modules", []),
    (AdaKronConfig, "split", True), (AdaKronConfig, "split", 0), (AdaKronConfig, "init", None),
]


@pytest.mark.parametrize("cls, field, value", BAD_VALUES, ids=[f"{c.__name__}.{f}={v!r}" for c, f, v in BAD_VALUES])
def test_bad_field_is_refused_at_construction_and_in_from_dict(cls, field, value):
    for build in (lambda: cls(**{field: value}), lambda: AdapterConfig.from_dict({"method": cls.method, field: value})):
        with pytest.raises(ValueError) as info:
            build()
        message = str(info.value)
        assert f"{cls.__name__}.{field} = {value!r}" in message and "must be" in message


def test_residual_string_false_does_not_turn_the_residual_on():
    with pytest.raises(ValueError, match=r"KronABConfig.residual = 'False'.*bool"):
        AdapterConfig.from_dict({"method": "kronab", "residual": "False"})


def test_bare_string_is_not_split_into_characters():
    with pytest.raises(ValueError, match="bare string"):
        KronABConfig(ffn_modules="mlp")
    with pytest.raises(ValueError, match="bare string"):
        BottleneckConfig(attn_modules="o")


def test_from_dict_needs_an_object():
    with pytest.raises(ValueError, match="JSON object"):
        AdapterConfig.from_dict(["krona"])


def test_ints_are_accepted_for_real_fields_and_normalised():
    config = KronABConfig(scale=2, residual_init=1, dropout=0)
    assert (config.scale, config.residual_init, config.dropout) == (2.0, 1.0, 0.0)
    assert all(type(v) is float for v in (config.scale, config.residual_init, config.dropout))


# -- property test ------------------------------------------------------------------------------------

WEIRD = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 64), st.floats(-10, 10), st.sampled_from([math.nan, math.inf, -math.inf]),
    st.sampled_from(["", "ffn", "attn", "query", "value", "gelu", "relu", "paper", "zero", "mlp", "False", "(", ".*"]),
    st.lists(st.one_of(st.sampled_from(["query", "value", "ffn", "attn", "dense", "", "classifier"]),
                       st.integers(0, 8)), max_size=3),
)
FIELDS = {cls: [f for f in cls.__dataclass_fields__] for cls in METHODS.values()}


@st.composite
def random_config_dict(draw):
    method = draw(st.sampled_from(sorted(METHODS)))
    fields = draw(st.lists(st.sampled_from(FIELDS[METHODS[method]]), unique=True, max_size=4))
    return {"method": method, **{f: draw(WEIRD) for f in fields}}


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(random_config_dict())
def test_random_configs_are_refused_by_field_or_build_finite_models(data):
    try:
        config = AdapterConfig.from_dict(json.loads(json.dumps(data)))
    except (ValueError, TypeError) as err:
        named = [f for f in data if f != "method" and f"{METHODS[data['method']].__name__}.{f} " in str(err)]
        assert named, f"error does not name a field of {data}: {err}"
        return
    model = make_model("bert")
    try:
        wrapped = get_model(model, config)
    except ValueError as err:  # a valid config that does not fit this model: the error says where
        message = str(err)
        assert any(w in message for w in ("match", "module", "divide", "square", *FIELDS[type(config)])), message
        return
    with torch.no_grad():
        logits = wrapped(**model_inputs(model)).logits
    assert torch.isfinite(logits).all()
