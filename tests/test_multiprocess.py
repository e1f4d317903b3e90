"""`kronpeft train` under torchrun with 2 CPU processes (gloo) equals a 1-process run."""
import json

import pytest
import torch
from conftest import GLUE_DIR as GLUE
from conftest import needs_glue, needs_minilm, run_two_processes
from safetensors.torch import load_file

from kronpeft.runner import cli

# conftest.py's one_thread: one torch thread, restored after
pytestmark = [needs_glue, needs_minilm, pytest.mark.usefixtures("one_thread")]


# same global batch (8) and seed; dropout off, since each process draws its own masks. A moderate lr:
# Adam's first steps are ~lr * sign(grad), so float-level gradient differences on near-zero gradient
# entries would show up amplified to ~lr at the KronA default (5e-3) and above, not at 1e-3.
ARGS = ["train", "--task", "rte", "--method", "krona", "--data-dir", str(GLUE), "--max-train-samples", "16",
        "--max-eval-samples", "16", "--max-length", "32", "--max-steps", "2", "--batch-size", "8",
        "--no-dropout", "--no-eval-before", "--cpu", "--log-every", "1", "--lr", "1e-3"]


def test_two_processes_equal_one(tmp_path):
    run_two_processes(ARGS, tmp_path / "two")
    assert cli.main([*ARGS, "--output-dir", str(tmp_path / "one")]) == 0

    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert two["steps"] == one["steps"] == 2
    # only rank 0 wrote: one log line per step, not two
    logs = {run: [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("one", "two")}
    assert [r["step"] for r in logs["two"] if r["type"] == "train"] == [1, 2]
    # the loss and gradient norm of every step: gradients summed over processes instead of averaged would
    # double the norm (Adam's first steps barely see that scale, so the weights alone would not tell)
    for record_one, record_two in zip(logs["one"], logs["two"], strict=True):
        assert (record_one["type"], record_one["step"]) == (record_two["type"], record_two["step"])
        for key in ("loss", "grad_norm"):
            if key in record_one:
                assert record_two[key] == pytest.approx(record_one[key], rel=1e-4), (record_one["step"], key)
    assert two["final"] == pytest.approx(one["final"])

    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert any(k.endswith(".B") and a[k].abs().max() > 0 for k in a)  # it trained
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
