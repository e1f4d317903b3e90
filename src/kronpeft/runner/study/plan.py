"""What is left to run: every rate of each sweep (seed `sweep_seed`), the sweep's best rate, one more rate
beyond its edge when the edge wins, then the other seeds at the best rate."""
from __future__ import annotations

from ..selection import choice_score
from .grid import Grid, MethodEntry, Run
from .results import read_results


def best_lr(rows: list[dict]) -> float:
    """The learning rate whose sweep run scored highest, on the split its protocol chooses on (ties: the
    smaller rate)."""
    return max(rows, key=lambda r: (choice_score(r), -r["lr"]))["lr"]


def _next_lr(lrs: tuple[float, ...], winner: float, factor: float | None = None) -> float | None:
    """One more rate beyond the edge of a sorted sweep that `winner` sits on, `factor` times (or over) that
    edge, by default the sweep's own ratio there; None when the winner is inside the sweep."""
    lrs = tuple(sorted(lrs))
    if len(lrs) < 2 or lrs[0] < winner < lrs[-1]:
        return None
    if winner == lrs[0]:
        return float(f"{lrs[0] / (factor or lrs[1] / lrs[0]):.3g}")
    return float(f"{lrs[-1] * (factor or lrs[-1] / lrs[-2]):.3g}")


def runs_left(grid: Grid) -> tuple[int, int]:
    """Runs of the grid not recorded yet (those that can start and those waiting for their sweep), and how
    many more may run, depending on where the sweeps' winners land (see `maybe_needed`)."""
    rows = [r for r in read_results(grid.results, warn=lambda _: None) if grid.holds(r)]
    todo, waiting = plan(grid, rows)
    maybe = len(maybe_needed(grid, rows, waiting))
    return len(todo) + len(waiting) - maybe, maybe


def maybe_needed(grid: Grid, rows: list[dict], waiting: list[Run]) -> list[Run]:
    """The waiting runs that may never run: seeds already recorded at their cell's present best rate (run
    again only if the pending edge extension beats it), and the extension of a sweep of three or more
    rates (only if its winner lands on an edge; with two rates it always does)."""
    done = {r["key"] for r in rows}
    out = []
    for run in waiting:
        if run.stage == "sweep":
            if len(run.entry.lrs) > 2:
                out.append(run)
            continue
        recorded = [r for r in _sweep_rows(grid, rows, run.task, run.entry) if r["lr"] in run.entry.lrs]
        if recorded and Run(run.task, run.entry, best_lr(recorded), run.seed, "seed").key(grid) in done:
            out.append(run)
    return out


def _sweep_rows(grid: Grid, rows: list[dict], task: str, entry: MethodEntry) -> list[dict]:
    """The recorded sweep runs (sweep seed) of one (task, method) cell."""
    return [r for r in rows if r["task"] == task and r["name"] == entry.name and r["seed"] == grid.sweep_seed
            and r.get("stage") == "sweep"]


def plan(grid: Grid, rows: list[dict]) -> tuple[list[Run], list[Run]]:
    """The runs left that can start now (task by task: the sweeps, then the seeds; methods in grid order)
    and the runs waiting for their sweep to choose the rate (`lr` None): the seeds, and with `extend_edges`
    the sweep's extension."""
    done = {r["key"] for r in rows}
    others = [s for s in grid.seeds if s != grid.sweep_seed]  # run at the sweep's best rate
    todo, waiting = [], []
    for task in grid.tasks:
        for entry in grid.methods:
            if task not in entry.tasks:
                continue
            lrs = entry.lrs
            if grid.every_seed_every_rate:  # no choice to wait for: every (rate, seed) is a sweep run
                todo += [run for lr in lrs for s in grid.seeds
                         if (run := Run(task, entry, lr, s, "sweep")).key(grid) not in done]
                continue
            sweep = [Run(task, entry, lr, grid.sweep_seed, "sweep") for lr in lrs]
            recorded = _sweep_rows(grid, rows, task, entry)
            if grid.extend_edges and all(run.key(grid) in done for run in sweep):
                extra = _next_lr(lrs, best_lr([r for r in recorded if r["lr"] in lrs]), grid.edge_factor)
                if extra is not None:
                    sweep.append(Run(task, entry, extra, grid.sweep_seed, "sweep"))
            left = [run for run in sweep if run.key(grid) not in done]
            if left:
                todo += left
                if grid.extend_edges and len(sweep) == len(lrs):  # its edge extension: rate not known yet
                    waiting.append(Run(task, entry, None, grid.sweep_seed, "sweep"))
                waiting += [Run(task, entry, None, s, "seed") for s in others]
                continue
            lr = best_lr([r for r in recorded if r["lr"] in {run.lr for run in sweep}])
            todo += [run for s in others
                     if (run := Run(task, entry, lr, s, "seed")).key(grid) not in done]
    order = {task: i for i, task in enumerate(grid.tasks)}  # per task: every sweep first, then the seeds
    return sorted(todo, key=lambda run: (order[run.task], run.stage == "seed")), waiting
