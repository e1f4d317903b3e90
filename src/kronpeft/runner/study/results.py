"""The results file (one JSON line per finished run: read, appended under a lock, the rows of the grid's
present settings) and the facts recorded with each row (the machine, the commit, CPU seconds)."""
from __future__ import annotations

import fcntl
import json
import math
import os
import platform
import subprocess
from pathlib import Path

from ..feedback import stderr_line
from .grid import Grid, Run


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
    stderr_line(f"kronpeft: warning: {message}")


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


def cpu_name(cpuinfo: str) -> str | None:
    """The first processor of a /proc/cpuinfo text as rows record it: "<model name> (family F model M; <SIMD
    flags that change speed>)"; None without a model name."""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if "model name" not in fields:
        return None
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in fields.get("flags", "").split()]
    return (f"{fields['model name']} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}; "
            f"{', '.join(simd) or 'no AVX2'})")


def machine() -> dict:
    """CPU/GPU model and library versions, recorded with every row."""
    try:
        cpu = cpu_name(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu = None
    cpu = cpu or platform.processor() or platform.machine()
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


def cpu_seconds(row: dict) -> float:
    """A run's CPU seconds: measured (rows since `cpu_seconds` was recorded), else wall seconds x threads."""
    return row.get("cpu_seconds") or row["wall_seconds"] * row.get("threads", 1)
