"""The report's Markdown tables: scores, claims, learning rates, every seed, the score after each epoch."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from ..study.grid import Grid
from .stats import (adapter_params, average_verdict, cell_stats, claim_verdict, collapses, complete, model_params,
                    rate_across_tasks)
from .figures import ForestPoint
from .papers import reported_gap
from .significance import BOOTSTRAP_RESAMPLES, bootstrap_cells, holm, paired_cells


def _fmt_cell(stats, wanted: int, sweeping: bool, median: float | None = None, collapsed: int = 0) -> str:
    mean, std, n = stats
    text = f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}"  # one seed: no spread
    text += f" [{100 * median:.1f}]" if n > 2 and median is not None else ""  # the median beside the mean
    text += "‡" * collapsed
    notes = ([f"{n}/{wanted} seeds"] if n < wanted else []) + (["sweep not finished"] if sweeping else [])
    return text + (f" ({', '.join(notes)})" if notes else "")


def cell_text(grid: Grid, summary: dict, task: str, s: dict) -> str:
    """A main-table cell: mean ± std [median], a ‡ per collapsed seed, the notes of an unfinished cell."""
    flags = collapses(grid, summary, task, s["rows"])
    return _fmt_cell(cell_stats(s["scores"]), len(grid.seeds), s["sweeping"], statistics.median(s["scores"]),
                     sum(flags))


def mark(grid: Grid, s: dict) -> str:
    """"†" for a cell whose rows come from another grid ([study] replace_cells), else ""."""
    return "" if grid.holds(s["rows"][0]) else "†"


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
            cells.append(cell_text(grid, summary, task, s) + mark(grid, s))
            means.append(statistics.fmean(s["scores"]))
        if any_row is None:
            continue
        complete = len(means) == len(tasks)
        avg = f"{100 * statistics.fmean(means):.1f}" if complete else "—"
        n = adapter_params(any_row)
        lines.append(f"| {entry.name} | {n:,} | {100 * n / model_params(any_row):.3f} | " + " | ".join(cells)
                     + f" | {avg} |")
    return lines


def first_run_table(grid: Grid, first: dict, task: str, names: list[str]) -> list[str]:
    """This grid's own cells of `task` for the methods `names` (those another grid's cells replace), as the main
    table shows them from `first`, the summary of this grid's rows alone."""
    lines = [f"| method | lr | {task} |", "|---|---:|---:|"]
    for name in names:
        s = first.get((task, name))
        lines.append(f"| {name} | " + (f"{s['lr']:g} | {cell_text(grid, first, task, s)} |" if s else "— | not run |"))
    return lines


@dataclass
class ClaimRow:
    """One row of the claims' table: a claim on one task or on the average over its tasks (differences and
    intervals are fractions; `paper`: the gap a paper reports for it, in points, or None)."""
    text: str
    where: str
    diff: float | None
    ci: tuple[float, float] | None
    welch_p: float | None
    verdict: str
    paired_p: float
    bootstrap_p: float | None
    paper: float | None
    holm_p: float = math.nan

    def after_holm(self) -> str:
        """The verdict once Holm's correction is applied: a "holds"/"reversed" whose Holm p is not below 0.05
        becomes "within noise"."""
        return self.verdict if self.verdict not in ("holds", "reversed") or self.holm_p < 0.05 else "within noise"


FAILURE = "optimisation failure"


def _failed(grid: Grid, summary: dict, task: str, *cells: dict) -> bool:
    """Whether every run of one of the `cells` on `task` collapsed (stats.collapses): that side's optimisation
    failed, so a claim row on it compares no trained model."""
    return any(all(collapses(grid, summary, task, cell["rows"])) for cell in cells)


def claim_rows(grid: Grid, summary: dict) -> list[ClaimRow]:
    """One row per claim and task, and per claim its average over tasks; Holm's correction runs over the
    paired p of every row (the whole table is one family). A row where every seed of one side collapsed, and an
    average over such a task, gets the verdict FAILURE instead of a comparison."""
    rows = []
    methods = {e.name: e for e in grid.methods}
    for claim in grid.claims:
        text = f"{claim.text} (`{claim.better}` vs `{claim.worse}`)"
        families = methods[claim.better].family, methods[claim.worse].family
        for task in grid.tasks:
            b, w = summary.get((task, claim.better)), summary.get((task, claim.worse))
            if b is None or w is None:
                continue
            diff, ci, p, verdict = claim_verdict(b["scores"], w["scores"], len(grid.seeds))
            if b["sweeping"] or w["sweeping"]:
                verdict = "waiting (sweep not finished)"
            elif verdict in ("holds", "reversed", "within noise") and _failed(grid, summary, task, b, w):
                verdict = FAILURE
            main = b["rows"][0].get("main_metric", "")
            rows.append(ClaimRow(text, task, diff, ci, p, verdict, paired_cells([b["rows"]], [w["rows"]])[1],
                                 bootstrap_cells(task, main, b["rows"], w["rows"], grid.results.parent),
                                 reported_gap(*families, [task])))
        shared = [t for t in grid.tasks if t in methods[claim.better].tasks and t in methods[claim.worse].tasks]
        if len(shared) < 2:
            continue
        pairs = [(summary.get((t, claim.better)), summary.get((t, claim.worse))) for t in shared]
        done = sum(1 for b, w in pairs if b and w and complete(b, len(grid.seeds)) and complete(w, len(grid.seeds)))
        where, paper = f"average of {len(shared)} tasks", reported_gap(*families, shared)
        if done < len(shared):
            rows.append(ClaimRow(text, where, None, None, None, f"waiting ({done}/{len(shared)} tasks complete)",
                                 math.nan, None, paper))
        else:
            diff, ci, p, verdict = average_verdict([b["scores"] for b, _ in pairs], [w["scores"] for _, w in pairs])
            if any(_failed(grid, summary, t, b, w) for t, (b, w) in zip(shared, pairs)):
                verdict = FAILURE
            rows.append(ClaimRow(text, where, diff, ci, p, verdict,
                                 paired_cells([b["rows"] for b, _ in pairs], [w["rows"] for _, w in pairs])[1],
                                 None, paper))
    for row, adjusted in zip(rows, holm([r.paired_p for r in rows])):
        row.holm_p = adjusted
    return rows


def claims_table(rows: list[ClaimRow]) -> list[str]:
    """The claims' Markdown table; a verdict that does not survive Holm's correction says so."""
    fmt = lambda v: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2g}"  # noqa: E731
    lines = ["| claim | task | better − worse (×100) | 95 % CI | Welch p | paired p | paired p, Holm | bootstrap p "
             "| verdict |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        verdict = r.verdict + (" (not after Holm)" if r.after_holm() != r.verdict else "")
        lines.append(f"| {r.text} | {r.where} | {'—' if r.diff is None else f'{100 * r.diff:+.1f}'} | "
                     f"{'—' if r.ci is None else f'{100 * r.ci[0]:+.1f} to {100 * r.ci[1]:+.1f}'} | "
                     f"{fmt(r.welch_p)} | {fmt(r.paired_p)} | {fmt(r.holm_p)} | {bootstrap_words(r.bootstrap_p)} | "
                     f"{verdict} |")
    return lines


def bootstrap_words(p: float | None) -> str:
    """A bootstrap p as the table prints it: no resample on the far side of zero is p below 2 / resamples, not 0."""
    if p is None:
        return "—"
    return f"< {2 / BOOTSTRAP_RESAMPLES:.2g}" if p == 0 else f"{p:.2g}"


def forest_points(rows: list[ClaimRow]) -> list[ForestPoint]:
    """The forest plot's lines: every claim row with a difference (the paper's gap as a fraction)."""
    return [ForestPoint(f"{r.text.split(' (`')[0]}: {r.where}" + (f" ({FAILURE})" if r.verdict == FAILURE else ""),
                        r.diff, r.ci, None if r.paper is None else r.paper / 100, r.verdict == FAILURE)
            for r in rows if r.diff is not None]


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
            sweep = ", ".join(f"{lr:g}: {_sweep_scores(s, lr)}" for lr in swept)
            if len(swept) < 2:
                edge = ""
            elif len(set(s["chose"].values())) == 1:  # the sweep chose nothing: no edge to look beyond
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


def _sweep_scores(s: dict, lr: float) -> str:
    """One swept rate's scores ×100: dev's, or "selection / dev" when another split chose the rate."""
    dev, chose = 100 * s["sweep"][lr], 100 * s["chose"][lr]
    return f"{dev:.1f}" if s["chose"] == s["sweep"] else f"{chose:.1f} / {dev:.1f}"


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
                lines.append(f"| {task} | {entry.name} | {s['lr']:g}{mark(grid, s)} | " + " | ".join(
                    f"{100 * by_seed[seed]:.1f}" if seed in by_seed else "—" for seed in grid.seeds) + " |")
    return lines


def epochs_table(grid: Grid, summary: dict) -> list[str]:
    """Dev score after each epoch at each cell's chosen rate, mean over the seeds whose rows carry a curve;
    [] when no row does. Shows whether the epochs were enough: the last column is the last epoch's gain."""
    cells = [(task, e.name + mark(grid, s), [r["curve"] for r in s["rows"] if r.get("curve")])
             for task in grid.tasks for e in grid.methods if (s := summary.get((task, e.name))) is not None]
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
