"""A few training steps of a tiny Llama-shaped decoder with a kronpeft adapter, in one process
(plain) or in each of several `torchrun` processes on gloo (FSDP2 `fully_shard`, FSDP1, DeepSpeed ZeRO-3).

`python scale_worker.py <engine> <out> <method>...` under torchrun writes `<out>/<method>/losses.json`
and the adapter (`<out>/<method>/adapter`); tests/test_scale_fsdp.py compares both with `train_tiny(..., "none")`.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers as T
from transformers import TrainerState, TrainingArguments

from kronpeft import AdaKronConfig, KronABConfig, KronAConfig, get_model
from kronpeft.integrations.trainer import KronSaveCallback
from kronpeft.sharding import fsdp1_auto_wrap_policy

METHODS = {"krona": lambda: KronAConfig(target_modules="all-linear"), "kronab": lambda: KronABConfig(),
           "adakron": lambda: AdaKronConfig(r=8, positions=("ffn", "attn"), init="paper")}
GLOBAL_BATCH, LENGTH, STEPS = 4, 8, 3


def tiny_decoder(seed: int = 0):
    torch.manual_seed(seed)
    return T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=100, pad_token_id=0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False))


def batches(steps: int = STEPS):
    """The same global batch every step, so that the loss falls."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 100, (GLOBAL_BATCH, LENGTH), generator=g)] * steps


def shard(model, engine: str):
    """`engine`: "fsdp2" (`fully_shard` per decoder layer, then the root), "fsdp1" (a unit per decoder
    layer, `use_orig_params=True`) or "fsdp1-flat" (FSDP1's default `use_orig_params=False`, with
    `fsdp1_auto_wrap_policy`: the adapters get units of their own, so no flat parameter mixes frozen and
    trained tensors)."""
    from torch.distributed.device_mesh import init_device_mesh

    if engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.base_model.model.layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    if engine.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        if engine == "fsdp1-flat":
            policy, orig = fsdp1_auto_wrap_policy(model), False
        else:
            policy, orig = ModuleWrapPolicy({type(model.base_model.model.layers[0])}), True
        return FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=orig,
                                        device_id=torch.device("cpu"))
    raise ValueError(engine)


def train_tiny(method: str, out: Path, engine: str = "none", steps: int = STEPS) -> list[float]:
    """Train `steps` AdamW steps, each process on its part of the global batch, save the adapter to
    `out/adapter`, then try to merge it (the error, if any, goes to `out/merge_error.txt`); returns
    the global mean loss per step."""
    model = get_model(tiny_decoder(), METHODS[method]())
    model.train()
    rank, world = (dist.get_rank(), dist.get_world_size()) if engine != "none" else (0, 1)
    if engine.startswith("fsdp"):  # before the optimizer is built: sharding replaces the parameters
        model = shard(model, engine)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    if engine.startswith("zero"):  # DeepSpeed wraps the optimizer and runs backward and step itself
        import deepspeed

        # skip DeepSpeed's optional shared-memory collectives (a C++ build of 90 s on first use): gloo carries them
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

        zero = {"stage": int(engine[-1]), "stage3_param_persistence_threshold": 0}  # 0: partition tiny tensors too
        config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "zero_optimization": zero}
        model, optimizer = deepspeed.initialize(model=model, optimizer=optimizer, config=config)[:2]
    losses = []
    for ids in batches(steps):
        local = ids.chunk(world)[rank]
        loss = model(input_ids=local, labels=local).loss
        if engine.startswith("zero"):
            model.backward(loss)
            model.step()
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    # FSDP1 and DeepSpeed wrap the model; FSDP2 changes its class in place
    kron_model = model.module if engine in ("fsdp1", "fsdp1-flat", "zero2", "zero3") else model
    kron_model.save_pretrained(out / "adapter")
    if engine == "fsdp2":  # Trainer runs its callbacks on every process: the sharded model gathers on each
        trainer_state = TrainerState(is_world_process_zero=rank == 0)
        KronSaveCallback().on_train_end(TrainingArguments(out / "trainer", report_to=[]), trainer_state, None, model)
    try:
        kron_model.merge_adapter()
    except ValueError as err:
        if rank == 0:
            (out / "merge_error.txt").write_text(str(err))
    return losses


class GlooFsdpTrainer(T.Trainer):
    """`Trainer` with `fsdp=` as it runs on GPUs. accelerate (1.16) turns FSDP on for GPU process groups only
    and runs DDP on gloo; this switches the state as accelerate itself does on GPUs, so Trainer's FSDP2
    path (sharding in `prepare`, gathered saves) runs here."""

    def create_accelerator_and_postprocess(self):
        from accelerate import FullyShardedDataParallelPlugin

        from kronpeft.runner.scale import switch_to_fsdp

        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and self.accelerator.num_processes > 1:
            switch_to_fsdp(self.accelerator, FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args))
            self.is_fsdp_enabled = True


def train_with_trainer(out: Path, fsdp: bool, steps: int = STEPS) -> list[float]:
    """KronA on the tiny decoder through `transformers.Trainer` (+ `KronSaveCallback`), `fsdp=` when
    sharded; every row is the same sequence, so each step's global batch is the same at any world size.
    Returns the logged loss per step."""
    model = get_model(tiny_decoder(), METHODS["krona"]())
    ids = batches(1)[0][0]
    rows = [{"input_ids": ids, "labels": ids}] * (GLOBAL_BATCH * steps)
    world = dist.get_world_size() if dist.is_initialized() else 1
    sharding = {"fsdp": "full_shard auto_wrap", "fsdp_config": {
        "version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "reshard_after_forward": True,
        "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": False}} if fsdp else {}
    args = TrainingArguments(out / "trainer", per_device_train_batch_size=GLOBAL_BATCH // world, max_steps=steps,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, seed=0, **sharding)
    trainer = GlooFsdpTrainer(model=model, args=args, train_dataset=rows, callbacks=[KronSaveCallback()])
    trainer.train()
    trainer.save_model()  # Trainer's own gathered save (model.safetensors: the KronModel's trained tensors)
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


if __name__ == "__main__":
    torch.set_num_threads(1)
    engine, out, methods = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    dist.init_process_group("gloo")
    if engine == "trainer-fsdp2":
        losses = train_with_trainer(out, fsdp=True)
        if dist.get_rank() == 0:
            (out / "losses.json").write_text(json.dumps(losses))
        methods = []
    for method in methods:
        losses = train_tiny(method, out / method, engine)
        if dist.get_rank() == 0:
            (out / method / "losses.json").write_text(json.dumps(losses))
    dist.destroy_process_group()
