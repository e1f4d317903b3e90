"""Issue 24 through the command line: a --max-length the tokenizer cannot truncate to, a head of another
label count, generate's flags and empty prompt, sizes beyond memory, hand-edited resume state, flags that
do not apply to the method, --resume with --overwrite. Each is one `kronpeft: error:` line, exit 2."""
import json
import shutil

import pytest
import torch
import transformers as T
from conftest import GLUE_DIR, needs_glue, needs_minilm, one_error_line

from kronpeft.runner import cli

pytestmark = [needs_glue, needs_minilm, pytest.mark.usefixtures("one_thread")]
QUICK = ["--max-train-samples", "16", "--max-eval-samples", "8", "--batch-size", "8", "--log-every", "1",
         "--no-eval-before"]


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return T.AutoTokenizer.from_pretrained(minilm_path)


def save_with(tokenizer, model, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer):
    """A tiny BERT encoder (128 positions) with the MiniLM tokenizer, as `--model` takes it."""
    torch.manual_seed(0)
    config = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    return save_with(tokenizer, T.BertModel(config), tmp_path_factory.mktemp("bert"))


def train(out, model, *extra, task="rte"):
    return cli.main(["train", "--task", task, "--data-dir", str(GLUE_DIR), "--model", str(model),
                     "--output-dir", str(out), *QUICK, *extra])


# -- §6, §15 --max-length shorter than the special tokens ------------------------------------------------

@pytest.mark.parametrize("task, length", [("rte", 1), ("rte", 2), ("sst2", 1)])
def test_max_length_the_tokenizer_cannot_truncate_to(tmp_path, capsys, bert_dir, task, length):
    code = train(tmp_path / "o", bert_dir, "--max-length", str(length), "--max-steps", "1", task=task)
    line = one_error_line(capsys, code, f"--max-length {length} is too short", "special tokens")
    assert not (tmp_path / "o").exists()
    minimum = int(line.rsplit("--max-length ", 1)[1].split()[0])
    assert train(tmp_path / "ok", bert_dir, "--max-length", str(minimum), "--max-steps", "1", task=task) == 0


# -- §14 a head of another label count --------------------------------------------------------------------

def test_head_with_another_label_count(tmp_path, capsys, tokenizer):
    config = T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          vocab_size=tokenizer.vocab_size, num_labels=2)
    folder = save_with(tokenizer, T.BertForSequenceClassification(config), tmp_path / "two-labels")
    capsys.readouterr()
    code = train(tmp_path / "o", folder, "--max-steps", "1", "--max-length", "32", task="stsb")
    one_error_line(capsys, code, "2 label(s)", "needs 1", "without a head")


# -- §10, §16, §22 generate ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    def make(bos):
        torch.manual_seed(0)
        config = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, vocab_size=tokenizer.vocab_size, max_position_embeddings=64,
                               pad_token_id=tokenizer.pad_token_id, bos_token_id=bos,
                               eos_token_id=tokenizer.sep_token_id)
        return save_with(tokenizer, T.LlamaForCausalLM(config), tmp_path_factory.mktemp("llama"))
    return {"bos": make(tokenizer.cls_token_id), "no-bos": make(None)}


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--temperature", "inf"),
                                         ("--temperature", "-1"), ("--seed", str(2**70)), ("--seed", "-1")])
def test_generate_numeric_flags(capsys, flag, value):
    one_error_line(capsys, cli.main(["generate", "--model", "m", "--prompt", "hi", flag, value]), flag)


def test_generate_empty_prompt_starts_from_bos(llama_dir):
    assert cli.main(["generate", "--model", str(llama_dir["bos"]), "--prompt", "", "--max-new-tokens", "3"]) == 0


def test_generate_empty_prompt_without_bos(capsys, llama_dir):
    code = cli.main(["generate", "--model", str(llama_dir["no-bos"]), "--prompt", "", "--max-new-tokens", "3"])
    one_error_line(capsys, code, "--prompt is empty", "no BOS")


def test_generate_more_tokens_than_positions(capsys, llama_dir):
    code = cli.main(["generate", "--model", str(llama_dir["bos"]), "--prompt", "hello", "--max-new-tokens", "100"])
    one_error_line(capsys, code, "--max-new-tokens 100", "64 positions")


# -- §17 a size beyond memory ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["bottleneck", "adakron", "lora"])
def test_huge_r_is_refused_before_allocating(tmp_path, capsys, bert_dir, method):
    code = train(tmp_path / "o", bert_dir, "--method", method, "--r", "2147483644", "--max-steps", "1")
    one_error_line(capsys, code, f"cannot build {method}", "GiB", "smaller")


# -- §22 flags that do not apply, --resume with --overwrite ---------------------------------------------------

@pytest.mark.parametrize("method, flags", [("krona", ["--r", "4"]), ("lora", ["--rank", "2"]),
                                           ("lora", ["--a-shape", "4,4"]), ("full", ["--targets", "query"]),
                                           ("lokr", ["--scale", "2"]), ("bottleneck", ["--init", "zero"])])
def test_a_flag_that_does_not_apply_to_the_method(tmp_path, capsys, bert_dir, method, flags):
    code = train(tmp_path / "o", bert_dir, "--method", method, "--max-steps", "1", "--max-length", "16", *flags)
    one_error_line(capsys, code, f"{flags[0]} does not apply to --method {method}", "it applies to")


@pytest.mark.parametrize("method, init", [("krona", "paper"), ("adakron", "kpsvd")])
def test_an_init_the_method_does_not_know(tmp_path, capsys, bert_dir, method, init):
    code = train(tmp_path / "o", bert_dir, "--method", method, "--max-steps", "1", "--max-length", "16", "--init", init)
    one_error_line(capsys, code, f"--init {init} is not an initialisation of --method {method}", "choose one of")


# -- §12, §21, §22 hand-edited resume state ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, bert_dir):
    out = tmp_path_factory.mktemp("run") / "run"
    assert train(out, bert_dir, "--max-length", "32", "--max-steps", "3", "--eval-every", "1",
                 "--stop-after", "2") == 0
    return out


STATE_EDITS = {
    "step -5": lambda s: s.update(step=-5), "step 10**6": lambda s: s.update(step=10**6),
    "string lr": lambda s: s["param_groups"][0].update(lr="0.005"),
    "evals not records": lambda s: s.update(evals=[1, 2]),
    "eval without its metric": lambda s: s["evals"][0].pop("accuracy"),
    "best of a string step": lambda s: s["best"].update(step="2"),
}


@pytest.mark.parametrize("edit", STATE_EDITS)
def test_hand_edited_checkpoint_state(tmp_path, capsys, bert_dir, stopped_run, edit):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    path = out / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    STATE_EDITS[edit](state)
    path.write_text(json.dumps(state))
    code = train(out, bert_dir, "--max-length", "32", "--max-steps", "3", "--eval-every", "1", "--resume")
    one_error_line(capsys, code, "state.json", "--overwrite")
    assert json.loads(path.read_text()) == state  # nothing changed


FLAGS = ["--max-length", "32", "--max-steps", "3", "--eval-every", "1"]


def test_resume_with_overwrite(tmp_path, capsys, bert_dir, stopped_run):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    one_error_line(capsys, train(out, bert_dir, *FLAGS, "--resume", "--overwrite"), "--resume", "--overwrite")
    assert (out / "checkpoint" / "state.json").is_file()


@pytest.mark.parametrize("content", ["[]", '{"task": "rte"}', "[" * 100_000])
def test_resume_of_a_garbled_finished_run(tmp_path, capsys, bert_dir, stopped_run, content):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    (out / "metrics.json").write_text(content)
    shutil.rmtree(out / "checkpoint")
    one_error_line(capsys, train(out, bert_dir, *FLAGS, "--resume"), "metrics.json", "--overwrite")


def test_overwrite_never_deletes_folders_kronpeft_did_not_write(tmp_path, capsys):
    for folder in ("adapter", "checkpoint"):
        out = tmp_path / folder
        (out / folder).mkdir(parents=True)
        (out / folder / "mine.txt").write_text("the user's file")
        code = cli.main(["train", "--task", "rte", "--data-dir", str(GLUE_DIR), "--output-dir", str(out),
                         "--overwrite", *QUICK, "--max-steps", "1", "--max-length", "16"])
        one_error_line(capsys, code, "--overwrite would delete", f"{folder}/", "did not write")
        assert (out / folder / "mine.txt").read_text() == "the user's file"
