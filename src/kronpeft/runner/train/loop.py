"""The training loop behind `kronpeft train`: a plain `accelerate` loop, the same for every method.

Data order is a pure function of (seed, epoch): each epoch shuffles the training set with a
generator seeded by both, cuts it into global batches of `--batch-size`, and process `rank` of
`world` takes the `rank`-th contiguous slice of every global batch. Dropout's RNG is re-seeded from
(seed, step, rank) before every step. So a resumed run replays exactly the batches and masks the
uninterrupted one would have seen, and 1 process and N processes see the same global batches.
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...atomic import write_json_atomic
from ...modules import count_parameters
from .. import baselines, scale, tracking
from ..errors import UsageError
from ..metrics import constant_baseline
from ..run_checks import check_resume_state
from ..selection import PREDICTIONS, save_predictions
from .batches import encode, epoch_batches, evaluate, shard, split_suffix
from .checkpoints import CHECKPOINT, STATE_FILE, check_output_dir, save_checkpoint
from .models import head_parameters, resolve_model
from .prepare import (Plan, build_model, check_args, chosen_metric, finished_run, load_data, make_optimizer,
                      new_state, plan_steps, prepare_output, read_resume_state, reporting, restore, run_info,
                      start_accelerator)


def run(args) -> dict | None:
    """Train and evaluate as `args` (the parsed `kronpeft train` flags) says; returns metrics.json's dict
    (None when --stop-after interrupted the run on purpose)."""
    fsdp = scale.fsdp_plugin(args)
    accelerator = start_accelerator(args, fsdp)
    spec = check_args(args, accelerator.num_processes)
    out = Path(args.output_dir)
    resuming = check_output_dir(out, args.overwrite, args.resume)
    if args.resume and not resuming:  # finished run, nothing left to do
        return finished_run(out, accelerator.is_main_process)
    saved = read_resume_state(out, args) if resuming else None
    train_examples, eval_examples, digests = load_data(args, spec, out, saved)
    model_path = resolve_model(args.model)
    base, model, tokenizer, text_to_text = build_model(args, spec, model_path, train_examples)
    sharded = scale.use_fsdp(accelerator, fsdp, base)
    trainable, total = count_parameters(model)
    sizes = {"trainable_params": trainable, "head_params": head_parameters(base), "total_params": total}
    train_set = encode(tokenizer, spec, train_examples, args.max_length, text_to_text)
    eval_sets = {s: encode(tokenizer, spec, ex, args.max_length, text_to_text) for s, ex in eval_examples.items()}
    plan = plan_steps(args, train_set, accelerator.num_processes)
    if resuming:
        check_resume_state(saved, plan.total_steps, spec.main_metric, out / CHECKPOINT / STATE_FILE)

    optimizer, scheduler = make_optimizer(model, args, plan.total_steps)
    model = model.to(accelerator.device)
    state = new_state(args, digests)
    model, optimizer = accelerator.prepare(model, optimizer)  # DDP or FSDP2 on several processes; device placement
    raw = accelerator.unwrap_model(model)
    params = [p for p in raw.parameters() if p.requires_grad]  # FSDP2 replaced them by their shards
    if resuming:  # after sharding: a checkpoint holds full tensors, each process loads its shards
        restore(out / CHECKPOINT, raw, optimizer, scheduler, state)

    ctx = RunContext(args, spec, accelerator, out, run_info(args, spec, model_path, text_to_text), tokenizer,
                     chosen_metric(args, spec), sharded)
    if ctx.main:
        prepare_output(out, resuming, state["step"])
    tracking.start(accelerator, args, reporting(args))
    announce(ctx, len(train_set), eval_sets, sizes, plan.total_steps)
    if state["step"] == 0 and not state["evals"] and not args.no_eval_before:
        evaluate_and_keep_best(ctx, raw, eval_sets, state, 0, 0.0)
    if not train_loop(ctx, model, raw, optimizer, scheduler, params, train_set, eval_sets, plan, state):
        return None  # --stop-after
    return finish(ctx, state, eval_sets, sizes, len(train_set), text_to_text)


@dataclass(frozen=True)
class RunContext:
    """What the steps of one run share once it is set up."""
    args: Any
    spec: Any
    accelerator: Any
    out: Path
    info: dict  # saved beside the adapter: `kronpeft eval` reads it again
    tokenizer: Any
    chosen_on: str  # the metric that picks the best evaluation
    sharded: bool = False  # FSDP2: a forward, a save and a checkpoint are collectives that every process runs

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def takes_part(self) -> bool:
        """Whether this process evaluates and saves: the main one, or every one when the model is sharded."""
        return self.main or self.sharded

    @property
    def log_path(self) -> Path:
        return self.out / "log.jsonl"


def announce(ctx: RunContext, num_train: int, eval_sets: dict, sizes: dict, total_steps: int):
    args = ctx.args
    if ctx.main:
        print(f"kronpeft: {args.method} on {ctx.spec.name} ({num_train} train / "
              f"{sum(len(d) for d in eval_sets.values())} dev examples), {args.model}: "
              f"{sizes['trainable_params']:,} of {sizes['total_params']:,} parameters trainable; {total_steps} "
              f"steps of {args.batch_size} on {ctx.accelerator.num_processes} process(es), lr {args.lr:g}",
              file=sys.stderr)


# -- training -------------------------------------------------------------------------------------------

def train_loop(ctx: RunContext, model, raw, optimizer, scheduler, params, train_set, eval_sets, plan: Plan,
               state: dict) -> bool:
    """Train from state["step"] to the last step, evaluating and saving checkpoints on the way; False when
    --stop-after stopped it on purpose. `model` is accelerate's (DDP) wrapper of `raw`."""
    from tqdm.auto import tqdm

    args, accelerator = ctx.args, ctx.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    model.train()
    step = state["step"]
    bar = tqdm(total=plan.total_steps, initial=step, desc=f"{args.method}/{ctx.spec.name}", disable=not ctx.main,
               dynamic_ncols=True, unit="step")
    clock = Clock(state)
    losses = []
    while step < plan.total_steps:
        epoch = step // plan.steps_per_epoch
        batches = epoch_batches(len(train_set), args.batch_size, args.seed, epoch, world, plan.lengths)
        for batch_indices in batches[step - epoch * plan.steps_per_epoch:]:
            torch.manual_seed(args.seed * 1_000_003 + step * world + rank)  # dropout masks: f(seed, step, rank)
            batch = {k: v.to(accelerator.device) for k, v in train_set.batch(shard(batch_indices, rank, world)).items()}
            mean_loss, grad_norm = forward_backward(ctx, model, batch, params, step)
            if not math.isfinite(mean_loss):
                bar.close()
                raise loss_error(ctx, mean_loss, step)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(mean_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step % args.log_every == 0 or step == plan.total_steps:
                log(ctx, {"type": "train", "step": step, "epoch": round(step / plan.steps_per_epoch, 4),
                          "loss": sum(losses) / len(losses), "lr": scheduler.get_last_lr()[0],
                          "grad_norm": float(grad_norm)})
                losses = []
            at_eval = step % plan.eval_every == 0 or step == plan.total_steps
            state["step"] = step
            if at_eval:
                bar.set_postfix_str(f"loss={mean_loss:.4f}, evaluating on dev")  # the eval bar shows below it
                with clock.excluded():
                    evaluate_and_keep_best(ctx, raw, eval_sets, state, step, step / plan.steps_per_epoch)
            if at_eval or (args.save_every and step % args.save_every == 0) or step == args.stop_after:
                clock.update(state)
                save_state(ctx, raw, optimizer, scheduler, state)
            if args.stop_after and step == args.stop_after and step < plan.total_steps:
                bar.close()
                if ctx.main:
                    print(f"kronpeft: stopped after step {step} (--stop-after); continue with --resume",
                          file=sys.stderr)
                return False
            if step >= plan.total_steps:
                break
    bar.close()
    return True


def forward_backward(ctx: RunContext, model, batch: dict, params: list, step: int) -> tuple[float, torch.Tensor]:
    """(the batch's loss averaged over processes, the gradient norm before clipping to --max-grad-norm)."""
    loss = model(**batch).loss
    if ctx.args.inject_nan_at is not None and step + 1 == ctx.args.inject_nan_at:
        loss = loss * float("nan")
    ctx.accelerator.backward(loss)
    grad_norm = ctx.accelerator.clip_grad_norm_(params, ctx.args.max_grad_norm)
    return ctx.accelerator.reduce(loss.detach(), reduction="mean").item(), grad_norm


def loss_error(ctx: RunContext, mean_loss: float, step: int) -> UsageError:
    """What to do when the loss of step `step` + 1 is nan or infinite."""
    lr = ctx.args.lr
    if (ctx.out / CHECKPOINT / STATE_FILE).exists():
        fix = (f"the last good checkpoint is in {ctx.out / CHECKPOINT}; lower --lr (now {lr:g}) and "
               f"continue with --resume, or check the data")
    else:
        fix = (f"no checkpoint had been written yet; lower --lr (now {lr:g}) and start over with "
               f"--overwrite, or check the data")
    return UsageError(f"loss is {mean_loss} at step {step + 1}; training stopped ({fix})")


def log(ctx: RunContext, record: dict):
    """One line of log.jsonl (main process), and to the --report-to trackers."""
    if ctx.main:
        with ctx.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    tracking.send(ctx.accelerator, record, bool(reporting(ctx.args)))


def evaluate_and_keep_best(ctx: RunContext, raw, eval_sets: dict, state: dict, step: int, epoch: float):
    """Evaluate on every dev split (main process; every process when sharded, on the same batches) and log it;
    a new best saves the adapter and its predictions."""
    ctx.accelerator.wait_for_everyone()
    if ctx.takes_part:
        args, preds = ctx.args, {}
        metrics = evaluate(raw, ctx.spec, eval_sets, args.eval_batch_size or args.batch_size, ctx.accelerator.device,
                           preds)
        record = {"type": "eval", "step": step, "epoch": round(epoch, 4), **metrics}
        log(ctx, record)
        state["evals"].append(record)
        best = state["best"]
        if step > 0 and (best is None or metrics[ctx.chosen_on] > best[ctx.chosen_on]):
            state["best"] = record
            baselines.save_trained(raw, args.method, ctx.out / "adapter", ctx.info, ctx.tokenizer)
            if ctx.main:
                save_predictions(ctx.out / PREDICTIONS, preds, {s: d.labels for s, d in eval_sets.items()})
    ctx.accelerator.wait_for_everyone()


def save_state(ctx: RunContext, raw, optimizer, scheduler, state: dict):
    if ctx.takes_part:
        save_checkpoint(ctx.out / CHECKPOINT, raw, optimizer, scheduler, state)
    ctx.accelerator.wait_for_everyone()


class Clock:
    """Times so far, every part of a resumed run summed: training wall and CPU seconds (evaluation
    excluded; CPU time does not grow while other work holds the CPU) and the process's CPU seconds."""

    def __init__(self, state: dict):
        self.started, self.cpu_started = time.perf_counter(), time.process_time()
        self.eval_wall = self.eval_cpu = 0.0  # evaluation inside the loop: not training time
        self.before = {k: state[k] for k in ("train_seconds", "train_cpu_seconds", "cpu_seconds")}

    @contextmanager
    def excluded(self):
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        self.eval_wall += time.perf_counter() - t0
        self.eval_cpu += time.process_time() - c0

    def update(self, state: dict):
        before = self.before
        state["train_seconds"] = before["train_seconds"] + time.perf_counter() - self.started - self.eval_wall
        if before["train_cpu_seconds"] is not None:
            state["train_cpu_seconds"] = (before["train_cpu_seconds"] + time.process_time() - self.cpu_started
                                          - self.eval_cpu)
        state["cpu_seconds"] = before["cpu_seconds"] + time.process_time()


# -- after training -------------------------------------------------------------------------------------

def finish(ctx: RunContext, state: dict, eval_sets: dict, sizes: dict, num_train: int,
           text_to_text: bool) -> dict | None:
    """metrics.json and curves.png (main process); returns the metrics there, None on the other processes."""
    if not ctx.main:
        ctx.accelerator.wait_for_everyone()
        return None
    metrics = summarise(ctx, state, eval_sets, sizes, num_train, text_to_text)
    write_json_atomic(ctx.out / "metrics.json", metrics)
    if reporting(ctx.args):
        ctx.accelerator.end_training()
    draw_curves(ctx)
    ctx.accelerator.wait_for_everyone()
    return metrics


def summarise(ctx: RunContext, state: dict, eval_sets: dict, sizes: dict, num_train: int, text_to_text: bool) -> dict:
    """metrics.json's dict."""
    args, spec = ctx.args, ctx.spec
    final = state["evals"][-1]
    before = state["evals"][0] if state["evals"] and state["evals"][0]["step"] == 0 else None
    best = state["best"] or final
    return {
        "task": spec.name, "method": args.method, "model": args.model, "seed": args.seed,
        "main_metric": spec.main_metric, "chosen_on": ctx.chosen_on, "predictions": PREDICTIONS,
        "final": _scores(final), "best": _scores(best), "best_step": best["step"],
        "evals": [{k: v for k, v in r.items() if k != "type"} for r in state["evals"]],
        "before_training": _scores(before) if before else None,
        "majority_baseline": {f"{k}{split_suffix(spec, split)}": v for split, data in eval_sets.items()
                              for k, v in constant_baseline(spec.name, data.labels).items()},
        **sizes,
        "train_seconds": round(state["train_seconds"], 2),
        "train_cpu_seconds": None if state["train_cpu_seconds"] is None else round(state["train_cpu_seconds"], 2),
        "cpu_seconds": round(state["cpu_seconds"], 2),
        "peak_memory_mb": round(peak_memory_mb(ctx.accelerator.device), 1),
        "steps": state["step"], "num_processes": ctx.accelerator.num_processes, "sharded": ctx.sharded,
        "num_train_examples": num_train,
        "text_to_text": text_to_text, "args": vars(args),
    }


def _scores(record: dict) -> dict:
    """An evaluation record's metrics, without its type, step and epoch."""
    return {k: v for k, v in record.items() if k not in ("type", "step", "epoch")}


def draw_curves(ctx: RunContext):
    from ..plots import plot_curves

    try:
        plot_curves([json.loads(line) for line in ctx.log_path.read_text().splitlines()], ctx.out / "curves.png",
                    ctx.spec.main_metric)
    except Exception as err:  # a plot must never lose a finished run
        print(f"kronpeft: warning: could not draw curves.png ({err})", file=sys.stderr)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def print_summary(metrics: dict, out: Path):
    """The closing table and the before/after line."""
    main_metric = metrics["main_metric"]
    rows = [("task", metrics["task"]), ("method", metrics["method"]), ("model", metrics["model"]),
            ("trainable params", f"{metrics['trainable_params']:,} of {metrics['total_params']:,} "
                                 f"({100 * metrics['trainable_params'] / metrics['total_params']:.3f}%)")]
    baseline = (metrics.get("majority_baseline") or {}).get(main_metric)
    baseline_name = "mean-prediction" if main_metric in ("pearson", "spearmanr", "combined") else "majority-class"
    if baseline is not None:
        rows.append((f"dev {main_metric}, {baseline_name} baseline", f"{baseline:.4f}"))
    if metrics.get("before_training"):
        rows.append((f"dev {main_metric} before training", f"{metrics['before_training'][main_metric]:.4f}"))
    rows += [(f"dev {k} (final)", f"{v:.4f}") for k, v in metrics["final"].items()]
    rows += [(f"dev {main_metric} (best, step {metrics['best_step']})", f"{metrics['best'][main_metric]:.4f}"),
             ("train time", f"{metrics['train_seconds']:.1f} s ({metrics['steps']} steps)"),
             ("peak memory", f"{metrics['peak_memory_mb']:.0f} MB"), ("output", str(out))]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="kronpeft train", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        for k, v in rows:
            table.add_row(k, v)
        Console().print(table)
    except ImportError:
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
    if metrics.get("before_training"):
        print(f"dev {main_metric} before training: {metrics['before_training'][main_metric]:.4f}  "
              f"after: {metrics['final'][main_metric]:.4f}"
              + (f"  ({baseline_name} baseline: {baseline:.4f})" if baseline is not None else ""))
