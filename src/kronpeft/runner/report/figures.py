"""The report's plots: score against trainable parameters (points named beside their markers), training-time
ratios, the claims' forest plot, and score against learning rate."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from ..plots import save_png
from ..study.grid import Grid
from .stats import adapter_params, cell_stats


def _compact(value: float, _=None) -> str:
    """An axis tick as 1k, 10k, 1M, ...: long digit strings run into each other on a log axis."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def plot_score_vs_params(grid: Grid, summary: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tasks = [t for t in grid.tasks if any((t, e.name) in summary for e in grid.methods)]
    cols = min(max(len(tasks), 1), 2)
    rows = math.ceil(max(len(tasks), 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 4.4 * rows), squeeze=False)
    axes = axes.flatten()
    for ax in axes[len(tasks):]:
        ax.set_visible(False)
    colors = {f: f"C{i % 10}" for i, f in enumerate(sorted({e.family for e in grid.methods}))}  # same in every panel
    named = []  # (axis, [(params, score, method)]): labelled once the layout is final
    for ax, task in zip(axes, tasks):
        families, seeds = defaultdict(list), []
        for entry in grid.methods:
            s = summary.get((task, entry.name))
            if s is not None:
                mean, std, _ = cell_stats(s["scores"])
                params, scores = adapter_params(s["rows"][0]), [100 * v for v in s["scores"]]
                families[entry.family].append((params, 100 * mean, 100 * std, entry.name))
                ax.scatter([params] * len(scores), scores, s=10, alpha=0.4, linewidths=0, color=colors[entry.family])
                seeds += scores
        for family, points in sorted(families.items()):
            points.sort()
            x, y, e, _ = zip(*points)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=family, color=colors[family])
        named.append((ax, [(xi, yi, name) for points in families.values() for xi, yi, _, name in points]))
        pad = 0.08 * (max(seeds) - min(seeds)) or 1.0
        ax.set_ylim(min(seeds) - pad, max(seeds) + pad)  # every seed shows; a ±std bar past them all is cut
        ax.set_xscale("log")
        ax.margins(x=0.2)  # room for the point labels at either end
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_compact))
        ax.set_title(f"{task} ({summary[next(k for k in summary if k[0] == task)]['rows'][0]['main_metric']})")
        ax.set_xlabel("trainable parameters (no head)")
        ax.grid(alpha=0.3)
    for ax in axes[::cols]:
        ax.set_ylabel("dev score ×100 (mean ± std; dots: seeds)")
    _legend_below(fig, axes, cols)
    fig.canvas.draw()  # final limits and layout, which the labels' positions are measured in
    for ax, points in named:
        _name_points(ax, points)
    save_png(fig, path, dpi=120)


def _legend_below(fig, axes, cols: int):
    """One legend for every panel's families, under the panels, and the layout that leaves room for it."""
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    per_row = 3 * cols  # legend entries that fit the figure's width
    legend_rows = math.ceil(max(len(labels), 1) / per_row)
    legend_height = 0.3 * legend_rows + 0.15  # inches
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), per_row), frameon=False)
    fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))


_LABEL_OFFSETS = [((7, 6), "left"), ((7, -6), "left"), ((-7, 6), "right"), ((-7, -6), "right"),
                  ((8, 0), "left"), ((-8, 0), "right"), ((0, 11), "center"), ((0, -11), "center"),
                  ((9, 15), "left"), ((9, -15), "left"), ((-9, 15), "right"), ((-9, -15), "right"),
                  ((12, 24), "left"), ((12, -24), "left"), ((-12, 24), "right"), ((-12, -24), "right"),
                  ((0, 22), "center"), ((0, -22), "center")]  # points: beside the marker, then further out


def _name_points(ax, points: list[tuple[float, float, str]]):
    """Label each point `(x, y, name)` at the first offset where its label overlaps no marker and no label
    placed before and lies nearer its own point than any other (points taken from the top down; sizes
    measured with the figure's renderer); where no offset does, at the free one with the widest such margin.
    A thin leader line ties each label to its point."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    at = ax.transData.transform([p[:2] for p in points])
    placed = [Bbox.from_bounds(px - 4, py - 4, 8, 8) for px, py in at]
    leader = {"arrowstyle": "-", "lw": 0.5, "color": "0.45", "shrinkA": 0, "shrinkB": 3}
    for i in sorted(range(len(points)), key=lambda i: -points[i][1]):
        xi, yi, name = points[i]
        others = [q for q in at if math.dist(q, at[i]) > 6]  # markers closer than that read as one place
        best = None  # (free, margin: how much nearer its own point than the nearest other), offset, ha, box
        for offset, ha in _LABEL_OFFSETS:
            label = ax.annotate(name, (xi, yi), textcoords="offset points", xytext=offset, ha=ha, va="center",
                                fontsize=7)
            label.update_positions(renderer)
            box = Text.get_window_extent(label, renderer)  # the text alone, not its leader line
            label.remove()
            free = not any(box.overlaps(other) for other in placed)
            margin = min((_gap(box, q) for q in others), default=math.inf) - _gap(box, at[i])
            if best is None or (free, margin) > best[0]:
                best = (free, margin), offset, ha, box
            if free and margin > 0:
                break
        _, offset, ha, box = best
        ax.annotate(name, (xi, yi), textcoords="offset points", xytext=offset, ha=ha, va="center", fontsize=7,
                    arrowprops=leader)
        placed.append(box)


def _gap(box, point) -> float:
    """Pixels from `point` to the nearest edge of `box` (0 inside it)."""
    px, py = point
    return math.hypot(max(box.x0 - px, 0, px - box.x1), max(box.y0 - py, 0, py - box.y1))


def plot_times(ratios: dict, reference: str, path: Path, task_order: list[str]):
    """Bars of `time_ratios`' ratios: one group per method, one bar per task (in `task_order`, the grid's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt

    names = list(ratios)
    tasks = [t for t in task_order if any(t in v for v in ratios.values())]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 3.6))
    width = 0.8 / max(len(tasks), 1)
    handles = []
    for i, task in enumerate(tasks):
        colour = f"C{task_order.index(task) % 10}"  # a task keeps its colour as other tasks' bars arrive
        bars = ax.bar([j + i * width for j in range(len(names))], [ratios[n].get(task, (0,))[0] for n in names],
                      width, color=colour)
        handles.append(matplotlib.patches.Patch(color=colour, label=task))
        for bar, name in zip(bars, names):
            if task in ratios[name] and not ratios[name][task][1]:
                bar.set_hatch("//")  # from wall time, not CPU time
    if any(not cpu for v in ratios.values() for _, cpu, _ in v.values()):
        handles.append(matplotlib.patches.Patch(facecolor="white", edgecolor="black", hatch="//",
                                                label="wall time (load varied)"))
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel(f"train time / {reference}'s")
    ax.legend(handles=handles, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # never over the bars
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, dpi=120)


class ForestPoint(NamedTuple):
    """One line of the forest plot: better − worse and its 95 % interval (fractions), the paper's gap or None;
    `failed`: one side's optimisation failed (every seed collapsed), so its difference does not set the axis."""
    label: str
    diff: float
    ci: tuple[float, float] | None
    paper: float | None
    failed: bool = False


def plot_forest(claims: list[tuple], path: str | Path) -> Path:
    """Forest plot of claims (ForestPoints, or tuples of their fields), ×100, with zero marked; a claim holds
    where its interval lies right of zero. A paper's gap is a hollow diamond on its claim's line ("paper" in
    the legend); a difference past the axis (a failed optimisation's) is a hollow marker at the edge, its
    value beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    claims = [ForestPoint(*c) for c in claims]
    longest = max(len(c.label) for c in claims)  # the y labels get their width, the axis keeps 3.5 in
    fig, ax = plt.subplots(figsize=(max(8.0, 3.5 + 0.055 * longest), 0.35 * len(claims) + 1.2))
    limit = forest_limit(claims)
    for y, point in enumerate(reversed(claims)):
        _forest_line(ax, point, y, limit)
    ax.axvline(0, color="grey", lw=1)
    ax.set_xlim(-limit * 1.04, limit * 1.04)
    ax.set_yticks(range(len(claims)), [c.label for c in reversed(claims)], fontsize=7)
    ax.set(xlabel="better − worse (×100), 95 % interval", title="every claim")
    ax.grid(axis="x", alpha=0.3)
    if any(c.paper is not None for c in claims):
        handles = dict(zip(*reversed(ax.get_legend_handles_labels())))  # one entry per label
        ax.legend(handles.values(), handles.keys(), fontsize=7, loc="best")
    fig.tight_layout()
    return save_png(fig, path, dpi=120)


def _forest_line(ax, point: ForestPoint, y: int, limit: float):
    """Draw one claim at height y on an axis of half-width `limit` (×100): its interval, cut at the edges with
    an arrow; its difference, a hollow marker at the edge with its value when past it; the paper's gap."""
    def clip(value: float) -> float:
        return max(-limit, min(limit, value))

    if point.ci is not None:
        ax.plot([clip(100 * point.ci[0]), clip(100 * point.ci[1])], [y, y], color="tab:blue")
        if 100 * point.ci[0] < -limit:
            ax.plot([-limit], [y], "<", color="tab:blue", ms=5)
        if 100 * point.ci[1] > limit:
            ax.plot([limit], [y], ">", color="tab:blue", ms=5)
    diff = 100 * point.diff
    shown = clip(diff)
    if shown != diff:  # only a failed row's difference can lie past the axis
        ax.plot([shown], [y], "o", mfc="none", mec="tab:blue")
        ax.annotate(f"{diff:+.1f}", (shown, y), xytext=(0, 5), textcoords="offset points", fontsize=7,
                    ha="left" if shown < 0 else "right")
    else:
        ax.plot([shown], [y], "o", color="tab:blue", label="measured (95 % interval)")
    if point.paper is not None:
        ax.plot([100 * point.paper], [y], "D", mfc="none", mec="tab:red", ms=7, label="paper")


def forest_limit(claims: list[tuple]) -> float:
    """Half-width of the forest plot's axis (×100): every measured difference and paper gap with room, and
    the typical interval (the 75th percentile of the ends); a wider interval, as a collapsed run makes, is cut
    at the edge instead of squeezing every other line, and a failed optimisation's difference and interval
    set nothing."""
    claims = [ForestPoint(*c) for c in claims]
    points = [abs(100 * c.paper) for c in claims if c.paper is not None]
    points += [abs(100 * c.diff) for c in claims if not c.failed]
    ends = sorted(abs(100 * e) for c in claims if c.ci is not None and not c.failed for e in c.ci)
    typical = ends[(3 * len(ends)) // 4] if ends else 0.0
    return max(5.0, 1.25 * max(points, default=0.0), typical)


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
        low = _lowest_shown([s for points in methods.values() for _, s in points], floor)
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


def _lowest_shown(scores: list[float], floor: float | None) -> float:
    """An axis' bottom for these scores: just under the lowest one above `floor` (the collapse line), so a
    collapsed run does not stretch the axis."""
    kept = _above(scores, floor)
    return min(kept) - 0.02 * (max(kept) - min(kept) + 0.05)


def _above(scores: list[float], floor: float | None) -> list[float]:
    """The scores above `floor` (all of them when none is, or without a floor)."""
    return [s for s in scores if floor is None or s > floor] or scores


BUDGET_FAMILIES = ("krona", "lora", "krona-sum", "krona-kpsvd")  # KronA shapes, LoRA ranks, Kronecker sums


def budget_panels(grid: Grid, summary: dict) -> dict[str, dict[str, list[tuple[int, str, list[float]]]]]:
    """{task: {family: [(trainable params, method name, seed scores)]}}, by parameters, of the budget families
    (BUDGET_FAMILIES), for the tasks where two of them span two budgets or more (a curve each)."""
    panels = {}
    for task in grid.tasks:
        families = defaultdict(list)
        for entry in grid.methods:
            s = summary.get((task, entry.name))
            if s is not None and entry.family in BUDGET_FAMILIES:
                families[entry.family].append((adapter_params(s["rows"][0]), entry.name, s["scores"]))
        if sum(len({params for params, _, _ in points}) > 1 for points in families.values()) >= 2:
            panels[task] = {family: sorted(points) for family, points in sorted(families.items())}
    return panels


def plot_budget(panels: dict, floors: dict[str, float | None], path: str | Path) -> Path:
    """Per task in `panels` (budget_panels) a panel of score (×100, mean ± std, seeds as dots) against trainable
    parameters (log), one line per family. `floors[task]`: the collapse line (majority class), dashed; the axis
    reaches down to it when it lies within the scores' spread of the lowest score above it, never further, and
    runs below the axis sit on its bottom edge as triangles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), squeeze=False)
    named = []
    for ax, (task, families) in zip(axes[0], panels.items()):
        floor = floors.get(task)
        seeds = [v for points in families.values() for _, _, scores in points for v in scores]
        bottom = _budget_bottom(seeds, floor)
        points_named = []
        for family, points in families.items():
            colour = f"C{BUDGET_FAMILIES.index(family)}"
            params = [p for p, _, _ in points]
            means = [max(statistics.fmean(scores), bottom) for _, _, scores in points]
            spread = [statistics.stdev(scores) if len(scores) > 1 else 0.0 for _, _, scores in points]
            ax.errorbar(params, [100 * m for m in means], yerr=[100 * e for e in spread], marker="o", capsize=3,
                        color=colour, label=family)
            for p, _, scores in points:
                shown, below = [v for v in scores if v >= bottom], [v for v in scores if v < bottom]
                ax.scatter([p] * len(shown), [100 * v for v in shown], s=10, alpha=0.4, linewidths=0, color=colour)
                ax.scatter([p] * len(below), [100 * bottom] * len(below), marker="v", s=50, color=colour)
            points_named += [(p, 100 * m, name) for (p, name, _), m in zip(points, means)]
        if floor is not None:
            ax.axhline(100 * floor, color="grey", ls="--", lw=1, label="collapse line (majority class)")
        top = max(seeds) + 0.08 * (max(seeds) - bottom)
        ax.set(xscale="log", ylim=(100 * bottom, 100 * top), title=task, xlabel="trainable parameters (no head)",
               ylabel="dev score ×100 (mean ± std; dots: seeds)")
        ax.margins(x=0.2)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_compact))
        ax.grid(alpha=0.3)
        named.append((ax, points_named))
    _legend_below(fig, axes[0], len(panels))
    fig.canvas.draw()
    for ax, points in named:
        _name_points(ax, points)
    return save_png(fig, path, dpi=120)


def _budget_bottom(scores: list[float], floor: float | None) -> float:
    """The budget plot's bottom: `_lowest_shown`, lowered to just under `floor` when the floor lies within the
    scores' spread of the lowest score above it (then the line shows without squashing the panel)."""
    low, kept = _lowest_shown(scores, floor), _above(scores, floor)
    if floor is not None and floor < low and min(kept) - floor <= max(kept) - min(kept):
        return floor - 0.02 * (max(kept) - floor + 0.05)
    return low
