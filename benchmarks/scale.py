"""Scale benchmarks (docs/scale.md), on CPU:

  memory:  peak resident memory per process of one KronA (all-linear) training step of a Llama-shaped
           decoder with a 1B model's widths (d=2048, FFN 8192, 32 heads, 8 KV heads; random weights from
           a config, built on the meta device and materialised after sharding), world size 1 vs 2
           (FSDP2 `fully_shard` per decoder layer, gloo), with and without gradient checkpointing.
  compile: step time of a small decoder, eager vs `torch.compile` (inductor), interleaved in one process.

  python benchmarks/scale.py memory --layers 8            # runs the 4 memory cases, one process group each
  python benchmarks/scale.py compile
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers as T

import kronpeft
from harness import cpu_model


def decoder_config(layers: int, d: int = 2048, ffn: int = 8192, heads: int = 32, kv_heads: int = 8, vocab: int = 32000):
    return T.LlamaConfig(hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=True)


def build(config, world: int, checkpointing: bool):
    """The adapted model on the meta device, sharded when world > 1, then materialised with random values."""
    with torch.device("meta"):
        model = kronpeft.get_model(T.LlamaForCausalLM(config), kronpeft.KronAConfig(target_modules="all-linear"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.base_model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.02)
        model.base_model.model.rotary_emb.__init__(config)  # the RoPE buffer, lost by to_empty
    return model.train()


def memory_case(layers: int, checkpointing: bool, batch: int, seq: int, steps: int) -> dict:
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    config = decoder_config(layers)
    model = build(config, world, checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    local = ids.chunk(world)[rank]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    local_bytes = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()) * 4
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    stats = torch.tensor([peak, local_bytes / 2**20, times[-1]])
    gathered = [torch.zeros(3) for _ in range(world)]
    if world > 1:
        dist.all_gather(gathered, stats)
    else:
        gathered = [stats]
    return {"layers": layers, "world": world, "checkpointing": checkpointing, "batch": batch, "seq": seq,
            "peak_rss_mib": [round(float(s[0])) for s in gathered], "param_mib": [round(float(s[1])) for s in gathered],
            "last_step_s": [round(float(s[2]), 1) for s in gathered], "loss": round(loss.item(), 3)}


def run_memory(args):
    """Each case in its own process(es): peak RSS is per process lifetime."""
    rows = []
    for world in (1, 2):
        for checkpointing in (False, True):
            out = Path(f"/tmp/kronpeft_scale_{os.getpid()}_{world}_{int(checkpointing)}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                   __file__, "_memory_case", "--layers", str(args.layers), "--batch", str(args.batch),
                   "--seq", str(args.seq), "--steps", str(args.steps), "--out", str(out)]
            if checkpointing:
                cmd.append("--checkpointing")
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            rows.append(json.loads(out.read_text()))
            out.unlink()
            print(json.dumps(rows[-1]), flush=True)
    return rows


def run_compile(args):
    """Eager vs inductor on the same model and batch: compile time (first step) and steady step times,
    alternated step by step so that load on the shared machine hits both alike."""
    torch.manual_seed(0)
    config = decoder_config(args.layers, d=args.d, ffn=4 * args.d, heads=8, kv_heads=4, vocab=1000)
    model = kronpeft.get_model(T.LlamaForCausalLM(config), kronpeft.KronAConfig(target_modules="all-linear")).train()
    compiled = torch.compile(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def step(m):
        start = time.perf_counter()
        m(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    first = step(compiled)
    times = {"eager": [], "compiled": []}
    for _ in range(args.steps):
        times["eager"].append(step(model))
        times["compiled"].append(step(compiled))
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    row = {"d": args.d, "layers": args.layers, "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(),
           "first_compiled_step_s": round(first, 1), "eager_step_ms": round(1000 * median["eager"], 1),
           "compiled_step_ms": round(1000 * median["compiled"], 1),
           "compiled_over_eager": round(median["compiled"] / median["eager"], 3)}
    print(json.dumps(row), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("memory", "compile", "_memory_case"))
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    print(f"# CPU: {cpu_model()}; torch {torch.__version__}", flush=True)
    if args.what == "memory":
        args.layers = args.layers or 8
        run_memory(args)
    elif args.what == "compile":
        torch.set_num_threads(args.threads)
        args.layers, args.steps = args.layers or 2, max(args.steps, 10)
        run_compile(args)
    else:
        torch.set_num_threads(args.threads)
        if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
            dist.init_process_group("gloo")
        row = memory_case(args.layers, args.checkpointing, args.batch, args.seq, args.steps)
        if not dist.is_initialized() or dist.get_rank() == 0:
            Path(args.out).write_text(json.dumps(row))
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
