"""The report's numbers: cells (mean, std, seeds at the chosen rate), collapsed runs, the claims' verdicts
(Welch's test per task, and on the average over tasks), one rate across tasks, and training-time ratios."""
from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict

from scipy.stats import t as student_t
from scipy.stats import ttest_ind

from ..study.grid import Grid
from ..selection import choice_score
from ..study.plan import best_lr, plan
from .significance import STSB_COLLAPSE_FRACTION, collapsed


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
    """{(task, name): {lr, sweep: {lr: score}, chose: {lr: score}, scores, rows, sweeping}} for every pair
    that has a sweep row; `sweep`: the sweep seed's dev scores, `chose`: the scores its rate was chosen by (the
    selection split's under the selection protocol, else the same dev scores); `sweeping`: a sweep run (an
    edge extension) is still to come, so the chosen rate may change (never for a cell whose rows come from
    another grid, [study] replace_cells: it is replaced once complete there)."""
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
                             "chose": {r["lr"]: choice_score(r) for r in sweep},
                             "scores": [r["score"] for r in at_lr.values()], "rows": list(at_lr.values()),
                             "sweeping": (task, name) in sweeping and grid.holds(pair[0])}
    return out


def complete(s: dict, wanted: int) -> bool:
    """A cell is final once its sweep is finished and every seed ran at the chosen rate."""
    return len(s["scores"]) >= wanted and not s["sweeping"]


def majority_score(grid: Grid, task: str, rows: list[dict]) -> float | None:
    """The dev score of always predicting the majority class: as recorded in a row, else from the dev data
    ([train] data_dir or $GLUE_DIR), else None (then no classification run is flagged)."""
    recorded = [r["majority_baseline"] for r in rows if isinstance(r.get("majority_baseline"), (int, float))]
    if recorded:
        return recorded[0]
    data_dir = grid.train.get("data_dir") or os.environ.get("GLUE_DIR")
    if not data_dir or not rows:
        return None
    from ..data import load_split
    from ..metrics import constant_baseline

    try:
        return constant_baseline(task, [e.label for e in load_split(task, "dev", data_dir)])[rows[0]["main_metric"]]
    except (OSError, ValueError, KeyError):
        return None


def collapse_lines(grid: Grid, summary: dict) -> dict[str, float | None]:
    """{task: the score at or below which a run collapsed}: the majority-class score, on STS-B (Pearson) half the
    median of the task's runs at the chosen rates; None where neither is known."""
    lines = {}
    for task in {t for t, _ in summary}:
        rows = [r for (t, _), s in summary.items() if t == task for r in s["rows"]]
        pearson = rows[0].get("main_metric") == "pearson"
        lines[task] = (STSB_COLLAPSE_FRACTION * statistics.median(r["score"] for r in rows) if pearson
                       else majority_score(grid, task, rows))
    return lines


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


def rate_across_tasks(grid: Grid, summary: dict) -> dict[str, tuple[float, float, int]]:
    """{name: (lr, shortfall ×100, tasks)} for each method whose sweep has finished on two tasks or more: of
    the rates swept on all of them, the one whose sweep-seed score falls least below each task's best, on
    average (the smaller rate on a tie), as one rate to use everywhere; scores as the rates were chosen
    (the selection split's under the selection protocol: dev chooses nothing)."""
    out = {}
    for entry in grid.methods:
        sweeps = [s["chose"] for task in grid.tasks
                  if (s := summary.get((task, entry.name))) is not None and not s["sweeping"]]
        shared = set.intersection(*(set(sweep) for sweep in sweeps)) if len(sweeps) > 1 else set()
        shortfall = {lr: statistics.fmean(100 * (max(sweep.values()) - sweep[lr]) for sweep in sweeps)
                     for lr in shared}
        if shortfall:
            lr = min(shortfall, key=lambda lr: (round(shortfall[lr], 9), lr))
            out[entry.name] = (lr, shortfall[lr], len(sweeps))
    return out


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
