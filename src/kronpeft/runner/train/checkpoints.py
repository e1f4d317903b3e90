"""A run's output folder: the checkpoint `--resume` continues from (saved crash-safe, loaded checked), the
checks that refuse to clobber a run or resume it with other settings, and the digest of its data."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ... import sharding
from ...atomic import commit, sha256, write_tensors
from .. import baselines
from ..errors import UsageError
from ..run_checks import check_overwritable
from ..selection import PREDICTIONS

CHECKPOINT = "checkpoint"
STATE_FILE = "state.json"
# The only settings a resumed run may change; every other flag must equal the run's (the data is
# checked by hash, so --data-dir may move).
RESUME_MAY_CHANGE = ("eval_every", "save_every", "log_every", "eval_batch_size", "no_eval_before", "cpu",
                     "data_dir", "output_dir", "overwrite", "resume", "stop_after", "inject_nan_at", "report_to",
                     "fsdp")  # a checkpoint holds full tensors: the process count and sharding may change
RUN_FILES = ("metrics.json", "log.jsonl", "curves.png", PREDICTIONS, CHECKPOINT, "adapter")


def save_checkpoint(directory: Path, model, optimizer, scheduler, state: dict):
    """Latest state for --resume: trainable weights + optimizer tensors (safetensors), the rest in
    `state.json`, which names both files and their sha256 and is replaced last, atomically (see
    `atomic.py`): after a crash at any point the previous or the new checkpoint loads. On a sharded (FSDP2)
    model every process calls it: they gather the full tensors, so the checkpoint is the unsharded one,
    and the main process writes it."""
    opt = optimizer.state_dict()
    tensors = sharding.gather_full({f"{idx}.{k}": v if torch.is_tensor(v) else torch.tensor(v)
                                    for idx, st in opt["state"].items() for k, v in st.items()})
    trainable = sharding.gather_full(baselines.trainable_state(model))
    if not sharding.is_main_process():
        return
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    directory.mkdir(parents=True, exist_ok=True)
    overwrite = (directory / STATE_FILE).exists()
    written, digests = {}, {}
    for stem, part in (("trainable", trainable), ("optimizer", tensors)):
        written[stem], digests[stem] = write_tensors(directory, stem, part, overwrite)
    meta = {**state, "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict()}
    commit(directory, STATE_FILE, lambda names: {**meta, "files": {
        stem: {"file": name, "sha256": digests[stem]} for stem, name in names.items()}}, written)


def read_checkpoint_state(directory: Path) -> dict:
    """`state.json` of a checkpoint, checked for the shape `load_checkpoint` needs."""
    path = directory / STATE_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise UsageError(f"{path} is unreadable ({str(err)[:80]}); start over with --overwrite") from None
    shape = {"step": int, "evals": list, "train_seconds": (int, float), "args": dict, "param_groups": list,
             "scheduler": dict}
    wrong = [k for k, kind in shape.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), kind)]
    if wrong:
        raise UsageError(f"{path} is not a kronpeft checkpoint (field {wrong[0]!r} missing or of the wrong type); "
                         f"start over with --overwrite")
    return meta


def load_checkpoint(directory: Path, model, optimizer, scheduler) -> dict:
    meta = read_checkpoint_state(directory)
    files = meta.pop("files", None) or {s: {"file": f"{s}.safetensors"} for s in ("trainable", "optimizer")}
    loaded = {}
    for stem in ("trainable", "optimizer"):
        entry = files.get(stem) if isinstance(files, dict) else None
        name = entry.get("file") if isinstance(entry, dict) else None
        path = directory / str(name)
        fix = "start over with --overwrite (or resume from a copy of the run)"
        if not isinstance(name, str) or Path(name).name != name or not path.is_file():
            raise UsageError(f"{directory / STATE_FILE} names no readable {stem} file ({name!r}); {fix}")
        if "sha256" in entry and entry["sha256"] != sha256(path):
            raise UsageError(f"{path} is corrupt or does not belong to this checkpoint (checksum mismatch); {fix}")
        try:
            loaded[stem] = load_file(path)
        except (SafetensorError, OSError) as err:
            raise UsageError(f"{path} is corrupt ({err}); {fix}") from None
    try:
        baselines.load_trainable_state(model, loaded["trainable"])
        state: dict = {}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for key, value in loaded["optimizer"].items():
            idx, name = key.split(".", 1)
            like = params[int(idx)]  # an FSDP2 shard: this process takes its part of the full tensor
            state.setdefault(int(idx), {})[name] = sharding.shard_like(value, like) if value.shape == like.shape \
                else value
        optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
        scheduler.load_state_dict(meta.pop("scheduler"))
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"checkpoint in {directory} does not fit this run ({first}); "
                         f"start over with --overwrite") from None
    return meta


# -- output folder --------------------------------------------------------------------------------------

def check_writable_dir(path: Path, flag: str):
    """Refuse a folder path that is a file, lies under a file, or under a read-only folder."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder; pass a folder path")
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, so no folder can be made under it; pass another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {parent} is not writable; pass a writable {flag}")


def check_output_dir(out: Path, overwrite: bool, resume: bool) -> bool:
    """Refuse to clobber a run (nothing is deleted without --overwrite); returns True when a checkpoint
    should be resumed."""
    check_writable_dir(out, "--output-dir")
    finished = (out / "metrics.json").is_file()
    legacy = out / f"{CHECKPOINT}.old"  # left by kronpeft <= 0.1's two-rename checkpoint swap on a crash
    if not (out / CHECKPOINT / STATE_FILE).is_file() and (legacy / STATE_FILE).is_file():
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
        os.rename(legacy, out / CHECKPOINT)
    has_ckpt = (out / CHECKPOINT / STATE_FILE).is_file()
    if resume:
        if not has_ckpt and not finished:
            raise UsageError(f"--resume: {out} holds no checkpoint to resume; drop --resume to start a new run")
        return has_ckpt
    if overwrite:
        check_overwritable(out, CHECKPOINT, STATE_FILE, baselines.RUN_FILE)
        return False
    if finished:
        raise UsageError(f"{out} already holds a finished run (metrics.json); pass --overwrite to replace it, "
                         f"--resume to continue it, or choose another --output-dir")
    if has_ckpt:
        raise UsageError(f"{out} holds an unfinished run (checkpoint/); pass --resume to continue it, "
                         f"--overwrite to start over, or choose another --output-dir")
    earlier = [name for name in RUN_FILES if (out / name).exists()]
    if earlier:
        raise UsageError(f"{out} holds files of an earlier run ({', '.join(earlier)}) but no checkpoint to resume; "
                         f"pass --overwrite to replace them, or choose another --output-dir")
    return False


def check_resume_args(out: Path, saved: dict, args) -> None:
    """Refuse a resume whose flags differ from the run's, except the RESUME_MAY_CHANGE ones. A flag the
    run's kronpeft did not have yet must be off (None/False): the run was trained without it."""
    now = json.loads(json.dumps(vars(args), default=str))
    changed = [k for k in now if k not in RESUME_MAY_CHANGE
               and (saved[k] != now[k] if k in saved else now[k] not in (None, False))]
    if changed:
        k = changed[0]
        was = f"with --{k.replace('_', '-')} {saved[k]!r}" if k in saved else f"without --{k.replace('_', '-')}"
        may = ", ".join("--" + f.replace("_", "-") for f in RESUME_MAY_CHANGE[:6])
        raise UsageError(f"--resume: {out} was started {was}, not {now[k]!r}; only {may} may change on resume: "
                         f"resume with the run's settings or start over with --overwrite")


def data_digest(examples) -> str:
    """sha256 of examples (texts and labels, in order): a resumed run must train on the same data."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.text_a, e.text_b, e.label]).encode() + b"\n")
    return digest.hexdigest()

