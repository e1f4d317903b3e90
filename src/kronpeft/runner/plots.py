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


def plot_forest(claims: list[tuple[str, float, tuple[float, float] | None]], path: str | Path) -> Path:
    """Forest plot of claims: one line per (label, better - worse, 95 % interval or None), ×100, with zero
    marked; a claim holds where its interval lies right of zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * len(claims) + 1.2))
    for y, (label, diff, ci) in enumerate(reversed(claims)):
        if ci is not None:
            ax.plot([100 * ci[0], 100 * ci[1]], [y, y], color="tab:blue")
        ax.plot([100 * diff], [y], "o", color="tab:blue")
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(range(len(claims)), [label for label, _, _ in reversed(claims)], fontsize=7)
    ax.set(xlabel="better − worse (×100), 95 % interval", title="the papers' claims")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path, dpi=120)


def plot_score_vs_lr(panels: dict[str, dict[str, list[tuple[float, float]]]], floors: dict[str, float | None],
                     path: str | Path) -> Path:
    """Per task a panel of score (×100) against learning rate (log), one line per method. `floors[task]`:
    the majority-class score, drawn as a dashed line; the axis starts at the lowest score above it (a
    collapsed run does not stretch it) and runs below it sit on the bottom edge as triangles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (task, methods) in zip(axes[0], panels.items()):
        floor = floors.get(task)
        scores = [s for points in methods.values() for _, s in points]
        kept = [s for s in scores if floor is None or s > floor] or scores
        low = min(kept) - 0.02 * (max(kept) - min(kept) + 0.05)
        for name, points in methods.items():
            points = sorted(points)
            line, = ax.plot([lr for lr, _ in points], [100 * max(s, low) for _, s in points], marker="o", label=name)
            below = [(lr, s) for lr, s in points if s < low]
            ax.plot([lr for lr, _ in below], [100 * low] * len(below), "v", color=line.get_color(), ms=9)
        if floor is not None:
            ax.axhline(100 * floor, color="grey", ls="--", lw=1)
        ax.set(xscale="log", xlabel="learning rate", ylabel="dev score ×100", title=task, ylim=(100 * low, None))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return save_png(fig, path, dpi=110)
