"""The steps of a run before its first training step: the flags checked, the data read (and checked against a
resumed run's), the base model loaded and the method built on it, the step plan, the optimizer, the state a
checkpoint restores, and the output folder made ready."""
from __future__ import annotations

import json
import math
import random
import shutil
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ...atomic import write_atomic
from ...injection import ALL_LINEAR
from .. import baselines, scale, tracking
from ..data import get_task, limit, load_split
from ..errors import UsageError
from ..run_checks import check_flags, read_finished_metrics
from ..selection import PREDICTIONS, SELECTION, split_train
from ..text2text import is_causal_lm
from .batches import epoch_batches, split_suffix
from .checkpoints import CHECKPOINT, check_resume_args, data_digest, load_checkpoint, read_checkpoint_state
from .models import load_base, start_at_label_mean


def start_accelerator(args, fsdp_plugin=None):
    """The `accelerate.Accelerator` of this process (several under torchrun / `accelerate launch`)."""
    from accelerate import Accelerator

    # cpu=True without a GPU: accelerate then sets up gloo for torchrun/`accelerate launch` processes
    on_cpu = args.cpu or not torch.cuda.is_available()
    mixed_precision = getattr(args, "mixed_precision", "no")
    if mixed_precision == "fp16" and on_cpu:  # accelerate would silently run fp32: its fp16 autocast is GPU-only
        raise UsageError("--mixed-precision fp16 needs a CUDA GPU (accelerate runs fp16 autocast only there); "
                         "use --mixed-precision bf16 on CPU")
    return Accelerator(cpu=on_cpu, mixed_precision=mixed_precision, fsdp_plugin=fsdp_plugin,
                       **tracking.accelerator_options(reporting(args), Path(args.output_dir)))


def reporting(args) -> str | None:
    """--report-to's trackers (None: no tracker)."""
    return getattr(args, "report_to", None)


def check_args(args, world: int):
    """The task's spec, once the flags are checked against each other; fills in the method's default --lr."""
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} (the global batch) does not divide over {world} processes; "
                         f"pick a multiple of {world}")
    if args.method not in baselines.METHODS:
        raise UsageError(f"unknown method {args.method!r}; choose one of: {', '.join(baselines.METHODS)}")
    check_flags(args)
    try:
        spec = get_task(args.task)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if getattr(args, "label_mean_bias", False) and not spec.is_regression:
        raise UsageError(f"--label-mean-bias applies to regression tasks (stsb); {spec.name} is a classification "
                         f"task: drop the flag")
    if args.lr is None:
        args.lr = baselines.DEFAULT_LR[args.method]
    return spec


def finished_run(out: Path, main: bool) -> dict:
    """--resume of a run that finished: its metrics, nothing trained."""
    metrics = read_finished_metrics(out / "metrics.json")
    if main:
        print(f"{out} already holds a finished run; nothing to resume", file=sys.stderr)
    return metrics


def read_resume_state(out: Path, args) -> dict:
    """The checkpoint's state.json, once its flags are checked against this run's."""
    saved_state = read_checkpoint_state(out / CHECKPOINT)
    check_resume_args(out, saved_state["args"], args)
    return saved_state


def load_data(args, spec, out: Path, saved: dict | None) -> tuple[list, dict, dict]:
    """(train examples, {split: dev examples}, {split: sha256}), read before anything is written, so a missing
    or malformed file leaves the folder as it was. A resumed run must find the data it was trained on."""
    data_dir = args.data_dir or None
    train_examples = load_split(spec.name, "train", data_dir)
    eval_examples = {s: limit(load_split(spec.name, s, data_dir), args.max_eval_samples, args.seed)
                     for s in spec.eval_splits}
    if selecting(args):
        train_examples, chosen_from = split_train(train_examples, args.selection_split)
        eval_examples[SELECTION] = limit(chosen_from, args.max_eval_samples, args.selection_split)  # not --seed's
    train_examples = limit(train_examples, args.max_train_samples, args.seed)
    digests = {"train": data_digest(train_examples), **{s: data_digest(e) for s, e in eval_examples.items()}}
    if saved is not None:
        changed = [s for s, d in saved.get("data_sha256", {}).items() if digests.get(s) != d]
        if changed:
            raise UsageError(f"--resume: the {changed[0]} data of task {spec.name} differs from the data {out} was "
                             f"trained on (sha256 mismatch; --data-dir {args.data_dir}); resume with the original "
                             f"files or start over with --overwrite")
    return train_examples, eval_examples, digests


def selecting(args) -> bool:
    """True when the best epoch is chosen on a split of train (--selection-split)."""
    return getattr(args, "selection_split", None) is not None


def build_model(args, spec, model_path: str, train_examples) -> tuple[Any, Any, Any, bool]:
    """(base, model, tokenizer, text_to_text): the seeded base model with the method's adapters (or
    trainable copy) built on it; text_to_text when the base is a decoder LM answering in words."""
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    base, tokenizer = load_base(model_path, spec.num_labels, spec.is_regression, args.no_dropout, args.max_length)
    text_to_text = is_causal_lm(base.config)
    if getattr(args, "label_mean_bias", False):  # before build: the adapters' copies of the head take it along
        if text_to_text:
            raise UsageError(f"--label-mean-bias: {args.model} answers in text (a decoder LM) and has no "
                             f"regression head; drop the flag")
        start_at_label_mean(base, [float(e.label) for e in train_examples])
    scale.prepare_base(base, args)  # --quantize (before the adapters are built: they stay fp32)
    try:
        model = baselines.build(args.method, base, a_shape=args.a_shape, scale=args.scale, r=args.r,
                                targets=args.targets or (ALL_LINEAR if text_to_text else None),
                                init=getattr(args, "init", None), causal_lm=text_to_text,
                                rank=getattr(args, "rank", 1))
    except baselines.MethodError as err:
        raise UsageError(f"{err} (fix --a-shape/--r/--targets)") from None
    scale.prepare_model(model, args)  # --gradient-checkpointing
    return base, model, tokenizer, text_to_text


class Plan(NamedTuple):
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    lengths: list[int] | None  # tokens per training example with --group-by-length, else None


def plan_steps(args, train_set, world: int) -> Plan:
    lengths = train_set.lengths if args.group_by_length else None
    steps_per_epoch = len(epoch_batches(len(train_set), args.batch_size, args.seed, 0, world))
    if steps_per_epoch == 0:
        raise UsageError(f"{len(train_set)} training examples make no batch of {args.batch_size}; "
                         f"lower --batch-size or raise --max-train-samples")
    total_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    return Plan(steps_per_epoch, total_steps, args.eval_every or steps_per_epoch, lengths)


def make_optimizer(model, args, total_steps: int):
    """(AdamW with no decay on biases and norms, its schedule: linear warmup then decay)."""
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_ratio * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, min(warmup, total_steps), total_steps)
    return optimizer, scheduler


def new_state(args, digests: dict) -> dict:
    """What a checkpoint keeps besides tensors (state.json), at step 0."""
    return {"step": 0, "evals": [], "best": None, "train_seconds": 0.0, "train_cpu_seconds": 0.0, "cpu_seconds": 0.0,
            "args": vars(args), "data_sha256": digests}


def restore(directory: Path, model, optimizer, scheduler, state: dict):
    """Load the checkpoint's weights, optimizer and schedule; its step, evaluations and times into `state`."""
    loaded = load_checkpoint(directory, model, optimizer, scheduler)
    state.update({k: loaded[k] for k in ("step", "evals", "best", "train_seconds")})
    train_cpu, cpu = loaded.get("train_cpu_seconds"), loaded.get("cpu_seconds")  # older checkpoints lack them
    state["train_cpu_seconds"] = float(train_cpu) if isinstance(train_cpu, (int, float)) else None  # unknown
    state["cpu_seconds"] = float(cpu) if isinstance(cpu, (int, float)) else 0.0


def run_info(args, spec, model_path: str, text_to_text: bool) -> dict:
    data_dir = args.data_dir or None
    return {"task": spec.name, "model": args.model, "model_path": model_path, "max_length": args.max_length,
            "num_labels": spec.num_labels, "text_to_text": text_to_text,
            "data_dir": str(Path(data_dir).resolve()) if data_dir else None}


def chosen_metric(args, spec) -> str:
    """The metric that picks the best epoch: the main one, on the selection split with --selection-split."""
    return spec.main_metric + (split_suffix(spec, SELECTION) if selecting(args) else "")


def prepare_output(out: Path, resuming: bool, step: int):
    """A new run removes an earlier run's files (check_output_dir allowed it); a resumed one drops the log
    lines written after its checkpoint (they will be written again) and a line cut by a crash."""
    out.mkdir(parents=True, exist_ok=True)
    if not resuming:
        for stale in ("metrics.json", "log.jsonl", "curves.png", PREDICTIONS):
            (out / stale).unlink(missing_ok=True)
        for stale in (CHECKPOINT, "adapter"):
            shutil.rmtree(out / stale, ignore_errors=True)
    else:
        log_path = out / "log.jsonl"
        lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
        kept = [line for line in lines if _log_step(line) <= step]
        write_atomic(log_path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


def _log_step(line: str) -> float:
    """The step of a log.jsonl line; infinity for a line a crash cut short (it is dropped)."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return math.inf
    return step if isinstance(step, int) else math.inf
