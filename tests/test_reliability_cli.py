"""§1/§2/§4 of issue 8 through the command line: every numeric flag validated, resume guards, nothing
deleted without --overwrite, and every user error one `kronpeft: error:` line with exit status 2."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import one_error_line

from kronpeft.runner import cli

torch.set_num_threads(1)
GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
needs_glue = pytest.mark.skipif(not (GLUE / "RTE" / "train.tsv").is_file(), reason=f"no GLUE data in {GLUE}")
SMALL = ["--max-train-samples", "16", "--max-eval-samples", "8", "--max-length", "32", "--batch-size", "8",
         "--log-every", "1"]


def train(out, *extra, data_dir=GLUE):
    return cli.main(["train", "--task", "rte", "--data-dir", str(data_dir), "--output-dir", str(out), *SMALL, *extra])


# -- every numeric flag ------------------------------------------------------------------------------

BAD = ["abc", "nan", "inf", "-inf", "-1", "1e30", "99999999999"]
TRAIN_FLAGS = {  # flag -> extra bad values (0 where 0 is not allowed)
    "--epochs": ["0"], "--max-steps": ["0", "2.5"], "--batch-size": ["0"], "--eval-batch-size": ["0"],
    "--lr": ["0", "2"], "--weight-decay": ["1.5"], "--warmup-ratio": ["1.01"], "--max-grad-norm": ["0"],
    "--max-length": ["0"], "--seed": ["4294967296"], "--max-train-samples": ["0"], "--max-eval-samples": ["0"],
    "--eval-every": ["0"], "--save-every": ["0"], "--log-every": ["0"], "--scale": ["0"], "--r": ["0"],
    "--stop-after": ["0"], "--inject-nan-at": ["0"],
}
EVAL_FLAGS = {"--max-eval-samples": ["0"], "--max-length": ["0"], "--batch-size": ["0"], "--seed": ["-5"]}
CASES = [("train", f, v) for f, extra in TRAIN_FLAGS.items() for v in BAD + extra] + \
        [("eval", f, v) for f, extra in EVAL_FLAGS.items() for v in BAD + extra]


@pytest.mark.parametrize("command, flag, value", CASES)
def test_every_numeric_flag_refuses_bad_values(tmp_path, capsys, command, flag, value):
    argv = ["train", "--output-dir", str(tmp_path / "o")] if command == "train" else ["eval", "--adapter", "x"]
    code = cli.main([*argv, f"{flag}={value}"])
    one_error_line(capsys, code, flag)
    assert not (tmp_path / "o").exists()


def test_argparse_errors_are_one_line(capsys):
    one_error_line(capsys, cli.main(["train", "--no-such-flag"]), "--no-such-flag", "--help")
    one_error_line(capsys, cli.main(["merge", "--adapter", "a"]), "--out")


# -- output folders ------------------------------------------------------------------------------------

def test_output_dir_that_is_a_file_or_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    one_error_line(capsys, train(tmp_path / "f"), "--output-dir", "is a file")
    one_error_line(capsys, train(tmp_path / "f" / "run"), "--output-dir", "is a file")


def test_earlier_run_without_checkpoint_is_not_deleted(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text("{}")
    (out / "log.jsonl").write_text("{}\n")
    line = one_error_line(capsys, train(out), "--overwrite", "adapter")
    assert "--resume" not in line
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "log.jsonl").is_file()
    one_error_line(capsys, train(out, "--resume"), "no checkpoint")


@needs_glue
def test_max_length_over_the_position_limit(tmp_path, capsys):
    code = train(tmp_path / "o", "--max-length", "100000")
    one_error_line(capsys, code, "--max-length 100000", "512")


@needs_glue
def test_tsv_field_over_the_csv_limit(tmp_path, capsys):
    shutil.copytree(GLUE / "RTE", tmp_path / "glue" / "RTE")
    with open(tmp_path / "glue" / "RTE" / "train.tsv", "a") as f:
        f.write("9999\t" + "x" * 200_000 + "\tb\tentailment\n")
    one_error_line(capsys, train(tmp_path / "o", data_dir=tmp_path / "glue"), "train.tsv", "line")


# -- resume ----------------------------------------------------------------------------------------------

@needs_glue
def test_resume_guards_and_recovery(tmp_path, capsys):
    shutil.copytree(GLUE / "RTE", tmp_path / "glue" / "RTE")
    glue, out = tmp_path / "glue", tmp_path / "run"
    steps = ["--max-steps", "3", "--eval-every", "1"]
    assert train(out, *steps, "--stop-after", "2", data_dir=glue) == 0
    capsys.readouterr()
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2

    # a changed setting outside the allow-list is refused, naming the flag; nothing changes
    for flag, value in [("--lr", "0.001"), ("--max-grad-norm", "0.5"), ("--weight-decay", "0.1"),
                        ("--warmup-ratio", "0.5"), ("--scale", "2")]:
        one_error_line(capsys, train(out, *steps, "--resume", flag, value, data_dir=glue), flag, "--resume")
    assert json.loads((out / "checkpoint" / "state.json").read_text()) == state

    # a changed training file is refused
    train_tsv = glue / "RTE" / "train.tsv"
    original = train_tsv.read_bytes()
    lines = original.decode().splitlines(keepends=True)
    train_tsv.write_text(lines[0] + "".join(reversed(lines[1:])))
    one_error_line(capsys, train(out, *steps, "--resume", data_dir=glue), "train data", "--overwrite")
    train_tsv.write_bytes(original)

    # a truncated or foreign checkpoint file / state.json: one line, no traceback
    files = state["files"]
    weights = out / "checkpoint" / files["trainable"]["file"]
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    one_error_line(capsys, train(out, *steps, "--resume", data_dir=glue), files["trainable"]["file"], "corrupt")
    weights.write_bytes(good)
    state_path = out / "checkpoint" / "state.json"
    state_path.write_text("[1, 2]")
    one_error_line(capsys, train(out, *steps, "--resume", data_dir=glue), "state.json")
    state_path.write_text(json.dumps(state))

    # a log line cut by a crash and the previous version's checkpoint.old do not block --resume
    with open(out / "log.jsonl", "a") as f:
        f.write('{"type": "train", "st')
    (out / "checkpoint").rename(out / "checkpoint.old")
    assert train(out, *steps, "--resume", "--eval-every", "3", data_dir=glue) == 0  # --eval-every may change
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "train"] == [1, 2, 3]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    capsys.readouterr()

    # eval: --output a folder, or an unwritable place (metrics printed first)
    adapter = out / "adapter"
    code = cli.main(["eval", "--adapter", str(adapter), "--data-dir", str(glue), "--output", str(tmp_path)])
    one_error_line(capsys, code, "--output", "folder")
    (tmp_path / "file").write_text("x")
    code = cli.main(["eval", "--adapter", str(adapter), "--data-dir", str(glue), "--max-eval-samples", "8",
                     "--output", str(tmp_path / "file" / "e.json")])
    captured = capsys.readouterr()
    assert code == 2 and "rte dev accuracy:" in captured.out
    assert captured.err.strip().splitlines()[-1].startswith("kronpeft: error: could not write")

    # merge: --out equal to --adapter, or a file
    before = sorted(p.name for p in adapter.iterdir())
    one_error_line(capsys, cli.main(["merge", "--adapter", str(adapter), "--out", str(adapter), "--overwrite"]),
                   "--out", "--adapter")
    one_error_line(capsys, cli.main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "file")]),
                   "--out", "is a file")
    assert sorted(p.name for p in adapter.iterdir()) == before


# -- loading -----------------------------------------------------------------------------------------------

def test_pickled_full_model_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "full"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    code = cli.main(["eval", "--adapter", str(folder), "--task", "rte", "--data-dir", str(GLUE)])
    one_error_line(capsys, code, "pytorch_model.bin", "safetensors")


@pytest.mark.parametrize("content", ["[]", '{"kind": 3}', '{"kind": "kronpeft", "task": ["rte"]}'])
def test_run_file_of_the_wrong_shape(tmp_path, capsys, content):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "kronpeft_run.json").write_text(content)
    one_error_line(capsys, cli.main(["eval", "--adapter", str(tmp_path / "a")]), "kronpeft_run.json")
