"""Converting adapters between kronpeft and PEFT: KronA is PEFT's LoKr with both factors full.

KronA's update of a linear layer is `scale · (A ⊗ B)`, `A (a1, a2)`, `B (b1, b2)`; LoKr's is
`alpha / r · (lokr_w1 ⊗ lokr_w2)`. With `decompose_both=False` and `r >= max(b1, b2) / 2` LoKr keeps
both factors as full matrices, so `lokr_w1 = A`, `lokr_w2 = B`, `alpha / r = scale`. LoKr sizes
`lokr_w1` with `peft.tuners.lokr.layer.factorization(dim, decompose_factor)`; kronpeft's balanced
split is the same as its default (`decompose_factor=-1`), a square `a_shape=(f, f)` is
`decompose_factor=f`, and other `a_shape`s have no LoKr equivalent. Only tensors and JSON are read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import replacing_dir
from .config import KronAConfig
from .injection import SITE_ATTR
from .kron import kron_shapes
from .saving import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, read_adapter_files, write_adapter
from .names import check_apart, check_path

PEFT_PREFIX = "base_model.model."
_SITE = f".{SITE_ATTR}."
# The end of a transformers model class's name -> PEFT's task type, which `AutoPeftModelFor...` checks.
_PEFT_TASK_TYPES = (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
                    ("LMHeadModel", "CAUSAL_LM"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
                    ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def to_peft(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike):
    """Write the KronA adapter in `adapter_dir` as a PEFT LoKr adapter in `out_dir` (task head included);
    `peft.PeftModel.from_pretrained(base, out_dir)` then computes the same outputs."""
    from peft import LoKrConfig
    from peft.tuners.lokr.layer import factorization

    check_path(out_dir, "to_peft's out_dir")
    check_apart(adapter_dir, out_dir, "the adapter folder", "the output folder")
    meta, state = read_adapter_files(adapter_dir)
    config = meta["adapter"]
    if config.get("method") != "krona":
        raise ValueError(f"{adapter_dir} holds a {config.get('method')!r} adapter; only KronA has a PEFT equivalent "
                         f"(LoKr), KronA^B, AdaKron and the bottleneck adapter have none")
    if config.get("rank", 1) != 1 or config.get("init", "zero") != "zero":
        raise ValueError(f"{adapter_dir} holds a KronA adapter with rank={config.get('rank', 1)}, "
                         f"init={config.get('init', 'zero')!r}; PEFT's LoKr has one Kronecker term and no frozen "
                         f"initial terms, so only rank=1, init='zero' converts: export it to LoRA instead "
                         f"(`kronpeft convert --to lora`)")
    conv1d = meta.get("conv1d_modules") or []
    if conv1d:
        raise ValueError(f"{adapter_dir} adapts GPT-2-style Conv1D layers ({', '.join(conv1d[:3])}"
                         f"{', ...' if len(conv1d) > 3 else ''}); PEFT's LoKr adapts only nn.Linear and Conv "
                         f"layers, so this adapter has no PEFT equivalent: use it with kronpeft, or `kronpeft "
                         f"merge` it into the model")
    factors = _kron_factors(state, "A", "B")
    decompose_factor = _decompose_factor(factors, factorization, config.get("a_shape"))
    r = 1 << max(max(B.shape) for _, B in factors.values()).bit_length()  # a power of 2: alpha / r == scale exactly
    tensors = {}
    for module, (A, B) in factors.items():
        tensors[f"{PEFT_PREFIX}{module}.lokr_w1"] = A
        tensors[f"{PEFT_PREFIX}{module}.lokr_w2"] = B
    head = {k: v for k, v in state.items() if _SITE not in k}
    tensors.update({PEFT_PREFIX + k: v for k, v in head.items()})
    peft_config = LoKrConfig(
        target_modules=sorted(factors), r=r, alpha=config.get("scale", 1.0) * r, decompose_both=False,
        decompose_factor=decompose_factor, modules_to_save=list(meta.get("modules_to_save") or []) or None,
        base_model_name_or_path=meta.get("base_model", {}).get("name_or_path"),
        task_type=peft_task_type(meta.get("base_model", {}).get("class")))
    with replacing_dir(out_dir, keep_others=True) as tmp:  # PEFT writes into a folder: others stay
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        peft_config.save_pretrained(str(tmp))


def peft_task_type(class_name: str | None) -> str | None:
    """PEFT's task type of a base model class (`BertForSequenceClassification` -> `SEQ_CLS`); None if unknown."""
    return next((task for end, task in _PEFT_TASK_TYPES if (class_name or "").endswith(end)), None)


def from_peft(peft_dir: str | os.PathLike, out_dir: str | os.PathLike, base_model: str | None = None):
    """Write the PEFT LoKr adapter in `peft_dir` (full factors) as a kronpeft KronA adapter in `out_dir`.

    `base_model`: the base model's folder or Hub id, whose `config.json` names the architecture (default:
    the adapter's `base_model_name_or_path`); kronpeft records it to refuse loading into another model.
    """
    peft_dir = Path(peft_dir)
    check_path(out_dir, "from_peft's out_dir")
    check_apart(peft_dir, out_dir, "the adapter folder", "the output folder")
    peft_config = _read_peft_config(peft_dir)
    try:
        state = load_file(peft_dir / WEIGHTS_NAME)
    except (SafetensorError, OSError, FileNotFoundError) as err:
        raise ValueError(f"cannot read {peft_dir / WEIGHTS_NAME} ({err}); save the PEFT adapter with "
                         f"safe_serialization=True") from None
    decomposed = sorted({k.rsplit(".", 1)[1] for k in state if k.rsplit(".", 1)[1] in
                         ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")})
    if decomposed:
        raise ValueError(f"{peft_dir}: LoKr factors are low-rank ({', '.join(decomposed)}); KronA needs both full: "
                         f"train with LoKrConfig(decompose_both=False, r >= max(w2 shape) / 2) so lokr_w1 and "
                         f"lokr_w2 are full matrices")
    if peft_config.get("rank_pattern") or peft_config.get("alpha_pattern"):
        raise ValueError(f"{peft_dir}: LoKrConfig rank_pattern/alpha_pattern give layers different scales; KronA "
                         f"has one scale for all layers: train without rank_pattern/alpha_pattern")
    weights = {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}
    factors = _kron_factors(weights, "lokr_w1", "lokr_w2", suffix=True)
    a_shape = None
    if any(A.shape != kron_shapes(A.shape[0] * B.shape[0], A.shape[1] * B.shape[1])[0] for A, B in factors.values()):
        shapes = {tuple(A.shape) for A, _ in factors.values()}
        if len(shapes) != 1:
            raise ValueError(f"{peft_dir}: lokr_w1 shapes {sorted(shapes)} differ between layers in a way one KronA "
                             f"a_shape cannot express; use decompose_factor=-1 or one square factor")
        a_shape = shapes.pop()
    config = KronAConfig(target_modules=sorted(factors), a_shape=a_shape,
                         scale=peft_config["alpha"] / peft_config["r"], dropout=0.0,
                         modules_to_save=sorted({k.rsplit(".", 1)[0] for k in weights if ".lokr_" not in k}))
    kron_state = {f"{module}{_SITE}A": A for module, (A, _) in factors.items()}
    kron_state.update({f"{module}{_SITE}B": B for module, (_, B) in factors.items()})
    kron_state.update({k: v for k, v in weights.items() if ".lokr_" not in k})
    meta = {"format_version": FORMAT_VERSION, "adapter": config.to_dict(), "modules_to_save": config.modules_to_save,
            "base_model": _base_model_description(peft_dir, peft_config, base_model),
            "converted_from": {"peft_type": "LOKR", "peft_version": peft_config.get("peft_version")}}
    write_adapter(out_dir, meta, kron_state)


def _kron_factors(state: dict, a_name: str, b_name: str, suffix: bool = False) -> dict:
    """`{module: (A, B)}` from tensors keyed `<module>.kronpeft.A` (or `<module>.<a_name>` with `suffix`)."""
    factors: dict = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        if not suffix:
            if _SITE not in key:
                continue
            module = key.split(_SITE)[0]
        if leaf in (a_name, b_name):
            factors.setdefault(module, {})[leaf] = tensor
    incomplete = sorted(m for m, f in factors.items() if len(f) != 2)
    if incomplete or not factors:
        raise ValueError(f"no complete pair of Kronecker factors ({a_name}, {b_name}) for {incomplete or 'any layer'}")
    return {m: (f[a_name], f[b_name]) for m, f in sorted(factors.items())}


def _decompose_factor(factors: dict, factorization, a_shape) -> int:
    """The LoKr `decompose_factor` that sizes every `lokr_w1` as KronA's `A`, or a ValueError."""
    candidates = [-1] + ([a_shape[0]] if a_shape and a_shape[0] == a_shape[1] else [])
    for factor in candidates:
        if all(tuple(A.shape) == (factorization(A.shape[0] * B.shape[0], factor)[0],
                                  factorization(A.shape[1] * B.shape[1], factor)[0]) for A, B in factors.values()):
            return factor
    raise ValueError(f"KronA a_shape={tuple(a_shape) if a_shape else None} has no PEFT LoKr equivalent: LoKr sizes its "
                     f"first factor with decompose_factor (-1: kronpeft's balanced split; f: a square (f, f)); "
                     f"train KronA with a_shape=None or a square a_shape")


def _read_peft_config(peft_dir: Path) -> dict:
    path = peft_dir / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {peft_dir} is not a PEFT adapter directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path} is corrupt ({err})") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        ours = isinstance(config, dict) and "adapter" in config
        kind = "a kronpeft adapter already" if ours else "not a PEFT adapter"
        raise ValueError(f"{peft_dir} is {kind} (its {CONFIG_NAME} has no 'peft_type'); convert a PEFT LoKr adapter")
    if str(config["peft_type"]).upper() != "LOKR":
        raise ValueError(f"{peft_dir} is a PEFT {config['peft_type']} adapter; only LoKr (with full factors) "
                         f"converts to KronA")
    return config


def _base_model_description(peft_dir: Path, peft_config: dict, base_model: str | None) -> dict:
    """What kronpeft records about the base model, from its `config.json` (local folder or Hub cache)."""
    from transformers import AutoConfig

    name = base_model or peft_config.get("base_model_name_or_path")
    try:
        model_type = AutoConfig.from_pretrained(name).model_type if name else None
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{peft_dir}: cannot read the base model {name!r} ({first}); pass the base model's folder "
                         f"or Hub id (--model / base_model=)") from None
    if model_type is None:
        raise ValueError(f"{peft_dir}: the adapter does not name its base model (base_model_name_or_path is empty); "
                         f"pass the base model's folder or Hub id (--model / base_model=)")
    mapping = peft_config.get("auto_mapping") or {}
    return {"model_type": model_type, "name_or_path": str(name), "class": mapping.get("base_model_class")}
