"""`kronpeft study` / `kronpeft report` without training: planning, skipping, resuming, concurrent appends,
malformed rows, and the rendered table and plots from a hand-written results file."""
from __future__ import annotations

import fcntl
import importlib.util
import json
import math
import multiprocessing
import os
import re
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import held_by_another_runner

from kronpeft.runner.errors import UsageError
from kronpeft.runner.report import figures as report_figures
from kronpeft.runner.report import page as report_page
from kronpeft.runner.report import stats as report_stats
from kronpeft.runner.study import estimate as study_estimate
from kronpeft.runner.study import execute as study_execute
from kronpeft.runner.study import grid as study_grid
from kronpeft.runner.study import plan as study_plan
from kronpeft.runner.study import results as study_results
from kronpeft.runner.cli import build_parser, main

GRID = """
[study]
name = "t"
results = "results.jsonl"
tasks = ["mrpc", "rte"]
seeds = [0, 1, 2]
extend_edges = false

[train]
epochs = 5
batch_size = 32

[[method]]
name = "krona"
method = "krona"
lrs = [1e-3, 3e-3, 1e-2]

[[method]]
name = "lora-r8"
method = "lora"
family = "lora"
lrs = [1e-3, 3e-3]
tasks = ["mrpc"]
args = { r = 8 }
"""


@pytest.fixture
def grid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the grid's run folders (runs/study/t) land here, not in the repository
    monkeypatch.delenv("GLUE_DIR", raising=False)  # no majority-class score: these fake scores flag nothing
    path = tmp_path / "grid.toml"
    path.write_text(GRID)
    return study_grid.load_grid(path)


def fake_row(grid, run, score, train_seconds=10.0, params=1000):
    return {"key": run.key(grid), "grid": grid.name, "task": run.task, "name": run.entry.name,
            "method": run.entry.method, "family": run.entry.family, "lr": run.lr, "seed": run.seed,
            "stage": run.stage, "score": score, "main_metric": "f1", "trainable_params": params + 770,
            "head_params": 770, "total_params": 1_000_000 + params, "train_seconds": train_seconds,
            "wall_seconds": train_seconds + 5, "steps": 100, "threads": 1, "flags": run.flags(grid),
            "cpu": "test cpu"}


def test_plan_sweeps_first_then_seeds_at_the_best_rate(grid):
    todo, waiting = study_plan.plan(grid, [])
    assert [r.label() for r in todo] == [
        "mrpc/krona/lr0.001/seed0", "mrpc/krona/lr0.003/seed0", "mrpc/krona/lr0.01/seed0",
        "mrpc/lora-r8/lr0.001/seed0", "mrpc/lora-r8/lr0.003/seed0",
        "rte/krona/lr0.001/seed0", "rte/krona/lr0.003/seed0", "rte/krona/lr0.01/seed0"]
    cells = ("mrpc/krona", "mrpc/lora-r8", "rte/krona")
    assert [r.label() for r in waiting] == [f"{c}/lr?/seed{s}" for c in cells for s in (1, 2)]  # rate: not chosen
    rows = [fake_row(grid, r, score) for r, score in zip(todo[:3], (0.80, 0.85, 0.82))]
    todo, _ = study_plan.plan(grid, rows)
    seeds = [r for r in todo if r.stage == "seed"]
    assert [(r.task, r.entry.name, r.lr, r.seed) for r in seeds] == [("mrpc", "krona", 0.003, s) for s in (1, 2)]


def test_runs_left_counts_sweeps_and_the_seeds_waiting_for_them(grid):
    assert study_plan.runs_left(grid) == (8 + 3 * 2, 0)  # 8 sweep runs; 2 more seeds for each of 3 (task, method) cells
    todo, _ = study_plan.plan(grid, [])
    rows = [fake_row(grid, r, score) for r, score in zip(todo[:3], (0.80, 0.85, 0.82))]
    grid.results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert study_plan.runs_left(grid) == (14 - 3, 0)


def test_runs_left_with_edge_extensions_separates_what_may_not_run(grid, capsys, monkeypatch):
    """A two-rate sweep always gets its extension (the winner sits on an edge); a three-rate sweep only
    maybe; seeds already run at a cell's present best run again only if the pending extension wins."""
    grid.path.write_text(grid.path.read_text().replace("extend_edges = false", "edge_factor = 2"))
    grid = study_grid.load_grid(grid.path)
    todo, _ = study_plan.plan(grid, [])
    krona = todo[:3]  # mrpc/krona 1e-3, 3e-3, 1e-2: 1e-2 wins, at the edge
    rows = [fake_row(grid, r, score) for r, score in zip(krona, (0.80, 0.82, 0.85))]
    rows += [fake_row(grid, study_grid.Run("mrpc", krona[0].entry, 0.01, s, "seed"), 0.84) for s in (1, 2)]
    todo, waiting = study_plan.plan(grid, rows)
    assert [r.label() for r in todo] == ["mrpc/krona/lr0.02/seed0", "mrpc/lora-r8/lr0.001/seed0",
                                         "mrpc/lora-r8/lr0.003/seed0", "rte/krona/lr0.001/seed0",
                                         "rte/krona/lr0.003/seed0", "rte/krona/lr0.01/seed0"]
    maybe = study_plan.maybe_needed(grid, rows, waiting)
    assert [(r.label(), r.stage) for r in maybe] == [
        ("mrpc/krona/lr?/seed1", "seed"), ("mrpc/krona/lr?/seed2", "seed"), ("rte/krona/lr?/seed0", "sweep")]
    assert [r.label() for r in waiting if r not in maybe] == [
        "mrpc/lora-r8/lr?/seed0", "mrpc/lora-r8/lr?/seed1", "mrpc/lora-r8/lr?/seed2",
        "rte/krona/lr?/seed1", "rte/krona/lr?/seed2"]
    grid.results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert study_plan.runs_left(grid) == (6 + 5, 3)
    monkeypatch.setattr(study_estimate, "_train_size", lambda task, data_dir: None)
    assert main(["study", str(grid.path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "later  mrpc/krona/lr?/seed1 (only if the edge extension beats the rate this seed ran at)" in out
    assert "later  mrpc/lora-r8/lr?/seed0 (the sweep's edge extension)" in out
    assert "later  rte/krona/lr?/seed0 (the sweep's edge extension if its winner lands on an edge)" in out
    assert "6 can start now, 8 more wait for their sweep (3 of them may not be needed, as listed)" in out
    assert re.search(r"estimate \d+\.\d-\d+\.\d CPU-hours", out)


def test_a_winner_at_the_edge_extends_the_sweep_by_one_value(grid):
    grid.extend_edges = True
    todo, _ = study_plan.plan(grid, [])
    rows = [fake_row(grid, r, score) for r, score in zip(todo[:3], (0.80, 0.82, 0.85))]  # 1e-2 wins: edge
    todo, _ = study_plan.plan(grid, rows)
    mrpc_krona = [r for r in todo if r.task == "mrpc" and r.entry.name == "krona"]
    assert [(r.lr, r.stage) for r in mrpc_krona] == [(0.0333, "sweep")]  # 1e-2 * (1e-2 / 3e-3), 3 digits
    rows.append(fake_row(grid, mrpc_krona[0], 0.84))  # the extension loses: seeds run at 1e-2
    todo, _ = study_plan.plan(grid, rows)
    assert {(r.lr, r.seed) for r in todo if r.task == "mrpc" and r.entry.name == "krona"} == {(0.01, 1), (0.01, 2)}


def test_edge_factor_sets_the_extension_and_a_winning_extension_moves_the_seeds(grid):
    """With `edge_factor` the extension is the edge times (or over) it; seeds already run at the old winner
    stay recorded, and when the extension wins the seeds run again at the new rate."""
    grid.extend_edges, grid.edge_factor = True, 2.0
    todo, _ = study_plan.plan(grid, [])
    rows = [fake_row(grid, r, score) for r, score in zip(todo[3:5], (0.90, 0.80))]  # lora-r8: 1e-3, lowest
    todo, _ = study_plan.plan(grid, rows)
    lora = [r for r in todo if r.task == "mrpc" and r.entry.name == "lora-r8"]
    assert [(r.lr, r.stage) for r in lora] == [(0.0005, "sweep")]  # 1e-3 / 2
    top = study_grid.Run("mrpc", lora[0].entry, 0.003, 0, "sweep")
    rows[1] = fake_row(grid, top, 0.95)  # now 3e-3, the top, wins: 3e-3 * 2
    assert [r.lr for r in study_plan.plan(grid, rows)[0] if r.entry.name == "lora-r8"] == [0.006]
    rows[1] = fake_row(grid, top, 0.80)
    rows += [fake_row(grid, study_grid.Run("mrpc", lora[0].entry, 0.001, s, "seed"), 0.9) for s in (1, 2)]
    rows.append(fake_row(grid, lora[0], 0.93))  # the extension wins: seeds 1, 2 again, at 5e-4
    todo, waiting = study_plan.plan(grid, rows)
    assert {(r.lr, r.seed) for r in todo if r.entry.name == "lora-r8"} == {(0.0005, 1), (0.0005, 2)}
    assert not [r for r in waiting if r.entry.name == "lora-r8"]


@pytest.mark.parametrize("toml", ["1", "0.5", '"2"', "true", "inf"])
def test_edge_factor_must_be_a_number_above_one(grid, toml):
    grid.path.write_text(grid.path.read_text().replace("extend_edges = false", f"edge_factor = {toml}"))
    with pytest.raises(UsageError, match="edge_factor must be a number above 1"):
        study_grid.load_grid(grid.path)


def test_runner_skips_recorded_runs_and_resumes_after_an_interruption(grid, monkeypatch):
    calls = []

    def fake_run_one(grid_, run, threads, parallel, host):
        calls.append(run.label())
        if len(calls) == 3:
            raise KeyboardInterrupt  # the session ends mid-grid
        return fake_row(grid_, run, 0.5 + 0.01 * len(calls))

    monkeypatch.setattr(study_execute, "run_one", fake_run_one)
    monkeypatch.setattr(study_execute, "machine", lambda: {})
    with pytest.raises(KeyboardInterrupt):
        study_execute.run_grid(grid, parallel=1)
    first = list(calls)
    assert len(study_results.read_results(grid.results)) == 2
    calls.clear()
    monkeypatch.setattr(study_execute, "run_one",
                        lambda g, run, *a: (calls.append(run.label()), fake_row(g, run, 0.6))[1])
    recorded = study_execute.run_grid(grid, parallel=2)
    assert not set(first[:2]) & set(calls), "recorded runs must not run again"
    assert first[2] in calls, "the interrupted run runs again"
    rows = study_results.read_results(grid.results)
    assert len(rows) == len({r["key"] for r in rows}) == 2 + recorded
    assert study_plan.plan(grid, rows)[0] == []  # grid complete: 3 + 2 + 3 sweeps and 2 seeds for each of 3 pairs
    assert len(rows) == 8 + 6


def _append_many(path, worker, n):
    for i in range(n):
        study_results.append_row(path, {"key": f"{worker}-{i}", "task": "mrpc", "name": "x", "lr": 1e-3, "seed": i,
                                "score": 0.5, "pad": "x" * 5000})


def test_task_and_method_filters(grid, monkeypatch):
    ran = []
    monkeypatch.setattr(study_execute, "run_one",
                        lambda g, run, *a: (ran.append(run.label()), fake_row(g, run, 0.5))[1])
    monkeypatch.setattr(study_execute, "machine", lambda: {})
    study_execute.run_grid(study_grid.select(grid, ["mrpc"], ["lora-r8"]))
    assert ran == ["mrpc/lora-r8/lr0.001/seed0", "mrpc/lora-r8/lr0.003/seed0",
                   "mrpc/lora-r8/lr0.001/seed1", "mrpc/lora-r8/lr0.001/seed2"]
    keys = {r.label(): r.key(grid) for r in study_plan.plan(grid, [])[0]}  # a run's identity ignores the selection
    assert all(keys[r.label()] == r.key(grid) for r in study_plan.plan(study_grid.select(grid, ["rte"]), [])[0])


def test_an_unwritable_results_file_is_refused_before_any_run(tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "g.toml"
    path.write_text(GRID.replace('results = "results.jsonl"', 'results = "a-file/results.jsonl"'))
    monkeypatch.setattr(study_execute, "run_one",
                        lambda *a: pytest.fail("started a run whose row could not be recorded"))
    assert main(["study", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write its results file" in err[0] and "[study] results" in err[0]


def test_task_and_method_filters_in_the_cli(grid, capsys, monkeypatch):
    monkeypatch.setattr(study_estimate, "_train_size", lambda task, data_dir: None)
    assert main(["study", str(grid.path), "--dry-run", "--tasks", "rte"]) == 0
    listed = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("sweep")]
    assert listed == ["rte/krona/lr0.001/seed0", "rte/krona/lr0.003/seed0", "rte/krona/lr0.01/seed0"]
    for flag, value, words in [("--tasks", "sst2", "--tasks sst2: not in grid"),
                               ("--methods", "lora-r8,zz", "--methods zz: not in grid")]:
        assert main(["study", str(grid.path), flag, value]) == 2
        err = capsys.readouterr().err
        assert words in err and "its " + flag[2:] in err
    assert not grid.results.exists()


def test_concurrent_appends_never_corrupt_or_duplicate(tmp_path):
    path = tmp_path / "results.jsonl"
    procs = [multiprocessing.get_context("fork").Process(target=_append_many, args=(path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 160 and all(json.loads(line)["pad"] == "x" * 5000 for line in lines)
    assert not study_results.append_row(path, {"key": "0-0", "task": "mrpc", "name": "x", "lr": 1e-3, "seed": 0,
                                               "score": 0.9})
    assert len(path.read_text().splitlines()) == 160


def test_two_grids_holding_the_same_run_each_record_it_and_the_runner_never_loops(grid, monkeypatch):
    """A key is a run's flags, so a second grid may define a run another grid already recorded: each grid
    gets its row. A row the file refuses is not launched again by the same runner."""
    run = study_plan.plan(grid, [])[0][0]
    row = fake_row(grid, run, 0.8)
    assert study_results.append_row(grid.results, {**row, "grid": "another-grid"})
    assert study_results.append_row(grid.results, row)  # the same key, this grid: recorded too
    assert not study_results.append_row(grid.results, row)
    assert run.key(grid) in {r["key"] for r in study_results.read_results(grid.results) if r["grid"] == grid.name}
    launched = []
    monkeypatch.setattr(study_execute, "run_one", lambda g, r, *a: (launched.append(r.label()), fake_row(g, r, 0.5))[1])
    monkeypatch.setattr(study_execute, "machine", dict)
    monkeypatch.setattr(study_execute, "append_row", lambda path, row: False)  # e.g. another runner was first
    assert study_execute.run_grid(study_grid.select(grid, ["mrpc"], ["lora-r8"])) == 0
    assert launched == ["mrpc/lora-r8/lr0.001/seed0", "mrpc/lora-r8/lr0.003/seed0"]  # once each


def test_a_second_runner_leaves_a_claimed_run_alone(grid, tmp_path, monkeypatch):
    grid.runs_dir = tmp_path / "runs"
    run = study_plan.plan(grid, [])[0][0]
    monkeypatch.setattr(study_execute, "_train", lambda *a: pytest.fail("trained a run another runner holds"))
    with held_by_another_runner(run.folder(grid)):
        assert study_execute.run_one(grid, run, 1, 1, {}) == "busy"


def test_malformed_rows_are_reported_with_their_line_and_skipped(grid, capsys):
    good = fake_row(grid, study_plan.plan(grid, [])[0][0], 0.8)
    grid.results.write_text(json.dumps(good) + "\n" + '{"key": "x", "task": "mrpc"\n' + "[1, 2]\n"
                            + json.dumps({**good, "key": "y", "score": "high"}) + "\n")
    rows = study_results.read_results(grid.results)
    assert [r["key"] for r in rows] == [good["key"]]
    err = capsys.readouterr().err
    for line in (2, 3, 4):
        assert f"results.jsonl:{line}: skipped malformed row" in err
    assert "results.jsonl:1:" not in err


def test_a_crash_mid_line_does_not_swallow_the_next_row(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"key": "a", "task": "m", "name": "x", "lr": 1, "seed": 0, "score": 1}\n{"key": "b", "ta')
    study_results.append_row(path, {"key": "c", "task": "m", "name": "x", "lr": 1, "seed": 0, "score": 1})
    assert [r["key"] for r in study_results.read_results(path, warn=lambda m: None)] == ["a", "c"]


def test_a_cell_waiting_for_its_edge_extension_is_not_final(tmp_path, monkeypatch):
    """Seeds run at a sweep winner that sits at the edge do not make the cell final while the extension is
    to come: the table says so, the claim waits, the count of complete cells leaves it out."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GLUE_DIR", raising=False)
    path = tmp_path / "grid.toml"
    path.write_text(GRID.replace("extend_edges = false", "edge_factor = 2.0")
                    + '[[claim]]\ntext = "KronA beats LoRA"\nbetter = "krona"\nworse = "lora-r8"\n')
    grid = study_grid.load_grid(path)
    krona, lora = grid.methods
    rows = [fake_row(grid, study_grid.Run("mrpc", krona, lr, 0, "sweep"), score)
            for lr, score in ((1e-3, 0.80), (3e-3, 0.85), (1e-2, 0.82))]  # inside the sweep: no extension
    rows += [fake_row(grid, study_grid.Run("mrpc", lora, lr, 0, "sweep"), score)
             for lr, score in ((1e-3, 0.90), (3e-3, 0.80))]
    rows += [fake_row(grid, study_grid.Run("mrpc", e, lr, seed, "seed"), 0.84 + seed / 100)
             for e, lr in ((krona, 3e-3), (lora, 1e-3)) for seed in (1, 2)]
    grid.results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "results.md"
    assert main(["report", str(path), "--out", str(out)]) == 0
    page = out.read_text()
    assert "| lora-r8 | 1,000 | 0.100 | 87.0 ± 2.6 [86.0] (sweep not finished) |" in page  # 1e-3 lowest: 5e-4 next
    # paired by seed: -5, 0, 0 points: t = -1 with 2 df, p = 1 - 1 / sqrt 3 = 0.42
    assert "| mrpc | -1.7 | -7.9 to +4.5 | 0.39 | 0.42 | 0.42 | — | waiting (sweep not finished) |" in page
    assert "Cells complete at 3 seeds: 1 of 3;" in page
    extension = study_grid.Run("mrpc", lora, 5e-4, 0, "sweep")
    with grid.results.open("a") as f:
        f.write(json.dumps(fake_row(grid, extension, 0.70)) + "\n")  # it loses: the cell is final
    assert main(["report", str(path), "--out", str(out)]) == 0
    page = out.read_text()
    assert "sweep not finished" not in page and "Cells complete at 3 seeds: 2 of 3;" in page
    assert "| KronA beats LoRA (`krona` vs `lora-r8`) | mrpc | -1.7 | -7.9 to +4.5 | 0.39 | 0.42 | 0.42 | — | within " \
        "noise |" in page


def test_report_renders_known_means_and_stds_and_the_plots(grid, tmp_path):
    todo, _ = study_plan.plan(grid, [])
    rows = []
    # mrpc/krona: lr 3e-3 wins the sweep (0.85); seeds 1, 2 score 0.83 and 0.87 -> 85.0 ± 2.0 over 3 seeds
    for run, score in zip(todo[:3], (0.80, 0.85, 0.82)):
        rows.append(fake_row(grid, run, score, train_seconds=30.0, params=9984))
    # mrpc/lora-r8: 1e-3 wins (0.90), one more seed only (0.80) -> 85.0 ± 7.1 (2/3 seeds)
    for run, score in zip(todo[3:5], (0.90, 0.70)):
        rows.append(fake_row(grid, run, score, train_seconds=20.0, params=73728))
    for run, score in zip(todo[5:8], (0.60, 0.65, 0.62)):
        rows.append(fake_row(grid, run, score, train_seconds=30.0, params=9984))
    todo, _ = study_plan.plan(grid, rows)
    extra = {("mrpc", "krona", 1): 0.83, ("mrpc", "krona", 2): 0.87, ("mrpc", "lora-r8", 1): 0.80,
             ("rte", "krona", 1): 0.66, ("rte", "krona", 2): 0.64}
    rows += [fake_row(grid, r, extra[(r.task, r.entry.name, r.seed)], train_seconds=30.0 if r.entry.name == "krona"
                      else 20.0, params=9984 if r.entry.name == "krona" else 73728)
             for r in todo if (r.task, r.entry.name, r.seed) in extra]
    for r in rows:  # the dev score after each epoch: mrpc/krona's chosen cell ends at its best score
        if (r["task"], r["name"], r["lr"]) == ("mrpc", "krona", 0.003):
            r["curve"] = [[0.0, 0.3], [1.0, 0.80], [2.0, r["score"]]]
    # a row recorded before a grid edit (its flags, so its key, differ): shown nowhere, counted
    rows.append({**fake_row(grid, todo[0], 0.10), "seed": 1, "key": "recorded-with-epochs-3"})
    grid.results.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    out = tmp_path / "docs" / "results.md"
    assert main(["report", str(grid.path), "--out", str(out)]) == 0
    page = out.read_text()
    assert "(13 runs) alone; 1 row(s) recorded under earlier settings of this grid are not shown." in page
    assert "| krona | 9,984 | 0.998 | 85.0 ± 2.0 [85.0] | 65.0 ± 1.0 [65.0] | 75.0 |" in page
    assert "| lora-r8 | 73,728 | 7.373 | 85.0 ± 7.1 (2/3 seeds) | — | — |" in page
    assert "**0.003** (0.001: 80.0, 0.003: 85.0, 0.01: 82.0)" in page  # inside its sweep: no edge mark
    assert "**0.001** ↓ (0.001: 90.0, 0.003: " in page  # lora-r8's winner is its lowest rate
    assert "does not extend a sweep past its edge" in page
    assert "| krona | 1.50* | — |" in page  # 30 s vs lora-r8's 20 s of wall time on mrpc (no CPU times recorded)
    assert "test cpu" in page
    assert "| task | method | 1 | 2 | last gain | seeds |" in page
    assert "| mrpc | krona | 80.0 | 85.0 | +5.0 | 3 |" in page and "| mrpc | lora-r8 | 8" not in page  # no curves
    assert "| mrpc | lora-r8 | 0.001 | 90.0 | 80.0 | — |" in page  # every seed at the chosen rate
    for r in rows:  # training CPU seconds, recorded by both cells: preferred to wall time
        r["train_cpu_seconds"] = {"krona": 24.0, "lora-r8": 12.0}[r["name"]]
    grid.results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(grid.path), "--out", str(out)]) == 0
    assert "| krona | 2.00 | — |" in out.read_text()
    for name in ("t-score-vs-params.png", "t-train-time.png"):
        png = out.parent / "img" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_a_sweep_whose_rates_all_tie_is_marked_as_choosing_nothing(grid, tmp_path):
    """Every rate at the majority class: the rule picks the smallest, which is no edge to look beyond."""
    todo, _ = study_plan.plan(grid, [])
    rows = [fake_row(grid, r, 0.5 if r.entry.name == "krona" else {0.001: 0.9}.get(r.lr, 0.8))
            for r in todo if r.task == "mrpc"]
    grid.results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "results.md"
    assert main(["report", str(grid.path), "--out", str(out)]) == 0
    page = out.read_text()
    assert "**0.001** (every rate tied: the smallest by rule) (0.001: 50.0, 0.003: 50.0, 0.01: 50.0)" in page
    assert "**0.001** ↓ (0.001: 90.0, 0.003: 80.0)" in page  # a real winner at the edge keeps its arrow


def test_one_rate_for_every_task_loses_least_on_average_not_the_most_wins(grid, tmp_path):
    """KronA wins at 1e-2 on MRPC but collapses there on RTE; 3e-3 is second on MRPC and best on RTE: the rate
    that loses least on average is 3e-3, though a count of wins would tie. LoRA r = 8 ran on one task only."""
    todo, _ = study_plan.plan(grid, [])
    scores = {("mrpc", 0.001): 0.80, ("mrpc", 0.003): 0.84, ("mrpc", 0.01): 0.86,
              ("rte", 0.001): 0.55, ("rte", 0.003): 0.60, ("rte", 0.01): 0.47}
    rows = [fake_row(grid, r, scores.get((r.task, r.lr), 0.7)) for r in todo]
    summary = report_stats.summarise(grid, rows)
    lr, shortfall, tasks = report_stats.rate_across_tasks(grid, summary)["krona"]
    assert (lr, tasks) == (0.003, 2) and shortfall == pytest.approx((2.0 + 0.0) / 2)
    assert "lora-r8" not in report_stats.rate_across_tasks(grid, summary)
    grid.results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "results.md"
    assert main(["report", str(grid.path), "--out", str(out)]) == 0
    assert "| **0.003** (1.0 below the best, on average over 2 tasks) |" in out.read_text()
    # a task whose sweep is still running does not count
    unfinished = {**summary, ("rte", "krona"): {**summary[("rte", "krona")], "sweeping": True}}
    assert "krona" not in report_stats.rate_across_tasks(grid, unfinished)


def test_time_ratios_compare_runs_of_one_processor_only(grid, tmp_path):
    """A cell's seeds may run on two machines (the grid resumed elsewhere): a ratio never divides one machine's
    time by another's, and the page names the processor behind each ratio."""
    todo, _ = study_plan.plan(grid, [])
    rows = [fake_row(grid, r, {0.001: 0.9}.get(r.lr, 0.5)) for r in todo if r.task == "mrpc"]
    todo, _ = study_plan.plan(grid, rows)
    rows += [fake_row(grid, r, 0.8) for r in todo if r.task == "mrpc"]
    speed = {("slow", "krona"): 24.0, ("slow", "lora-r8"): 12.0, ("fast", "krona"): 10.0, ("fast", "lora-r8"): 8.0}

    def ratios(machine):  # machine(row) -> the processor it ran on; its CPU seconds follow from that
        for r in rows:
            r["cpu"] = machine(r)
            r["train_cpu_seconds"] = speed[(r["cpu"], r["name"])]
        return report_stats.time_ratios(grid, report_stats.summarise(grid, rows), "lora-r8")

    # seed 0 on the slow machine, seeds 1, 2 on the fast one: krona is 1.25x lora-r8 there (10 / 8), which
    # pooling the machines would hide (medians 10 and 8 by luck) or distort (2 of 3 rows)
    assert ratios(lambda r: "slow" if r["seed"] == 0 else "fast")["krona"]["mrpc"] == (1.25, True, "fast")
    # lora-r8 on the slow machine only: krona's one slow seed is the only fair comparison, 24 / 12
    assert ratios(lambda r: "slow" if r["seed"] == 0 or r["name"] == "lora-r8" else "fast")["krona"]["mrpc"] == (
        2.0, True, "slow")
    # no machine in common: no ratio at all
    assert "krona" not in ratios(lambda r: "slow" if r["name"] == "lora-r8" else "fast")
    # two machines on the page (krona's ratio from the fast one, lora-r8's own from the slow): each has a letter
    ratios(lambda r: "slow" if (r["name"], r["seed"]) in {("krona", 0), ("lora-r8", 0), ("lora-r8", 1)} else "fast")
    grid.results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "docs" / "results.md"
    assert main(["report", str(grid.path), "--out", str(out)]) == 0
    page = out.read_text()
    assert "| krona | 1.25 A | — |" in page and "| lora-r8 | 1.00 B | — |" in page
    assert "from runs on one processor: A: fast; B: slow." in page
    hours = {m: sum(study_results.cpu_seconds(r) for r in rows if r["cpu"] == m) / 3600 for m in ("fast", "slow")}
    assert f"CPU-hours recorded: {sum(hours.values()):.1f} ({hours['fast']:.1f} on fast; {hours['slow']:.1f} on slow)" \
        in page


def test_report_page_is_replaced_atomically_and_bad_out_is_refused(grid, tmp_path, monkeypatch, capsys):
    from kronpeft.atomic import TMP_MARK

    todo, _ = study_plan.plan(grid, [])
    grid.results.write_text("".join(json.dumps(fake_row(grid, r, 0.7)) + "\n" for r in todo))
    out = tmp_path / "docs" / "results.md"
    assert main(["report", str(grid.path), "--out", str(out)]) == 0
    before = out.read_text()
    grid.results.write_text("".join(json.dumps(fake_row(grid, r, 0.6)) + "\n" for r in todo))

    def crash(self, text, *args, **kwargs):  # the disk fills halfway through the page
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", crash)
    assert main(["report", str(grid.path), "--out", str(out)]) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kronpeft: error: --out ") and "No space left on device" in err[-1]
    assert out.read_text() == before and not [p for p in out.parent.rglob("*") if TMP_MARK in p.name]
    assert main(["report", str(grid.path), "--out", str(out.parent)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_score_plot_gives_a_family_one_colour_in_every_panel(grid, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    todo, _ = study_plan.plan(grid, [])
    rows = [fake_row(grid, run, 0.7) for run in todo]
    rows = [r for r in rows if (r["task"], r["name"]) != ("mrpc", "krona")]  # mrpc: lora only; rte: krona only
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    report_figures.plot_score_vs_params(grid, report_stats.summarise(grid, rows), tmp_path / "p.png")
    colours = {}
    for ax in figures[0].axes:
        for container in ax.containers:
            colours.setdefault(container.get_label(), set()).add(container.lines[0].get_color())
    assert set(colours) == {"krona", "lora"} and all(len(c) == 1 for c in colours.values())
    assert colours["krona"] != colours["lora"]
    assert report_figures._compact(110_784) == "110.784k" and report_figures._compact(22_000_000) == "22M"


def test_parameter_counts_exclude_the_head_for_every_method():
    full = {"method": "full", "trainable_params": 22_713_986, "head_params": 770, "total_params": 22_713_986}
    krona = {"method": "krona", "trainable_params": 10_754, "head_params": 770, "total_params": 22_723_970}
    assert (report_stats.adapter_params(full), report_stats.model_params(full)) == (22_713_216, 22_713_986)
    # the same model
    assert (report_stats.adapter_params(krona), report_stats.model_params(krona)) == (9_984, 22_713_986)


CROWDED = [(9_984, 85.2, "krona"), (9_216, 85.3, "lora-r1"), (9_984, 85.1, "lokr"), (10_000, 85.25, "kronab"),
           (9_500, 85.2, "adakron-long-name"), (22_713_216, 80.0, "full"), (1_000, 88.0, "tiny")]  # the last
# two spread the axes as a real panel does: the first five then sit within a few pixels
MRPC_LIKE = [(9_984, 85.2, "krona"), (28_416, 85.6, "krona-a8x8"), (110_784, 85.8, "krona-a4x4"),
             (9_216, 85.3, "lora-r1"), (27_648, 86.5, "lora-r3"), (73_728, 86.4, "lora-r8"),
             (110_592, 86.0, "lora-r12"), (149_856, 85.3, "adakron"), (223_776, 86.1, "bottleneck"),
             (4_992, 83.9, "kronab"), (22_713_216, 86.1, "full")]  # the MRPC panel where labels once misled


@pytest.mark.parametrize("points", [CROWDED, MRPC_LIKE], ids=["crowded", "mrpc-like"])
def test_score_plot_labels_do_not_overlap_and_sit_by_their_point(points):
    """Methods at nearly the same budget and score (KronA, LoRA r = 1, LoKr, ...) keep readable names, each
    nearer its own marker than any other (unless the markers coincide)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    ax.plot([p[0] for p in points], [p[1] for p in points], "o")
    ax.set_xscale("log")
    fig.canvas.draw()
    report_figures._name_points(ax, points)
    renderer = fig.canvas.get_renderer()
    labels = {t.get_text(): t.update_positions(renderer) or matplotlib.text.Text.get_window_extent(t, renderer)
              for t in ax.texts}  # the text alone, not its leader line
    assert sorted(labels) == sorted(p[2] for p in points)
    assert all(t.arrow_patch is not None for t in ax.texts)  # each label has its leader line to its point
    boxes = list(labels.values())
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    at = {name: ax.transData.transform((x, y)) for x, y, name in points}
    for name, box in labels.items():
        others = [q for other, q in at.items() if other != name and math.dist(q, at[name]) > 6]
        assert all(report_figures._gap(box, at[name]) < report_figures._gap(box, q) for q in others), name
    plt.close(fig)


MRPC_DONE = {"krona": (9_984, 85.5, 1.3), "krona-a8x8": (28_416, 85.65, 0.5), "krona-a4x4": (110_784, 85.8, 0.7),
             "lora-r1": (9_216, 85.3, 0.6), "lora-r3": (27_648, 86.5, 1.1), "lora-r8": (73_728, 86.4, 0.4),
             "lora-r12": (110_592, 86.0, 1.5), "adakron": (149_856, 85.3, 0.1), "bottleneck": (223_776, 86.15, 0.3),
             "kronab": (4_992, 83.9, 0.6), "kronab-res": (4_998, 84.3, 0.2), "lokr": (9_984, 84.7, 0.9),
             "full": (22_713_216, 86.8, 0.3)}  # the finished MRPC panel, whose lora-r12 label once sat by adakron


def test_score_plot_of_the_finished_mrpc_panel_names_every_point_by_its_marker(tmp_path, monkeypatch):
    """The real figure (error bars, family lines, two panels, legend): each label nearer its own marker."""
    import matplotlib

    grid = study_grid.load_grid(Path(__file__).parents[1] / "benchmarks" / "study" / "glue-minilm.toml")
    summary = {}
    for task, scale in (("mrpc", 1.0), ("stsb", 0.97)):
        for name, (params, mean, std) in MRPC_DONE.items():
            row = {"trainable_params": params + 770, "head_params": 770, "main_metric": "f1"}
            summary[(task, name)] = {"scores": [scale * (mean + d * std) / 100 for d in (-1, 0, 1)], "rows": [row]}
    checked = []

    def name_and_check(ax, points):
        report_name_points(ax, points)
        renderer = ax.figure.canvas.get_renderer()
        at = {name: ax.transData.transform((x, y)) for x, y, name in points}
        for text in ax.texts:
            text.update_positions(renderer)
            box, name = matplotlib.text.Text.get_window_extent(text, renderer), text.get_text()
            others = [q for other, q in at.items() if other != name and math.dist(q, at[name]) > 6]
            assert all(report_figures._gap(box, at[name]) < report_figures._gap(box, q) for q in others), name
        checked.append(len(ax.texts))

    report_name_points = report_figures._name_points
    monkeypatch.setattr(report_figures, "_name_points", name_and_check)
    report_figures.plot_score_vs_params(grid, summary, tmp_path / "plot.png")
    assert checked == [13, 13] and (tmp_path / "plot.png").stat().st_size > 0


def test_add_curves_backfills_only_rows_whose_log_agrees(grid, tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(
        "add_curves", Path(__file__).parents[1] / "benchmarks" / "study" / "add_curves.py")
    add_curves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(add_curves)
    todo, _ = study_plan.plan(grid, [])
    rows = [{**fake_row(grid, run, 0.8), "final": {"f1": 0.75}} for run in todo[:3]]
    grid.runs_dir = tmp_path / "runs"
    logs = {0: [(0, 0.0, 0.3), (5, 1.0, 0.8), (10, 2.0, 0.7), (10, 2.0, 0.75)],  # step 10 logged twice
            1: [(0, 0.0, 0.3), (5, 1.0, 0.6), (10, 2.0, 0.75)]}  # best 0.75, not the row's 0.8: not its run
    for i, records in logs.items():
        run = todo[i]
        out = grid.runs_dir / run.task / run.entry.name / f"lr{run.lr:g}-seed{run.seed}"
        out.mkdir(parents=True)
        (out / "log.jsonl").write_text("".join(json.dumps({"type": "eval", "step": s, "epoch": e, "f1": v}) + "\n"
                                               for s, e, v in records))
    grid.results.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    monkeypatch.setattr(sys, "argv", ["add_curves.py", str(grid.path), "--runs-dir", str(grid.runs_dir)])
    add_curves.main()
    after = study_results.read_results(grid.results)
    assert after[0]["curve"] == [[0.0, 0.3], [1.0, 0.8], [2.0, 0.75]]
    assert "curve" not in after[1] and "curve" not in after[2]  # disagreeing log; no log
    assert [{k: v for k, v in r.items() if k != "curve"} for r in after] == rows
    assert "added 1 curve(s)" in capsys.readouterr().out
    held = os.open(out / ".study.lock", os.O_RDWR | os.O_CREAT)  # a runner at work: refused
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        with pytest.raises(SystemExit, match="stop it first"):
            add_curves.main()
    finally:
        os.close(held)


def test_dry_run_lists_runs_left_with_an_estimate(grid, capsys, monkeypatch):
    monkeypatch.setattr(study_estimate, "_train_size", lambda task, data_dir: None)  # no GLUE data at hand
    todo, _ = study_plan.plan(grid, [])
    rows = [fake_row(grid, r, 0.8, train_seconds=295.0) for r in todo[:2]]  # 300 s wall per 100 steps, 1 thread
    grid.results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["study", str(grid.path), "--dry-run", "--parallel", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "sweep  mrpc/krona/lr0.01/seed0" in out and "mrpc/krona/lr0.001/seed0" not in out
    # 6 sweep runs left + 2 seeds of each of the 3 pairs still sweeping; the 7 on mrpc at the recorded
    # 3 s/step x 100 steps, the 5 on rte (no row, no data) guessed at 3 s/step x 500 steps: 9,600 s
    assert "2 runs recorded" in out and "6 can start now, 6 more wait" in out and "estimate 2.7 CPU-hours" in out
    assert "1.3 h wall with 2 x 1 thread(s) (5 runs with no recorded row or data to go by: guessed" in out


def test_estimate_scales_a_known_rate_to_other_tasks_by_size(grid, monkeypatch):
    sizes = {"mrpc": (3200, 200.0), "rte": (1600, 400.0)}  # rte: half the examples, twice as long
    monkeypatch.setattr(study_estimate, "_train_size", lambda task, data_dir: sizes[task])
    todo, _ = study_plan.plan(grid, [])
    row = fake_row(grid, todo[0], 0.8, train_seconds=295.0)  # mrpc: 3 CPU-s per step, 100 steps recorded
    rte = [r for r in todo if r.task == "rte"]
    seconds, unknown = study_estimate.estimate_seconds(grid, rte, [row])
    # rte: 5 epochs x 1600 / 32 = 250 steps at 3 x 400/200 = 6 s per step, for each of the 3 sweep runs
    assert unknown == 0 and seconds == pytest.approx(3 * 250 * 6.0)


def test_estimate_uses_measured_cpu_seconds_over_wall_time(grid, monkeypatch):
    """A run that shared the CPU took longer in wall time than in CPU time: the CPU time is the rate."""
    monkeypatch.setattr(study_estimate, "_train_size", lambda task, data_dir: None)
    todo, _ = study_plan.plan(grid, [])
    row = {**fake_row(grid, todo[0], 0.8, train_seconds=595.0), "cpu_seconds": 150.0}  # 600 s wall, 150 s CPU
    seconds, _ = study_estimate.estimate_seconds(grid, [todo[1]], [row])
    assert seconds == pytest.approx(150.0)  # 1.5 CPU-s per step x 100 steps, not 6 x 100


def test_estimate_counts_only_the_steps_an_interrupted_run_has_left(grid, monkeypatch, tmp_path):
    """A run cut at step 60 of 100 resumes from its checkpoint: 40 steps at 3 CPU-s are left, not 100."""
    monkeypatch.setattr(study_estimate, "_train_size", lambda task, data_dir: None)
    grid.runs_dir = tmp_path / "runs"
    todo, _ = study_plan.plan(grid, [])
    row = fake_row(grid, todo[0], 0.8, train_seconds=295.0)  # 3 CPU-s per step, 100 steps
    assert study_estimate.estimate_seconds(grid, [todo[1]], [row])[0] == pytest.approx(300.0)
    state = todo[1].folder(grid) / "checkpoint" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"step": 60, "evals": [], "train_seconds": 180.0, "args": {}, "param_groups": [],
                                 "scheduler": {}}))
    assert study_estimate.estimate_seconds(grid, [todo[1]], [row])[0] == pytest.approx(120.0)
    state.write_text("{not json")  # a damaged state gives no step to go by: the whole run is counted
    assert study_estimate.estimate_seconds(grid, [todo[1]], [row])[0] == pytest.approx(300.0)


def test_estimate_on_a_new_machine_scales_old_rows_by_the_speed_measured_on_shared_cells(grid, monkeypatch):
    """The grid resumes on a faster processor: rows recorded on the old one count at the measured speed ratio."""
    monkeypatch.setattr(study_estimate, "_train_size", lambda task, data_dir: None)
    todo, _ = study_plan.plan(grid, [])
    mrpc_krona, rte_krona = todo[0], next(r for r in todo if r.task == "rte")
    old = [{**fake_row(grid, run, 0.8), "cpu_seconds": 300.0, "cpu": "old"} for run in (mrpc_krona, rte_krona)]
    new = {**fake_row(grid, mrpc_krona, 0.8), "cpu_seconds": 120.0, "cpu": "new"}  # mrpc/krona: 0.4x the time
    # rte/krona ran on the old processor only: 3 s per step there, so 1.2 s here, x 100 steps
    assert study_estimate.estimate_seconds(grid, [rte_krona], old + [new], here="new")[0] == pytest.approx(120.0)
    assert study_estimate.estimate_seconds(grid, [rte_krona], old + [new], here="old")[0] == pytest.approx(300.0)
    # a third machine sharing no cell with the old rows: they count as they are
    assert study_estimate.estimate_seconds(grid, [rte_krona], old, here="other")[0] == pytest.approx(300.0)


def test_run_child_reports_exit_code_and_cpu_seconds(tmp_path):
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\nraise SystemExit(3)"
    with open(tmp_path / "log", "w") as log:
        code, cpu = study_execute.run_child([sys.executable, "-c", busy], dict(os.environ), log)
    assert code == 3 and 0.3 <= cpu < 5.0


RUNNER = """
import os, sys
from kronpeft.runner.study import execute as study_execute
from kronpeft.runner.cli import main

real = study_execute.run_child
sleep = "import os, time; open('pids', 'a').write(f'{os.getpid()} '); time.sleep(120)"
study_execute.run_child = lambda argv, env, log, keep_fds=(): real([sys.executable, "-c", sleep], env, log, keep_fds)
sys.exit(main(["study", "grid.toml", "--parallel", "2"]))
"""


def start_runner_with_two_runs(tmp_path):
    """A real `kronpeft study` process whose two runs are sleepers; (runner, the runs' pids)."""

    (tmp_path / "runner.py").write_text(RUNNER)
    with open(tmp_path / "runner.err", "w") as err:
        runner = subprocess.Popen([sys.executable, "runner.py"], cwd=tmp_path, stderr=err)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = (tmp_path / "pids").read_text().split() if (tmp_path / "pids").exists() else []
        if len(pids) == 2:
            return runner, [int(p) for p in pids]
        time.sleep(0.1)
    runner.kill()
    pytest.fail("the runner did not start its two runs")


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # reparented and not yet reaped: a zombie is not alive
        return stat.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_sigterm_to_the_runner_ends_its_runs(grid, tmp_path):
    runner, pids = start_runner_with_two_runs(tmp_path)
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)
    err = (tmp_path / "runner.err").read_text()
    assert "stopping (SIGTERM)" in err and "failed" not in err  # a stop, not two failed runs


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_run_outliving_a_killed_runner_keeps_its_claim(grid, tmp_path):
    runner, pids = start_runner_with_two_runs(tmp_path)
    try:
        runner.kill()  # SIGKILL: no handler runs, the two runs go on as orphans
        runner.wait(timeout=30)
        assert all(alive(p) for p in pids)
        grid.runs_dir = tmp_path / grid.runs_dir
        for run in study_plan.plan(grid, [])[0][:2]:  # a second runner must not train them beside the orphans
            assert study_execute.run_one(grid, run, 1, 1, {}) == "busy"
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)


def test_a_resumed_run_counts_the_cpu_seconds_of_its_earlier_parts(grid, tmp_path, monkeypatch):
    grid.runs_dir = tmp_path / "runs"
    run = study_plan.plan(grid, [])[0][0]
    out = grid.runs_dir / run.task / run.entry.name / f"lr{run.lr:g}-seed{run.seed}"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "state.json").write_text(json.dumps({"step": 3, "cpu_seconds": 100.0}))
    metrics = {"main_metric": "f1", "best": {"f1": 0.8}, "final": {"f1": 0.8}, "best_step": 3,
               "trainable_params": 10, "total_params": 100, "train_seconds": 9.0, "peak_memory_mb": 1.0, "steps": 6,
               "evals": [{"step": 0, "epoch": 0.0, "f1": 0.3}, {"step": 3, "epoch": 0.5, "f1": 0.8}]}
    commands = []

    def fake_child(argv, env, log, keep_fds=()):
        commands.append(argv)
        (out / "metrics.json").write_text(json.dumps(metrics))
        return 0, 5.0

    monkeypatch.setattr(study_execute, "run_child", fake_child)
    row = study_execute.run_one(grid, run, 1, 1, {})
    assert "--resume" in commands[0] and row["resumed"] and row["cpu_seconds"] == 105.0
    assert row["curve"] == [[0.0, 0.3], [0.5, 0.8]]  # the main metric at every evaluation
    (out / "checkpoint" / "state.json").write_text("{not json")  # unreadable: only the last part is counted
    assert study_execute.run_one(grid, run, 1, 1, {})["cpu_seconds"] == 5.0


def test_bad_grid_files_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a runner would make its run folders
    path = tmp_path / "g.toml"
    path.write_text(textwrap.dedent(GRID).replace('lrs = [1e-3, 3e-3]', 'lrs = [-1]'))
    assert main(["study", str(path), "--dry-run"]) == 2
    assert "method 'lora-r8': lrs must be positive" in capsys.readouterr().err
    assert main(["study", str(tmp_path / "missing.toml")]) == 2
    assert "not found" in capsys.readouterr().err
    for old, new, words in [("seeds = [0, 1, 2]", "seeds = []", "[study] seeds must be a non-empty list"),
                            ("seeds = [0, 1, 2]", "seeds = [0, 0]", "without repeats, got [0, 0]"),
                            ('tasks = ["mrpc", "rte"]', 'tasks = "mrpc"', "[study] tasks must be a non-empty list"),
                            ("lrs = [1e-3, 3e-3]", "lrs = 1e-3", "method 'lora-r8': lrs must be a non-empty list"),
                            ("lrs = [1e-3, 3e-3]", 'lrs = ["x"]', "method 'lora-r8': lrs must be"),
                            ("[train]\n", "[train]\nseed = 3\n", "[train] sets ['seed']"),
                            ("args = { r = 8 }", 'args = { r = 8, lr = 0.1 }', "method 'lora-r8': args sets ['lr']")]:
        path.write_text(GRID.replace(old, new))
        assert main(["study", str(path), "--dry-run"]) == 2
        assert words in capsys.readouterr().err
    for table, words in [("[task.sst2]\nepochs = 3\n", "[task.sst2] must be a table for one of"),
                         ("[task.rte]\nlr = 0.1\n", "[task.rte] sets ['lr']")]:
        path.write_text(GRID + table)
        assert main(["study", str(path), "--dry-run"]) == 2
        assert words in capsys.readouterr().err
    # runs that could not start are refused before anything runs, naming the grid's field
    for old, new, words in [('tasks = ["mrpc", "rte"]', 'tasks = ["mrpc", "nope"]', "tasks ['nope'] are not tasks"),
                            ('method = "krona"', 'method = "kronaa"', "method = 'kronaa' is not one of"),
                            ("epochs = 5", "epochz = 5", "unrecognized arguments: --epochz 5"),
                            ("epochs = 5", 'epochs = "x"', "argument --epochs: expected a finite number"),
                            ("args = { r = 8 }", 'args = { r = 0 }', "method 'lora-r8' on mrpc")]:
        path.write_text(GRID.replace(old, new))
        assert main(["study", str(path)]) == 2  # not only --dry-run
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("kronpeft: error: grid ") and words in err[0], err
    assert not (tmp_path / "results.jsonl").exists() and not (tmp_path / "runs").exists()


def test_task_tables_override_flags_of_their_task_only(grid, tmp_path):
    path = tmp_path / "tasks.toml"
    path.write_text(GRID + "\n[task.rte]\nepochs = 20\nmax_length = 256\n")
    with_table = study_grid.load_grid(path)
    runs = {r.label(): r for r in study_plan.plan(grid, [])[0]}
    runs_t = {r.label(): r for r in study_plan.plan(with_table, [])[0]}
    assert runs.keys() == runs_t.keys()
    for label, run in runs.items():
        flags, flags_t = run.flags(grid), runs_t[label].flags(with_table)
        if run.task == "rte":
            assert flags_t == {**flags, "epochs": 20, "max_length": 256}
            assert run.key(grid) != runs_t[label].key(with_table)  # a new setting is a new run
        else:
            assert flags_t == flags and run.key(grid) == runs_t[label].key(with_table)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "benchmarks").glob("*/*.toml")),
                         ids=lambda p: p.name)
def test_checked_in_grids_load_and_plan(path, monkeypatch, capsys):
    """Every grid in the repository parses, names real tasks and methods, and dry-runs."""
    from kronpeft.runner import baselines
    from kronpeft.runner.data import TASKS

    monkeypatch.setattr(study_estimate, "_train_size", lambda task, data_dir: None)
    grid = study_grid.load_grid(path)
    assert set(grid.tasks) <= set(TASKS) and {e.method for e in grid.methods} <= set(baselines.METHODS)
    parser = build_parser()
    for run in study_plan.plan(grid, [])[0]:  # every run's flags are real `kronpeft train` flags with valid values
        args = parser.parse_args(["train", *study_grid.argv(run.flags(grid))])
        assert (args.task, args.method, args.lr, args.seed) == (run.task, run.entry.method, run.lr, run.seed)
    assert main(["study", str(path), "--dry-run"]) == 0


def test_claims_get_a_verdict_only_with_every_seed(tmp_path, monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)  # no majority-class score: no collapse flags
    path = tmp_path / "claims.toml"
    path.write_text(GRID + '\n[[claim]]\ntext = "KronA beats LoRA"\nbetter = "krona"\nworse = "lora-r8"\n')
    grid = study_grid.load_grid(path)
    rows = []
    scores = {("krona", 0.001): 0.80, ("krona", 0.003): 0.85, ("krona", 0.01): 0.82,
              ("lora-r8", 0.001): 0.70, ("lora-r8", 0.003): 0.75}
    rows += [fake_row(grid, r, scores[(r.entry.name, r.lr)]) for r in study_plan.plan(grid, [])[0] if r.task == "mrpc"]
    seeds = {("krona", 1): 0.83, ("krona", 2): 0.87, ("lora-r8", 1): 0.74, ("lora-r8", 2): 0.76}
    later = [r for r in study_plan.plan(grid, rows)[0] if r.task == "mrpc" and r.stage == "seed"]
    grid.results.write_text("".join(json.dumps(r) + "\n" for r in rows + [fake_row(grid, later[0], 0.83)]))
    out = tmp_path / "results.md"
    report_page.render(grid, out)
    assert "| KronA beats LoRA (`krona` vs `lora-r8`) | mrpc | +" in out.read_text()
    assert "| mrpc | +9.0 | — | — | — | — | — | waiting (2/3 and 1/3 seeds) |" in out.read_text()  # one seed: no spread
    assert "| lora-r8 | 1,000 | 0.100 | 75.0 (1/3 seeds) |" in out.read_text()
    assert "| mrpc | krona | 0.003 | 85.0 | 83.0 | — |" in out.read_text()  # every seed, missing ones marked
    assert "| mrpc | lora-r8 | 0.003 | 75.0 | — | — |" in out.read_text()
    rows += [fake_row(grid, r, seeds[(r.entry.name, r.seed)]) for r in later]
    grid.results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report_page.render(grid, out)
    # 85.0 ± 2.0 vs 75.0 ± 1.0 over 3 seeds: difference 10.0, SE sqrt(2.0²/3 + 1.0²/3) = 1.29, Welch's
    # df (4/3 + 1/3)² / ((4/3)²/2 + (1/3)²/2) = 2.94, t(0.975, 2.94) = 3.22: 10.0 ± 4.2
    # paired by seed: differences 10, 9, 11 points, t = 0.10 / (0.01 / sqrt 3) = sqrt 300 with 2 df, two-sided
    # p = 1 - t / sqrt(t^2 + 2) = 0.0033; one claim row, so Holm leaves it; no predictions, no bootstrap
    assert "| KronA beats LoRA (`krona` vs `lora-r8`) | mrpc | +10.0 | +5.8 to +14.2 | 0.0048 | 0.0033 | 0.0033 | — " \
        "| holds |" in out.read_text()
    assert "| mrpc | lora-r8 | 0.003 | 75.0 | 74.0 | 76.0 |" in out.read_text()
    assert report_stats.claim_verdict([0.80, 0.82, 0.81], [0.81, 0.80, 0.83], 3)[3] == "within noise"
    assert report_stats.claim_verdict([0.70, 0.71, 0.69], [0.80, 0.81, 0.79], 3)[3] == "reversed"
    # beyond two standard errors but not beyond Welch's interval (df ~2.4): not a verdict with three seeds
    better, worse = [0.846, 0.840, 0.833], [0.849, 0.853, 0.853]
    diff, ci, p, verdict = report_stats.claim_verdict(better, worse, 3)
    se = (statistics.variance(better) / 3 + statistics.variance(worse) / 3) ** 0.5
    assert diff < -2 * se and ci[0] < 0 < ci[1] and p > 0.05 and verdict == "within noise"


def test_a_claim_on_several_tasks_is_also_tested_on_their_average(tmp_path, monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)  # no majority-class score: no collapse flags
    path = tmp_path / "avg.toml"
    path.write_text(GRID.replace('tasks = ["mrpc"]\n', "")
                    + '\n[[claim]]\ntext = "KronA beats LoRA"\nbetter = "krona"\nworse = "lora-r8"\n')
    grid = study_grid.load_grid(path)
    seeds = {("mrpc", "krona"): [0.85, 0.83, 0.87], ("mrpc", "lora-r8"): [0.75, 0.74, 0.76],
             ("rte", "krona"): [0.60, 0.62, 0.58], ("rte", "lora-r8"): [0.58, 0.57, 0.59]}
    rows = [fake_row(grid, r, seeds[(r.task, r.entry.name)][0] - (0.1 if r.lr != 1e-3 else 0))
            for r in study_plan.plan(grid, [])[0]]  # every sweep's winner: 1e-3
    later = study_plan.plan(grid, rows)[0]
    out = tmp_path / "results.md"
    grid.results.write_text("".join(json.dumps(r) + "\n" for r in rows + [
        fake_row(grid, r, seeds[(r.task, r.entry.name)][r.seed]) for r in later if r.task == "mrpc"]))
    report_page.render(grid, out)
    assert "| average of 2 tasks | — | — | — | — | — | — | waiting (1/2 tasks complete) |" in out.read_text()
    rows += [fake_row(grid, r, seeds[(r.task, r.entry.name)][r.seed]) for r in later]
    grid.results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report_page.render(grid, out)
    # averages 72.5 vs 66.5; SE sqrt((2.0² + 1.0² + 2.0² + 1.0²) / 3) / 2 = 0.913, Welch-Satterthwaite df
    # 5.88, t(0.975, 5.88) = 2.459: +6.0 ± 2.24
    # paired: per seed the mean over tasks of the differences, (10 + 2) / 2, (9 + 5) / 2, (11 - 1) / 2 = 6, 7, 5:
    # t = sqrt 108, p = 1 - t / sqrt(t^2 + 2) = 0.0091. Holm over the 3 rows (mrpc 0.0033, rte 0.37, average
    # 0.0091): 0.0033 x 3, then 0.0091 x 2 = 0.018, then 0.37
    assert "| KronA beats LoRA (`krona` vs `lora-r8`) | average of 2 tasks | +6.0 | +3.8 to +8.2 | 0.00064 | 0.0091 " \
        "| 0.018 | — | holds |" in out.read_text()
    # paired differences: 2, 5, -1
    assert "| rte | +2.0 | -2.2 to +6.2 | 0.22 | 0.37 | 0.37 | — | within noise |" in out.read_text()
    text = out.read_text()
    assert text.index("| rte | +2.0 |") < text.index("| average of 2 tasks | +6.0")  # after the tasks' rows


@pytest.mark.parametrize("better, worse", [([0.80, 0.84, 0.83], [0.79, 0.80, 0.78]),
                                           ([0.70, 0.71], [0.69, 0.75, 0.74, 0.71])])
def test_the_average_of_one_task_is_welchs_test(better, worse):
    """With one task the average's interval and p are scipy's Welch test's (claim_verdict)."""
    one = report_stats.average_verdict([better], [worse])
    welch = report_stats.claim_verdict(better, worse, 1)
    assert one[0] == pytest.approx(welch[0]) and one[2] == pytest.approx(welch[2]) and one[3] == welch[3]
    assert one[1] == pytest.approx(welch[1])


def test_score_plot_shows_every_seed_and_a_failed_one_does_not_squash_the_panel(grid, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.collections import PathCollection  # scatter dots (error bars are LineCollections)

    todo, _ = study_plan.plan(grid, [])
    rows = [fake_row(grid, run, 0.85 if run.lr == 1e-3 else 0.80) for run in todo if run.task == "mrpc"]
    later = [run for run in study_plan.plan(grid, rows)[0] if run.task == "mrpc"]
    rows += [fake_row(grid, run, {1: 0.86, 2: 0.20 if run.entry.name == "lora-r8" else 0.84}[run.seed])
             for run in later]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    report_figures.plot_score_vs_params(grid, report_stats.summarise(grid, rows), tmp_path / "p.png")
    ax = figures[0].axes[0]
    dots = sorted(float(y) for c in ax.collections if isinstance(c, PathCollection) for _, y in c.get_offsets())
    assert dots == pytest.approx(sorted([85.0, 86.0, 84.0, 85.0, 86.0, 20.0]))  # both cells' three seeds
    low, high = ax.get_ylim()
    mean, std = statistics.fmean([85, 86, 20]), statistics.stdev([85, 86, 20])
    assert low < 20 and 86 < high < mean + std  # the failed seed in view; lora-r8's ±std bar (to 101.4) cut


def test_rows_name_the_processor_from_cpuinfo_with_the_flags_that_change_its_speed():
    """Two processors, as a VM shows them: the first one's name, family, model and SIMD flags, in the form the
    time ratios group rows by; a cpuinfo without a model name gives None (platform's name is used instead)."""
    info = ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 167\n"
            "model name\t: Intel(R) Xeon(R) Processor\n"
            "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\n"
            "processor\t: 1\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n")
    assert study_results.cpu_name(info) == \
        "Intel(R) Xeon(R) Processor (family 6 model 167; avx2, avx512f, avx512_bf16, amx_bf16)"
    assert study_results.cpu_name(info.split("\n\n")[1]) == "AMD EPYC (family 25 model 1; avx2)"
    assert study_results.cpu_name("processor\t: 0\nflags\t: fpu\n") is None
