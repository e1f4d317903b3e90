"""FSDP2 (`fully_shard`) and FSDP1 on a gloo CPU mesh of 2 processes train like one process, and the
adapter they save equals the unsharded one (issue 27)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scale_worker import METHODS, tiny_decoder, train_tiny, train_with_trainer

from kronpeft import get_model

pytestmark = pytest.mark.usefixtures("one_thread")
WORKER = Path(__file__).with_name("scale_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"


def torchrun(*args: str):
    """`scale_worker.py <args>` under torchrun, 2 processes of one thread each; must exit 0."""
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), *args], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_run(one: Path, two: Path, losses_one: list[float]):
    losses_two = json.loads((two / "losses.json").read_text())
    assert losses_two == pytest.approx(losses_one, rel=1e-5)
    assert losses_one[-1] < losses_one[0]  # it trained
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (one, two))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key  # the full tensor, not a shard
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert any(a[k].abs().max() > 0 for k in a if k.endswith(".B") or ".up." in k)


def test_fsdp2_two_processes_equal_one(tmp_path):
    methods = ["krona", "kronab", "adakron"]
    torchrun("fsdp2", str(tmp_path / "two"), *methods)
    for method in methods:
        losses = train_tiny(method, tmp_path / "one" / method)
        assert_same_run(tmp_path / "one" / method, tmp_path / "two" / method, losses)
    # KronSaveCallback, called on every process as Trainer does, writes the same adapter from the sharded model
    by_callback = load_file(tmp_path / "two" / "krona" / "trainer" / "adapter_model.safetensors")
    direct = load_file(tmp_path / "two" / "krona" / "adapter" / "adapter_model.safetensors")
    assert by_callback.keys() == direct.keys() and all(torch.equal(by_callback[k], direct[k]) for k in direct)
    # a sharded weight is refused by merge_adapter, naming the fix (the unsharded model merges)
    error = (tmp_path / "two" / "krona" / "merge_error.txt").read_text()
    assert "sharded over processes (FSDP2 DTensor)" in error and "merge_and_unload" in error
    assert not (tmp_path / "one" / "krona" / "merge_error.txt").exists()


@pytest.mark.parametrize("engine, refusal", [
    ("fsdp1", "holds only this process's part of the weight"),
    ("fsdp1-flat", "flat-parameter view (use_orig_params=False)")])
def test_fsdp1_two_processes_equal_one(tmp_path, engine, refusal):
    """FSDP1, both `use_orig_params` settings (False: with `fsdp1_auto_wrap_policy`, which gives the
    adapters their own units; without it FSDP1 refuses a unit mixing frozen and trained tensors). Outside
    forward each process's adapter tensors are views of its shard (often empty, or freed): save_pretrained
    gathers them (summon_full_params) instead of writing `[0]`-shaped tensors, and merging is refused
    before it writes into a freed storage (which crashed the process)."""
    methods = ["krona", "adakron"] if engine == "fsdp1-flat" else ["krona"]  # AdaKron: a unit per FFN/attn adapter
    torchrun(engine, str(tmp_path / "two"), *methods)
    for method in methods:
        losses = train_tiny(method, tmp_path / "one" / method)
        assert_same_run(tmp_path / "one" / method, tmp_path / "two" / method, losses)
    error = (tmp_path / "two" / "krona" / "merge_error.txt").read_text()  # refused, before changing anything
    assert refusal in error and "merge_and_unload" in error


def test_trainer_with_fsdp2_on_two_processes_equals_one(tmp_path):
    """The docs/scale.md recipe: `Trainer(fsdp=..., fsdp_config={"version": 2, ...})` + `KronSaveCallback`,
    on gloo (accelerate's FSDP switch made as on GPUs: `GlooFsdpTrainer`): the logged losses, the adapter
    the callback writes and `trainer.save_model()`'s file equal a 1-process Trainer run's."""
    torchrun("trainer-fsdp2", str(tmp_path / "two"))
    losses = train_with_trainer(tmp_path / "one", fsdp=False)
    assert json.loads((tmp_path / "two" / "losses.json").read_text()) == pytest.approx(losses, rel=1e-5)
    assert losses[-1] < losses[0]
    for name in ("adapter_model.safetensors", "model.safetensors"):
        a, b = (load_file(tmp_path / run / "trainer" / name) for run in ("one", "two"))
        assert a.keys() == b.keys() and a
        for key in a:
            assert a[key].shape == b[key].shape and torch.allclose(a[key], b[key], atol=1e-6), (name, key)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_processes_equal_one(tmp_path, stage):
    """DeepSpeed ZeRO-2/3 on its CPU accelerator (gloo). ZeRO-3 partitions every parameter, the adapters'
    too (empty on each process outside forward): save_pretrained gathers them (GatheredParameters)
    and merging is refused; ZeRO-2 keeps whole parameters (it partitions optimizer state and gradients)."""
    torchrun(f"zero{stage}", str(tmp_path / "two"), "krona")
    losses = train_tiny("krona", tmp_path / "one" / "krona")
    assert_same_run(tmp_path / "one" / "krona", tmp_path / "two" / "krona", losses)
    if stage == 3:
        error = (tmp_path / "two" / "krona" / "merge_error.txt").read_text()
        assert "partitioned by DeepSpeed ZeRO-3" in error and "merge_and_unload" in error


def test_only_the_main_process_writes_an_unsharded_adapter(tmp_path, monkeypatch):
    """ZeRO-2 and DDP keep whole parameters on every process: save_pretrained called on every process (as for
    a sharded model) wrote from each at once, and two processes renamed into one folder (ENOTEMPTY in CI)."""
    from kronpeft import sharding

    model = get_model(tiny_decoder(), METHODS["krona"]())
    monkeypatch.setattr(sharding, "is_main_process", lambda: False)
    model.save_pretrained(tmp_path / "other")
    assert not (tmp_path / "other").exists()
    monkeypatch.setattr(sharding, "is_main_process", lambda: True)
    model.save_pretrained(tmp_path / "main")
    assert (tmp_path / "main" / "adapter_model.safetensors").is_file()
