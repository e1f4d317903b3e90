"""§2 never lose an adapter or a run: a crash injected at every write step of `save_pretrained`, of the
checkpoint writer and of the folder swap (merged models, PEFT exports), each followed by a successful
load (the old or the new version)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, model_inputs, outputs

import kronpeft.atomic as atomic
from kronpeft import BottleneckConfig, KronAConfig, KronModel, get_model
from kronpeft.runner.train.checkpoints import load_checkpoint, save_checkpoint


class Crash(BaseException):
    """A simulated kill -9: not an Exception, so no cleanup code runs."""


class CrashAt:
    """Patch every write step; the `at`-th call crashes (a writer first leaves half a file)."""

    def __init__(self, monkeypatch, at: int | None):
        self.calls, self.at = 0, at
        for owner, name in [(os, "replace"), (os, "rename"), (os, "link"), (os, "fsync"), (Path, "unlink"),
                            (shutil, "rmtree"),
                            (atomic, "save_file"), (atomic, "_write_text"), (atomic, "_exchange")]:
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


def folder(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in path.iterdir()}


def write_new_folder(target, keep_others=False):
    with atomic.replacing_dir(target, keep_others=keep_others) as tmp:
        atomic._write_text(tmp / "a.txt", "new a")
        atomic._write_text(tmp / "b.txt", "new b")


@pytest.mark.parametrize("swap", ["exchange", "rename aside"])
@pytest.mark.parametrize("keep_others", [False, True])
def test_folder_swap_survives_a_crash_at_every_step(tmp_path, monkeypatch, keep_others, swap):
    if swap == "rename aside":  # systems without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "a.txt").write_text("old a")
    (tmp_path / "old" / "c.txt").write_text("old c")  # not written by the new version
    old = folder(tmp_path / "old")
    new = {"a.txt": "new a", "b.txt": "new b", **({"c.txt": "old c"} if keep_others else {})}
    shutil.copytree(tmp_path / "old", tmp_path / "scratch")
    steps = crash_points(monkeypatch, lambda: write_new_folder(tmp_path / "scratch", keep_others))
    assert folder(tmp_path / "scratch") == new
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the old folder is gone
    seen = set()
    for at in range(1, steps + 1):
        target = crashed_copy(tmp_path, monkeypatch, at, lambda d: write_new_folder(d, keep_others))
        if target.exists():
            state = "old" if folder(target) == old else "new" if folder(target) == new else "neither"
        else:  # only without the swap: between the two renames, the old folder waits under a hidden name
            aside = [p for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}.tmp-old-")]
            assert swap == "rename aside" and len(aside) == 1 and folder(aside[0]) == old
            state = "aside"
        seen.add(state)
        write_new_folder(target, keep_others)  # the next write works (nothing to carry over once aside)
        assert folder(target) == (new if state != "aside" else {"a.txt": "new a", "b.txt": "new b"})
    assert {"old", "new"} <= seen and "neither" not in seen
    assert ("aside" in seen) == (swap == "rename aside")


def test_folder_swap_error_leaves_the_old_folder_and_new_folders_get_the_usual_permissions(tmp_path, monkeypatch):
    target = tmp_path / "out"
    write_new_folder(target)
    (tmp_path / "plain").mkdir()
    assert target.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777  # not mkdtemp's 0700
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.replacing_dir(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("disk full")
    assert folder(target) == {"a.txt": "new a", "b.txt": "new b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plain"]  # the partial folder is removed
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename, failed = os.rename, []

    def rename_new_in_fails(a, b):  # the new folder cannot be renamed in; the old one can be renamed back
        if Path(a).name.startswith(".out.tmp-") and Path(b) == target and not failed:
            failed.append(a)
            raise OSError(28, "No space left on device")
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename_new_in_fails)
    with pytest.raises(OSError, match="No space"):
        with atomic.replacing_dir(target) as tmp:
            (tmp / "a.txt").write_text("newer a")
    assert failed and folder(target) == {"a.txt": "new a", "b.txt": "new b"}  # renamed back from aside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plain"]


def test_a_later_write_removes_what_dead_writers_left_and_spares_live_ones(tmp_path):
    """A kill between mkdir and the swap leaves a hidden folder (a merged model's size); the next write of
    the same target deletes those of processes that are gone, not those of running ones (this one too)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process now
    target = tmp_path / "out"
    left = [tmp_path / f".out.tmp-{gone.pid}-dead0001", tmp_path / f".out.tmp-old-{gone.pid}-dead0002",
            tmp_path / f".out.tmp-{os.getpid()}-live0003", tmp_path / f".other.tmp-{gone.pid}-dead0004"]
    for path in left:
        path.mkdir()
        (path / "weights").write_text("big")
    write_new_folder(target)
    assert folder(target) == {"a.txt": "new a", "b.txt": "new b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", left[2].name, left[3].name])
    (tmp_path / "adapter").mkdir()  # a first adapter save cleans up the same way
    (tmp_path / "adapter" / f".a.tmp-{gone.pid}-dead0005").mkdir()
    model = get_model(make_model("bert"), KronAConfig())
    model.save_pretrained(tmp_path / "adapter" / "a")
    assert [p.name for p in (tmp_path / "adapter").iterdir()] == ["a"]


def trained(method, seed):
    from kronpeft.runner import baselines

    model = baselines.build(method, make_model("bert"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("method", ["lora", "full", "krona"])
def test_best_adapter_of_a_run_survives_a_crash_at_every_step(tmp_path, monkeypatch, method):
    """`train` re-saves `adapter/` at every better eval: a kill mid-save leaves the previous best loadable,
    for PEFT adapters and whole models as for kronpeft's own."""
    from transformers import AutoModelForSequenceClassification

    from kronpeft.runner import baselines

    def load(folder):
        if method == "full":
            return AutoModelForSequenceClassification.from_pretrained(folder).eval()
        return baselines.load_trained(folder, make_model("bert"), baselines.read_run(folder)).eval()

    inputs = model_inputs(make_model("bert"))
    old, new = trained(method, 1), trained(method, 2)

    def save_new(folder):
        baselines.save_trained(new, method, folder, {"task": "rte"})

    baselines.save_trained(old, method, tmp_path / "old", {"task": "rte"})
    steps = crash_points(monkeypatch, lambda: save_new(tmp_path / "scratch"))
    want_old, want_new = outputs(load(tmp_path / "old"), inputs), outputs(load(tmp_path / "scratch"), inputs)
    assert not torch.equal(want_old, want_new) and torch.equal(want_new, outputs(new, inputs))
    seen = set()
    for at in range(1, steps + 1):
        target = crashed_copy(tmp_path, monkeypatch, at, save_new)
        got = outputs(load(target), inputs)
        seen.add("old" if torch.equal(got, want_old) else "new" if torch.equal(got, want_new) else "neither")
    assert seen == {"old", "new"}
