"""Collect runs/rte/<method>/metrics.json into the Markdown table of docs/results-rte.md."""
import json
import sys
from pathlib import Path

METHODS = ["krona", "lokr", "kronab", "kronab-res", "adakron", "bottleneck", "lora", "full"]
root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/rte")
print("| method | dev accuracy (final) | best (step) | before training | trainable params | % of model | train time (s) | peak RSS (MB) |")
print("|---|---|---|---|---|---|---|---|")
for method in METHODS:
    path = root / method / "metrics.json"
    if not path.is_file():
        print(f"| {method} | not run yet | | | | | | |")
        continue
    m = json.loads(path.read_text())
    before = m.get("before_training") or {}
    print(f"| {method} | {m['final']['accuracy']:.4f} | {m['best']['accuracy']:.4f} ({m['best_step']}) | "
          f"{before.get('accuracy', float('nan')):.4f} | {m['trainable_params']:,} | "
          f"{100 * m['trainable_params'] / m['total_params']:.3f} | {m['train_seconds']:.0f} | {m['peak_memory_mb']:.0f} |")
