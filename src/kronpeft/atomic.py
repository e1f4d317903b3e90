"""Crash-safe writes of a folder holding safetensors files and one JSON manifest naming them.

The manifest is the commit point. New tensor files go under names the current manifest does not use,
each written to a temporary file, fsynced and renamed; then the manifest is replaced the same way
(one `os.replace`, atomic on POSIX). Files are then hard-linked to their plain names
(`<stem>.safetensors`) and the manifest replaced again to name those; only then are files no manifest
names deleted. A crash at any point therefore leaves either the old manifest with its intact files or
the new one with its own, and a finished write always has the plain layout.

A folder with no manifest (a merged model, a PEFT adapter) is written whole beside its target and swapped
in by `replacing_dir`. Single files (metrics, reports, plots) go through `write_atomic`.
"""
from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

TMP_MARK = ".tmp-"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, write: Callable[[Path], None]):
    """`write(tmp)` then fsync and rename `tmp` over `path`; on an error the temporary file is removed."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{secrets.token_hex(4)}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def replacing_dir(target: str | os.PathLike, keep_others: bool = False) -> Iterator[Path]:
    """Yield a new hidden folder beside `target` to write into; when the block succeeds, the folder takes
    `target`'s place in one step (Linux `renameat2(RENAME_EXCHANGE)`) and the old one is deleted.
    `keep_others`: the old folder's entries the block did not write are carried over (hard links or copies).
    A crash or error at any point leaves `target` as it was or wholly new, at worst with a hidden
    `.<name>.tmp-*` folder beside it, which the next write of `target` deletes (`remove_leftovers`). Where
    the swap is not available (not Linux, or a file system without it) the old folder is renamed aside
    first: a crash between the two renames leaves it under that name."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(target)
    tmp.mkdir()  # not mkdtemp: the folder gets the usual permissions, not 0700
    try:
        yield tmp
        if keep_others and target.is_dir():
            for entry in target.iterdir():
                if not (tmp / entry.name).exists():
                    _carry_over(entry, tmp / entry.name)
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        if not target.exists():
            os.rename(tmp, target)
        elif not _exchange(tmp, target):
            aside = tmp_sibling(target, "old-")
            os.rename(target, aside)
            try:
                os.rename(tmp, target)
            except Exception:
                os.rename(aside, target)
                raise
            tmp = aside
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after the swap: the old folder
    remove_leftovers(target)


def tmp_sibling(target: Path, kind: str = "") -> Path:
    """`.<name>.tmp-[kind]<pid>-<hex>` beside `target`: hidden, unique, and naming the process writing it."""
    return target.with_name(f".{target.name}{TMP_MARK}{kind}{os.getpid()}-{secrets.token_hex(4)}")


def remove_leftovers(target: Path):
    """Delete the hidden folders that writes of `target` by processes no longer running left beside it
    (a crash between mkdir and the swap); those of live processes, this one included, stay."""
    prefix = f".{target.name}{TMP_MARK}"
    for path in target.parent.glob(glob.escape(prefix) + "*"):
        ours = re.fullmatch(r"(?:old-)?(\d+)-[0-9a-f]{8}", path.name[len(prefix):])  # tmp_sibling's names only
        if ours and not _running(int(ours.group(1))) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _carry_over(entry: Path, dest: Path):
    if entry.is_dir():
        shutil.copytree(entry, dest)
        return
    try:
        os.link(entry, dest)
    except OSError:
        shutil.copy2(entry, dest)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False where the system or file system cannot."""
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc < 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def write_json_atomic(path: Path, data: dict):
    write_atomic(path, lambda tmp: _write_text(tmp, json.dumps(data, indent=2, default=_jsonable) + "\n"))


def write_tensors(directory: Path, stem: str, tensors: dict[str, torch.Tensor], overwrite: bool) -> tuple[str, str]:
    """Write `tensors` to `<stem>.safetensors`, or, when overwriting (a manifest exists), to a fresh
    `<stem>.<hex>.safetensors` so the current version stays intact; returns `(file name, sha256)`."""
    name = f"{stem}.safetensors"
    if overwrite:
        name = f"{stem}.{secrets.token_hex(4)}.safetensors"
    write_atomic(directory / name, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    return name, sha256(directory / name)


def commit(directory: Path, manifest_name: str, manifest: Callable[[dict[str, str]], dict], written: dict[str, str]):
    """Atomically replace the manifest (`manifest(names)`, `names`: stem -> file name) to name the `written`
    files, move them to their plain names (second commit), then delete the versions and temporary files this
    or an earlier (crashed) write left: only names `written_by_us` matches, nothing else in the folder."""
    write_json_atomic(directory / manifest_name, manifest(written))
    _fsync_dir(directory)
    final = dict(written)
    for stem, name in written.items():
        plain = f"{stem}.safetensors"
        if name != plain:
            (directory / plain).unlink(missing_ok=True)  # the old version, no longer named
            try:
                os.link(directory / name, directory / plain)
                final[stem] = plain
            except OSError:  # no hard links on this file system: keep the versioned name
                pass
    if final != written:
        _fsync_dir(directory)
        write_json_atomic(directory / manifest_name, manifest(final))
        _fsync_dir(directory)
    for path in directory.iterdir():
        if path.name not in final.values() and written_by_us(path.name, manifest_name, list(final)):
            path.unlink(missing_ok=True)


def written_by_us(name: str, manifest_name: str, stems: list[str]) -> bool:
    """Whether `name` is exactly a name this module gives files of a manifest's folder: `<stem>.safetensors`,
    `<stem>.<8 hex>.safetensors` (a version), or one of those or the manifest with `write_atomic`'s
    `.tmp-<8 hex>`. Only such files are ever deleted: a user's `adapter_model_backup.safetensors` or
    `notes.tmp-draft.txt` in the same folder stays."""
    versions = "|".join(rf"{re.escape(stem)}(?:\.[0-9a-f]{{8}})?\.safetensors" for stem in stems)
    temporary = rf"(?:{re.escape(TMP_MARK)}[0-9a-f]{{8}})"
    if re.fullmatch(rf"{re.escape(manifest_name)}{temporary}", name):
        return True
    return bool(versions) and re.fullmatch(rf"(?:{versions}){temporary}?", name) is not None


def _write_text(path: Path, text: str):
    path.write_text(text)


def _fsync(path: Path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    if torch.is_tensor(value):
        return value.tolist()
    return str(value)
