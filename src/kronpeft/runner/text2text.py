"""Text-to-text tasks for decoder LMs (`*ForCausalLM`), T5-style: a prompt, then the label word(s).

An example becomes `<task> <field>: <text> ... <field>: <text>` + `SEPARATOR`, followed by the
target ` <label word>` and the end-of-sequence token ("sst2 sentence: a gem of a film\\nlabel:
positive</s>"). STS-B's target is its score rounded to 0.2 and written as text ("3.8"), as in T5.

Training: the loss is on the target tokens only (every prompt and padding position is labelled
-100). Evaluation: rank classification -- each label's summed log-likelihood (target tokens + EOS)
given the prompt, argmax; for STS-B, the greedily decoded number.
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

from .data import Example, TaskSpec
from .feedback import batches

# T5's input fields (Raffel et al. 2020, appendix D): (field name, Example attribute).
_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "cola": (("sentence", "text_a"),),
    "sst2": (("sentence", "text_a"),),
    "mrpc": (("sentence1", "text_a"), ("sentence2", "text_b")),
    "qqp": (("question1", "text_a"), ("question2", "text_b")),
    "stsb": (("sentence1", "text_a"), ("sentence2", "text_b")),
    "mnli": (("hypothesis", "text_b"), ("premise", "text_a")),
    "qnli": (("question", "text_a"), ("sentence", "text_b")),
    "rte": (("sentence1", "text_a"), ("sentence2", "text_b")),
    "wnli": (("sentence1", "text_a"), ("sentence2", "text_b")),
    "bbc-news": (("article", "text_a"),),
}
SEPARATOR = "\nlabel:"
STSB_STEP = 0.2
STSB_UNPARSED = 2.5  # the middle of the 0-5 scale, for a generation that holds no number
STSB_NEW_TOKENS = 6


def is_causal_lm(config) -> bool:
    """Whether a model config describes a decoder LM (`*ForCausalLM`, GPT-2's `*LMHeadModel`); a config
    naming no architecture (one read from a GGUF file) by its model type: a causal LM, not a masked LM."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    if getattr(config, "is_encoder_decoder", False):
        return False
    archs = getattr(config, "architectures", None)
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def prompt_text(spec: TaskSpec, example: Example) -> str:
    """`"rte sentence1: ... sentence2: ..."`, without the separator."""
    parts = [spec.name] + [f"{field}: {getattr(example, attr)}" for field, attr in _FIELDS[spec.name]]
    return " ".join(parts)


def stsb_text(score: float) -> str:
    """An STS-B score rounded to 0.2 and written as text: 3.87 -> "3.8"."""
    return f"{round(score / STSB_STEP) * STSB_STEP:.1f}"


def parse_stsb(text: str) -> float:
    """The first number in a generation, clipped to [0, 5]; `STSB_UNPARSED` when there is none."""
    found = re.search(r"-?\d+(?:\.\d+)?", text)  # the sign too: "-1" is below the range (0), not 1
    return min(max(float(found.group()), 0.0), 5.0) if found else STSB_UNPARSED


def label_words(spec: TaskSpec) -> list[str]:
    """The target text of each class id (STS-B: every score step 0.0 ... 5.0)."""
    if spec.is_regression:
        return [stsb_text(i * STSB_STEP) for i in range(round(5 / STSB_STEP) + 1)]
    return list(spec.label_names)


def target_text(spec: TaskSpec, example: Example) -> str:
    return stsb_text(example.label) if spec.is_regression else spec.label_names[example.label]


def bos_prefix(tokenizer) -> list[int]:
    """`[bos]` when the tokenizer puts a BOS token first (Llama-2 style), else `[]`; no other
    special token (a WordPiece tokenizer's [CLS]/[SEP]) enters a prompt."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a free-text prompt, encoded as `PromptedSet` encodes the training prompts."""
    return bos_prefix(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]


class PromptedSet:
    """A task's examples as token ids: `prompts[i]` (BOS if the tokenizer adds one, the prompt text
    truncated so that the longest target still fits in `max_length`, the separator) and
    `targets[i]` (` <label word>` + EOS). `labels[i]` is the gold class id or score."""

    def __init__(self, tokenizer, spec: TaskSpec, examples: list[Example], max_length: int):
        if not examples:
            raise ValueError("no examples to use (check --max-train-samples/--max-eval-samples and the data)")
        self.spec, self.tokenizer = spec, tokenizer
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.bos = bos_prefix(tokenizer)
        self.candidates = [self.encode_target(w) for w in label_words(spec)]
        separator = self._ids(SEPARATOR)
        budget = max_length - len(self.bos) - len(separator) - max(len(c) for c in self.candidates)
        if budget < 1:
            raise ValueError(f"--max-length {max_length} leaves no room for the prompt of {spec.name}; raise it")
        self.prompts = [self.bos + self._ids(prompt_text(spec, e))[:budget] + separator for e in examples]
        self.targets = [self.encode_target(target_text(spec, e)) for e in examples]
        self.labels = [float(e.label) if spec.is_regression else int(e.label) for e in examples]
        self.regression = spec.is_regression

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_target(self, word: str) -> list[int]:
        return self._ids(" " + word) + ([self.eos_id] if self.eos_id is not None else [])

    def __len__(self):
        return len(self.prompts)

    @property
    def lengths(self) -> list[int]:
        return [len(p) + len(t) for p, t in zip(self.prompts, self.targets)]

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """Right-padded `input_ids (n, T)`, `attention_mask`, and `labels`: -100 except on the target."""
        seqs = [self.prompts[i] + self.targets[i] for i in indices]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(indices):
            p, t = len(self.prompts[i]), len(self.targets[i])
            ids[row, :p + t] = torch.tensor(self.prompts[i] + self.targets[i])
            labels[row, p:p + t] = torch.tensor(self.targets[i])
            mask[row, :p + t] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @torch.no_grad()
    def predict(self, model, batch_size: int, device) -> np.ndarray:
        """Class ids by rank classification, or STS-B scores parsed from greedy generations."""
        was_training = model.training
        model.eval()
        try:
            if self.regression:
                texts = []
                for start in batches(range(0, len(self), batch_size)):
                    texts += generate_greedy(model, self.prompts[start:start + batch_size], self.pad_id,
                                             self.eos_id, self.tokenizer, device)
                return np.array([parse_stsb(t) for t in texts])
            k = len(self.candidates)
            per_batch = max(1, batch_size // k)
            scores = [rank_scores(model, self.prompts[s:s + per_batch], self.candidates, self.pad_id, device)
                      for s in batches(range(0, len(self), per_batch))]
            return torch.cat(scores).argmax(-1).numpy()
        finally:
            model.train(was_training)


def left_padded(seqs: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask` and `position_ids` with every sequence ending at the last column."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        ids[row, width - len(s):] = torch.tensor(s)
        mask[row, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


@torch.no_grad()
def rank_scores(model, prompts: list[list[int]], candidates: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """`scores (n, k)`: `Σ_t log p(candidate_j[t] | prompt_i, candidate_j[:t])` for every prompt and candidate.

    All `n·k` sequences are left-padded to end together, so the candidate tokens sit in the last
    `max len` columns and only those logits are computed (`logits_to_keep`).
    """
    seqs = [p + c for p in prompts for c in candidates]
    inputs = left_padded(seqs, pad_id, device)
    keep = max(len(c) for c in candidates) + 1
    logits = model(**inputs, logits_to_keep=keep).logits[:, -keep:-1].float()  # predicts the last keep-1 tokens
    tokens = inputs["input_ids"][:, -keep + 1:]
    token_logp = F.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (n*k, keep-1)
    lengths = torch.tensor([len(c) for _ in prompts for c in candidates], device=tokens.device)
    in_target = torch.arange(keep - 1, device=tokens.device) >= (keep - 1 - lengths).unsqueeze(-1)
    return (token_logp * in_target).sum(-1).view(len(prompts), len(candidates)).cpu()


@torch.no_grad()
def generate_greedy(model, prompts: list[list[int]], pad_id: int, eos_id, tokenizer, device,
                    max_new_tokens: int = STSB_NEW_TOKENS) -> list[str]:
    """Greedy continuations of token-id prompts (batched, left-padded), decoded to text."""
    inputs = left_padded(prompts, pad_id, device)
    inputs.pop("position_ids")  # generate derives them from the attention mask
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                         eos_token_id=eos_id)
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
