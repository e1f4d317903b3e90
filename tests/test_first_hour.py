"""The first hour of a new user, as the README and docs/ write it (issue 25, section 2): each test here
failed on the code before its fix."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import kronpeft
from kronpeft.cli import build_parser, main

SRC = Path(kronpeft.__file__).resolve().parents[1]  # the kronpeft under test, also in the subprocesses


def _python(code: str) -> str:
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout


def test_help_and_version_load_no_torch():
    out = _python("import sys\nfrom kronpeft.cli import main\n"
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
