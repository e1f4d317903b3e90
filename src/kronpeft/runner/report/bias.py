"""The selection bias of the first round's protocol, for a grid that runs the same method under both protocols:
per rate, dev chosen on dev against dev chosen on the selection split, and the epoch choice alone on the
selection-protocol runs (which record dev at every epoch)."""
from __future__ import annotations

import statistics

from ..selection import SELECTION
from ..study.grid import Grid, MethodEntry


def protocol_pairs(grid: Grid) -> list[tuple[MethodEntry, MethodEntry]]:
    """(dev-protocol entry, selection-protocol entry) for each selection-protocol method whose twin under the
    dev protocol has the same method, args and rates."""
    dev = [e for e in grid.methods if grid.protocol_of(e) == "dev"]
    pairs = []
    for entry in grid.methods:
        if grid.protocol_of(entry) != SELECTION:
            continue
        twin = next((d for d in dev if (d.method, d.args, sorted(d.lrs)) == (entry.method, entry.args,
                                                                              sorted(entry.lrs))), None)
        if twin is not None:
            pairs.append((twin, entry))
    return pairs


def epoch_choice_gap(row: dict) -> float | None:
    """Dev at the epoch dev would choose (its best after step 0) minus dev at the epoch the row's run chose (its
    score), from the row's dev curve; None without one."""
    trained = [score for epoch, score in row.get("curve") or [] if epoch > 0]
    return max(trained) - row["score"] if trained else None


def _one_per_seed(rows: list[dict], task: str, name: str, lr: float) -> list[dict]:
    """The rows of one method, task and rate, one per seed (the last recorded, as the score table takes)."""
    return list({r["seed"]: r for r in rows if (r["task"], r["name"], r["lr"]) == (task, name, lr)}.values())


def _mean(values: list[float], wanted: int) -> str:
    """Mean ×100 and how many seeds it holds: "82.0 (3 of 3 seeds)", "— (0 of 3 seeds)"."""
    return f"{100 * statistics.fmean(values):.1f} ({len(values)} of {wanted} seeds)" if values else \
        f"— (0 of {wanted} seeds)"


def bias_table(grid: Grid, rows: list[dict]) -> list[str]:
    """Per protocol pair, task and rate: mean dev score under each protocol, their difference (the bias) and the
    epoch choice alone on the selection-protocol runs; [] when the grid has no pair."""
    pairs, wanted = protocol_pairs(grid), len(grid.seeds)
    if not pairs:
        return []
    lines = ["| dev protocol / selection protocol | task | lr | dev score, chosen on dev | dev score, chosen on the "
             "selection split | bias (dev − selection) | epoch choice alone, selection runs |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for dev, sel in pairs:
        for task in (t for t in grid.tasks if t in dev.tasks and t in sel.tasks):
            for lr in sorted(dev.lrs):
                old = [r["score"] for r in _one_per_seed(rows, task, dev.name, lr)]
                new = _one_per_seed(rows, task, sel.name, lr)
                gaps = [g for g in map(epoch_choice_gap, new) if g is not None]
                new = [r["score"] for r in new]
                bias = f"{100 * (statistics.fmean(old) - statistics.fmean(new)):+.1f}" if old and new else "—"
                gap = f"{100 * statistics.fmean(gaps):+.1f} ({len(gaps)} of {wanted} seeds)" if gaps else "—"
                lines.append(f"| `{dev.name}` / `{sel.name}` | {task} | {lr:g} | {_mean(old, wanted)} | "
                             f"{_mean(new, wanted)} | {bias} | {gap} |")
    return lines


def rate_choice_lines(grid: Grid, summary: dict) -> list[str]:
    """Per protocol pair and task, the rate each protocol chooses (on its sweep seed) and the mean dev score at
    it: the bias of the whole protocol, rate and epoch."""
    lines = []
    for dev, sel in protocol_pairs(grid):
        for task in (t for t in grid.tasks if t in dev.tasks and t in sel.tasks):
            old, new = summary.get((task, dev.name)), summary.get((task, sel.name))
            line = (f"- `{dev.name}` / `{sel.name}` on {task}: {_chosen(grid, 'the dev protocol', dev, old)}; "
                    f"{_chosen(grid, 'the selection protocol', sel, new)}")
            if old and new:
                bias = statistics.fmean(old["scores"]) - statistics.fmean(new["scores"])
                line += f": the whole protocol's bias is {100 * bias:+.1f}"
            lines.append(line + ".")
    return lines


def _chosen(grid: Grid, protocol: str, entry: MethodEntry, cell: dict | None) -> str:
    """"the dev protocol chooses 0.01, where dev scores 86.9 (3 of 3 seeds)", or that its sweep seed has not run."""
    if cell is None:
        return f"{protocol} has no run of the sweep seed yet"
    swept = f" (the sweep seed has run {len(cell['sweep'])} of {len(entry.lrs)} rates)" \
        if len(cell["sweep"]) < len(entry.lrs) else ""
    return f"{protocol} chooses {cell['lr']:g}{swept}, where dev scores {_mean(cell['scores'], len(grid.seeds))}"
