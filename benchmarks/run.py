"""Benchmark KronA against the frozen base, PEFT LoKr (same factors) and PEFT LoRA.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--dtype fp32|bf16] [--out benchmarks/results]

Prints Markdown tables (medians of interleaved repetitions, and ratios) and writes them with the
raw numbers to OUT/results.md and OUT/results.json. See docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from kronpeft.atomic import write_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))

import layer_level  # noqa: E402
from harness import cpu_model  # noqa: E402
import mixed_precision  # noqa: E402
import model_level  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PARTS = ["layers", "models", "generation", "mixed"]
MB = 2**20


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="3 layer cases, fewer repetitions, small models (< 3 min on 2 CPU cores)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--only", nargs="+", choices=PARTS, help="run these parts only (default: all)")
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(model_level.MODELS),
                        help="model-level cases (default: all; quick: minilm and llama_d2048)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions of the model-level and generation parts (default: 5; quick: 3)")
    parser.add_argument("--out", default="benchmarks/results")
    return parser.parse_args(argv)


def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": cpu_model(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def layer_table(rows: list[dict]) -> str:
    head = ("| out x in | tokens | base ms | KronA ms | LoKr ms | LoRA r=8 ms | LoRA same-params ms (r) "
            "| kron ref ms | KronA/base | KronA/LoKr | KronA/LoRA8 | KronA/LoRA same | extra MB KronA | extra MB LoKr "
            "| extra MB LoRA8 | KronA/LoKr extra mem |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        t, e = r["time_s"], r["extra_bytes"]
        lines.append(
            f"| {r['out']}x{r['in']} | {r['tokens']} | {_ms(t['base'])} | {_ms(t['krona'])} | {_ms(t['lokr'])} "
            f"| {_ms(t['lora_r8'])} | {_ms(t['lora_same'])} ({r['lora_same_r']}) | {_ms(t['kron_ref'])} "
            f"| {_ratio(t['krona'], t['base'])} | {_ratio(t['krona'], t['lokr'])} | {_ratio(t['krona'], t['lora_r8'])} "
            f"| {_ratio(t['krona'], t['lora_same'])} | {e['krona'] / MB:.1f} | {e['lokr'] / MB:.1f} "
            f"| {e['lora_r8'] / MB:.1f} | {_ratio(e['krona'], e['lokr'])} |")
    return "\n".join(lines)


def model_table(result: dict) -> str:
    t, peak = result["step_s"], result["peak_bytes"]
    head = "| method | step ms | / base | / LoRA r=8 | / LoKr | peak MB | peak / LoRA r=8 | trainable params |"
    lines = [f"**{result['model']}** — {result['note']} ({result['tokens']} tokens per step; weights: "
             f"{result['weights']})", "", head,
             "|---|---|---|---|---|---|---|---|"]
    for method in t:
        lines.append(
            f"| {method} | {_ms(t[method])} | {_ratio(t[method], t['base'])} | {_ratio(t[method], t['lora_r8'])} "
            f"| {_ratio(t[method], t['lokr'])} | {peak[method] / MB:.0f} | {_ratio(peak[method], peak['lora_r8'])} "
            f"| {result['trainable'][method]:,} |")
    return "\n".join(lines)


def inference_table(result: dict) -> str:
    t = result["inference"]["forward_s"]
    lines = [f"**{result['model']}** inference (forward, `torch.inference_mode`; merged vs unmerged KronA relative "
             f"difference {result['inference']['merged_vs_unmerged_rel_err']:.1e})", "",
             "| method | forward ms | % of base |", "|---|---|---|"]
    for method, seconds in t.items():
        lines.append(f"| {method} | {_ms(seconds)} | {100 * seconds / t['base']:.0f}% |")
    return "\n".join(lines)


def generation_table(result: dict) -> str:
    t, rate = result["seconds"], result["tokens_per_s"]
    same = "yes" if result["merged_same_tokens_as_unmerged"] else "NO"
    lines = [f"**{result['model']}** greedy generation ({result['weights']} weights, {result['layers']} layers; "
             f"batch 1, {result['prompt_tokens']}-token prompt + {result['new_tokens']} new tokens, KV cache; "
             f"merged KronA generates the unmerged one's tokens: {same})", "",
             "| model | seconds | tokens/s | tokens/s / base |", "|---|---|---|---|"]
    for name, seconds in t.items():
        lines.append(f"| {name} | {seconds:.2f} | {rate[name]:.1f} | {_ratio(rate[name], rate['base'])} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    started = time.time()
    results = {"command": " ".join(["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
               "machine": machine(device), "dtype": args.dtype, "quick": args.quick, "layers": [], "models": []}
    sections = []
    parts = args.only or PARTS
    reps = args.reps or (3 if args.quick else 5)
    if "layers" in parts:
        for (out_features, in_features), tokens in layer_level.cases(args.quick):
            layer_reps = layer_level.reps_for(out_features, in_features, tokens, args.quick)
            row = layer_level.run_case(out_features, in_features, tokens, layer_reps, dtype, device)
            results["layers"].append(row)
            print(layer_table([row]).splitlines()[-1], flush=True)
        sections.append("### Layer level: frozen nn.Linear + adapter, forward + backward\n\n"
                        + layer_table(results["layers"]))
    if "models" in parts:
        names = args.models or (["minilm", "llama_d2048"] if args.quick else list(model_level.MODELS))
        for name in names:
            result = model_level.run_model(model_level.MODELS[name], args.quick, reps, dtype, device)
            results["models"].append(result)
            print(model_table(result), "\n", inference_table(result), sep="\n", flush=True)
        sections.append("### Model level: one training step (forward, backward, AdamW)\n\n"
                        + "\n\n".join(model_table(r) for r in results["models"]))
        sections.append("### Inference\n\n" + "\n\n".join(inference_table(r) for r in results["models"]))
    if "generation" in parts:
        results["generation"] = model_level.run_generation(args.quick, reps, device)
        print(generation_table(results["generation"]), flush=True)
        sections.append("### Generation: merged KronA against the base model\n\n"
                        + generation_table(results["generation"]))
    if "mixed" in parts:
        results["mixed_precision"] = mixed_precision.run(args.quick, 3 if args.quick else 5, device)
        print(mixed_precision.table(results["mixed_precision"]), flush=True)
        sections.append("### Mixed precision: fp32 and bf16 autocast\n\n"
                        + mixed_precision.table(results["mixed_precision"]))
    results["seconds"] = time.time() - started
    header = (f"Command: `{results['command']}`  \nMachine: {results['machine']}  \n"
              f"dtype {args.dtype}, device {args.device}; medians of interleaved repetitions; "
              f"took {results['seconds']:.0f} s.")
    report = "\n\n".join([header, *sections]) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.md", lambda tmp: tmp.write_text(report))
    write_atomic(out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1) + "\n"))
    print("\n" + report)


if __name__ == "__main__":
    main()
