"""`kronpeft train --report-to tensorboard,wandb,...`: the run's log lines, also sent to experiment
trackers through `accelerate`'s (`Accelerator(log_with=...)`, `init_trackers`, `log`, `end_training`).

Each `log.jsonl` record goes to the trackers as it is written: `train/loss`, `train/lr`,
`train/grad_norm` and `eval/<metric>` at its step; the run's flags are the tracker's configuration.
Trackers that write files (TensorBoard) write them under `<output-dir>/tracking/`.
"""
from __future__ import annotations

from pathlib import Path

from .errors import UsageError

TRACKING_DIR = "tracking"
PROJECT = "kronpeft"


def accelerator_options(report_to: list[str] | None, out: Path) -> dict:
    """`Accelerator(**options)` for the trackers named (none: {}); a UsageError for an unknown or missing one."""
    if not report_to:
        return {}
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [str(t) for t in LoggerType]
    available = {str(t) for t in get_available_trackers()}
    for name in report_to:
        if name not in known:
            raise UsageError(f"--report-to {name}: unknown tracker; choose from {', '.join(known)}")
        if name != "all" and name not in available:
            raise UsageError(f"--report-to {name}: the {name} package is not installed; pip install {name}, "
                             f"or drop it from --report-to")
    return {"log_with": list(report_to), "project_dir": str(out / TRACKING_DIR)}


def start(accelerator, args, tracking: bool):
    """Open the trackers with the run's flags as their configuration (numbers, text and switches only)."""
    if tracking:
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers(PROJECT, config=config)


def send(accelerator, record: dict, tracking: bool):
    """One `log.jsonl` record (`{"type": "train"|"eval", "step": ..., <numbers>}`) to the trackers."""
    if tracking:
        values = {f"{record['type']}/{k}": v for k, v in record.items()
                  if k not in ("type", "step") and isinstance(v, (int, float))}
        accelerator.log(values, step=record["step"])
