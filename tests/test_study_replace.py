"""[study] replace_cells: a grid's page takes a task's cells from another grid, method by method, once that grid
has every seed of the method; hand-written rows, hand-computed numbers."""
from __future__ import annotations

from pathlib import Path

import pytest

from kronpeft.runner.errors import UsageError
from kronpeft.runner.report import page as report_page
from kronpeft.runner.study import grid as study_grid
from study_rows import study_row, write_rows

MAIN = """
[study]
name = "m"
tasks = ["mrpc", "stsb"]
seeds = [0, 1, 2]
extend_edges = false
every_seed_every_rate = true
{replace}

[train]
epochs = 5

[[method]]
name = "krona"
method = "krona"
lrs = [1e-3]

[[method]]
name = "lora-r1"
method = "lora"
lrs = [1e-3]
args = { r = 1 }

[[claim]]
text = "KronA beats LoRA"
better = "krona"
worse = "lora-r1"
"""
REPLACE = 'replace_cells = [{ task = "stsb", grid = "sl" }]'

OTHER = """
[study]
name = "sl"
title = "STS-B, head at the mean label"
tasks = ["stsb"]
seeds = [0, 1, 2]
extend_edges = false
every_seed_every_rate = true
protocol = "selection"

[train]
epochs = 5
label_mean_bias = true

[[method]]
name = "krona"
method = "krona"
lrs = [1e-2]
"""
OTHER_LORA = """
[[method]]
name = "lora-r1"
method = "lora"
lrs = [1e-3]
args = { r = 1 }
"""


@pytest.fixture(autouse=True)
def no_glue(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GLUE_DIR", raising=False)  # majority-class scores only where a row records one


def grids(tmp_path, replace=REPLACE, other=OTHER + OTHER_LORA):
    """This grid (main.toml) and the other one, in label-mean.toml: found by its name, not its file name."""
    (tmp_path / "label-mean.toml").write_text(other)
    (tmp_path / "main.toml").write_text(MAIN.replace("{replace}", replace))
    grid = study_grid.load_grid(Path("main.toml"))  # in tmp_path: the page names files as given
    return grid, grid.replace_cells[0].grid


FIRST = {("mrpc", "krona"): [0.85, 0.83, 0.87], ("mrpc", "lora-r1"): [0.75, 0.74, 0.76],
         ("stsb", "krona"): [0.84, 0.82, 0.86], ("stsb", "lora-r1"): [0.80, 0.30, 0.81]}


def write(grid, other, theirs: dict):
    """This grid's FIRST rows and `theirs` ({(name, lr): seed scores}) on STS-B in the other grid, one file."""
    rows = [study_row(grid, t, n, 1e-3, s, v, selection_score=v)
            for (t, n), scores in FIRST.items() for s, v in enumerate(scores)]
    rows += [study_row(other, "stsb", n, lr, s, v, selection_score=v, curve=[[0.0, 0.1], [1.0, v]])  # dev per epoch
             for (n, lr), scores in theirs.items() for s, v in enumerate(scores)]
    write_rows(grid, rows)


def test_a_complete_cell_replaces_that_methods_cell_alone_everywhere_the_scores_are_used(tmp_path, monkeypatch):
    grid, other = grids(tmp_path)
    write(grid, other, {("krona", 1e-2): [0.88, 0.86], ("lora-r1", 1e-3): [0.85, 0.84, 0.86]})
    forest = []
    monkeypatch.setattr(report_page, "plot_forest", lambda points, path: (forest.extend(points), path)[1])
    page = report_page.render(grid, tmp_path / "page.md").read_text()
    # lora-r1 on STS-B from sl: mean 85.0, std 1.0, median 85.0, finished (sl has every seed); its mrpc cell
    # stays. krona has 2 of 3 seeds in sl: its own cell stays. STS-B's runs now 0.82 to 0.86: none collapsed
    assert "| krona | 1,000 | 0.100 | 85.0 ± 2.0 [85.0] | 84.0 ± 2.0 [84.0] | 84.5 |" in page
    assert "| lora-r1 | 1,000 | 0.100 | 75.0 ± 1.0 [75.0] | 85.0 ± 1.0 [85.0]† | 80.0 |" in page  # (75 + 85) / 2
    assert "Rendered by `kronpeft report main.toml` from `results.jsonl` (15 runs)" in page  # 12 own + 3 of sl's
    assert "- 0 of 12 runs at the chosen rates collapsed" in page
    assert "| stsb | lora-r1 | 0.001† | 85.0 | 84.0 | 86.0 |" in page
    assert "| stsb | krona | 0.001 | 84.0 | 82.0 |" in page
    assert "| stsb | lora-r1† | 85.0 | — | 3 |" in page  # the only curves: sl's rows, epoch 1 (krona's: not shown)
    assert "- The † cells (STS-B: `lora-r1`) come from grid `sl`" in page
    assert "†: STS-B cells from grid `sl` (label-mean.toml: STS-B, head at the mean label), which differs from this " \
           "grid in `--label-mean-bias`; its protocol: rates and epochs were chosen on a 10 % selection split of " \
           "train, and dev, which chose nothing, is reported as the test set. Replaced: `lora-r1`; kept from this " \
           "grid: 2 of 3 seeds there: `krona`." in page
    # the claims: stsb 84.0 - 85.0 = -1.0 (the first run's 63.7 gave +20.3); the average (85 + 84) / 2 - 80.0 = +4.5
    assert "| KronA beats LoRA (`krona` vs `lora-r1`) | stsb | -1.0 |" in page
    assert "| KronA beats LoRA (`krona` vs `lora-r1`) | average of 2 tasks | +4.5 |" in page
    assert [(p.label, round(100 * p.diff, 1)) for p in forest] == [
        ("KronA beats LoRA: mrpc", 10.0), ("KronA beats LoRA: stsb", -1.0),
        ("KronA beats LoRA: average of 2 tasks", 4.5)]
    # below, the first run's lora-r1 cell: (80 + 30 + 81) / 3 = 63.7, deviations +16.3, -33.7, +17.3: std
    # sqrt(1700.7 / 2) = 29.2; the first run's STS-B runs 0.30, 0.80, 0.81, 0.82, 0.84, 0.86: half their median
    # (0.81 + 0.82) / 2 is 0.4075, and 0.30 below it collapsed
    first = page[page.index("*STS-B as first run*"):page.index("![score vs")].strip().splitlines()
    assert first[2:] == ["| method | lr | stsb |", "|---|---:|---:|", "| lora-r1 | 0.001 | 63.7 ± 29.2 [80.0]‡ |"]
    assert "63.7" not in page[:page.index("*STS-B as first run*")]
    # the learning rates are this grid's own sweeps: lora-r1's seed 0 scored 80.0 on STS-B (85.0 in sl)
    assert "| lora-r1 | **0.001** (0.001: 75.0) | **0.001** (0.001: 80.0) |" in page


def test_an_incomplete_cell_or_a_method_the_other_grid_lacks_keeps_the_first_run(tmp_path):
    grid, other = grids(tmp_path, other=OTHER)  # sl has no lora-r1
    write(grid, other, {("krona", 1e-2): [0.88, 0.86]})
    page = report_page.render(grid, tmp_path / "page.md").read_text()
    assert "| krona | 1,000 | 0.100 | 85.0 ± 2.0 [85.0] | 84.0 ± 2.0 [84.0] | 84.5 |" in page
    assert "No STS-B cell is replaced yet by grid `sl` (label-mean.toml): a method's cell is, once that grid has " \
           "every seed of it (2 of 3 seeds there: `krona`; not in grid sl: `lora-r1`)." in page
    assert "(12 runs)" in page and "†" not in page and "as first run" not in page


def test_the_other_grid_is_found_by_name_its_own_file_first(tmp_path):
    (tmp_path / "sl.toml").write_text(OTHER)
    (tmp_path / "label-mean.toml").write_text(OTHER)
    (tmp_path / "x.toml").write_text(OTHER.replace('name = "sl"', 'name = "y"'))
    assert study_grid.find_grid(tmp_path, "sl") == tmp_path / "sl.toml"
    assert study_grid.find_grid(tmp_path, "y") == tmp_path / "x.toml"
    assert study_grid.find_grid(tmp_path, "x") is None


def test_glue_minilm_takes_stsb_from_the_label_mean_grid():
    grid = study_grid.load_grid(Path(__file__).parents[1] / "benchmarks/study/glue-minilm.toml")
    assert [(r.task, r.grid.name, r.grid.path.name) for r in grid.replace_cells] == [
        ("stsb", "stsb-label-mean", "stsb-label-mean.toml")]


@pytest.mark.parametrize("replace, other, message", [
    ('replace_cells = "stsb"', OTHER, "must be a list of tables"),
    ('replace_cells = [{ task = "stsb", grid = "sl", note = "x" }]', OTHER, "must be a list of tables"),
    ('replace_cells = [{ task = "rte", grid = "sl" }]', OTHER, "task 'rte' is not one of [study] tasks"),
    ('replace_cells = [{ task = "stsb", grid = "sl" }, { task = "stsb", grid = "sl" }]', OTHER, "replaced twice"),
    ('replace_cells = [{ task = "stsb", grid = "nowhere" }]', OTHER, "grid 'nowhere' not found"),
    ('replace_cells = [{ task = "stsb", grid = "m" }]', OTHER, "grid 'm' not found"),  # not its own cells
    ('replace_cells = [{ task = "mrpc", grid = "sl" }]', OTHER, "must run task 'mrpc' with this grid's seeds"),
    (REPLACE, OTHER.replace("seeds = [0, 1, 2]", "seeds = [0, 1]"), "must run task 'stsb' with this grid's seeds"),
    (REPLACE, OTHER.replace('protocol = "selection"', 'replace_cells = [{ task = "stsb", grid = "m" }]'),
     "replaces cells itself"),
])
def test_a_bad_setting_is_one_error_naming_the_field(tmp_path, replace, other, message):
    with pytest.raises(UsageError) as err:
        grids(tmp_path, replace, other)
    assert str(err.value).startswith("grid main.toml: [study] replace_cells") \
        and message in str(err.value)


def test_replaced_rows_find_their_kept_predictions_beside_the_other_results_file(tmp_path):
    from kronpeft.runner.report.replace import take_cells

    grid, other = grids(tmp_path, other=OTHER.replace("[train]", 'results = "sub/sl.jsonl"\n\n[train]'))
    assert other.results == Path("sub/sl.jsonl")
    other.results.parent.mkdir()
    write_rows(other, [study_row(other, "stsb", "krona", 1e-2, s, 0.8, selection_score=0.8, predictions=f"p/{s}.npz")
                       for s in range(3)])
    rows, [taken] = take_cells(grid, [])
    assert taken.methods == ["krona"] and taken.kept == {"lora-r1": "not in grid sl"}
    assert [r["predictions"] for r in rows] == [str(tmp_path / "sub" / "p" / f"{s}.npz") for s in range(3)]
