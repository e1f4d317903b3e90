"""How much of each layer's FFN output does a trained sequential adapter replace? (GLUE study, issue 7)

For each run folder that `kronpeft study` left (an AdaKron or Pfeiffer adapter), load the adapter at its best
checkpoint, run the first 64 dev examples of the run's task and print, per layer, ||adapter(h) - h|| / ||h||
over the real (non-padding) tokens, `h (tokens, d)` the FFN output the adapter receives; then the rms of its
bottleneck `z (tokens, r)` before the activation, and h's largest entry (in absolute value) beside its rms.
A ratio near 1 or above: the adapter overwrites that layer's FFN output instead of adjusting it.

    python benchmarks/study/adapter_share.py --data-dir ../shared/data/glue \\
        runs/study/glue-minilm/stsb/bottleneck/lr0.0005-seed0 runs/study/glue-minilm/stsb/adakron/lr0.002-seed0
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from kronpeft.runner import baselines
from kronpeft.runner.data import get_task, load_split
from kronpeft.layers import SequentialAdapter
from kronpeft.runner.train.batches import Encoded
from kronpeft.runner.train.models import load_base


def adapter_shares(run_dir: Path, data_dir: str | None, examples: int) -> dict[str, list[float]]:
    """||Δ|| / ||h||, rms of z, max |h| and rms of h, one value per layer, for the adapter in `run_dir/adapter`."""
    info = baselines.read_run(run_dir / "adapter")
    spec = get_task(info["task"])
    base, tokenizer = load_base(info["model_path"], spec.num_labels, spec.is_regression)
    model = baselines.load_trained(run_dir / "adapter", base, info).eval()
    dev = load_split(spec.name, "dev", data_dir)[:examples]
    batch = Encoded(tokenizer, dev, info["max_length"], spec.is_regression).batch(range(len(dev)))
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[1], out)))
             for m in model.modules() if isinstance(m, SequentialAdapter)]
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
        real = batch["attention_mask"].bool()
        stats = {"share": [((out - h)[real].norm() / h[real].norm()).item() for _, h, out in seen],
                 "z_rms": [mod.bottleneck(h)[real].pow(2).mean().sqrt().item() for mod, h, _ in seen],
                 "h_max": [h[real].abs().max().item() for _, h, _ in seen],
                 "h_rms": [h[real].pow(2).mean().sqrt().item() for _, h, _ in seen]}
    for hook in hooks:
        hook.remove()
    return stats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of `kronpeft study` (with adapter/)")
    parser.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"))
    parser.add_argument("--examples", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = [(run, adapter_shares(run, args.data_dir, args.examples)) for run in args.runs]
    layers = len(rows[0][1]["share"])
    print("| run | " + " | ".join(f"layer {i}" for i in range(layers))
          + " | rms of z per layer | largest abs h / rms h |")
    print("|---|" + "---:|" * layers + "---|---|")
    for run, stats in rows:
        print(f"| {'/'.join(run.parts[-3:])} | " + " | ".join(f"{s:.2f}" for s in stats["share"])
              + " | " + ", ".join(f"{z:.1f}" for z in stats["z_rms"])
              + " | " + ", ".join(f"{m:.0f}/{r:.1f}" for m, r in zip(stats["h_max"], stats["h_rms"])) + " |")


if __name__ == "__main__":
    main()
