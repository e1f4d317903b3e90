"""How far does one learning rate move each method? (diagnosis for the GLUE study, issue 7)

For each (method, lr), take N AdamW steps (constant rate, no warm-up, no weight decay) on MRPC training
batches and print how much the encoder's output moved: ||h_k - h_0|| / ||h_0|| of the final hidden states
on a fixed batch of 32 dev pairs, after 1, 5 and N steps. Under Adam the first steps move every trainable
entry by about `lr`, so what a given rate does depends on how the adapter turns entry-sized steps into a
weight change; this measures it directly, method-agnostic.

    python benchmarks/study/update_size.py --data-dir ../shared/data/glue krona:2e-2 krona:2e-3 lora-r1:5e-3
"""
from __future__ import annotations

import argparse
import copy
import os

import torch

from kronpeft.runner import baselines
from kronpeft.runner.data import get_task, load_split
from kronpeft.runner.train.batches import Encoded, epoch_batches
from kronpeft.runner.train.models import load_base, resolve_model

SPECS = {  # name -> (method, build options)
    "krona": ("krona", {}), "lokr": ("lokr", {}), "lora-r1": ("lora", {"r": 1}), "lora-r8": ("lora", {"r": 8}),
    "kronab": ("kronab", {}), "kronab-res": ("kronab-res", {}), "adakron": ("adakron", {"init": "paper"}),
    "bottleneck": ("bottleneck", {}), "full": ("full", {}),
}


def hidden(model, batch):
    out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
    return out.hidden_states[-1].detach()


def measure(name: str, lr: float, base, tokenizer, train, probe, steps: int) -> dict:
    method, options = SPECS[name]
    torch.manual_seed(0)
    model = baselines.build(method, copy.deepcopy(base), **options)
    model.eval()  # no dropout: the change is the update's alone
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    with torch.no_grad():
        h0 = hidden(model, probe)
    moved, losses = {}, []
    batches = epoch_batches(len(train), 32, 0, 0, 1)
    for step in range(1, steps + 1):
        loss = model(**train.batch(batches[step - 1])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step in (1, 5, steps):
            with torch.no_grad():
                moved[step] = ((hidden(model, probe) - h0).norm() / h0.norm()).item()
    return {"name": name, "lr": lr, "moved": moved, "loss": sum(losses[-5:]) / len(losses[-5:])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="name:lr, name one of " + ", ".join(SPECS))
    parser.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = get_task("mrpc")
    base, tokenizer = load_base(resolve_model("all-MiniLM-L6-v2"), spec.num_labels, False)
    train = Encoded(tokenizer, load_split("mrpc", "train", args.data_dir), 128, False)
    dev = Encoded(tokenizer, load_split("mrpc", "dev", args.data_dir), 128, False)
    probe = dev.batch(range(32))
    print(f"| method | lr | moved after 1 step | after 5 | after {args.steps} | train loss (last 5 steps) |")
    print("|---|---:|---:|---:|---:|---:|")
    for item in args.runs:
        name, lr = item.split(":")
        r = measure(name, float(lr), base, tokenizer, train, probe, args.steps)
        m = r["moved"]
        print(f"| {name} | {r['lr']:g} | {m[1]:.4f} | {m[5]:.4f} | {m[args.steps]:.4f} | {r['loss']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
