"""A results-file row as `kronpeft study` records it, written by hand for the report's tests."""
from __future__ import annotations

import json

from kronpeft.runner.study import grid as study_grid


def study_row(grid, task, name, lr, seed, score, params=1000, **fields) -> dict:
    """Method `name`'s sweep run on `task` at `lr` and `seed`, dev score `score`; `fields` add or override."""
    entry = next(e for e in grid.methods if e.name == name)
    return {"key": study_grid.Run(task, entry, lr, seed, "sweep").key(grid), "grid": grid.name, "task": task,
            "name": name, "method": entry.method, "family": entry.family, "lr": lr, "seed": seed, "stage": "sweep",
            "score": score, "main_metric": "pearson" if task == "stsb" else "f1", "trainable_params": params,
            "head_params": 0, "total_params": 10**6, "train_seconds": 1.0, "wall_seconds": 1.0, "steps": 1,
            "threads": 1, "cpu": "test", "protocol": grid.protocol_of(entry), **fields}


def write_rows(grid, rows):
    grid.results.write_text("".join(json.dumps(r) + "\n" for r in rows))
