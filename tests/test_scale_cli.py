"""`kronpeft train --quantize int8|int4` and `--gradient-checkpointing` on the real all-MiniLM-L6-v2
and a real GLUE slice (issue 27)."""
import importlib.util
import json

import pytest
from conftest import needs_glue, needs_minilm
from safetensors.torch import load_file
from test_cli import assert_usage_error, train

pytestmark = [needs_glue, needs_minilm, pytest.mark.usefixtures("one_thread")]
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")


@needs_torchao
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_train_on_a_quantized_base_with_checkpointing(tmp_path, quantize):
    assert train(tmp_path / "q", "--quantize", quantize, "--gradient-checkpointing", "--no-dropout") == 0
    metrics = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["args"]["quantize"] == quantize
    assert metrics["args"]["gradient_checkpointing"] is True
    adapter = load_file(next((tmp_path / "q" / "adapter").glob("adapter_model*.safetensors")))
    assert any(k.endswith(".B") and t.abs().max() > 0 for k, t in adapter.items())  # it trained


@needs_torchao
def test_quantize_refuses_full_fine_tuning(tmp_path, capsys):
    code = train(tmp_path / "f", "--quantize", "int8", method="full")
    assert_usage_error(capsys, code, "--quantize int8", "--method full")
    assert not (tmp_path / "f").exists()
