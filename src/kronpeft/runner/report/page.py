"""The report's page: `render` writes the Markdown, section by section, and its plots; `setup` says how the
runs were made."""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from ...atomic import write_atomic
from ..data import task_title
from ..selection import SELECTION
from ..study.grid import Grid, argv
from ..study.results import cpu_seconds, current_rows, read_results
from .bias import bias_table, rate_choice_lines
from .figures import (BUDGET_FAMILIES, budget_panels, plot_budget, plot_forest, plot_score_vs_lr, plot_score_vs_params,
                      plot_times)
from .replace import Taken, differences, take_cells
from .significance import BOOTSTRAP_RESAMPLES
from .stats import collapse_lines, collapses, complete, summarise, time_ratios
from .tables import (FAILURE, ClaimRow, claim_rows, claims_table, epochs_table, first_run_table, forest_points,
                     lr_table, seeds_table, table)

PAPER_MARKERS = ("Hollow diamonds (*paper*): the gap the paper reports for the claim, where it reports one: KronA's "
                 "paper only its GLUE average on T5-base (on our average rows), AdaKron's paper every task on "
                 "BERT-base (per task, and their mean on an average row), in points as the papers print them.")
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
    own, stale = current_rows(grid, read_results(grid.results))
    cells = take_cells(grid, own)
    shown = own + [r for r in cells[0] if not grid.holds(r)]  # every run the page shows
    img = out.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    lines = [PAGE_MARK, f"# {grid.title or 'Study ' + grid.name}", "",
             f"Rendered by `kronpeft report {grid.path}` from `{grid.results}` ({len(shown)} runs) alone"
             + (f"; {stale} row(s) recorded under earlier settings of this grid are not shown." if stale else "."), ""]
    if grid.summary is not None:
        lines += [grid.summary.read_text().rstrip(), ""]
    lines += _results(grid, own, cells, out, img, reference) if shown else ["No runs recorded yet."]
    lines += _companions(grid, out, img)
    if grid.notes is not None:
        lines += ["", grid.notes.read_text().rstrip()]
    if shown:
        lines += ["", "## Setup", ""] + setup(grid, shown)
    write_atomic(out, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return out


def _results(grid: Grid, own: list[dict], cells: tuple[list[dict], list[Taken]], out: Path, img: Path,
             reference: str | None = None, whole: bool = True) -> list[str]:
    """The grid's sections from its rows `own` and `cells` (`take_cells(grid, own)`: the page's rows, and what
    each replacement did); `whole=False` (a companion's summary on another page): its findings, scores, budget
    curve, selection bias, claims and their plots, without its sweeps, seeds, epochs and times."""
    rows, taken = cells
    summary, first = summarise(grid, rows), summarise(grid, own)  # first: this grid's cells alone (its sweeps)
    claims = claim_rows(grid, summary)
    lines = _what_this_shows(grid, summary, claims, taken) + _scores(grid, summary) + _replaced(grid, taken, first)
    lines.append("")
    if whole:
        lines += _score_plot(grid, summary, out, img)
    lines += _budget(grid, summary, out, img) + _selection_bias(grid, rows, summary) + _claims(grid, claims, whole)
    lines += _extra_plots(grid, first, forest_points(claims), out, img, whole)
    if whole:
        lines += _rates(grid, first) + _seeds_and_epochs(grid, summary)
        reference = reference or next((e.name for e in grid.methods if e.family == "lora"), grid.methods[0].name)
        lines += _times(grid, first, reference, out, img)
    return lines


def _companions(grid: Grid, out: Path, img: Path) -> list[str]:
    """[study] companions: each other grid's findings, scores and claims under a heading of its own, with a
    link to its whole page ([] without companions)."""
    if not grid.companions:
        return []
    lines = ["", "## The other grids of this study", "",
             "Each grid below is summarised from the same results file: its findings, its scores, its budget "
             "curve, selection bias and claims where it has them. Its own page (linked) adds its sweeps, every "
             "seed, the epochs and the training times.", ""]
    for other in grid.companions:
        own, _ = current_rows(other, read_results(other.results))
        page = other.page or other.path.with_suffix(".md")
        lines += [f"### {other.title or other.name}", "",
                  f"Grid `{other.name}` ({other.path}; its page: [{page.name}]({os.path.relpath(page, out.parent)})), "
                  f"{len(own)} runs recorded; model: {other.model}.", ""]
        body = _results(other, own, take_cells(other, own), out, img, whole=False) if own else \
            ["No runs recorded yet.", ""]
        lines += ["###" + line[1:] if line.startswith("## ") else line for line in body]
    return lines


VERDICTS = ("holds", "reversed", "within noise", FAILURE)
MODEL_WORDS = {"all-MiniLM-L6-v2": "all-MiniLM-L6-v2, one small 6-layer encoder, not the papers' T5-base or "
                                   "BERT-base",
               "mpnet": "all-mpnet-base-v2 (`mpnet`), a 12-layer encoder of BERT-base's size (d = 768, 109 M), "
                        "not the papers' T5-base or BERT-base themselves"}


def _what_this_shows(grid: Grid, summary: dict, claims: list[ClaimRow], taken: list[Taken]) -> list[str]:
    """The page's findings in plain words, from the claims' rows, and the caveats every reader needs ([] when
    the grid has no claims)."""
    if not grid.claims:
        return []
    if not claims:
        return ["## What this shows and what it does not", "",
                f"- Nothing yet: none of the {len(grid.claims)} claims has both its cells.", ""]
    decided = [c for c in claims if c.verdict in VERDICTS]
    before = ", ".join(f"{v}: {sum(c.verdict == v for c in decided)}" for v in VERDICTS)
    after = ", ".join(f"{v}: {sum(c.after_holm() == v for c in decided)}" for v in VERDICTS)
    found = [c for c in decided if c.verdict in ("holds", "reversed")]
    failed = [f"{c.text} on {_the(c.where)}" for c in decided if c.verdict == FAILURE]
    named = "".join(f"; {c.text} on {_the(c.where)}: {c.verdict}" for c in found)
    survivors = [f"{c.text} on {_the(c.where)} ({c.verdict}, Holm p {c.holm_p:.2g})" for c in found
                 if c.after_holm() == c.verdict]
    tested = sum(1 for c in claims if c.holm_p == c.holm_p)  # nan: no paired test
    chance = f" (the {len(found)} verdicts above do not survive correcting for {tested} tests)" if found else ""
    return ["## What this shows and what it does not", "",
            f"- {len(claims)} claim rows ({len(grid.claims)} claims, per task and on their average where a claim "
            f"spans several tasks): {len(decided)} have a verdict, {len(claims) - len(decided)} still wait for "
            "seeds or a sweep.",
            f"- Before Holm's correction: {before}{named}.",
            f"- After it (over the {tested} rows with a paired test): {after}.",
            "- Surviving Holm's correction: " + ("; ".join(survivors) if survivors else f"none{chance}") + ".",
            *([f"- No comparison where an optimisation failed (every seed of one side collapsed): {'; '.join(failed)}."]
              if failed else []),
            f"- One model: {MODEL_WORDS.get(grid.model, grid.model)}; a gap measured here need not carry over to "
            "other models.",
            f"- {len(grid.seeds)} seeds per cell: only large differences are resolved, and *within noise* means "
            "not resolved, not equal.",
            f"- {_protocol_words(grid)}",
            *[f"- The † cells ({task_title(t.replacement.task)}: {', '.join(f'`{n}`' for n in t.methods)}) come "
              f"from grid `{t.replacement.grid.name}`, with its own settings (under the table of scores)."
              for t in taken if t.methods],
            f"- {_collapse_words(grid, summary)}", ""]


def _the(where: str) -> str:
    """A claim row's place in a sentence: "mrpc", "the average of 4 tasks"."""
    return f"the {where}" if where.startswith("average") else where


PROTOCOL_WORDS = {"dev": "the dev set chose each rate and each run's best epoch and is also the set reported, so "
                          "the scores are optimistic (no held-out test set)",
                  SELECTION: "rates and epochs were chosen on a 10 % selection split of train, and dev, which chose "
                             "nothing, is reported as the test set"}


def _protocol_words(grid: Grid) -> str:
    """Which split chose the rates and epochs, in words, per protocol the grid's methods use."""
    by_protocol = defaultdict(list)
    for entry in grid.methods:
        by_protocol[grid.protocol_of(entry)].append(f"`{entry.name}`")
    if len(by_protocol) == 1:
        return next(iter(PROTOCOL_WORDS[p] for p in by_protocol)).capitalize() + "."
    return " ".join(f"{', '.join(names)}: {PROTOCOL_WORDS[p]}." for p, names in by_protocol.items())


def _collapse_words(grid: Grid, summary: dict) -> str:
    """How many runs at the chosen rates collapsed (the table's ‡), and the tasks whose majority-class score is
    unknown (so no run of theirs is flagged)."""
    flags = [flag for (task, _), s in summary.items() for flag in collapses(grid, summary, task, s["rows"])]
    unknown = sorted(task for task, line in collapse_lines(grid, summary).items() if line is None)
    return (f"{sum(flags)} of {len(flags)} runs at the chosen rates collapsed (‡ in the table: at or below the "
            "majority-class score; STS-B below half the median Pearson); they stay in the means and the tests."
            + (f" Not flagged, their majority-class score unknown (rows without it, no `$GLUE_DIR` or [train] "
               f"data_dir): {', '.join(unknown)}." if unknown else ""))


def _scores(grid: Grid, summary: dict) -> list[str]:
    """How many cells are complete, and the table of scores."""
    wanted = sum(len(e.tasks) for e in grid.methods) * len(grid.seeds)
    cells = sum(1 for s in summary.values() if complete(s, len(grid.seeds)))
    return [f"Cells complete at {len(grid.seeds)} seeds: {cells} of {sum(len(e.tasks) for e in grid.methods)}; "
            f"rows at the chosen rates: {sum(len(s['scores']) for s in summary.values())} of {wanted}.", "",
            "Dev score ×100 at the best checkpoint (mean ± sample std over seeds, [median] with three or "
            "more; MRPC F1, STS-B Pearson, CoLA Matthews, RTE/SST-2 accuracy), at each method's best learning "
            "rate on the sweep seed. ‡: one per collapsed seed (at or below the majority-class score; on "
            "STS-B a Pearson below half the median of the task's runs):", "", *table(grid, summary)]


def _replaced(grid: Grid, taken: list[Taken], first: dict) -> list[str]:
    """Under the table of scores, per [study] replace_cells: the cells it replaced (†), where they come from and
    how that grid differs, the methods that kept their cell, and this grid's own cells it replaced."""
    lines = []
    for t in taken:
        other, task = t.replacement.grid, t.replacement.task
        title = task_title(task)
        by_why = defaultdict(list)
        for name, why in t.kept.items():
            by_why[why].append(f"`{name}`")
        waiting = "; ".join(f"{why}: {', '.join(names)}" for why, names in by_why.items())
        if not t.methods:
            lines += ["", f"No {title} cell is replaced yet by grid `{other.name}` ({other.path}): a method's cell "
                          "is, once that grid has every seed of it" + (f" ({waiting})." if waiting else ".")]
            continue
        protocol = ([f"its protocol: {PROTOCOL_WORDS[other.protocol]}"] if other.protocol != grid.protocol else [])
        changes = differences(grid, other, task) + protocol
        lines += ["", f"†: {title} cells from grid `{other.name}` ({other.path}"
                  + (f": {other.title}" if other.title else "") + "), "
                  + (f"which differs from this grid in {'; '.join(changes)}" if changes else "run as this grid runs")
                  + f". Replaced: {', '.join(f'`{n}`' for n in t.methods)}"
                  + (f"; kept from this grid: {waiting}. " if waiting else ". ")
                  + "A claim between a † cell and another compares across these differences; the learning rates, "
                  "the score against learning rate and the training times below are this grid's own runs.", "",
                  f"*{title} as first run*: this grid's own cells that † replaces, as the table showed them (‡ "
                  "against the first run's median):", "", *first_run_table(grid, first, task, t.methods)]
    return lines


def _score_plot(grid: Grid, summary: dict, out: Path, img: Path) -> list[str]:
    path = img / f"{grid.name}-score-vs-params.png"
    plot_score_vs_params(grid, summary, path)
    return ["", f"![score vs trainable parameters]({path.relative_to(out.parent)})", ""]


def _selection_bias(grid: Grid, rows: list[dict], summary: dict) -> list[str]:
    """The bias of choosing on dev, where the grid runs a method under both protocols ([] otherwise)."""
    table = bias_table(grid, rows)
    if not table:
        return []
    return ["## Selection bias: the same method under both protocols", "",
            "Each pair runs one method, with the same arguments and rates, under the first round's protocol "
            "(rate and best epoch chosen on dev, dev reported) and under the selection protocol (trained on 90 % "
            "of train, epoch and rate chosen on the other 10 %, dev reported as a test set). Per rate: the mean "
            "dev score (×100) over the seeds each side has so far; *bias*: the first minus the second, what "
            "choosing on dev adds, mixed with the effect of training on 10 % less data. *Epoch choice alone*: on "
            "the selection-protocol runs themselves (the same training), dev at the epoch dev would choose minus "
            "dev at the epoch the selection split chose.", "", *table, "",
            "The rate each protocol chooses (on the sweep seed: dev for the first, the selection split for the "
            "second) and the mean dev score there:", "", *rate_choice_lines(grid, summary), ""]


def _budget(grid: Grid, summary: dict, out: Path, img: Path) -> list[str]:
    """Score against parameters for the budget families alone ([] when no task has two of their curves)."""
    panels = budget_panels(grid, summary)
    if not panels:
        return []
    path = plot_budget(panels, collapse_lines(grid, summary), img / f"{grid.name}-budget.png")
    return ["## Score against parameter budget", "", "The budget-matched families alone ("
            + ", ".join(f"`{f}`" for f in BUDGET_FAMILIES) + ", those the grid has) at each method's chosen rate: "
            "mean ± std over seeds, dots the seeds; dashed: the collapse line (the majority-class score; STS-B: "
            "half the median Pearson), runs below the axis sit on its bottom edge as triangles.", "",
            f"![score against trainable parameters, budget families]({path.relative_to(out.parent)})", ""]


def _claims(grid: Grid, claims: list[ClaimRow], explain: bool = True) -> list[str]:
    """The claims' section, how to read it (`explain`; else a pointer to the page's first claims table) and its
    table ([] when the grid has no claims)."""
    if not grid.claims:
        return []
    if not claims:
        return ["## The papers' claims", "", f"None of the {len(grid.claims)} claims has both its cells yet.", ""]
    if not explain:
        return ["## The papers' claims", "", "Columns and verdicts as in the first claims table of this page.", "",
                *claims_table(claims), ""]
    return ["## The papers' claims", "", "Each claim per task: the difference of the two cells' means, "
            "its 95 % confidence interval and p from Welch's t-test (unequal variances; with three "
            "seeds a cell, about 2-4 degrees of freedom, so the interval spans about ±3 to ±4 "
            "standard errors), "
            "and a verdict once both cells have every seed: *holds* or *reversed* when the interval "
            "excludes zero (p < 0.05), *within noise* otherwise, *optimisation failure* when every seed of "
            "one side collapsed (‡ on all of them; on an average row, on one of its tasks): such a row compares a "
            "failed optimisation, not the methods. Three seeds resolve only large "
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
            f"examples ({BOOTSTRAP_RESAMPLES:,} resamples) from the runs' kept predictions, where both cells have "
            f"them (no resample past zero: p < {2 / BOOTSTRAP_RESAMPLES:.2g}).", "",
            *claims_table(claims), ""]


def _extra_plots(grid: Grid, summary: dict, forest: list, out: Path, img: Path, whole: bool = True) -> list[str]:
    """The forest plot of the claims, and score against learning rate per task where some sweep has two rates or
    more (Markdown lines); `whole=False`: a companion's, whose table of learning rates is on its own page."""
    lines = []
    if forest:
        path = plot_forest(forest, img / f"{grid.name}-claims.png")
        if any(point.paper is not None for point in forest):
            lines += [PAPER_MARKERS, ""]
        lines += [f"![every claim: difference and 95 % interval]({path.relative_to(out.parent)})", ""]
    panels = {}
    for (task, name), s in summary.items():
        panels.setdefault(task, {})[name] = sorted(s["sweep"].items())
    if any(len(sweep) > 1 for by_method in panels.values() for sweep in by_method.values()):
        order = [t for t in grid.tasks if t in panels]
        path = plot_score_vs_lr({t: panels[t] for t in order}, collapse_lines(grid, summary),
                                img / f"{grid.name}-score-vs-lr.png")
        chose = (" (the selection split chose the rate: its scores are in the table of learning rates"
                 f"{'' if whole else ' of its own page'})" if _chosen_off_dev(summary) else "")
        lines += ["## Score against learning rate", "", f"Each method's sweep (seed {grid.sweep_seed}), dev "
                  f"score{chose}; dashed: the collapse line (the majority-class score; STS-B: half the "
                  "median Pearson); runs below the axis sit on its edge as triangles.", "",
                  f"![score against learning rate]({path.relative_to(out.parent)})", ""]
    return lines


def _chosen_off_dev(summary: dict) -> bool:
    """Some sweep chose its rate by other scores than dev's (the selection split's)."""
    return any(s["chose"] != s["sweep"] for s in summary.values())


def _rates(grid: Grid, summary: dict) -> list[str]:
    chose = _chosen_off_dev(summary)
    scores = ("scores: the selection split's, which chose the winner, then dev's (*selection / dev*)" if chose
              else "dev score")
    return ["## Learning rates", "", "The winner in bold; each sweep value with its seed-"
            f"{grid.sweep_seed} {scores}. ↑ / ↓: the winner is the highest / lowest rate swept, so the "
            "best rate may lie beyond the sweep" + ("." if grid.extend_edges else " (this grid does not "
            "extend a sweep past its edge: with two values the winner always sits at one)."), "",
            "*One rate for every task*: of the rates a method swept on every task whose sweep has "
            "finished, the one whose score falls least below each task's best, on average (in points, "
            "whatever the task's metric)" + (", on the scores that chose the rates." if chose else "."), "",
            *lr_table(grid, summary)]


def _seeds_and_epochs(grid: Grid, summary: dict) -> list[str]:
    lines = ["", "## Every seed", "", "Each seed's dev score (×100) at the cell's chosen rate: the rows behind "
             "the table's means.", "", *seeds_table(grid, summary)]
    curves = epochs_table(grid, summary)
    if curves:
        lines += ["", "## Dev score after each epoch", "", "At each cell's chosen rate, mean over the seeds "
                  "whose rows carry their curve (×100). "
                  "*last gain*: the last epoch's change, the check that the epochs were enough.", "", *curves]
    return lines


def _times(grid: Grid, summary: dict, reference: str, out: Path, img: Path) -> list[str]:
    """Training time relative to `reference`: the plot and its table ([] when no pair of cells has it)."""
    ratios = time_ratios(grid, summary, reference)
    if not ratios:
        return []
    plot2 = img / f"{grid.name}-train-time.png"
    plot_times(ratios, reference, plot2, grid.tasks)
    machines = sorted({m for by_task in ratios.values() for _, _, m in by_task.values()}, key=str)
    mark = {m: chr(ord('A') + i) if len(machines) > 1 else "" for i, m in enumerate(machines)}
    lines = ["", "## Training time", "", f"Median training time per cell relative to `{reference}` on the "
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
    return lines


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
