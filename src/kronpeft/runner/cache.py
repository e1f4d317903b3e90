"""Model folders kronpeft makes once and keeps in `$KRONPEFT_CACHE` (default `~/.cache/kronpeft`)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def cache_dir() -> Path:
    return Path(os.environ.get("KRONPEFT_CACHE", "~/.cache/kronpeft")).expanduser()


def cached_folder(name: str, build: Callable[[Path], None]) -> str:
    """`cache_dir() / name`, made on first use: `build(target)` fills `target` (not yet existing; its parent is
    a private scratch folder), which is then renamed into place, so the folder appears complete or not at all.
    A folder holding `config.json` is made; a concurrent builder that won the race is kept."""
    folder = cache_dir() / name
    if (folder / "config.json").is_file():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=folder.parent))
    try:
        build(scratch / "folder")
        os.rename(scratch / "folder", folder)
    except OSError:
        if not (folder / "config.json").is_file():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return str(folder)
