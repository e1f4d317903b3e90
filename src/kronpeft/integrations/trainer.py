"""`transformers.Trainer` support: a callback that writes the kronpeft adapter next to Trainer's own files.

`KronModel.state_dict()` already holds only the trained tensors, so Trainer's checkpoints
(`model.safetensors`, `optimizer.pt`) are adapter-sized and `resume_from_checkpoint` /
`load_best_model_at_end` work unchanged. This callback adds the `KronModel.save_pretrained` files
(`adapter_config.json`, `adapter_model.safetensors`) to every `checkpoint-N` folder and, when
training ends, to `args.output_dir` -- the folder `trainer.save_model()` writes to by default -- so
each of them loads with `KronModel.from_pretrained(base, folder)`. At the start of training it warns
when `learning_rate` is ten times or more below the adapter method's usual rate (Trainer's default
5e-5 leaves a KronA adapter, whose usual rate is 5e-3, where it started).
"""
from __future__ import annotations

import warnings
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..choices import DEFAULT_LR
from ..model import KronModel


class KronSaveCallback(TrainerCallback):
    """`Trainer(model=kron_model, ..., callbacks=[KronSaveCallback()])`: kronpeft adapters in
    every checkpoint folder and in `output_dir` at the end of training. Called on every process, as Trainer
    calls callbacks: `save_pretrained` writes from rank 0 alone, and a sharded model gathers on every process."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            for method in sorted({config.method for config in _kron_model(model).configs.values()}):
                usual = DEFAULT_LR.get(method)
                if usual is not None and args.learning_rate <= usual / 10:
                    warnings.warn(f"TrainingArguments(learning_rate={args.learning_rate:g}) is far below the usual "
                                  f"rate of a {method} adapter ({usual:g}): it may learn nothing; pass "
                                  f"TrainingArguments(..., learning_rate={usual:g})", stacklevel=2)

    def on_save(self, args, state, control, model=None, **kwargs):
        _kron_model(model).save_pretrained(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        _kron_model(model).save_pretrained(args.output_dir)  # after load_best_model_at_end: the best adapter


def _kron_model(model) -> KronModel:
    inner = getattr(model, "module", model)  # DistributedDataParallel / DataParallel wrappers
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    if not isinstance(inner, KronModel):
        raise TypeError(f"KronSaveCallback needs a Trainer whose model is a KronModel, got {type(inner).__name__}")
    return inner
