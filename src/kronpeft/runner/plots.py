"""`curves.png`: training loss and the dev metric against the step, from a run's `log.jsonl`."""
from __future__ import annotations

from pathlib import Path

from ..atomic import write_atomic

MARKERS_UP_TO = 50  # loss curves with at most this many logged points get a marker per point


def plot_curves(records: list[dict], path: str | Path, main_metric: str) -> Path:
    """Draw loss (left) and dev `main_metric` (right) from log records; returns the file written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval" and main_metric in r]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.8))
    few = len(train) <= MARKERS_UP_TO  # a handful of points: draw them, or a short run looks like a smooth curve
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", marker="o" if few else None)
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    ax_metric.plot([r["step"] for r in evals], [r[main_metric] for r in evals], marker="o", color="tab:orange")
    ax_metric.set(xlabel="step", ylabel=f"dev {main_metric}", title=f"dev {main_metric}")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path, dpi=100)


def save_png(fig, path: str | Path, dpi: int) -> Path:
    """Write a matplotlib figure as PNG atomically (a crash leaves the old file whole) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)
    return path
