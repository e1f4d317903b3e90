"""The study's selection protocol on the runner side: grid settings, run identity, the rate chosen on the
selection split, every seed at every rate, reused rows of another grid, and predictions kept with a checksum."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from kronpeft.runner.errors import UsageError
from kronpeft.runner.selection import load_predictions, save_predictions
from kronpeft.runner.study import execute as study_execute
from kronpeft.runner.study import grid as study_grid
from kronpeft.runner.study import plan as study_plan
from kronpeft.runner.study import results as study_results

REPO = Path(__file__).resolve().parents[1]

GRID = """
[study]
name = "p"
tasks = ["mrpc"]
seeds = [0, 1, 2]
extend_edges = false
{study}

[train]
epochs = 5

[[method]]
name = "krona"
method = "krona"
lrs = [1e-3, 1e-2]
{method}
"""


def load(tmp_path, study_extra="", method_extra=""):
    path = tmp_path / "grid.toml"
    path.write_text(GRID.format(study=study_extra, method=method_extra))
    return study_grid.load_grid(path)


def test_the_selection_protocol_adds_its_split_seed_to_every_run_and_old_keys_stay(tmp_path):
    old = load(tmp_path)
    run = study_grid.Run("mrpc", old.methods[0], 1e-3, 1, "seed")
    assert "selection_split" not in run.flags(old) and old.protocol == "dev"
    key = hashlib.sha256(json.dumps({"name": "krona", **run.flags(old)}, sort_keys=True).encode()).hexdigest()[:16]
    assert run.key(old) == key  # the first round's identity: unchanged
    new = load(tmp_path, 'protocol = "selection"\nsplit_seed = 7')
    run = study_grid.Run("mrpc", new.methods[0], 1e-3, 1, "seed")
    assert run.flags(new)["selection_split"] == 7 and run.key(new) != key
    mixed = load(tmp_path, 'protocol = "selection"', 'protocol = "dev"')  # a method may keep the old protocol
    assert study_grid.Run("mrpc", mixed.methods[0], 1e-3, 1, "seed").key(mixed) == key


@pytest.mark.parametrize("extra, word", [('protocol = "test"', "protocol"), ("split_seed = -1", "split_seed"),
                                         ('every_seed_every_rate = "yes"', "every_seed_every_rate"),
                                         ("reuse = 5", "reuse")])
def test_bad_protocol_settings_are_refused_by_name(tmp_path, extra, word):
    with pytest.raises(UsageError, match=word):
        load(tmp_path, extra)


def test_the_rate_is_chosen_on_the_selection_split_not_on_dev(tmp_path):
    rows = [{"lr": 1e-3, "score": 0.9, "selection_score": 0.6, "protocol": "selection"},
            {"lr": 1e-2, "score": 0.7, "selection_score": 0.8, "protocol": "selection"}]
    assert study_plan.best_lr(rows) == 1e-2
    assert study_plan.best_lr([{**r, "protocol": "dev"} for r in rows]) == 1e-3
    assert study_plan.best_lr([{k: v for k, v in r.items() if k != "protocol"} for r in rows]) == 1e-3  # old rows


def test_every_seed_at_every_rate_and_rows_reused_from_another_grid(tmp_path):
    grid = load(tmp_path, 'every_seed_every_rate = true\nreuse = ["first"]')
    todo, waiting = study_plan.plan(grid, [])
    assert not waiting and {(r.lr, r.seed, r.stage) for r in todo} == {
        (lr, s, "sweep") for lr in (1e-3, 1e-2) for s in (0, 1, 2)}
    theirs = {"grid": "first", "key": todo[0].key(grid)}
    other = {"grid": "unrelated", "key": todo[1].key(grid)}
    rows = [r for r in (theirs, other) if grid.holds(r)]
    assert study_plan.plan(grid, rows)[0] == todo[1:]
    run = todo[0]
    row = {"grid": "first", "key": run.key(grid), "task": "mrpc", "name": "krona", "lr": run.lr, "seed": run.seed}
    elsewhere = {**row, "task": "rte", "key": study_grid.Run("rte", run.entry, run.lr, run.seed, "").key(grid)}
    unmatched = {**row, "key": "0" * 16, "seed": 2}
    # the reused grid's matching run counts; its other tasks and runs are neither shown nor "stale"
    assert study_results.current_rows(grid, [row, elsewhere, unmatched]) == ([row], 0)


def test_the_bias_grid_reuses_the_first_rounds_runs_exactly():
    bias = study_grid.load_grid(REPO / "benchmarks/study/selection-bias-mrpc.toml")
    first = study_grid.load_grid(REPO / "benchmarks/study/glue-minilm.toml")
    for name in ("krona", "lora-r1"):
        mine = next(e for e in bias.methods if e.name == name)
        theirs = next(e for e in first.methods if e.name == name)
        assert (study_grid.Run("mrpc", mine, 5e-3, 1, "sweep").key(bias)
                == study_grid.Run("mrpc", theirs, 5e-3, 1, "seed").key(first))
    sel = next(e for e in bias.methods if e.name == "krona-sel")
    assert study_grid.Run("mrpc", sel, 5e-3, 1, "sweep").flags(bias)["selection_split"] == 0


def test_a_finished_run_keeps_its_predictions_beside_the_results_with_their_checksum(tmp_path, monkeypatch):
    grid = load(tmp_path, 'protocol = "selection"')
    grid.runs_dir = tmp_path / "runs"
    run = study_grid.Run("mrpc", grid.methods[0], 1e-3, 0, "sweep")
    out = grid.runs_dir / "x"
    out.mkdir(parents=True)
    metrics = {"main_metric": "f1", "chosen_on": "f1_selection", "best": {"f1": 0.8, "f1_selection": 0.7},
               "final": {"f1": 0.79}, "best_step": 10, "trainable_params": 1, "total_params": 2, "train_seconds": 1,
               "peak_memory_mb": 1, "steps": 20, "evals": [{"epoch": 1, "f1": 0.8, "f1_selection": 0.7}]}

    def fake_child(argv, env, log, keep_fds=()):
        (out / "metrics.json").write_text(json.dumps(metrics))
        save_predictions(out / "predictions.npz", {"dev": np.array([1, 0, 1])}, {"dev": [1, 1, 1]})
        return 0, 1.0

    monkeypatch.setattr(study_execute, "run_child", fake_child)
    row = study_execute._train(grid, run, out, run.flags(grid), ["train"], 1, 1, {}, -1)
    assert row["protocol"] == "selection" and row["score"] == 0.8 and row["selection_score"] == 0.7
    assert row["selection_curve"] == [[1, 0.7]]
    kept = grid.results.parent / row["predictions"]
    assert kept == tmp_path / "predictions" / "p" / f"{run.key(grid)}.npz"
    assert row["predictions_sha256"] == hashlib.sha256(kept.read_bytes()).hexdigest()
    assert load_predictions(kept)["dev"].tolist() == [1, 0, 1]


def test_the_table_flags_collapsed_seeds_and_shows_medians(tmp_path, monkeypatch):
    from kronpeft.runner.report import page as report_page

    monkeypatch.delenv("GLUE_DIR", raising=False)
    grid = load(tmp_path)
    entry = grid.methods[0]
    rows = []
    for lr, seed, score in ((1e-3, 0, 0.85), (1e-2, 0, 0.80), (1e-3, 1, 0.812), (1e-3, 2, 0.87)):
        run = study_grid.Run("mrpc", entry, lr, seed, "sweep" if seed == 0 else "seed")
        rows.append({"key": run.key(grid), "grid": "p", "task": "mrpc", "name": "krona", "method": "krona",
                     "family": "krona", "lr": lr, "seed": seed, "stage": run.stage, "score": score,
                     "main_metric": "f1", "majority_baseline": 0.812, "trainable_params": 10, "head_params": 0,
                     "total_params": 100, "train_seconds": 1.0, "wall_seconds": 2.0, "steps": 1, "threads": 1,
                     "flags": run.flags(grid), "cpu": "test"})
    grid.results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = report_page.render(grid, tmp_path / "page.md").read_text()
    # seeds 85.0, 81.2 (MRPC majority-class F1: collapsed), 87.0: mean 84.4, median 85.0, one ‡
    assert "| krona | 10 | 11.111 | 84.4 ± 2.9 [85.0]‡ | 84.4 |" in page  # sd sqrt((0.6² + 3.2² + 2.6²) / 2) = 2.9


def test_score_vs_lr_axis_is_not_stretched_by_a_collapsed_run_and_the_forest_lists_every_claim(tmp_path, monkeypatch):
    from kronpeft.runner.report import figures as report_figures

    figures = []
    monkeypatch.setattr(report_figures, "save_png", lambda fig, path, dpi: (figures.append(fig), Path(path))[1])
    panels = {"mrpc": {"krona": [(1e-3, 0.85), (1e-2, 0.812)], "lora": [(1e-3, 0.86), (5e-3, 0.84)]}}
    report_figures.plot_score_vs_lr(panels, {"mrpc": 0.812}, tmp_path / "lr.png")
    low, _ = figures[0].axes[0].get_ylim()
    assert 81.2 < low < 84.0  # the lowest score above the majority-class line sets the floor, not 81.2
    report_figures.plot_forest([("a: mrpc", 0.02, (0.01, 0.03), None), ("a: average", -0.01, None, None)],
                              tmp_path / "f.png")
    labels = [t.get_text() for t in figures[1].axes[0].get_yticklabels()]
    assert labels == ["a: average", "a: mrpc"]  # first claim on top
