"""SmolLM2-135M-Instruct with an int8 and an int4 (torchao) frozen base vs fp32 (docs/scale.md): the same short
SST-2 fine-tune (KronA all-linear, docs/llm.md's recipe) through `kronpeft train --quantize`, the three runs
started together, side by side, one thread each, so that load on the shared machine hits them alike.
Reports each run's peak RSS, training wall and CPU seconds per step, and dev accuracy (metrics.json).
`--weights`: the bytes the 210 decoder linear weights take after quantization (a torchao tensor counted by
its inner tensors), each variant loaded in turn.

    python benchmarks/quantized.py --data-dir /work/shared/data/glue [--train 256 --eval 200] [--out /tmp/...]
    python benchmarks/quantized.py --weights
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from harness import cpu_model

VARIANTS = {"fp32": [], "int8": ["--quantize", "int8"], "int4": ["--quantize", "int4"]}


def command(variant: str, args) -> list[str]:
    return [sys.executable, "-m", "kronpeft", "train", "--model", "smollm2", "--task", "sst2", "--method", "krona",
            "--lr", "0.005", "--epochs", "1", "--batch-size", "16", "--max-length", "64",
            "--max-train-samples", str(args.train), "--max-eval-samples", str(args.eval), "--warmup-ratio", "0.06",
            "--group-by-length", "--weight-decay", "0", "--max-grad-norm", "1", "--log-every", "1", "--seed", "0",
            "--no-eval-before", "--data-dir", args.data_dir, "--overwrite",
            "--output-dir", f"{args.out}/{variant}", *VARIANTS[variant]]


def row(variant: str, out: str) -> dict:
    m = json.loads(Path(f"{out}/{variant}/metrics.json").read_text())
    return {"base": variant, "steps": m["steps"], "peak_rss_mb": round(m["peak_memory_mb"]),
            "train_s_per_step": round(m["train_seconds"] / m["steps"], 2),
            "train_cpu_s_per_step": round(m["train_cpu_seconds"] / m["steps"], 2),
            "dev_accuracy": m["final"].get("accuracy"), "trainable_params": m["trainable_params"]}


def nbytes(t) -> int:
    if hasattr(t, "__tensor_flatten__"):  # a torchao tensor subclass: its packed data, scales, zero points
        return sum(nbytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def weight_bytes():
    import torch
    import transformers as T
    from kronpeft.runner.scale import quantize_base
    from kronpeft.runner.train import smollm2_folder

    torch.set_num_threads(1)
    for variant in VARIANTS:
        model = T.AutoModelForCausalLM.from_pretrained(smollm2_folder())
        if variant != "fp32":
            quantize_base(model, variant)
        linears = [m for m in model.model.layers.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
                   and m.weight.dim() == 2]
        print(json.dumps({"base": variant, "linear_layers": len(linears),
                          "weight_class": type(linears[0].weight).__name__,
                          "linear_weights_mib": round(sum(nbytes(m.weight) for m in linears) / 2**20, 1)}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("GLUE_DIR", "/work/shared/data/glue"))
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--out", default="/tmp/kronpeft-quantized-bench")
    parser.add_argument("--report-only", action="store_true", help="tabulate finished runs in --out")
    parser.add_argument("--weights", action="store_true", help="only the quantized weights' bytes")
    args = parser.parse_args()
    print(f"# CPU: {cpu_model()}", flush=True)
    if args.weights:
        return weight_bytes()
    if not args.report_only:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        procs = {v: subprocess.Popen(command(v, args), env=env, stdout=subprocess.DEVNULL) for v in VARIANTS}
        for v, p in procs.items():
            if p.wait():
                sys.exit(f"{v}: kronpeft train exited with {p.returncode}")
    rows = [row(v, args.out) for v in VARIANTS]
    ref = rows[0]
    for r in rows:
        r["rss_vs_fp32"] = round(r["peak_rss_mb"] / ref["peak_rss_mb"], 2)
        r["cpu_step_vs_fp32"] = round(r["train_cpu_s_per_step"] / ref["train_cpu_s_per_step"], 2)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
