"""Why AdaKron's paper initialisation breaks a pre-norm decoder and not BERT (docs/llm.md).

For each FFN output `y` the adapter sees: mean token norm |y|, mean |z| of the bottleneck
`z = v ⊗ u` (quadratic in `y`) and the mean norm of the adapter's change `|y' - y|`; then the step-0
change of the model's output: the LM loss on 8 BBC News articles (decoder) or the largest logit change
(encoder). Usage: `python benchmarks/adakron_init.py --model smollm2` (or `all-MiniLM-L6-v2`).
"""
from __future__ import annotations

import argparse

import torch

from kronpeft import AdaKronConfig, get_model
from kronpeft.runner.data import load_split
from kronpeft.injection import sites
from kronpeft.runner.text2text import is_causal_lm
from kronpeft.runner.train.models import load_base, resolve_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args(argv)
    model, tokenizer = load_base(resolve_model(args.model), 5, False)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [e.text_a[:400] for e in load_split("bbc-news", "dev")[:8]]
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=96))
    batch.pop("token_type_ids", None)
    decoder = is_causal_lm(model.config)
    if decoder:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        base = model(**batch)
    for init in ("paper", "zero"):
        torch.manual_seed(0)
        kron = get_model(model, AdaKronConfig(init=init))
        rows, hooks = [], []
        for _, site in sites(model):
            def record(adapter, inputs, output):
                _, y = inputs
                z = adapter.bottleneck(y.to(adapter.up.weight.dtype))
                rows.append((y[mask].norm(dim=-1).mean().item(), z[mask].abs().mean().item(),
                             (output - y)[mask].norm(dim=-1).mean().item()))
            hooks.append(site["default"].register_forward_hook(record))
        with torch.no_grad():
            out = kron(**batch)
        for hook in hooks:
            hook.remove()
        kron.delete_adapter("default")
        if decoder:
            change = f"LM loss {base.loss.item():.3f} -> {out.loss.item():.3f}"
        else:
            change = f"max |logit change| {(out.logits - base.logits).abs().max().item():.2e}"
        print(f"{args.model} init={init}: {change}")
        for i, (y, z, delta) in enumerate(rows):
            print(f"  layer {i:2d}: |y| {y:8.1f}   mean |z| {z:9.3g}   |adapter change| {delta:9.3g}")


if __name__ == "__main__":
    main()
