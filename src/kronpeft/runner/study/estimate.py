"""`kronpeft study --dry-run`: the runs left, and the CPU time they should take, from recorded rows."""
from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict

from ..errors import UsageError
from ..train.checkpoints import CHECKPOINT, STATE_FILE, read_checkpoint_state
from .grid import Grid, Run
from .plan import maybe_needed, plan
from .results import cpu_seconds, machine, read_results


def _train_size(task: str, data_dir: str | None) -> tuple[int, float] | None:
    """(training examples, mean characters per example) of a task, None when its data is not at hand."""
    from ..data import load_split

    try:
        examples = load_split(task, "train", data_dir)
    except Exception:  # no data here: the estimate says it guessed
        return None
    chars = [len(e.text_a) + len(e.text_b or "") for e in examples]
    return len(examples), sum(chars) / len(chars)


def _steps_done(run: Run, grid: Grid) -> int:
    """Steps an interrupted run has behind it: its checkpoint's (it resumes there), 0 without one (or before
    its sweep has chosen its rate, `lr` None)."""
    if run.lr is None or not (run.folder(grid) / CHECKPOINT / STATE_FILE).is_file():
        return 0
    try:
        return max(read_checkpoint_state(run.folder(grid) / CHECKPOINT)["step"], 0)
    except UsageError:  # not a checkpoint `--resume` accepts: the whole run is counted
        return 0


def _step_cost(row: dict) -> float:
    """CPU-seconds per training step of a recorded run."""
    return cpu_seconds(row) / max(row["steps"], 1)


def _speed_factors(rows: list[dict], here: str) -> dict[str, float]:
    """{processor: its cost per step scaled to `here`'s}: the median, over the (task, method) pairs both ran,
    of the ratio of their median costs per step; a processor with no pair in common with `here` is absent."""
    cost = defaultdict(list)
    for r in rows:
        cost[(r.get("cpu"), r["task"], r["name"])].append(_step_cost(r))
    ratios = defaultdict(list)
    for (cpu, task, name), costs in cost.items():
        if cpu != here and (here, task, name) in cost:
            ratios[cpu].append(statistics.median(cost[(here, task, name)]) / statistics.median(costs))
    return {cpu: statistics.median(r) for cpu, r in ratios.items()}


def estimate_seconds(grid: Grid, runs: list[Run], rows: list[dict], here: str | None = None) -> tuple[float, int]:
    """CPU-seconds (wall x threads) the runs should take on processor `here` (default: this machine's), and how
    many of them were guessed.

    Steps per run: a recorded run of the same task and schedule, else the task's training-set size, less
    the steps an interrupted run's checkpoint already holds.
    Cost per step: the median of recorded runs of the same task and method, else of the task, else of
    any task scaled by the tasks' mean characters per example; a row from another processor counts at the
    speed ratio measured on cells both ran (`_speed_factors`). `rows` may come from any grid; only
    those of the grid's model are used."""
    rows = [r for r in rows if r.get("flags", {}).get("model") == grid.model]
    speed = _speed_factors(rows, machine()["cpu"] if here is None else here)
    data_dir = grid.train.get("data_dir") or os.environ.get("GLUE_DIR")
    sizes = {}

    def size(task):
        if task not in sizes:
            sizes[task] = _train_size(task, data_dir)
        return sizes[task]

    def per_step(select):
        costs = [_step_cost(r) * speed.get(r.get("cpu"), 1.0) for r in rows if select(r)]
        return statistics.median(costs) if costs else None

    total, unknown = 0.0, 0
    for run in runs:
        flags = run.flags(grid)
        steps = next((r["steps"] for r in rows if r["task"] == run.task and r.get("flags", {}).get("epochs")
                      == flags.get("epochs") and r.get("flags", {}).get("batch_size") == flags.get("batch_size")),
                     None)
        if steps is None and size(run.task) is not None:
            steps = math.ceil(float(flags.get("epochs", 1)) * size(run.task)[0] / int(flags.get("batch_size", 32)))
        rate = per_step(lambda r: r["task"] == run.task and r["name"] == run.entry.name) \
            or per_step(lambda r: r["task"] == run.task)
        if rate is None and size(run.task) is not None:
            known = [(t, per_step(lambda r, t=t: r["task"] == t)) for t in {r["task"] for r in rows}]
            scaled = [c * size(run.task)[1] / size(t)[1] for t, c in known if c and size(t) is not None]
            rate = statistics.median(scaled) if scaled else None
        if rate is None or steps is None:
            unknown += 1
            rate, steps = rate or 3.0, steps or 500
        total += rate * max(steps - _steps_done(run, grid), 0)
    return total, unknown


def dry_run(grid: Grid, threads: int, parallel: int):
    all_rows = read_results(grid.results)  # other grids' rows too: their rates per step help the estimate
    rows = [r for r in all_rows if grid.holds(r)]
    todo, waiting = plan(grid, rows)
    maybe = maybe_needed(grid, rows, waiting)
    for run in todo:
        print(f"{run.stage:5}  {run.label()}")
    for run in waiting:
        if run.stage == "sweep":
            why = "the sweep's edge extension" + (" if its winner lands on an edge" if run in maybe else "")
        elif run in maybe:
            why = "only if the edge extension beats the rate this seed ran at"
        else:
            why = "waits for the sweep's best lr"
        print(f"later  {run.label()} ({why})")
    here = machine()["cpu"]  # once: it imports torch and reads /proc/cpuinfo
    certain, unknown = estimate_seconds(grid, todo + [r for r in waiting if r not in maybe], all_rows, here)
    extra, unknown_extra = estimate_seconds(grid, maybe, all_rows, here)
    unknown += unknown_extra

    def hours(cores=1):
        return f"{certain / 3600 / cores:.1f}" + (f"-{(certain + extra) / 3600 / cores:.1f}" if maybe else "")

    print(f"{len(rows)} runs recorded in {grid.results}; {len(todo)} can start now, {len(waiting)} more wait for "
          f"their sweep" + (f" ({len(maybe)} of them may not be needed, as listed)" if maybe else "")
          + f"; estimate {hours()} CPU-hours, {hours(max(parallel * threads, 1))} h wall with {parallel} x {threads} "
          f"thread(s)" + (f" ({unknown} runs with no recorded row or data to go by: guessed at 3 s x 500 steps)"
                          if unknown else ""))
