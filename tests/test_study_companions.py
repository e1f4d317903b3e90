"""[study] companions: a grid's page summarises other grids (findings, scores, claims, plots) under headings of
their own, with a link to each one's whole page; hand-written rows, hand-computed numbers."""
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
tasks = ["mrpc"]
seeds = [0, 1, 2]
extend_edges = false
every_seed_every_rate = true
{companions}

[[method]]
name = "krona"
method = "krona"
lrs = [1e-3]
"""
OTHER = """
[study]
name = "{name}"
title = "Grid {name}"
model = "mpnet"
tasks = ["mrpc"]
seeds = [0, 1, 2]
extend_edges = false
every_seed_every_rate = true
protocol = "selection"

[[method]]
name = "krona"
method = "krona"
lrs = [1e-2]

[[method]]
name = "lora-r1"
method = "lora"
lrs = [1e-3]
args = {{ r = 1 }}

[[claim]]
text = "KronA beats LoRA"
better = "krona"
worse = "lora-r1"
"""


@pytest.fixture(autouse=True)
def no_glue(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GLUE_DIR", raising=False)


def grids(tmp_path, companions='companions = ["a", "b"]', other=OTHER):
    for name in ("a", "b"):
        (tmp_path / f"{name}.toml").write_text(other.format(name=name))
    (tmp_path / "main.toml").write_text(MAIN.replace("{companions}", companions))
    return study_grid.load_grid(Path("main.toml"))


def test_each_companion_gets_its_findings_scores_claims_and_plots_under_its_own_heading(tmp_path):
    grid = grids(tmp_path)
    a, b = grid.companions
    rows = [study_row(grid, "mrpc", "krona", 1e-3, s, v) for s, v in enumerate([0.80, 0.82, 0.84])]
    rows += [study_row(a, "mrpc", "krona", 1e-2, s, v, selection_score=v) for s, v in enumerate([0.86, 0.88, 0.90])]
    rows += [study_row(a, "mrpc", "lora-r1", 1e-3, s, v, selection_score=v) for s, v in enumerate([0.84, 0.85, 0.86])]
    write_rows(grid, rows)
    before = {f for f in tmp_path.rglob("*") if f.is_file()}
    page = report_page.render(grid, tmp_path / "docs" / "page.md").read_text()
    written = {f for f in tmp_path.rglob("*") if f.is_file()} - before
    assert all(f.parent in (tmp_path / "docs", tmp_path / "docs" / "img") for f in written)  # only the named folder
    assert {f.name for f in written} >= {"page.md", "a-claims.png"} and before <= set(tmp_path.rglob("*"))
    head, rest = page.split("## The other grids of this study")
    assert "| krona | 1,000 | 0.100 | 82.0 ± 2.0 [82.0] | 82.0 |" in head and "Grid a" not in head
    section_a, section_b = rest.split("### Grid b")
    assert "### Grid a" in section_a
    assert "Grid `a` (a.toml; its page: [a.md](../a.md)), 6 runs recorded; model: mpnet." in section_a
    assert "all-mpnet-base-v2 (`mpnet`), a 12-layer encoder" in section_a  # its own findings, in words
    # a's cells: krona 88.0 ± 2.0, lora-r1 85.0 ± 1.0; its claim 88.0 - 85.0 = +3.0
    assert "| krona | 1,000 | 0.100 | 88.0 ± 2.0 [88.0] | 88.0 |" in section_a
    assert "| lora-r1 | 1,000 | 0.100 | 85.0 ± 1.0 [85.0] | 85.0 |" in section_a
    assert "| KronA beats LoRA (`krona` vs `lora-r1`) | mrpc | +3.0 |" in section_a
    assert "Columns and verdicts as in the first claims table of this page." in section_a  # not explained again
    assert "Score against learning rate" not in rest  # one rate per sweep: nothing to plot
    assert "#### The papers' claims" in section_a and "\n## " not in rest.split("## Setup")[0]  # demoted headings
    assert "(img/a-claims.png)" in section_a and (tmp_path / "docs/img/a-claims.png").is_file()
    assert "## Every seed" not in rest and "## Learning rates" not in rest  # on its own page only
    assert "Grid `b` (b.toml; its page: [b.md](../b.md)), 0 runs recorded" in section_b
    assert "No runs recorded yet." in section_b


def test_a_companions_rate_plot_points_to_its_own_page_for_the_scores_that_chose(tmp_path):
    """Companion a sweeps KronA at two rates under the selection protocol: its plot (dev scores) is on this page,
    the table of the selection split's scores that chose only on a's own page, and the caption says so."""
    grid = grids(tmp_path, other=OTHER.replace("lrs = [1e-2]", "lrs = [1e-3, 1e-2]"))
    a = grid.companions[0]
    write_rows(grid, [study_row(a, "mrpc", "krona", lr, 0, dev, selection_score=sel)
                      for lr, dev, sel in ((1e-3, 0.80, 0.70), (1e-2, 0.85, 0.60))])
    rest = report_page.render(grid, tmp_path / "page.md").read_text().split("## The other grids of this study")[1]
    assert "#### Score against learning rate" in rest and "(img/a-score-vs-lr.png)" in rest
    assert "its scores are in the table of learning rates of its own page)" in rest
    assert "## Learning rates" not in rest


def test_a_page_without_companions_has_no_such_section(tmp_path):
    grid = grids(tmp_path, companions="")
    assert grid.companions == ()
    write_rows(grid, [study_row(grid, "mrpc", "krona", 1e-3, 0, 0.8)])
    assert "other grids" not in report_page.render(grid, tmp_path / "page.md").read_text()


def test_glue_minilm_summarises_the_second_round_grids():
    grid = study_grid.load_grid(Path(__file__).parents[1] / "benchmarks/study/glue-minilm.toml")
    assert [g.name for g in grid.companions] == [
        "selection-bias-mrpc", "stsb-label-mean", "adakron-cola", "mpnet-mrpc", "kron-sums", "mpnet-rte"]


@pytest.mark.parametrize("companions, other, message", [
    ('companions = "a"', OTHER, "must be a non-empty list of grid names without repeats"),
    ('companions = ["a", "a"]', OTHER, "must be a non-empty list of grid names without repeats"),
    ('companions = ["nowhere"]', OTHER, "grid 'nowhere' not found"),
    ('companions = ["m"]', OTHER, "grid 'm' not found"),  # not itself
    ('companions = ["a"]', OTHER.replace('protocol = "selection"', 'companions = ["b"]'), "has companions of its own"),
])
def test_a_bad_setting_is_one_error_naming_the_field(tmp_path, companions, other, message):
    with pytest.raises(UsageError) as err:
        grids(tmp_path, companions, other)
    assert str(err.value).startswith("grid main.toml: [study] companions") and message in str(err.value)
