"""Where each architecture's attention projections and feed-forward blocks are, by module name.

Names are suffixes of `named_modules()` names. `ffn` is `(first,)` for a feed-forward block that is
one module, or `(first, last)` with `last` relative to `first`'s parent when the block is split
over two modules (BERT: `intermediate` holds the up-projection, `output.dense` the down-projection).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    attention: tuple[str, ...]  # KronA's default targets: the attention query and value
    ffn: tuple[str, ...]  # the feed-forward block: (module,) or (first, last relative to first's parent)
    attn_output: tuple[str, ...]  # the attention output projection(s)


_BERT = Preset(("query", "value"), ("intermediate", "output.dense"), ("attention.output.dense",))
_LLAMA = Preset(("q_proj", "v_proj"), ("mlp",), ("self_attn.o_proj",))

PRESETS: dict[str, Preset] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "mpnet": Preset(("attn.q", "attn.v"), ("intermediate", "output.dense"), ("attn.o",)),
    "distilbert": Preset(("q_lin", "v_lin"), ("ffn",), ("attention.out_lin",)),
    "t5": Preset(("q", "v"), ("DenseReluDense",), ("SelfAttention.o", "EncDecAttention.o")),
    "mt5": Preset(("q", "v"), ("DenseReluDense",), ("SelfAttention.o", "EncDecAttention.o")),
    "gpt2": Preset(("c_attn",), ("mlp",), ("attn.c_proj",)),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
}
