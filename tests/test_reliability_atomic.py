"""§2 never lose an adapter or a run: a crash injected at every write step of `save_pretrained` and of
the checkpoint writer, each followed by a successful load (the old or the new version)."""
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_model, model_inputs, outputs

import kronpeft.atomic as atomic
from kronpeft import BottleneckConfig, KronAConfig, KronModel, get_model
from kronpeft.train import load_checkpoint, save_checkpoint


class Crash(BaseException):
    """A simulated kill -9: not an Exception, so no cleanup code runs."""


class CrashAt:
    """Patch every write step; the `at`-th call crashes (a writer first leaves half a file)."""

    def __init__(self, monkeypatch, at: int | None):
        self.calls, self.at = 0, at
        for owner, name in [(os, "replace"), (os, "rename"), (os, "link"), (os, "fsync"), (Path, "unlink"),
                            (shutil, "rmtree"),
                            (atomic, "save_file"), (atomic, "_write_text")]:
            monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name), name))

    def wrap(self, real, name):
        def step(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                if name in ("save_file", "_write_text"):
                    Path(args[1] if name == "save_file" else args[0]).write_bytes(b"half a file")
                raise Crash(name)
            return real(*args, **kwargs)
        return step


def crash_points(monkeypatch, write) -> int:
    with monkeypatch.context() as m:
        counter = CrashAt(m, None)
        write()
    return counter.calls


def crashed_copy(tmp_path, monkeypatch, at: int, write):
    """A fresh copy of `tmp_path/old` that `write(copy)` was cut off in at its `at`-th write step."""
    target = tmp_path / f"crash{at}"
    shutil.copytree(tmp_path / "old", target)
    with monkeypatch.context() as m:
        CrashAt(m, at)
        with pytest.raises(Crash):
            write(target)
    return target


def test_adapter_overwrite_survives_a_crash_at_every_step(tmp_path, monkeypatch):
    inputs = model_inputs(make_model("bert"))
    old = get_model(make_model("bert", seed=1), KronAConfig())
    new = get_model(make_model("bert", seed=2), KronAConfig())
    old.save_pretrained(tmp_path / "old")
    scratch = tmp_path / "scratch"
    shutil.copytree(tmp_path / "old", scratch)
    steps = crash_points(monkeypatch, lambda: new.save_pretrained(scratch))
    want_old, want_new = (outputs(KronModel.from_pretrained(make_model("bert"), d), inputs)
                          for d in (tmp_path / "old", scratch))
    assert not torch.equal(want_old, want_new)
    assert steps >= 6
    seen = set()
    for at in range(1, steps + 1):
        target = crashed_copy(tmp_path, monkeypatch, at, new.save_pretrained)
        got = outputs(KronModel.from_pretrained(make_model("bert"), target), inputs)
        seen.add("old" if torch.equal(got, want_old) else "new" if torch.equal(got, want_new) else "neither")
        new.save_pretrained(target)  # the next save cleans up and works
        assert torch.equal(outputs(KronModel.from_pretrained(make_model("bert"), target), inputs), want_new)
        assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert seen == {"old", "new"}


def test_first_save_survives_a_crash_at_every_step(tmp_path, monkeypatch):
    inputs = model_inputs(make_model("bert"))
    kron = get_model(make_model("bert", seed=2), BottleneckConfig(r=4))
    steps = crash_points(monkeypatch, lambda: kron.save_pretrained(tmp_path / "probe"))
    want = outputs(KronModel.from_pretrained(make_model("bert"), tmp_path / "probe"), inputs)
    for at in range(1, steps + 1):
        target = tmp_path / f"crash{at}"
        with monkeypatch.context() as m:
            CrashAt(m, at)
            with pytest.raises(Crash):
                kron.save_pretrained(target)
        if target.exists():  # the folder appears whole or not at all
            assert torch.equal(outputs(KronModel.from_pretrained(make_model("bert"), target), inputs), want)
        kron.save_pretrained(target)
        assert torch.equal(outputs(KronModel.from_pretrained(make_model("bert"), target), inputs), want)


def training_state(seed):
    torch.manual_seed(seed)
    model = get_model(make_model("bert"), KronAConfig())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(seed):
        model(**model_inputs(model.base_model)).logits.square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def fresh_load(directory):
    model, optimizer, scheduler = training_state(0)
    meta = load_checkpoint(directory, model, optimizer, scheduler)
    return meta["step"], {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpoint_survives_a_crash_at_every_step(tmp_path, monkeypatch):
    old, new = training_state(1), training_state(2)
    base = {"evals": [], "best": None, "train_seconds": 0.0, "args": {}}
    save_checkpoint(tmp_path / "old", *old, {**base, "step": 1})
    shutil.copytree(tmp_path / "old", tmp_path / "scratch")
    steps = crash_points(monkeypatch, lambda: save_checkpoint(tmp_path / "scratch", *new, {**base, "step": 2}))
    assert steps >= 8
    trained = {1: {n: p.detach() for n, p in old[0].named_parameters() if p.requires_grad},
               2: {n: p.detach() for n, p in new[0].named_parameters() if p.requires_grad}}
    seen = set()
    for at in range(1, steps + 1):
        target = crashed_copy(tmp_path, monkeypatch, at, lambda d: save_checkpoint(d, *new, {**base, "step": 2}))
        step, params = fresh_load(target)
        assert all(torch.equal(params[n], trained[step][n]) for n in params)
        seen.add(step)
        save_checkpoint(target, *new, {**base, "step": 2})  # the next write cleans up: the plain layout again
        assert sorted(p.name for p in target.iterdir()) == ["optimizer.safetensors", "state.json",
                                                            "trainable.safetensors"]
    assert seen == {1, 2}
