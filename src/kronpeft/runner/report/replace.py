"""Cells a page takes from another grid ([study] replace_cells): per method, the other grid's rows of a task
stand in for this grid's once that grid has every seed of the method; the rest keep this grid's cells."""
from __future__ import annotations

from dataclasses import dataclass

from ..study.grid import Grid, Replacement, argv
from ..study.results import current_rows, read_results
from .stats import complete, summarise


@dataclass
class Taken:
    """What one replacement did: the methods whose cell it replaced, and why each other method kept its own."""
    replacement: Replacement
    methods: list[str]
    kept: dict[str, str]


def take_cells(grid: Grid, rows: list[dict]) -> tuple[list[dict], list[Taken]]:
    """The page's rows: `rows` (this grid's) with each replaced cell's rows swapped for the other grid's (all of
    that cell's there, so its sweep chooses the rate again), and what each replacement did."""
    taken = []
    for replacement in grid.replace_cells:
        other, task = replacement.grid, replacement.task
        theirs = [_resolved(other, r) for r in current_rows(other, read_results(other.results))[0]
                  if r["task"] == task]
        summary, names = summarise(other, theirs), {e.name for e in other.methods}
        replaced, kept = [], {}
        for entry in (e for e in grid.methods if task in e.tasks):
            cell = summary.get((task, entry.name))
            if entry.name not in names:
                kept[entry.name] = f"not in grid {other.name}"
            elif cell is None or len(cell["scores"]) < len(other.seeds):
                kept[entry.name] = f"{0 if cell is None else len(cell['scores'])} of {len(other.seeds)} seeds there"
            elif not complete(cell, len(other.seeds)):
                kept[entry.name] = "sweep not finished there"
            else:
                replaced.append(entry.name)
        rows = [r for r in rows if not (r["task"] == task and r["name"] in replaced)] + \
               [r for r in theirs if r["name"] in replaced]
        taken.append(Taken(replacement, replaced, kept))
    return rows, taken


def _resolved(other: Grid, row: dict) -> dict:
    """A row of `other` whose kept predictions (a path relative to its results file) are found from any folder."""
    if not row.get("predictions"):
        return row
    return {**row, "predictions": str((other.results.parent / row["predictions"]).resolve())}


def differences(grid: Grid, other: Grid, task: str) -> list[str]:
    """How `other` runs `task` unlike `grid`, in words: its model and each training flag that differs
    ("`--label-mean-bias`", "no `--no-dropout`")."""
    mine = {**grid.train, **grid.task_train.get(task, {})}
    theirs = {**other.train, **other.task_train.get(task, {})}
    out = [f"model {other.model}"] if other.model != grid.model else []
    for key in {**mine, **theirs}:
        if mine.get(key) != theirs.get(key):
            flag = " ".join(argv({key: theirs.get(key)}))
            out.append(f"`{flag}`" if flag else f"no `--{key.replace('_', '-')}`")
    return out
