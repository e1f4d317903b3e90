"""`kronpeft report`: render a study's results page (Markdown + plots) from its results file alone.

Per task and method, the learning rate is the sweep's best on dev (seed `sweep_seed`); the cell is the
mean ± sample standard deviation over every recorded seed at that rate (×100, as the papers print them),
with the seed count when it is short of the grid's. Trainable counts exclude the task head.
"""
from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

from scipy.stats import t as student_t
from scipy.stats import ttest_ind

from ..atomic import write_atomic
from .plots import plot_forest, plot_score_vs_lr, save_png
from .stats import bootstrap_cells, collapsed, holm, paired_cells
from .study import Grid, argv, best_lr, cpu_seconds, current_rows, plan, read_results


def cell_stats(scores: list[float]) -> tuple[float, float, int]:
    """(mean, sample std (0 for one value), n) of dev scores."""
    mean = statistics.fmean(scores)
    return mean, statistics.stdev(scores) if len(scores) > 1 else 0.0, len(scores)


def adapter_params(row: dict) -> int:
    """Trainable parameters without the task head (`full`: every parameter of the encoder)."""
    return row["trainable_params"] - (row.get("head_params") or 0)


def model_params(row: dict) -> int:
    """Parameters of the base model with its head (the wrapped model minus the adapter)."""
    return row["total_params"] if row["method"] == "full" else row["total_params"] - adapter_params(row)


def summarise(grid: Grid, rows: list[dict]) -> dict:
    """{(task, name): {lr, sweep: {lr: score}, scores, rows, sweeping}} for every pair that has a sweep row;
    `sweeping`: a sweep run (an edge extension) is still to come, so the chosen rate may change."""
    out = {}
    sweeping = {(run.task, run.entry.name) for run in plan(grid, rows)[0] if run.stage == "sweep"}
    by_pair = defaultdict(list)
    for row in rows:
        by_pair[(row["task"], row["name"])].append(row)
    for (task, name), pair in by_pair.items():
        sweep = [r for r in pair if r.get("stage") == "sweep" and r["seed"] == grid.sweep_seed]
        if not sweep:
            continue
        lr = best_lr(sweep)
        at_lr = {}
        for r in pair:  # one score per seed at the chosen rate (the last recorded if repeated)
            if r["lr"] == lr:
                at_lr[r["seed"]] = r
        out[(task, name)] = {"lr": lr, "sweep": {r["lr"]: r["score"] for r in sweep},
                             "scores": [r["score"] for r in at_lr.values()], "rows": list(at_lr.values()),
                             "sweeping": (task, name) in sweeping}
    return out


def _fmt_cell(stats, wanted: int, sweeping: bool, median: float | None = None, collapsed: int = 0) -> str:
    mean, std, n = stats
    text = f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}"  # one seed: no spread
    text += f" [{100 * median:.1f}]" if n > 2 and median is not None else ""  # the median beside the mean
    text += "‡" * collapsed
    notes = ([f"{n}/{wanted} seeds"] if n < wanted else []) + (["sweep not finished"] if sweeping else [])
    return text + (f" ({', '.join(notes)})" if notes else "")


def complete(s: dict, wanted: int) -> bool:
    """A cell is final once its sweep is finished and every seed ran at the chosen rate."""
    return len(s["scores"]) >= wanted and not s["sweeping"]


def table(grid: Grid, summary: dict) -> list[str]:
    tasks = list(grid.tasks)
    lines = ["| method | trainable params (no head) | % of model | " + " | ".join(tasks) + " | avg |",
             "|---|---:|---:|" + "---:|" * (len(tasks) + 1)]
    for entry in grid.methods:
        cells, means, any_row = [], [], None
        for task in tasks:
            s = summary.get((task, entry.name))
            if s is None:
                cells.append("—" if task not in entry.tasks else "not run")
                continue
            any_row = any_row or s["rows"][0]
            stats = cell_stats(s["scores"])
            flags = collapses(grid, summary, task, s["rows"])
            cells.append(_fmt_cell(stats, len(grid.seeds), s["sweeping"], statistics.median(s["scores"]), sum(flags)))
            means.append(stats[0])
        if any_row is None:
            continue
        complete = len(means) == len(tasks)
        avg = f"{100 * statistics.fmean(means):.1f}" if complete else "—"
        n = adapter_params(any_row)
        lines.append(f"| {entry.name} | {n:,} | {100 * n / model_params(any_row):.3f} | " + " | ".join(cells)
                     + f" | {avg} |")
    return lines


def _extra_plots(grid: Grid, summary: dict, forest: list, out: Path, img: Path) -> list[str]:
    """The forest plot of the claims and score against learning rate per task (Markdown lines)."""
    lines = []
    if forest:
        path = plot_forest(forest, img / f"{grid.name}-claims.png")
        lines += [f"![every claim: difference and 95 % interval]({path.relative_to(out.parent)})", ""]
    panels, floors = {}, {}
    for (task, name), s in summary.items():
        panels.setdefault(task, {})[name] = sorted(s["sweep"].items())
    for task in panels:
        rows = [r for (t, _), s in summary.items() if t == task for r in s["rows"]]
        scores = [r["score"] for r in rows]
        pearson = rows and rows[0].get("main_metric") == "pearson"
        floors[task] = 0.5 * statistics.median(scores) if pearson else majority_score(grid, task, rows)
    if panels:
        order = [t for t in grid.tasks if t in panels]
        path = plot_score_vs_lr({t: panels[t] for t in order}, floors, img / f"{grid.name}-score-vs-lr.png")
        lines += ["## Score against learning rate", "", "Each method's sweep (seed "
                  f"{grid.sweep_seed}); dashed: the collapse line (the majority-class score; STS-B: half the "
                  "median Pearson); runs below the axis sit on its edge as triangles.", "",
                  f"![score against learning rate]({path.relative_to(out.parent)})", ""]
    return lines


def majority_score(grid: Grid, task: str, rows: list[dict]) -> float | None:
    """The dev score of always predicting the majority class: as recorded in a row, else from the dev data
    ([train] data_dir or $GLUE_DIR), else None (then no classification run is flagged)."""
    recorded = [r["majority_baseline"] for r in rows if isinstance(r.get("majority_baseline"), (int, float))]
    if recorded:
        return recorded[0]
    data_dir = grid.train.get("data_dir") or os.environ.get("GLUE_DIR")
    if not data_dir or not rows:
        return None
    from .data import load_split
    from .metrics import constant_baseline

    try:
        return constant_baseline(task, [e.label for e in load_split(task, "dev", data_dir)])[rows[0]["main_metric"]]
    except (OSError, ValueError, KeyError):
        return None


def collapses(grid: Grid, summary: dict, task: str, rows: list[dict]) -> list[bool]:
    """Which of a cell's runs collapsed (stats.collapsed: at or below the majority-class score; STS-B below
    half the median Pearson of the task's cells' runs)."""
    task_scores = [score for (t, _), s in summary.items() if t == task for score in s["scores"]]
    majority = majority_score(grid, task, rows)
    return [collapsed(r["score"], r.get("main_metric", ""), majority, task_scores) for r in rows]


def claim_verdict(better: list[float], worse: list[float], wanted: int
                  ) -> tuple[float, tuple[float, float] | None, float | None, str]:
    """(mean difference, its 95 % confidence interval, Welch's two-sided p, verdict) of two cells' seed
    scores; interval and p are Welch's t-test's (None below two seeds or with no spread). The verdict waits
    for `wanted` seeds in both; then "holds" / "reversed" when the interval excludes zero (p < 0.05) on
    either side, "within noise" otherwise."""
    diff = statistics.fmean(better) - statistics.fmean(worse)
    ci = p = None
    if min(len(better), len(worse)) > 1 and max(statistics.stdev(better), statistics.stdev(worse)) > 0:
        test = ttest_ind(better, worse, equal_var=False)
        p, ci = float(test.pvalue), tuple(float(x) for x in test.confidence_interval(0.95))
    if min(len(better), len(worse)) < wanted:
        return diff, ci, p, f"waiting ({len(better)}/{wanted} and {len(worse)}/{wanted} seeds)"
    return diff, ci, p, _verdict(diff, ci)


def _verdict(diff: float, ci: tuple[float, float] | None) -> str:
    """"holds" / "reversed" when the interval (or, without one, the difference) excludes zero on that side."""
    low, high = ci or (diff, diff)
    return "holds" if low > 0 else "reversed" if high < 0 else "within noise"


def average_verdict(better: list[list[float]], worse: list[list[float]]
                    ) -> tuple[float, tuple[float, float] | None, float | None, str]:
    """The claim on the average over tasks (the GLUE-style score KronA's paper compares): `better` and
    `worse` hold one list of seed scores per task. The difference of the two averages of cell means, with
    standard error sqrt(sum of s²/n over all 2T cells) / T and Welch-Satterthwaite degrees of freedom, so one
    task reduces to `claim_verdict`'s Welch test. Interval, p and verdict as `claim_verdict`'s (its caller
    asks only once every cell is complete)."""
    tasks = len(better)
    diff = statistics.fmean(map(statistics.fmean, better)) - statistics.fmean(map(statistics.fmean, worse))
    cells = better + worse
    ci = p = None
    if min(map(len, cells)) > 1:
        parts = [(statistics.variance(c) / len(c) / tasks ** 2, len(c) - 1) for c in cells]
        var = sum(v for v, _ in parts)
        if var > 0:
            df = var ** 2 / sum(v ** 2 / k for v, k in parts)
            half = float(student_t.ppf(0.975, df)) * math.sqrt(var)
            ci, p = (diff - half, diff + half), float(2 * student_t.sf(abs(diff) / math.sqrt(var), df))
    return diff, ci, p, _verdict(diff, ci)


def _claim_row(text: str, where: str, diff: float | None, ci, p, verdict: str, paired=math.nan,
               holm_p=math.nan, boot=None) -> str:
    fmt = lambda v: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2g}"  # noqa: E731
    if verdict in ("holds", "reversed") and not holm_p < 0.05:
        verdict += " (not after Holm)"
    return (f"| {text} | {where} | {'—' if diff is None else f'{100 * diff:+.1f}'} | "
            f"{'—' if ci is None else f'{100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}'} | "
            f"{fmt(p)} | {fmt(paired)} | {fmt(holm_p)} | {fmt(boot)} | {verdict} |")


def claims_table(grid: Grid, summary: dict, forest: list | None = None) -> list[str]:
    """One row per claim and task, and per claim its average over tasks; Holm's correction runs over the
    paired p of every row (the whole table is one family). `forest`, when given, receives (label,
    difference, interval) of every row that has a difference, for the forest plot."""
    entries = []  # (text, where, diff, ci, Welch p, verdict, paired p, bootstrap p)
    methods = {e.name: e for e in grid.methods}
    for claim in grid.claims:
        text = f"{claim.text} (`{claim.better}` vs `{claim.worse}`)"
        for task in grid.tasks:
            b, w = summary.get((task, claim.better)), summary.get((task, claim.worse))
            if b is None or w is None:
                continue
            diff, ci, p, verdict = claim_verdict(b["scores"], w["scores"], len(grid.seeds))
            if b["sweeping"] or w["sweeping"]:
                verdict = "waiting (sweep not finished)"
            main = b["rows"][0].get("main_metric", "")
            entries.append((text, task, diff, ci, p, verdict, paired_cells([b["rows"]], [w["rows"]])[1],
                            bootstrap_cells(task, main, b["rows"], w["rows"], grid.results.parent)))
        shared = [t for t in grid.tasks if t in methods[claim.better].tasks and t in methods[claim.worse].tasks]
        if len(shared) < 2:
            continue
        pairs = [(summary.get((t, claim.better)), summary.get((t, claim.worse))) for t in shared]
        done = sum(1 for b, w in pairs if b and w and complete(b, len(grid.seeds)) and complete(w, len(grid.seeds)))
        where = f"average of {len(shared)} tasks"
        if done < len(shared):
            entries.append((text, where, None, None, None, f"waiting ({done}/{len(shared)} tasks complete)",
                            math.nan, None))
        else:
            entries.append((text, where, *average_verdict([b["scores"] for b, _ in pairs],
                                                          [w["scores"] for _, w in pairs]),
                            paired_cells([b["rows"] for b, _ in pairs], [w["rows"] for _, w in pairs])[1], None))
    adjusted = holm([e[6] for e in entries])
    if forest is not None:
        forest += [(f"{e[0].split(' (`')[0]}: {e[1]}", e[2], e[3]) for e in entries if e[2] is not None]
    return ["| claim | task | better − worse (×100) | 95 % CI | Welch p | paired p | paired p, Holm | bootstrap p "
            "| verdict |", "|---|---|---:|---:|---:|---:|---:|---:|---|",
            *(_claim_row(*e[:6], e[6], h, e[7]) for e, h in zip(entries, adjusted))]


def rate_across_tasks(grid: Grid, summary: dict) -> dict[str, tuple[float, float, int]]:
    """{name: (lr, shortfall ×100, tasks)} for each method whose sweep has finished on two tasks or more: of
    the rates swept on all of them, the one whose sweep-seed score falls least below each task's best, on
    average (the smaller rate on a tie), as one rate to use everywhere."""
    out = {}
    for entry in grid.methods:
        sweeps = [s["sweep"] for task in grid.tasks
                  if (s := summary.get((task, entry.name))) is not None and not s["sweeping"]]
        shared = set.intersection(*(set(sweep) for sweep in sweeps)) if len(sweeps) > 1 else set()
        shortfall = {lr: statistics.fmean(100 * (max(sweep.values()) - sweep[lr]) for sweep in sweeps)
                     for lr in shared}
        if shortfall:
            lr = min(shortfall, key=lambda lr: (round(shortfall[lr], 9), lr))
            out[entry.name] = (lr, shortfall[lr], len(sweeps))
    return out


def lr_table(grid: Grid, summary: dict) -> list[str]:
    across = rate_across_tasks(grid, summary)
    lines = ["| method | " + " | ".join(grid.tasks) + " | one rate for every task |",
             "|---|" + "---|" * (len(grid.tasks) + 1)]
    for entry in grid.methods:
        cells = []
        for task in grid.tasks:
            s = summary.get((task, entry.name))
            if s is None:
                cells.append("—")
                continue
            swept = sorted(s["sweep"])
            sweep = ", ".join(f"{lr:g}: {100 * s['sweep'][lr]:.1f}" for lr in swept)
            if len(swept) < 2:
                edge = ""
            elif len(set(s["sweep"].values())) == 1:  # the sweep chose nothing: no edge to look beyond
                edge = " (every rate tied: the smallest by rule)"
            else:
                edge = " ↑" if s["lr"] == swept[-1] else " ↓" if s["lr"] == swept[0] else ""
            extended = " (sweep extended)" if set(swept) - set(entry.lrs) else ""
            cells.append(f"**{s['lr']:g}**{edge} ({sweep}){extended}")
        if entry.name in across:
            lr, shortfall, tasks = across[entry.name]
            cells.append(f"**{lr:g}** ({shortfall:.1f} below the best, on average over {tasks} tasks)")
        else:
            cells.append("—")
        lines.append(f"| {entry.name} | " + " | ".join(cells) + " |")
    return lines


def seeds_table(grid: Grid, summary: dict) -> list[str]:
    """Every seed's dev score (×100) at each cell's chosen rate: the numbers behind each mean ± std, where a
    run that failed to learn stands out."""
    lines = ["| task | method | lr | " + " | ".join(f"seed {s}" for s in grid.seeds) + " |",
             "|---|---|---:|" + "---:|" * len(grid.seeds)]
    for task in grid.tasks:
        for entry in grid.methods:
            s = summary.get((task, entry.name))
            if s is not None:
                by_seed = {r["seed"]: r["score"] for r in s["rows"]}
                lines.append(f"| {task} | {entry.name} | {s['lr']:g} | " + " | ".join(
                    f"{100 * by_seed[seed]:.1f}" if seed in by_seed else "—" for seed in grid.seeds) + " |")
    return lines


def epochs_table(grid: Grid, summary: dict) -> list[str]:
    """Dev score after each epoch at each cell's chosen rate, mean over the seeds whose rows carry a curve;
    [] when no row does. Shows whether the epochs were enough: the last column is the last epoch's gain."""
    cells = [(task, e.name, [r["curve"] for r in summary[(task, e.name)]["rows"] if r.get("curve")])
             for task in grid.tasks for e in grid.methods if (task, e.name) in summary]
    cells = [c for c in cells if c[2]]
    if not cells:
        return []
    epochs = sorted({ep for _, _, curves in cells for curve in curves for ep, _ in curve if ep > 0})
    lines = ["| task | method | " + " | ".join(f"{ep:g}" for ep in epochs) + " | last gain | seeds |",
             "|---|---|" + "---:|" * (len(epochs) + 2)]
    for task, name, curves in cells:
        means = []
        for ep in epochs:
            at = [score for curve in curves for e, score in curve if e == ep]
            means.append(100 * statistics.fmean(at) if len(at) == len(curves) else None)
        done = [m for m in means if m is not None]
        gain = f"{round(done[-1] - done[-2], 1) + 0.0:+.1f}" if len(done) > 1 else "—"  # no "-0.0"
        lines.append(f"| {task} | {name} | " + " | ".join("—" if m is None else f"{m:.1f}" for m in means)
                     + f" | {gain} | {len(curves)} |")
    return lines


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
    handles, labels = [], []
    for ax in axes:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    per_row = 3 * cols  # legend entries that fit the figure's width
    legend_rows = math.ceil(max(len(labels), 1) / per_row)
    legend_height = 0.3 * legend_rows + 0.15  # inches
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), per_row), frameon=False)
    fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))
    fig.canvas.draw()  # final limits and layout, which the labels' positions are measured in
    for ax, points in named:
        _name_points(ax, points)
    save_png(fig, path, dpi=120)


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


def _median_of(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def time_ratios(grid: Grid, summary: dict, reference: str) -> dict[str, dict[str, tuple[float, bool, str]]]:
    """{method: {task: (ratio, from CPU time, processor)}}: the cell's median training CPU seconds over the
    reference method's on the same task when both cells recorded them (CPU time does not grow while other work
    holds the CPU), else the same ratio of train (wall) seconds. Both medians come from rows of one processor,
    the one holding most of the two cells' rows, since speed differs between machines; a pair with no processor
    in common gets no ratio."""
    out = defaultdict(dict)
    for task in grid.tasks:
        ref = summary.get((task, reference))
        if ref is None:
            continue
        for entry in grid.methods:
            s = summary.get((task, entry.name))
            if s is None:
                continue
            shared = {r.get("cpu") for r in s["rows"]} & {r.get("cpu") for r in ref["rows"]}
            if not shared:
                continue
            both = s["rows"] + ref["rows"]
            cpu_name = max(sorted(shared, key=str), key=lambda c: sum(r.get("cpu") == c for r in both))
            mine = [r for r in s["rows"] if r.get("cpu") == cpu_name]
            theirs = [r for r in ref["rows"] if r.get("cpu") == cpu_name]
            cpu, ref_cpu = _median_of(mine, "train_cpu_seconds"), _median_of(theirs, "train_cpu_seconds")
            if cpu is not None and ref_cpu is not None:
                out[entry.name][task] = (cpu / ref_cpu, True, cpu_name)
            else:
                wall = _median_of(mine, "train_seconds") / _median_of(theirs, "train_seconds")
                out[entry.name][task] = (wall, False, cpu_name)
    return out


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


PAGE_MARK = "<!-- written by `kronpeft report`: re-rendered in place; edit the grid, notes or results instead -->"


def is_report_page(path: Path) -> bool:
    """`path` is a page `kronpeft report` wrote (its first line is PAGE_MARK; pages from before the mark
    say "Rendered by `kronpeft report" on their third line), so it may be re-rendered without --overwrite."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = [f.readline() for _ in range(3)]
    except OSError:
        return False
    return head[0].strip() == PAGE_MARK or head[2].startswith("Rendered by `kronpeft report ")


def render(grid: Grid, out: Path, reference: str | None = None) -> Path:
    """Write `out` (Markdown) and its plots in `out.parent / "img"`; returns `out`."""
    rows, stale = current_rows(grid, read_results(grid.results))
    summary = summarise(grid, rows)
    img = out.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    lines = [PAGE_MARK, f"# {grid.title or 'Study ' + grid.name}", "",
             f"Rendered by `kronpeft report {grid.path}` from `{grid.results}` ({len(rows)} runs) alone"
             + (f"; {stale} row(s) recorded under earlier settings of this grid are not shown." if stale else "."), ""]
    if not rows:
        lines.append("No runs recorded yet.")
    else:
        wanted = sum(len(e.tasks) for e in grid.methods) * len(grid.seeds)
        cells = sum(1 for s in summary.values() if complete(s, len(grid.seeds)))
        lines += [f"Cells complete at {len(grid.seeds)} seeds: {cells} of {sum(len(e.tasks) for e in grid.methods)}; "
                  f"rows at the chosen rates: {sum(len(s['scores']) for s in summary.values())} of {wanted}.", "",
                  "Dev score ×100 at the best checkpoint (mean ± sample std over seeds, [median] with three or "
                  "more; MRPC F1, STS-B Pearson, CoLA Matthews, RTE/SST-2 accuracy), at each method's best learning "
                  "rate on the sweep seed. ‡: one per collapsed seed (at or below the majority-class score; on "
                  "STS-B a Pearson below half the median of the task's runs):", ""]
        lines += table(grid, summary)
        forest = []
        plot1 = img / f"{grid.name}-score-vs-params.png"
        plot_score_vs_params(grid, summary, plot1)
        lines += ["", f"![score vs trainable parameters]({plot1.relative_to(out.parent)})", "",
                  *(["## The papers' claims", "", "Each claim per task: the difference of the two cells' means, "
                     "its 95 % confidence interval and p from Welch's t-test (unequal variances; with three "
                     "seeds a cell, about 2-4 degrees of freedom, so the interval spans about ±3 to ±4 "
                     "standard errors), "
                     "and a verdict once both cells have every seed: *holds* or *reversed* when the interval "
                     "excludes zero (p < 0.05), *within noise* otherwise. Three seeds resolve only large "
                     "differences, and among many claim-task pairs where nothing differs about one in twenty "
                     "still gets a verdict by chance: a lone verdict is weaker than a pattern across tasks. "
                     "Where a claim spans several tasks, its last row tests the average over them (the "
                     "GLUE-style score KronA's paper compares): the difference of the two methods' averages, "
                     "its standard error from every cell's spread, Welch-Satterthwaite degrees of freedom; "
                     "with more cells behind it, it resolves smaller differences than any one task. "
                     "*paired p*: seed s of one method against seed s of the other (they share data order and "
                     "head initialisation), a paired t-test; on an average row, of the per-seed averages over "
                     "tasks. *paired p, Holm*: Holm's correction over every row of this table (one family); a "
                     "verdict that does not survive it says so. *bootstrap p*: a paired bootstrap over dev "
                     "examples (1,000 resamples) from the runs' kept predictions, where both cells have them.", "",
                     *claims_table(grid, summary, forest), ""] if grid.claims else []),
                  *_extra_plots(grid, summary, forest, out, img),
                  "## Learning rates", "", "The winner in bold; each sweep value with its seed-"
                  f"{grid.sweep_seed} dev score. ↑ / ↓: the winner is the highest / lowest rate swept, so the "
                  "best rate may lie beyond the sweep" + ("." if grid.extend_edges else " (this grid does not "
                  "extend a sweep past its edge: with two values the winner always sits at one)."), "",
                  "*One rate for every task*: of the rates a method swept on every task whose sweep has "
                  "finished, the one whose score falls least below each task's best, on average (in points, "
                  "whatever the task's metric).", ""]
        lines += lr_table(grid, summary)
        lines += ["", "## Every seed", "", "Each seed's dev score (×100) at the cell's chosen rate: the rows behind "
                  "the table's means.", "", *seeds_table(grid, summary)]
        curves = epochs_table(grid, summary)
        if curves:
            lines += ["", "## Dev score after each epoch", "", "At each cell's chosen rate, mean over the seeds "
                      "whose rows carry their curve (×100). "
                      "*last gain*: the last epoch's change, the check that the epochs were enough.", "", *curves]
        reference = reference or next((e.name for e in grid.methods if e.family == "lora"), grid.methods[0].name)
        ratios = time_ratios(grid, summary, reference)
        if ratios:
            plot2 = img / f"{grid.name}-train-time.png"
            plot_times(ratios, reference, plot2, grid.tasks)
            machines = sorted({m for by_task in ratios.values() for _, _, m in by_task.values()}, key=str)
            mark = {m: chr(ord('A') + i) if len(machines) > 1 else "" for i, m in enumerate(machines)}
            lines += ["", "## Training time", "", f"Median training time per cell relative to `{reference}` on the "
                      "same task (evaluation excluded): training CPU seconds where both cells recorded them, "
                      "else wall seconds (marked *), which grow when other work shares the machine (see the load "
                      "averages in the results file). Both medians of a ratio come from runs on one processor: "
                      + "; ".join(f"{mark[m] + ': ' if mark[m] else ''}{m}" for m in machines) + ".", "",
                      f"![train time relative to {reference}]({plot2.relative_to(out.parent)})", "",
                      "| method | " + " | ".join(grid.tasks) + " |", "|---|" + "---:|" * len(grid.tasks)]
            for name, by_task in ratios.items():
                lines.append(f"| {name} | " + " | ".join(
                    f"{by_task[t][0]:.2f}{'' if by_task[t][1] else '*'} {mark[by_task[t][2]]}".rstrip() if t in by_task
                    else "—" for t in grid.tasks) + " |")
    if grid.notes is not None and grid.notes.is_file():
        lines += ["", grid.notes.read_text().rstrip()]
    if rows:
        lines += ["", "## Setup", ""] + setup(grid, rows)
    write_atomic(out, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return out


def setup(grid: Grid, rows: list[dict]) -> list[str]:
    def values(key):
        return sorted({str(r.get(key)) for r in rows})

    shared = " ".join(argv(grid.train))
    hours = defaultdict(float)
    for r in rows:
        hours[str(r.get("cpu"))] += cpu_seconds(r) / 3600
    per_machine = f" ({'; '.join(f'{h:.1f} on {m}' for m, h in sorted(hours.items()))})" if len(hours) > 1 else ""
    return [f"- Command: `kronpeft study {grid.path} --parallel P --threads T`, then `kronpeft report {grid.path}`; "
            f"each run is `kronpeft train --model {grid.model} {shared} --task T --method M --lr LR --seed S` "
            "(its exact command is in its row).",
            f"- Model: {grid.model}; data: the GLUE TSV files (train on train, report dev).",
            f"- Machine(s): {'; '.join(values('cpu'))}; GPU: {', '.join(values('gpu'))}; "
            f"threads per run: {', '.join(values('threads'))}; runs side by side: {', '.join(values('parallel'))}.",
            f"- Versions: torch {', '.join(values('torch'))}; transformers {', '.join(values('transformers'))}; "
            f"peft {', '.join(values('peft'))}; accelerate {', '.join(values('accelerate'))}; "
            f"kronpeft commits {', '.join(values('commit'))}.",
            f"- CPU-hours recorded: {sum(cpu_seconds(r) for r in rows) / 3600:.1f}{per_machine} (CPU time where the "
            "row measured it, else wall time x threads, which counts time the run waited for a shared CPU; a run "
            "resumed after an interruption counts its earlier parts up to their last checkpoint, or, in rows recorded "
            "before kronpeft aa6c85d, its last part only)."]
