"""The rules for what a user names that becomes a file operation: adapter names and folder paths.

An adapter name becomes a module key (`<module>.kronpeft.<name>`) and, in `save_pretrained`, a folder
name (`save_directory/<name>`), so it must be one safe path component: 1-64 characters from ASCII
letters, digits, `_` and `-`, not starting with `-`, and not the reserved `BASE_ADAPTER_NAME`
(`"__base__"`, the base model without adapter). `/`, `\\`, `.`, spaces and everything else are refused,
so no name can be absolute, climb out (`..`) or hide (`.x`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .config import BASE_ADAPTER_NAME

MAX_NAME_LENGTH = 64
_NAME = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_-]{{0,{MAX_NAME_LENGTH - 1}}}")
NAME_RULE = (f"1-{MAX_NAME_LENGTH} characters from ASCII letters, digits, '_' and '-', not starting with '-' "
             f"(it becomes a module key and a folder name), and not the reserved {BASE_ADAPTER_NAME!r} "
             f"(the base model)")


def check_adapter_name(name) -> str:
    """`name` if it is a valid adapter name (see the module docstring), else a ValueError saying the rule."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == BASE_ADAPTER_NAME:
        raise ValueError(f"adapter name {name!r} is not allowed: use {NAME_RULE}, e.g. 'default' or 'task_2'")
    return name


def check_path(path, what: str) -> str | os.PathLike:
    """Refuse an empty path (an unset shell variable): it would silently mean the current folder."""
    if path is None or not str(os.fspath(path)).strip():
        raise ValueError(f"{what} is empty ({path!r}); pass a folder path (use '.' for the current folder)")
    return path


def check_apart(source, out, source_what: str, out_what: str):
    """Refuse writing `out` when it is the folder `source` being read, or inside or around it: the write
    would replace or mix into what it reads (e.g. converting an adapter folder onto itself)."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
        raise ValueError(f"{out_what} {out} is {source_what} {source} or inside/around it: writing it would replace "
                         f"the adapter being read; pass another {out_what}")
