"""Add the dev curve to results rows recorded before rows carried one (a one-off, issue 7).

Rows of `kronpeft study` record `curve` (the main metric at every evaluation) since the curve was added;
the rows recorded earlier lack it, but their runs' `log.jsonl` still hold every evaluation. For each such
row this reads its run's log, keeps the last record of each evaluation step (a resumed run may have logged
a step twice), and adds the curve only if it agrees with the row: its best after step 0 is the row's
score and its last is the row's final score. Rows whose log is missing or disagrees are left as they are.
The results file is replaced atomically; refused while a runner trains a run of the grid (it could append
to the file being replaced).

    python benchmarks/study/add_curves.py benchmarks/study/glue-minilm.toml \
        --runs-dir /work/study/runs/study/glue-minilm
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
from pathlib import Path

from kronpeft.atomic import write_atomic
from kronpeft.runner.study.grid import load_grid
from kronpeft.runner.study.results import read_results


def curve_from_log(log: Path, main: str) -> list[list[float]] | None:
    if not log.is_file():
        return None
    evals = {}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if record.get("type") == "eval" and main in record:
            evals[record["step"]] = [record["epoch"], record[main]]
    return [evals[step] for step in sorted(evals)] or None


def runner_active(runs_dir: Path) -> bool:
    for lock in runs_dir.glob("*/*/*/.study.lock"):
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path)
    parser.add_argument("--runs-dir", type=Path, help="the grid's run folders (default: the grid's runs_dir)")
    args = parser.parse_args()
    grid = load_grid(args.grid)
    runs_dir = args.runs_dir or grid.runs_dir
    if runner_active(runs_dir):
        raise SystemExit(f"a runner is training runs in {runs_dir}: stop it first")
    rows = read_results(grid.results)
    if len(rows) != sum(1 for line in grid.results.read_text().splitlines() if line.strip()):
        raise SystemExit(f"{grid.results} has malformed lines, which a rewrite would drop: mend them first")
    added, left = 0, []
    for row in rows:
        if row.get("grid") != grid.name or row.get("curve"):
            continue
        main_metric = row["main_metric"]
        curve = curve_from_log(runs_dir / row["task"] / row["name"] / f"lr{row['lr']:g}-seed{row['seed']}"
                               / "log.jsonl", main_metric)
        trained = [score for epoch, score in curve or [] if epoch > 0]
        if not trained or max(trained) != row["score"] or trained[-1] != row["final"][main_metric]:
            left.append(f"{row['task']}/{row['name']}/lr{row['lr']:g}/seed{row['seed']}")
            continue
        row["curve"] = curve
        added += 1
    if added:
        text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        write_atomic(grid.results, lambda tmp: tmp.write_text(text))
    print(f"added {added} curve(s) to {grid.results}; left without: {', '.join(left) or 'none'}")


if __name__ == "__main__":
    main()
