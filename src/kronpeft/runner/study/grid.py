"""The study's grid: its TOML file checked and loaded (`load_grid`), its runs (`Run`: flags, key, label),
`select` (`--tasks`, `--methods`), `check_runs` and `argv` (a run's flags as a `kronpeft train` command)."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..errors import UsageError
from ..selection import SELECTION
from .check import check_shape

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


@dataclass(frozen=True)
class Replacement:
    """[study] replace_cells: the page shows `task`'s cells from grid `grid`, method by method, where `grid` has
    every seed of that method (the rest keep this grid's cells)."""
    task: str
    grid: Grid


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
    summary: Path | None = None  # hand-written Markdown the report puts under the title (findings in plain words)
    title: str | None = None
    claims: list[Claim] = field(default_factory=list)
    protocol: str = "dev"  # "dev": rate and epoch chosen on dev (the first round); "selection": on a split of train
    split_seed: int = 0  # the selection split's seed (one for the whole grid)
    reuse: tuple[str, ...] = ()  # other grids whose rows count here when their key (flags) matches a run's
    every_seed_every_rate: bool = False  # run every seed at every rate (no seed stage): measures the selection
    page: Path | None = None  # where `kronpeft report` writes by default (else <grid file>.md)
    replace_cells: tuple[Replacement, ...] = ()  # tasks whose cells the page takes from other grids, per method
    companions: tuple[Grid, ...] = ()  # other grids whose results the page summarises in a section of their own

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
    raw = _read_toml(path)
    where = f"grid {path}"
    check_shape(raw, where)
    study = raw.get("study", {})
    seeds, sweep_seed, tasks = _study_basics(study, where)
    methods = [_method(m, i, tasks, where) for i, m in enumerate(raw.get("method", []))]
    names = [m.name for m in methods]
    if len(set(names)) != len(names) or not names:
        raise UsageError(f"{where}: [[method]] names must be unique and at least one, got {names}")
    _no_run_flags(raw.get("train", {}), f"{where}: [train]")
    task_train = _task_tables(raw, tasks, where)
    claims = _claims(raw, names, where)
    edge_factor = _edge_factor(study, where)
    results = Path(study.get("results", "results.jsonl"))
    replacements = _replacements(study, path, (seeds, sweep_seed, tasks), where) if "replace_cells" in study else ()
    companions = _companions(study, path, where) if "companions" in study else ()
    return Grid(path=path, name=study["name"], model=study.get("model", "all-MiniLM-L6-v2"),
                results=results if results.is_absolute() else path.parent / results, seeds=seeds,
                sweep_seed=sweep_seed, tasks=tasks, train=dict(raw.get("train", {})), methods=methods,
                task_train={t: dict(v) for t, v in task_train.items()},
                extend_edges=bool(study.get("extend_edges", True)), edge_factor=edge_factor,
                runs_dir=Path(study.get("runs_dir", f"runs/study/{study['name']}")),
                notes=_markdown(study, "notes", path, where), summary=_markdown(study, "summary", path, where),
                title=study.get("title"),
                claims=claims, protocol=_protocol(study, "dev", f"{where}: [study]"),
                page=path.parent / study["page"] if "page" in study else None,
                split_seed=_whole(study.get("split_seed", 0), f"{where}: [study] split_seed"),
                reuse=(_list(study["reuse"], (str,), "grid names", f"{where}: [study] reuse")
                       if "reuse" in study else ()),
                every_seed_every_rate=_flag(study.get("every_seed_every_rate", False),
                                            f"{where}: [study] every_seed_every_rate"),
                replace_cells=replacements, companions=companions)


def _replacements(study: dict, path: Path, basics: tuple, where: str) -> tuple[Replacement, ...]:
    """[study] replace_cells, checked: a list of `{ task = "stsb", grid = "<name>" }`, each task once and among
    this grid's, each grid found beside this one, holding that task, with the same seeds and no replacements
    of its own."""
    seeds, sweep_seed, tasks = basics
    field = f"{where}: [study] replace_cells"
    value = study["replace_cells"]
    if not isinstance(value, list) or not value or not all(
            isinstance(v, dict) and set(v) == {"task", "grid"} and all(isinstance(x, str) for x in v.values())
            for v in value):
        raise UsageError(f'{field} must be a list of tables {{ task = "stsb", grid = "<grid name>" }}, got {value!r}')
    out = []
    for task, name in ((v["task"], v["grid"]) for v in value):
        if task not in tasks:
            raise UsageError(f"{field}: task {task!r} is not one of [study] tasks {list(tasks)}")
        if task in [r.task for r in out]:
            raise UsageError(f"{field}: task {task!r} is replaced twice; give each task one grid")
        found = find_grid(path.parent, name) if name != study["name"] else None
        if found is None:
            raise UsageError(f"{field}: grid {name!r} not found: no other grid file in {path.parent} has "
                             f"[study] name = {name!r} (looked at {name}.toml first)")
        if "replace_cells" in _read_toml(found).get("study", {}):
            raise UsageError(f"{field}: grid {name!r} ({found}) replaces cells itself; its cells must be its own")
        other = load_grid(found)
        if task not in other.tasks or (other.seeds, other.sweep_seed) != (seeds, sweep_seed):
            raise UsageError(f"{field}: grid {name!r} ({found}) must run task {task!r} with this grid's seeds "
                             f"{list(seeds)} and sweep seed {sweep_seed}; it runs {list(other.tasks)} with seeds "
                             f"{list(other.seeds)}, sweep seed {other.sweep_seed}")
        out.append(Replacement(task, other))
    return tuple(out)


def _companions(study: dict, path: Path, where: str) -> tuple[Grid, ...]:
    """[study] companions, checked: names of other grids beside this one, each found, none with companions of its
    own (a summary of a summary would nest without end)."""
    field = f"{where}: [study] companions"
    names = _list(study["companions"], (str,), "grid names", field)
    out = []
    for name in names:
        found = find_grid(path.parent, name) if name != study["name"] else None
        if found is None:
            raise UsageError(f"{field}: grid {name!r} not found: no other grid file in {path.parent} has "
                             f"[study] name = {name!r} (looked at {name}.toml first)")
        if "companions" in _read_toml(found).get("study", {}):
            raise UsageError(f"{field}: grid {name!r} ({found}) has companions of its own; list its companions "
                             "here instead")
        out.append(load_grid(found))
    return tuple(out)


def find_grid(folder: Path, name: str) -> Path | None:
    """The grid file in `folder` whose [study] name is `name` (`<name>.toml` first), or None."""
    for file in [folder / f"{name}.toml", *sorted(folder.glob("*.toml"))]:
        try:
            study = tomllib.loads(file.read_text()).get("study")
        except (OSError, tomllib.TOMLDecodeError):
            continue
        if isinstance(study, dict) and study.get("name") == name:
            return file
    return None


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"grid file {path} not found; pass a .toml grid such as benchmarks/study/glue-minilm.toml")
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"grid file {path} is not valid TOML ({err})") from None


def _study_basics(study: dict, where: str) -> tuple[tuple[int, ...], int, tuple[str, ...]]:
    """[study]'s required keys checked: (seeds, sweep_seed, tasks)."""
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
    return seeds, sweep_seed, tasks


def _method(m: dict, i: int, tasks: tuple[str, ...], where: str) -> MethodEntry:
    """The `i`-th [[method]] table, checked."""
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
    return MethodEntry(m["name"], m["method"], m.get("family", m["method"]), lrs, m_tasks,
                       dict(m.get("args", {})), _protocol(m, None, f"{where}: method {m['name']!r}"))


def _task_tables(raw: dict, tasks: tuple[str, ...], where: str) -> dict:
    """The [task.<name>] tables: {task: flags that task overrides}."""
    task_train = raw.get("task", {})
    for task, table in task_train.items():
        if task not in tasks or not isinstance(table, dict):
            raise UsageError(f"{where}: [task.{task}] must be a table for one of [study] tasks {list(tasks)}")
        _no_run_flags(table, f"{where}: [task.{task}]")
    return task_train


def _claims(raw: dict, names: list[str], where: str) -> list[Claim]:
    claims = []
    for i, c in enumerate(raw.get("claim", [])):
        if not {"text", "better", "worse"} <= set(c) or not {c["better"], c["worse"]} <= set(names):
            raise UsageError(f"{where}: [[claim]] #{i + 1} needs text, better and worse, the last two among the "
                             f"method names {names}")
        claims.append(Claim(c["text"], c["better"], c["worse"]))
    return claims


def _edge_factor(study: dict, where: str) -> float | None:
    edge_factor = study.get("edge_factor")
    if edge_factor is not None and (isinstance(edge_factor, bool) or not isinstance(edge_factor, (int, float))
                                    or not edge_factor > 1 or not math.isfinite(edge_factor)):
        raise UsageError(f"{where}: [study] edge_factor must be a number above 1 (the extension is the edge rate "
                         f"times or over it), got {edge_factor!r}")
    return edge_factor


PROTOCOLS = ("dev", SELECTION)


def _markdown(study: dict, key: str, path: Path, where: str) -> Path | None:
    """[study] notes or summary: a Markdown file beside the grid file, which must exist (None when unset)."""
    if key not in study:
        return None
    file = path.parent / study[key]
    if not file.is_file():
        raise UsageError(f"{where}: [study] {key} = {study[key]!r}: no file {file}; write it beside the grid file "
                         f"or remove the key")
    return file


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

    def folder(self, grid: Grid) -> Path:
        """The run's output folder (checkpoints, logs, its `.study.lock`)."""
        return grid.runs_dir / self.task / self.entry.name / f"lr{self.lr:g}-seed{self.seed}"


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
    from ..baselines import METHODS
    from ..data import TASKS

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
