"""Running a grid: each run is `python -m kronpeft train ...` in a subprocess with its own output folder,
claimed by a lock; its row is appended to the results file once it ends."""
from __future__ import annotations

import fcntl
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from ..errors import UsageError
from ..feedback import stderr_line
from ..selection import SELECTION, keep_predictions
from ..train.checkpoints import CHECKPOINT, STATE_FILE
from .grid import Grid, Run, argv
from .plan import plan, runs_left
from .results import _git_commit, _warn, append_row, machine, read_results


def say(message: str):
    """One progress line on stderr, written whole (the runs' threads print side by side)."""
    stderr_line(f"kronpeft study: {message}")


def run_one(grid: Grid, run: Run, threads: int, parallel: int, host: dict) -> dict | str | None:
    """Train one run in a subprocess (resuming its checkpoint if any) and build its results row;
    None when it failed, "busy" when another runner holds it."""
    out = run.folder(grid)
    flags = {**run.flags(grid), "output_dir": str(out)}
    cmd = ["train", *argv(flags)]
    if (out / CHECKPOINT / STATE_FILE).is_file() or (out / "metrics.json").is_file():
        cmd.append("--resume")
    else:
        cmd.append("--overwrite")
    out.mkdir(parents=True, exist_ok=True)
    claim = os.open(out / ".study.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:  # another runner on the same grid is training this run: leave it to that one
        fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(claim)
        say(f"skip {run.label()}: another runner is training it")
        return "busy"
    say(f"start {run.label()} ({run.stage})")  # only once it holds it
    try:
        return _train(grid, run, out, flags, cmd, threads, parallel, host, claim)
    finally:
        os.close(claim)  # the lock is released once the child has ended too


_children: set[subprocess.Popen] = set()  # the runs this runner is training now


_stopping = False  # set by SIGTERM: the runs it ends are not failures


def run_child(argv: list[str], env: dict, log, keep_fds: tuple[int, ...] = ()) -> tuple[int, float]:
    """Run `argv` to its end, output to `log`: (exit code, CPU seconds it used, user + system). CPU time,
    unlike wall time, does not grow when other work shares the machine. The child inherits `keep_fds`
    (the run's claim lock: a child that outlives a killed runner still holds its run)."""
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, pass_fds=keep_fds)
    _children.add(proc)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # interrupted: take the child down too, as subprocess.run does
        proc.kill()
        proc.wait()
        raise
    finally:
        _children.discard(proc)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def stop_on_sigterm(signum, frame):
    """SIGTERM to the runner (`kill`, a job scheduler) ends its runs too; they resume from their checkpoints."""
    global _stopping
    _stopping = True
    say("stopping (SIGTERM); the runs resume from their checkpoints")
    for proc in list(_children):
        proc.kill()
    raise SystemExit(128 + signum)


def _checkpoint_cpu_seconds(out: Path) -> float:
    """CPU seconds the interrupted parts of a run used up to its checkpoint (0 when unknown): a resumed
    run's row counts every part, not only the last."""
    try:
        cpu = json.loads((out / CHECKPOINT / STATE_FILE).read_text()).get("cpu_seconds")
    except (OSError, ValueError, AttributeError):
        return 0.0
    return float(cpu) if isinstance(cpu, (int, float)) else 0.0


def _train(grid: Grid, run: Run, out: Path, flags: dict, cmd: list[str], threads: int, parallel: int,
           host: dict, claim: int) -> dict | None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    earlier_cpu = _checkpoint_cpu_seconds(out) if "--resume" in cmd else 0.0
    commit = _git_commit()  # the code the child is about to load
    started = time.time()
    with open(out / "study.log", "a") as log:
        code, cpu = run_child([sys.executable, "-m", "kronpeft", *cmd], env, log, keep_fds=(claim,))
    wall = time.time() - started
    if code != 0 or not (out / "metrics.json").is_file():
        if not _stopping:
            _warn(f"{run.label()} failed (exit {code}); see {out / 'study.log'}")
        return None
    m = json.loads((out / "metrics.json").read_text())
    main = m["main_metric"]
    chosen_on = m.get("chosen_on", main)
    protocol = {"protocol": grid.protocol_of(run.entry), "chosen_on": chosen_on,
                "majority_baseline": (m.get("majority_baseline") or {}).get(main),
                "selection_score": m["best"].get(f"{main}_{SELECTION}"),
                **keep_predictions(out, grid.results, grid.name, run.key(grid))}
    return {**protocol,
        "key": run.key(grid), "grid": grid.name, "task": run.task, "name": run.entry.name,
        "method": run.entry.method, "family": run.entry.family, "lr": run.lr, "seed": run.seed,
        "stage": run.stage, "grid_seeds": len(grid.seeds),
        "score": m["best"][main], "main_metric": main, "best": m["best"], "final": m["final"],
        "best_step": m["best_step"], "before_training": m.get("before_training"),
        "curve": [[e["epoch"], e[main]] for e in m.get("evals", []) if main in e],
        "selection_curve": [[e["epoch"], e[chosen_on]] for e in m.get("evals", []) if chosen_on in e]
        if chosen_on != main else None,
        "trainable_params": m["trainable_params"], "head_params": m.get("head_params"),
        "total_params": m["total_params"], "train_seconds": m["train_seconds"],
        "train_cpu_seconds": m.get("train_cpu_seconds"),
        "peak_memory_mb": m["peak_memory_mb"], "steps": m["steps"], "wall_seconds": round(wall, 1),
        "cpu_seconds": round(earlier_cpu + cpu, 1), "resumed": "--resume" in cmd,
        "threads": threads, "parallel": parallel, "load_average": [round(v, 2) for v in os.getloadavg()],
        "flags": flags,
        "command": "kronpeft " + shlex.join(cmd[:-1]), "commit": commit,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **host,
    }


def run_grid(grid: Grid, threads: int = 1, parallel: int = 1, max_runs: int | None = None) -> int:
    """Run what is left of the grid, `parallel` runs at a time; returns how many runs were recorded."""
    _check_writable(grid)
    host = machine()
    in_flight: dict = {}
    failed: set[str] = set()  # not retried by this invocation (a rerun of the command tries again)
    recorded = 0
    launched = 0
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        while True:
            rows = [r for r in read_results(grid.results) if grid.holds(r)]
            todo, _ = plan(grid, rows)
            busy = {run.key(grid) for run in in_flight.values()}
            todo = [r for r in todo if r.key(grid) not in busy | failed]
            while todo and len(in_flight) < parallel and (max_runs is None or launched < max_runs):
                run = todo.pop(0)
                in_flight[pool.submit(run_one, grid, run, threads, parallel, host)] = run
                launched += 1
            if not in_flight:
                return recorded
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:
                run = in_flight.pop(future)
                row = future.result()
                if row is None or row == "busy":
                    failed.add(run.key(grid))
                elif append_row(grid.results, row):
                    recorded += 1
                    left, maybe = runs_left(grid)
                    more = f" (+{maybe} depending on the sweeps' winners)" if maybe else ""
                    say(f"done {run.label()}: {row['main_metric']} {row['score']:.4f} ({row['wall_seconds']:.0f} s); "
                        f"{left} runs of the grid left{more}")
                else:  # the file already holds this grid's row for it: never launch it again
                    failed.add(run.key(grid))


def _check_writable(grid: Grid):
    """Before any run: a finished run must never fail to be recorded."""
    try:
        grid.results.parent.mkdir(parents=True, exist_ok=True)
        with open(grid.results, "a"):
            pass
        grid.runs_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(grid.runs_dir, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as err:
        raise UsageError(f"grid {grid.path}: cannot write its results file {grid.results} or run folders in "
                         f"{grid.runs_dir} ({err.strerror or err}); fix [study] results / runs_dir or the "
                         f"folders' permissions") from None
