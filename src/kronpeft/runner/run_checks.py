"""Checks of `kronpeft train`/`eval` input that would otherwise pass silently or end in a traceback: flags
that do not apply to the chosen method, contradictory flags, a --max-length the tokenizer cannot truncate
to, a model head of another label count, and hand-edited resume state. Each raises one `UsageError`."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import UsageError
from .text2text import is_causal_lm


# flag -> the methods it applies to (one entry per flag; a flag given for another method is an error)
METHOD_FLAGS = {
    "--a-shape": ("krona", "kronab", "kronab-res", "lokr"),
    "--scale": ("krona", "kronab", "kronab-res"),
    "--r": ("adakron", "bottleneck", "lora"),
    "--rank": ("krona",),
    "--init": ("krona", "adakron"),
    "--targets": ("krona", "lora", "lokr"),
}
FLAG_DEFAULTS = {"--scale": 1.0, "--rank": 1}  # the parser's default where not None: that value counts as not given
INITS = {"krona": ("zero", "kpsvd"), "adakron": ("paper", "zero")}  # --init: the values each method knows


def check_flags(args):
    """Refuse a method flag the method ignores, and --resume with --overwrite (which one is meant?)."""
    for flag, methods in METHOD_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None and value != FLAG_DEFAULTS.get(flag) and args.method not in methods:
            raise UsageError(f"{flag} does not apply to --method {args.method} (it applies to {', '.join(methods)}); "
                             f"drop {flag} or choose one of those methods")
    init = getattr(args, "init", None)
    if init is not None and args.method in INITS and init not in INITS[args.method]:
        raise UsageError(f"--init {init} is not an initialisation of --method {args.method}; "
                         f"choose one of {', '.join(INITS[args.method])}")
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        raise UsageError("--resume and --overwrite contradict each other (continue the run, or delete it and start "
                         "over?); pass one of them")


def check_truncated(lengths: list[int], max_length: int, tokenizer, pair: bool):
    """Refuse a --max-length the tokenizer could not truncate the examples to (shorter than its special tokens)."""
    longest = max(lengths, default=0)
    if longest <= max_length:
        return
    minimum = tokenizer.num_special_tokens_to_add(pair=pair) + 1
    raise UsageError(f"--max-length {max_length} is too short: the tokenizer adds "
                     f"{tokenizer.num_special_tokens_to_add(pair=pair)} special tokens to "
                     f"{'a sentence pair' if pair else 'a sentence'} and could not truncate the examples to it "
                     f"({longest} tokens left); pass --max-length {minimum} or more")


def check_head_labels(config, num_labels: int, model_path: str):
    """Refuse a classifier folder whose head has another label count than the task needs (before loading)."""
    if is_causal_lm(config) or not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        return
    if config.num_labels != num_labels:
        raise UsageError(f"{model_path} has a classification head with {config.num_labels} label(s), but the task "
                         f"needs {num_labels}; pass a model trained for this task, or the base model without a head")


def check_resume_state(meta: dict, total_steps: int, main_metric: str, path: Path):
    """Refuse a checkpoint `state.json` whose step, evaluations or optimizer settings do not fit this run."""
    fix = "start over with --overwrite (or resume from an unedited copy of the run)"
    step = meta["step"]
    if not 0 <= step <= total_steps:
        raise UsageError(f"{path}: step {step} is outside this run's 0..{total_steps} steps; {fix}")
    records = meta["evals"] + ([meta["best"]] if meta.get("best") is not None else [])
    for record in records:
        if not (isinstance(record, dict) and type(record.get("step")) is int and 0 <= record["step"] <= step
                and _is_number(record.get(main_metric))):
            raise UsageError(f"{path}: evaluation record {str(record)[:60]} is malformed (needs an int step up "
                             f"to {step} and a number {main_metric!r}); {fix}")
    for group in meta["param_groups"]:
        bad = [k for k in ("lr", "initial_lr", "weight_decay", "eps") if isinstance(group, dict) and k in group
               and not _is_number(group[k])]
        if not isinstance(group, dict) or bad:
            raise UsageError(f"{path}: optimizer setting {bad[0] if bad else 'param_groups'} is not a number; {fix}")
    for key in ("train_cpu_seconds", "cpu_seconds"):
        if meta.get(key) is not None and not _is_number(meta[key]):
            raise UsageError(f"{path}: {key} {meta[key]!r} is not a number; {fix}")


def read_finished_metrics(path: Path) -> dict:
    """`metrics.json` of a finished run, checked before it is summarised."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise UsageError(f"{path} is unreadable ({str(err)[:80]}); start over with --overwrite") from None
    needed = ("task", "method", "model", "main_metric", "final", "best", "best_step", "trainable_params",
              "total_params", "train_seconds", "steps", "peak_memory_mb")
    if not isinstance(metrics, dict) or any(k not in metrics for k in needed) \
            or not all(isinstance(metrics[k], dict) for k in ("final", "best")):
        raise UsageError(f"{path} is not a kronpeft metrics file (a JSON object with {', '.join(needed[:5])}, ...); "
                         f"start over with --overwrite")
    return metrics


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_overwritable(out: Path, checkpoint: str, state_file: str, run_file: str):
    """--overwrite deletes the run's `adapter/` and `checkpoint/` folders whole: refuse when they do not look
    like a kronpeft run's (a user's own `adapter/` folder in --output-dir is never deleted)."""
    from ..atomic import written_by_us

    adapter, ckpt = out / "adapter", out / checkpoint
    foreign = []
    if adapter.exists() and not (adapter / run_file).is_file():
        foreign.append(f"adapter/ (no {run_file})")
    if ckpt.exists() and not (ckpt / state_file).is_file() and not all(
            written_by_us(p.name, state_file, ["trainable", "optimizer"]) for p in ckpt.iterdir()):
        foreign.append(f"{checkpoint}/ (no {state_file})")
    if foreign:
        raise UsageError(f"--overwrite would delete {foreign[0]} in {out}, which kronpeft train did not write; move "
                         f"it away or choose another --output-dir")
