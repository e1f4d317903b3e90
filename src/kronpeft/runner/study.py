"""`kronpeft study`: run a grid of `kronpeft train` runs and record one JSON line per finished run.

A grid is a TOML file (see benchmarks/study/*.toml):

    [study]  name, model, results (path of the .jsonl, relative to the grid file), seeds, sweep_seed,
             tasks, extend_edges (add one learning rate beyond a sweep's edge when the edge wins),
             edge_factor (that rate is the edge's times or over this; default the sweep's own ratio),
             notes (a Markdown file the report inserts before its setup section), title (the page's)
    [train]  flags every run shares (epochs, batch_size, max_length, ...), as `kronpeft train` spells them
    [[method]] name (the row label), method (`--method`), family (the line a plot joins), lrs (the sweep),
               optional tasks (a subset) and args (more `kronpeft train` flags)

Stage 1 runs every learning rate of a method's sweep with `sweep_seed`; stage 2 runs the other seeds at
the learning rate that scored best on dev. Each run is `python -m kronpeft train ...` in a subprocess (the
code path users run), with its own output folder; a finished run is appended to the results file under an
exclusive lock, so runners side by side never write the same row twice. Runs already recorded are skipped;
an interrupted run resumes from its checkpoint.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .gridcheck import check_shape
from .selection import SELECTION, choice_score, keep_predictions
from .errors import UsageError
from .train.checkpoints import CHECKPOINT, STATE_FILE

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# -- the grid -------------------------------------------------------------------------------------------

RUN_FLAGS = {"model", "task", "method", "lr", "seed", "output_dir"}  # set by the grid per run, never in a table


@dataclass(frozen=True)
class MethodEntry:
    name: str
    method: str
    family: str
    lrs: tuple[float, ...]
    tasks: tuple[str, ...]
    args: dict = field(default_factory=dict, hash=False, compare=False)
    protocol: str | None = None  # overrides the grid's (two protocols side by side in one grid)


@dataclass(frozen=True)
class Claim:
    """A paper's claim the report checks: method `better` scores above method `worse` on each task."""
    text: str
    better: str
    worse: str


@dataclass
class Grid:
    path: Path
    name: str
    model: str
    results: Path
    seeds: tuple[int, ...]
    sweep_seed: int
    tasks: tuple[str, ...]
    train: dict
    methods: list[MethodEntry]
    task_train: dict = field(default_factory=dict)  # {task: flags that task overrides}, from [task.<name>]
    extend_edges: bool = True
    edge_factor: float | None = None  # None: the ratio of the sweep's two values nearest the edge
    runs_dir: Path = Path("runs/study")
    notes: Path | None = None  # hand-written Markdown the report inserts (diagnosis, discussion)
    title: str | None = None
    claims: list[Claim] = field(default_factory=list)
    protocol: str = "dev"  # "dev": rate and epoch chosen on dev (the first round); "selection": on a split of train
    split_seed: int = 0  # the selection split's seed (one for the whole grid)
    reuse: tuple[str, ...] = ()  # other grids whose rows count here when their key (flags) matches a run's
    every_seed_every_rate: bool = False  # run every seed at every rate (no seed stage): measures the selection
    page: Path | None = None  # where `kronpeft report` writes by default (else <grid file>.md)

    def protocol_of(self, entry: MethodEntry) -> str:
        return entry.protocol or self.protocol

    def holds(self, row: dict) -> bool:
        """The row belongs to this grid (its own, or a reused grid's)."""
        return row.get("grid") == self.name or row.get("grid") in self.reuse


def _list(value, kinds: tuple[type, ...], what: str, field: str) -> tuple:
    """`value` as a tuple when it is a non-empty list of `kinds` without repeats, else a UsageError on `field`."""
    ok = (isinstance(value, list) and value and len(set(value)) == len(value)
          and all(isinstance(v, kinds) and not isinstance(v, bool) for v in value))
    if not ok:
        raise UsageError(f"{field} must be a non-empty list of {what} without repeats, got {value!r}")
    return tuple(value)


def _no_run_flags(table: dict, field: str):
    """Refuse flags the grid sets per run in a table of shared flags (`[train]`, `[task.X]`, a method's args)."""
    fixed = sorted(set(table) & RUN_FLAGS)
    if fixed:
        raise UsageError(f"{field} sets {fixed}, which the grid sets per run (model in [study], tasks, methods, lrs, "
                         f"seeds); set only training flags there (epochs, batch_size, max_length, ...)")


def load_grid(path: str | os.PathLike) -> Grid:
    """Parse and check a grid file; every problem is a UsageError naming the file and the field."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"grid file {path} not found; pass a .toml grid such as benchmarks/study/glue-minilm.toml")
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"grid file {path} is not valid TOML ({err})") from None
    where = f"grid {path}"
    check_shape(raw, where)
    study = raw.get("study", {})
    for key in ("name", "tasks", "seeds"):
        if key not in study:
            raise UsageError(f"{where}: [study] needs {key!r}")
    if not isinstance(study["name"], str) or not study["name"]:
        raise UsageError(f"{where}: [study] name must be a non-empty string, got {study['name']!r}")
    seeds = _list(study["seeds"], (int,), "whole numbers", f"{where}: [study] seeds")
    sweep_seed = study.get("sweep_seed", seeds[0])
    if sweep_seed not in seeds:
        raise UsageError(f"{where}: sweep_seed {sweep_seed} is not one of seeds {list(seeds)}")
    tasks = _list(study["tasks"], (str,), "task names", f"{where}: [study] tasks")
    methods = []
    for i, m in enumerate(raw.get("method", [])):
        for key in ("name", "method", "lrs"):
            if key not in m:
                raise UsageError(f"{where}: [[method]] #{i + 1} needs {key!r}")
        lrs = tuple(float(v) for v in _list(m["lrs"], (int, float), "numbers", f"{where}: method {m['name']!r}: lrs"))
        if any(not math.isfinite(v) or v <= 0 for v in lrs):
            raise UsageError(f"{where}: method {m['name']!r}: lrs must be positive numbers, got {m['lrs']!r}")
        m_tasks = _list(m.get("tasks", list(tasks)), (str,), "task names", f"{where}: method {m['name']!r}: tasks")
        unknown = [t for t in m_tasks if t not in tasks]
        if unknown:
            raise UsageError(f"{where}: method {m['name']!r}: tasks {unknown} are not in [study] tasks {list(tasks)}")
        _no_run_flags(m.get("args", {}), f"{where}: method {m['name']!r}: args")
        methods.append(MethodEntry(m["name"], m["method"], m.get("family", m["method"]), lrs, m_tasks,
                                   dict(m.get("args", {})), _protocol(m, None, f"{where}: method {m['name']!r}")))
    names = [m.name for m in methods]
    if len(set(names)) != len(names) or not names:
        raise UsageError(f"{where}: [[method]] names must be unique and at least one, got {names}")
    _no_run_flags(raw.get("train", {}), f"{where}: [train]")
    task_train = raw.get("task", {})
    for task, table in task_train.items():
        if task not in tasks or not isinstance(table, dict):
            raise UsageError(f"{where}: [task.{task}] must be a table for one of [study] tasks {list(tasks)}")
        _no_run_flags(table, f"{where}: [task.{task}]")
    claims = []
    for i, c in enumerate(raw.get("claim", [])):
        if not {"text", "better", "worse"} <= set(c) or not {c["better"], c["worse"]} <= set(names):
            raise UsageError(f"{where}: [[claim]] #{i + 1} needs text, better and worse, the last two among the "
                             f"method names {names}")
        claims.append(Claim(c["text"], c["better"], c["worse"]))
    edge_factor = study.get("edge_factor")
    if edge_factor is not None and (isinstance(edge_factor, bool) or not isinstance(edge_factor, (int, float))
                                    or not edge_factor > 1 or not math.isfinite(edge_factor)):
        raise UsageError(f"{where}: [study] edge_factor must be a number above 1 (the extension is the edge rate "
                         f"times or over it), got {edge_factor!r}")
    results = Path(study.get("results", "results.jsonl"))
    return Grid(path=path, name=study["name"], model=study.get("model", "all-MiniLM-L6-v2"),
                results=results if results.is_absolute() else path.parent / results, seeds=seeds,
                sweep_seed=sweep_seed, tasks=tasks, train=dict(raw.get("train", {})), methods=methods,
                task_train={t: dict(v) for t, v in task_train.items()},
                extend_edges=bool(study.get("extend_edges", True)), edge_factor=edge_factor,
                runs_dir=Path(study.get("runs_dir", f"runs/study/{study['name']}")),
                notes=path.parent / study["notes"] if "notes" in study else None, title=study.get("title"),
                claims=claims, protocol=_protocol(study, "dev", f"{where}: [study]"),
                page=path.parent / study["page"] if "page" in study else None,
                split_seed=_whole(study.get("split_seed", 0), f"{where}: [study] split_seed"),
                reuse=_list(study["reuse"], (str,), "grid names", f"{where}: [study] reuse") if "reuse" in study else (),
                every_seed_every_rate=_flag(study.get("every_seed_every_rate", False),
                                            f"{where}: [study] every_seed_every_rate"))


PROTOCOLS = ("dev", SELECTION)


def _protocol(table: dict, default: str | None, field: str) -> str | None:
    value = table.get("protocol", default)
    if value is not default and value not in PROTOCOLS:
        raise UsageError(f"{field}: protocol must be one of {list(PROTOCOLS)} (\"selection\": rate and epoch "
                         f"chosen on a split of train, dev reported), got {value!r}")
    return value


def _whole(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise UsageError(f"{field} must be a whole number in [0, 2**32), got {value!r}")
    return value


def _flag(value, field: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{field} must be true or false (unquoted), got {value!r}")
    return value


# -- runs -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    task: str
    entry: MethodEntry
    lr: float | None  # None: a seed run waiting for its sweep's best rate
    seed: int
    stage: str  # "sweep" or "seed"

    def flags(self, grid: Grid) -> dict:
        """Every `kronpeft train` flag of this run (the grid's shared ones, its task's, the method's, the run's)."""
        selection = {"selection_split": grid.split_seed} if grid.protocol_of(self.entry) == SELECTION else {}
        return {**grid.train, **grid.task_train.get(self.task, {}), "model": grid.model, **self.entry.args,
                "task": self.task, "method": self.entry.method, "lr": self.lr, "seed": self.seed, **selection}

    def key(self, grid: Grid) -> str:
        """Identity of a run: a digest of its flags (so a grid edit that changes a run re-runs it)."""
        blob = json.dumps({"name": self.entry.name, **self.flags(grid)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def label(self) -> str:
        return f"{self.task}/{self.entry.name}/lr{'?' if self.lr is None else f'{self.lr:g}'}/seed{self.seed}"


def select(grid: Grid, tasks: list[str] | None = None, methods: list[str] | None = None) -> Grid:
    """The grid narrowed to some of its tasks and methods (`--tasks`, `--methods`); a name the grid does not
    have is a UsageError. A run's identity does not depend on the selection."""
    names = [e.name for e in grid.methods]
    for flag, asked, known in (("--tasks", tasks, list(grid.tasks)), ("--methods", methods, names)):
        unknown = [v for v in asked or [] if v not in known]
        if unknown:
            raise UsageError(f"{flag} {','.join(unknown)}: not in grid {grid.path} "
                             f"(its {flag[2:]}: {', '.join(known)})")
    return replace(grid, tasks=tuple(t for t in grid.tasks if not tasks or t in tasks),
                   methods=[e for e in grid.methods if not methods or e.name in methods])


def check_runs(grid: Grid, parse: Callable[[list[str]], object]):
    """Refuse a grid whose runs could not start: an unknown task or method, or flags that do not make a
    valid `kronpeft train` command (`parse`: the CLI's parser). Checked before anything runs."""
    from .baselines import METHODS
    from .data import TASKS

    where = f"grid {grid.path}"
    unknown = [t for t in grid.tasks if t not in TASKS]
    if unknown:
        raise UsageError(f"{where}: [study] tasks {unknown} are not tasks kronpeft knows; choose from {sorted(TASKS)}")
    for entry in grid.methods:
        if entry.method not in METHODS:
            raise UsageError(f"{where}: method {entry.name!r}: method = {entry.method!r} is not one of {list(METHODS)}")
        for task in entry.tasks:
            flags = Run(task, entry, entry.lrs[0], grid.sweep_seed, "sweep").flags(grid)
            try:
                parse(["train", *argv(flags)])
            except UsageError as err:
                raise UsageError(f"{where}: method {entry.name!r} on {task}: its flags ([train], [task.{task}], "
                                 f"args) make no valid `kronpeft train` command: {err}") from None


def argv(flags: dict) -> list[str]:
    """`{"batch_size": 32, "no_dropout": True, "a_shape": [8, 8]}` -> `--batch-size 32 --no-dropout --a-shape 8,8`."""
    out = []
    for key, value in flags.items():
        opt = "--" + key.replace("_", "-")
        if value is True:
            out.append(opt)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            out += [opt, ",".join(str(v) for v in value)]
        else:
            out += [opt, f"{value:g}" if isinstance(value, float) else str(value)]
    return out


def read_results(path: Path, warn=None) -> list[dict]:
    """Rows of a results file; a malformed line is reported (file:line) and skipped, never fatal."""
    rows = []
    if not path.exists():
        return rows
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not {"key", "task", "name", "lr", "seed", "score"} <= row.keys():
                raise ValueError("not a results row (needs key, task, name, lr, seed, score)")
            if not isinstance(row["score"], (int, float)) or not math.isfinite(row["score"]):
                raise ValueError(f"score {row['score']!r} is not a finite number")
        except ValueError as err:
            (warn or _warn)(f"{path}:{number}: skipped malformed row ({err})")
            continue
        rows.append(row)
    return rows


def _warn(message: str):
    print(f"kronpeft: warning: {message}", file=sys.stderr)


def append_row(path: Path, row: dict) -> bool:
    """Append one JSON line under an exclusive lock, flushed and fsynced (whole lines only); False (and
    nothing written) when the same grid already has a row with the same key (two grids may hold the same
    run: a key is the run's flags)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        recorded = {(r.get("grid"), r["key"]) for r in read_results(path, warn=lambda _: None)}
        if (row.get("grid"), row["key"]) in recorded:
            return False
        size = os.fstat(fd).st_size
        if size:  # a crash mid-line earlier: start on a fresh line so this row stays parseable
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
        return True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def current_rows(grid: Grid, rows: list[dict]) -> tuple[list[dict], int]:
    """The rows of `grid` recorded with its present settings, and how many of its rows were recorded
    with earlier ones (a flag or method edited since: their key no longer matches)."""
    entries = {e.name: e for e in grid.methods}

    def current(row):
        entry = entries.get(row["name"])
        return entry is not None and row["task"] in entry.tasks and \
            Run(row["task"], entry, row["lr"], row["seed"], "").key(grid) == row["key"]

    mine = [r for r in rows if r.get("grid") == grid.name]
    reused = [r for r in rows if r.get("grid") in grid.reuse and current(r)]  # only the runs this grid has
    fresh = [r for r in mine if current(r)]
    return fresh + reused, len(mine) - len(fresh)


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


# -- the machine ----------------------------------------------------------------------------------------

def machine() -> dict:
    """CPU/GPU model and library versions, recorded with every row."""
    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
        fam = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("cpu family")), "?")
        model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model\t")), "?")
        flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
        simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
        cpu = f"{name} (family {fam} model {model}; {', '.join(simd) or 'no AVX2'})"
    except (OSError, StopIteration):
        pass
    out = {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), "gpu": None}
    import torch

    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    from importlib.metadata import PackageNotFoundError, version

    for lib in ("torch", "transformers", "peft", "accelerate"):
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = None
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


# -- running --------------------------------------------------------------------------------------------

def run_one(grid: Grid, run: Run, threads: int, parallel: int, host: dict) -> dict | str | None:
    """Train one run in a subprocess (resuming its checkpoint if any) and build its results row;
    None when it failed, "busy" when another runner holds it."""
    out = grid.runs_dir / run.task / run.entry.name / f"lr{run.lr:g}-seed{run.seed}"
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
        print(f"kronpeft study: skip {run.label()}: another runner is training it", file=sys.stderr, flush=True)
        return "busy"
    print(f"kronpeft study: start {run.label()} ({run.stage})", file=sys.stderr, flush=True)  # only once it holds it
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
    print("kronpeft study: stopping (SIGTERM); the runs resume from their checkpoints", file=sys.stderr, flush=True)
    for proc in list(_children):
        proc.kill()
    raise SystemExit(128 + signum)


def cpu_seconds(row: dict) -> float:
    """A run's CPU seconds: measured (rows since `cpu_seconds` was recorded), else wall seconds x threads."""
    return row.get("cpu_seconds") or row["wall_seconds"] * row.get("threads", 1)


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


def _train_size(task: str, data_dir: str | None) -> tuple[int, float] | None:
    """(training examples, mean characters per example) of a task, None when its data is not at hand."""
    from .data import load_split

    try:
        examples = load_split(task, "train", data_dir)
    except Exception:  # no data here: the estimate says it guessed
        return None
    chars = [len(e.text_a) + len(e.text_b or "") for e in examples]
    return len(examples), sum(chars) / len(chars)


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

    Steps per run: a recorded run of the same task and schedule, else the task's training-set size.
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
        total += rate * steps
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


def run_grid(grid: Grid, threads: int = 1, parallel: int = 1, max_runs: int | None = None) -> int:
    """Run what is left of the grid, `parallel` runs at a time; returns how many runs were recorded."""
    try:  # before any run: a finished run must never fail to be recorded
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
                    print(f"kronpeft study: done {run.label()}: {row['main_metric']} {row['score']:.4f} "
                          f"({row['wall_seconds']:.0f} s); {left} runs of the grid left"
                          + (f" (+{maybe} depending on the sweeps' winners)" if maybe else ""),
                          file=sys.stderr, flush=True)
                else:  # the file already holds this grid's row for it: never launch it again
                    failed.add(run.key(grid))
