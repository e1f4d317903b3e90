"""The shape of a study grid file (`kronpeft study`): its tables, their keys and the types of their values.

A misspelt table or key, or a value of the wrong type, is an error naming it (`[trian]`, `extend_edges =
"false"`, `model = 5`, `args = 4`, `name = ["bn"]`), never silently ignored or coerced; `grid.load_grid`
then checks the values themselves (lists, ranges, names).
"""
from __future__ import annotations

from ..errors import UsageError

_TEXT, _FLAG, _LATER = (str,), (bool,), (object,)  # _LATER: load_grid checks it with a message of its own
GRID_KEYS = {  # table -> {key: the types it may hold}; anything else in a grid file is an error naming it
    "study": {"name": _TEXT, "title": _TEXT, "model": _TEXT, "results": _TEXT, "tasks": _LATER, "seeds": _LATER,
              "sweep_seed": (int,), "extend_edges": _FLAG, "edge_factor": _LATER, "notes": _TEXT,
              "runs_dir": _TEXT, "page": _TEXT, "protocol": _TEXT, "split_seed": _LATER, "reuse": _LATER,
              "every_seed_every_rate": _FLAG, "replace_cells": _LATER, "companions": _LATER,
              "summary": _TEXT},
    "method": {"name": _TEXT, "method": _TEXT, "family": _TEXT, "lrs": _LATER, "tasks": _LATER, "args": (dict,),
               "protocol": _TEXT},
    "claim": {"text": _TEXT, "better": _TEXT, "worse": _TEXT},
}
FLAG_VALUE = (str, int, float, bool, list)  # a `kronpeft train` flag's value in [train], [task.X] or args


def check_shape(raw: dict, where: str):
    """Refuse unknown tables and keys and values of the wrong type (a typo must not be silently ignored)."""
    unknown = sorted(set(raw) - {"study", "train", "task", "method", "claim"})
    if unknown:
        raise UsageError(f"{where}: unknown table [{unknown[0]}]; a grid has [study], [train], [task.<name>], "
                         f"[[method]] and [[claim]]")
    tables = [("study", "[study]", raw.get("study", {}))]
    tables += [("method", f"[[method]] #{i + 1}", m) for i, m in enumerate(_array(raw, "method", where))]
    tables += [("claim", f"[[claim]] #{i + 1}", c) for i, c in enumerate(_array(raw, "claim", where))]
    for kind, label, table in tables:
        if not isinstance(table, dict):
            raise UsageError(f"{where}: {label} must be a table")
        for key, value in table.items():
            kinds = GRID_KEYS[kind].get(key)
            if kinds is None:
                raise UsageError(f"{where}: {label} has unknown key {key!r}; known: {', '.join(GRID_KEYS[kind])}")
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds and kinds != _LATER):
                names = " or ".join("true/false" if k is bool else {"str": "a string"}.get(k.__name__, k.__name__)
                                    for k in kinds)
                raise UsageError(f"{where}: {label} {key} must be {names}, got {value!r}")
    if not isinstance(raw.get("task", {}), dict):
        raise UsageError(f"{where}: task must be tables [task.<name>] of flags one task overrides")
    flag_tables = [("[train]", raw.get("train", {}))] + [(f"[task.{t}]", v) for t, v in raw.get("task", {}).items()]
    flag_tables += [(f"[[method]] #{i + 1} args", m.get("args", {})) for i, m in enumerate(raw.get("method", []))]
    for label, table in flag_tables:
        if not isinstance(table, dict):
            raise UsageError(f"{where}: {label} must be a table of `kronpeft train` flags")
        wrong = [k for k, v in table.items() if not isinstance(v, FLAG_VALUE)]
        if wrong:
            raise UsageError(f"{where}: {label} {wrong[0]} = {table[wrong[0]]!r} is no flag value (a string, "
                             f"number, true/false or list)")


def _array(raw: dict, name: str, where: str) -> list:
    value = raw.get(name, [])
    if not isinstance(value, list):
        raise UsageError(f"{where}: [{name}] must be an array of tables, written [[{name}]]")
    return value
