"""The study page's issue-23 sections from hand-written results: the papers' gaps on the forest plot, the
plain-words summary, the selection-bias table and the budget curve."""
from __future__ import annotations

from pathlib import Path

import pytest

from kronpeft.runner.errors import UsageError
from kronpeft.runner.report import figures as report_figures
from kronpeft.runner.report import page as report_page
from kronpeft.runner.report import stats as report_stats
from kronpeft.runner.report import tables as report_tables
from kronpeft.runner.report.papers import reported_gap
from kronpeft.runner.study import grid as study_grid
from kronpeft.runner.study.results import read_results
from study_rows import study_row, write_rows

GRID = """
[study]
name = "r"
tasks = ["mrpc", "rte"]
seeds = [0, 1, 2]
extend_edges = false
every_seed_every_rate = true

[train]
epochs = 5

[[method]]
name = "krona"
method = "krona"
family = "krona"
lrs = [1e-3]

[[method]]
name = "lora-r1"
method = "lora"
family = "lora"
lrs = [1e-3]
args = { r = 1 }
{extra}
"""


@pytest.fixture(autouse=True)
def no_glue(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GLUE_DIR", raising=False)  # majority-class scores only where a row records one


def load(tmp_path, extra=""):
    path = tmp_path / "grid.toml"
    path.write_text(GRID.replace("{extra}", extra))
    return study_grid.load_grid(path)


def test_the_papers_gaps_are_their_tables_numbers():
    # KronA (T5-base GLUE average): KronA 86.14, LoRA 85.73, KronA^B 86.28, KronA^B_res 86.57, full 85.65
    assert reported_gap("krona", "lora", ["mrpc", "rte"]) == pytest.approx(0.41)
    assert reported_gap("kronab", "krona", ["mrpc", "rte"]) == pytest.approx(0.14)
    assert reported_gap("kronab-res", "kronab", ["mrpc", "stsb", "cola", "rte"]) == pytest.approx(0.29)
    assert reported_gap("krona", "lora", ["mrpc"]) is None  # KronA's paper has no per-task scores
    assert reported_gap("krona-sum", "lora", ["mrpc", "rte"]) is None  # no paper reports a sum
    # AdaKron (BERT-base dev) against Pfeiffer r = 48: RTE 73.8 - 67.6; over MRPC, STS-B, CoLA, RTE the mean of
    # +0.1, -0.2, +0.8, +6.2 = 1.725
    assert reported_gap("adakron", "bottleneck", ["rte"]) == pytest.approx(6.2)
    assert reported_gap("adakron", "bottleneck", ["mrpc", "stsb", "cola", "rte"]) == pytest.approx(1.725)


def test_the_forest_marks_a_papers_gap_on_its_claims_average_row_only(tmp_path, monkeypatch):
    grid = load(tmp_path, '[[claim]]\ntext = "KronA beats LoRA"\nbetter = "krona"\nworse = "lora-r1"\n')
    scores = {("mrpc", "krona"): [0.85, 0.83, 0.87], ("mrpc", "lora-r1"): [0.75, 0.74, 0.76],
              ("rte", "krona"): [0.60, 0.62, 0.58], ("rte", "lora-r1"): [0.58, 0.57, 0.59]}
    results = [study_row(grid, t, n, 1e-3, s, v[s]) for (t, n), v in scores.items() for s in range(3)]
    write_rows(grid, results)
    rows = report_tables.claim_rows(grid, report_stats.summarise(grid, results))
    assert [(r.where, r.paper) for r in rows] == [("mrpc", None), ("rte", None), ("average of 2 tasks", 0.41)]
    points = report_tables.forest_points(rows)
    assert points[2][0] == "KronA beats LoRA: average of 2 tasks" and points[2][3] == pytest.approx(0.0041)
    figures = []
    monkeypatch.setattr(report_figures, "save_png", lambda fig, path, dpi: (figures.append(fig), Path(path))[1])
    report_figures.plot_forest(points, tmp_path / "f.png")
    ax = figures[0].axes[0]
    diamonds = [line for line in ax.get_lines() if line.get_marker() == "D"]
    assert len(diamonds) == 1  # the average row (drawn at y 0: rows run top-down), no marker on the tasks' rows
    assert list(diamonds[0].get_xdata()) == pytest.approx([0.41]) and list(diamonds[0].get_ydata()) == [0]
    assert diamonds[0].get_markerfacecolor() == "none"
    assert "paper" in [t.get_text() for t in ax.get_legend().get_texts()]
    page = report_page.render(grid, tmp_path / "page.md").read_text()
    assert "Hollow diamonds (*paper*)" in page


def test_the_forest_keeps_its_axis_and_label_inside_the_figure_beside_long_claim_texts(tmp_path, monkeypatch):
    label = "A Kronecker-SVD-initialised sum of 3 beats LoRA at an equal budget (28-30 k): average of 4 tasks"
    figures = []
    monkeypatch.setattr(report_figures, "save_png", lambda fig, path, dpi: (figures.append(fig), Path(path))[1])
    report_figures.plot_forest([(label, 0.01, (-0.02, 0.04), None), ("short: mrpc", 0.0, None, None)],
                               tmp_path / "f.png")
    fig = figures[0]
    fig.canvas.draw()
    ax, renderer = fig.axes[0], fig.canvas.get_renderer()
    assert ax.get_window_extent(renderer).width >= 3 * fig.dpi  # the plot keeps its width
    for text in (ax.xaxis.label, *ax.get_yticklabels()):  # nothing clipped at the figure's edges
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= fig.bbox.x1


def test_the_page_opens_with_what_it_shows_counted_from_its_claims(tmp_path):
    grid = load(tmp_path, '[[claim]]\ntext = "KronA beats LoRA"\nbetter = "krona"\nworse = "lora-r1"\n')
    scores = {("mrpc", "krona"): [0.85, 0.83, 0.87], ("mrpc", "lora-r1"): [0.75, 0.74, 0.76],
              ("rte", "krona"): [0.60, 0.62, 0.58], ("rte", "lora-r1"): [0.58, 0.57, 0.59]}
    majority = {"mrpc": {"majority_baseline": 0.745}, "rte": {}}  # rte: no majority score known, nothing flagged
    write_rows(grid, [study_row(grid, t, n, 1e-3, s, v[s], **majority[t])
                      for (t, n), v in scores.items() for s in range(3)])
    page = report_page.render(grid, tmp_path / "page.md").read_text()
    # as in test_study's average test: mrpc holds (paired p 0.0033), rte within noise (0.37), the average holds
    # (0.0091); Holm over 3: 3 x 0.003317 = 0.00995 (0.01 at two digits), 0.37, 2 x 0.0091 = 0.018: both verdicts
    # survive. LoRA's mrpc seed 0.74 <= 0.745: collapsed.
    section = page[page.index("## What this shows"):page.index("Cells complete")]
    assert section.index("## What this shows") < page.index("Cells complete")  # before the tables
    assert "- 3 claim rows (1 claims, per task and on their average where a claim spans several tasks): 3 have a " \
           "verdict, 0 still wait for seeds or a sweep." in section
    assert "- Before Holm's correction: holds: 2, reversed: 0, within noise: 1, optimisation failure: 0; KronA beats " \
           "LoRA (`krona` vs `lora-r1`) on mrpc: holds; KronA beats LoRA (`krona` vs `lora-r1`) on the average of 2 " \
           "tasks: holds." \
           in section
    assert "- After it (over the 3 rows with a paired test): holds: 2, reversed: 0, within noise: 1, " \
           "optimisation failure: 0." in section
    assert "- Surviving Holm's correction: KronA beats LoRA (`krona` vs `lora-r1`) on mrpc (holds, Holm p 0.01); " \
           "KronA beats LoRA (`krona` vs `lora-r1`) on the average of 2 tasks (holds, Holm p 0.018)." in section
    assert "- One model: all-MiniLM-L6-v2, one small 6-layer encoder" in section
    assert "- 3 seeds per cell" in section
    assert "- The dev set chose each rate and each run's best epoch and is also the set reported" in section
    assert "- 1 of 12 runs at the chosen rates collapsed" in section
    assert "Not flagged, their majority-class score unknown (rows without it, no `$GLUE_DIR` or [train] data_dir): " \
           "rte." in section  # a page rendered without the dev data says so instead of "0 collapsed"


def test_the_plain_words_name_the_selection_protocol_and_skip_grids_without_claims(tmp_path):
    (tmp_path / "a").mkdir()
    grid = load(tmp_path / "a", '[[claim]]\ntext = "KronA beats LoRA"\nbetter = "krona"\nworse = "lora-r1"\n')
    grid.protocol = "selection"  # as `protocol = "selection"` in [study]
    write_rows(grid, [study_row(grid, "mrpc", n, 1e-3, 0, 0.8, selection_score=0.7) for n in ("krona", "lora-r1")])
    page = report_page.render(grid, tmp_path / "a" / "page.md").read_text()
    assert "- Rates and epochs were chosen on a 10 % selection split of train, and dev, which chose nothing, is " \
           "reported as the test set." in page
    assert "0 have a verdict, 2 still wait" in page  # mrpc at one seed of three; the average: rte not run
    plain = load(tmp_path)
    write_rows(plain, [study_row(plain, "mrpc", n, 1e-3, 0, 0.8) for n in ("krona", "lora-r1")])
    assert "What this shows" not in report_page.render(plain, tmp_path / "page.md").read_text()


BIAS = """
[study]
name = "b"
tasks = ["mrpc", "rte"]
seeds = [0, 1, 2]
extend_edges = false
every_seed_every_rate = true

[[method]]
name = "krona"
method = "krona"
lrs = [1e-3, 1e-2]
tasks = ["mrpc"]
protocol = "dev"

[[method]]
name = "second-look"        # krona again under the selection protocol: paired by method, args and rates
method = "krona"
lrs = [1e-2, 1e-3]
tasks = ["mrpc"]
protocol = "selection"

[[method]]
name = "lora-r1"
method = "lora"
lrs = [1e-3]
args = { r = 1 }

[[method]]
name = "lora-r8-sel"        # lora-r1's method and rates but other args: no pair
method = "lora"
lrs = [1e-3]
args = { r = 8 }
protocol = "selection"
"""


def test_selection_bias_pairs_by_method_args_and_rates_and_counts_the_seeds_each_side_has(tmp_path):
    from kronpeft.runner.report.bias import protocol_pairs

    (tmp_path / "bias.toml").write_text(BIAS)
    grid = study_grid.load_grid(tmp_path / "bias.toml")
    assert [(d.name, s.name) for d, s in protocol_pairs(grid)] == [("krona", "second-look")]
    rows = [study_row(grid, "mrpc", "krona", 1e-3, s, v) for s, v in enumerate([0.80, 0.82, 0.84])]
    rows.append(study_row(grid, "mrpc", "krona", 1e-2, 0, 0.70))
    # selection runs: dev at the epoch the split chose (score) and dev after every epoch (curve); dev would
    # have chosen 0.79 (gap 0.01) and 0.83 (gap 0.03)
    rows += [study_row(grid, "mrpc", "second-look", 1e-3, 0, 0.78, selection_score=0.9,
                 curve=[[0.0, 0.5], [1.0, 0.79], [2.0, 0.78]]),
             study_row(grid, "mrpc", "second-look", 1e-3, 1, 0.80, selection_score=0.9,
                 curve=[[0.0, 0.5], [1.0, 0.80], [2.0, 0.83]])]
    write_rows(grid, rows)
    page = report_page.render(grid, tmp_path / "page.md").read_text()
    # 1e-3: 82.0 over 3 seeds against 79.0 over 2: bias +3.0; epoch choice alone (1 + 3) / 2 = +2.0
    assert "| `krona` / `second-look` | mrpc | 0.001 | 82.0 (3 of 3 seeds) | 79.0 (2 of 3 seeds) | +3.0 " \
           "| +2.0 (2 of 3 seeds) |" in page
    assert "| `krona` / `second-look` | mrpc | 0.01 | 70.0 (1 of 3 seeds) | — (0 of 3 seeds) | — | — |" in page
    # sweep seed 0: dev chooses 1e-3 (0.80 > 0.70); the selection protocol has run 1e-3 only
    assert "- `krona` / `second-look` on mrpc: the dev protocol chooses 0.001, where dev scores 82.0 (3 of 3 " \
           "seeds); the selection protocol chooses 0.001 (the sweep seed has run 1 of 2 rates), where dev scores " \
           "79.0 (2 of 3 seeds): the whole protocol's bias is +3.0." in page
    assert "lora-r8-sel` |" not in page and "rte |" not in page.split("## Selection bias")[1].split("##")[0]


def test_the_plain_words_name_each_protocol_of_a_grid_that_mixes_them(tmp_path):
    (tmp_path / "bias.toml").write_text(BIAS)
    words = report_page._protocol_words(study_grid.load_grid(tmp_path / "bias.toml"))
    assert words == ("`krona`, `lora-r1`: the dev set chose each rate and each run's best epoch and is also the set "
                     "reported, so the scores are optimistic (no held-out test set). `second-look`, `lora-r8-sel`: "
                     "rates and epochs were chosen on a 10 % selection split of train, and dev, which chose nothing, "
                     "is reported as the test set.")


def test_no_selection_bias_section_without_a_pair(tmp_path):
    grid = load(tmp_path)
    write_rows(grid, [study_row(grid, "mrpc", "krona", 1e-3, 0, 0.8)])
    assert "Selection bias" not in report_page.render(grid, tmp_path / "page.md").read_text()


BUDGET = """
[study]
name = "g"
tasks = ["mrpc", "rte"]
seeds = [0, 1, 2]
extend_edges = false
every_seed_every_rate = true

[[method]]
name = "krona-small"
method = "krona"
lrs = [1e-3]

[[method]]
name = "krona-big"
method = "krona"
lrs = [1e-3]
tasks = ["mrpc"]
args = { a_shape = [4, 4] }

[[method]]
name = "lora-small"
method = "lora"
lrs = [1e-3]

[[method]]
name = "lora-big"
method = "lora"
lrs = [1e-3]
tasks = ["mrpc"]
args = { r = 3 }

[[method]]
name = "bottleneck"
method = "bottleneck"
lrs = [1e-3]
"""


def test_the_budget_curve_has_the_budget_families_alone_and_a_collapse_does_not_stretch_it(tmp_path, monkeypatch):
    (tmp_path / "budget.toml").write_text(BUDGET)
    grid = study_grid.load_grid(tmp_path / "budget.toml")
    seeds = {"krona-small": (1000, [0.85, 0.84, 0.86]), "krona-big": (3000, [0.86, 0.85, 0.87]),
             "lora-small": (900, [0.84, 0.83, 0.85]), "lora-big": (2800, [0.86, 0.87, 0.20]),
             "bottleneck": (5000, [0.88, 0.88, 0.88])}
    rows = [study_row(grid, "mrpc", name, 1e-3, s, v, params, majority_baseline=0.812)
            for name, (params, scores) in seeds.items() for s, v in enumerate(scores)]
    rows += [study_row(grid, "rte", name, 1e-3, 0, 0.6) for name in ("krona-small", "lora-small", "bottleneck")]
    summary = report_stats.summarise(grid, rows)
    panels = report_figures.budget_panels(grid, summary)
    # rte has one budget per family: no curve there; bottleneck is no budget family
    assert list(panels) == ["mrpc"] and list(panels["mrpc"]) == ["krona", "lora"]
    assert [(p, n) for p, n, _ in panels["mrpc"]["lora"]] == [(900, "lora-small"), (2800, "lora-big")]
    figures = []
    monkeypatch.setattr(report_figures, "save_png", lambda fig, path, dpi: (figures.append(fig), Path(path))[1])
    report_figures.plot_budget(panels, {"mrpc": 0.812}, tmp_path / "b.png")
    ax = figures[0].axes[0]
    # seeds above the 0.812 line: 0.83 to 0.87, spread 0.04; the line lies 0.018 below them, within it, so the
    # axis reaches just under it: 0.812 - 0.02 x (0.87 - 0.812 + 0.05) = 0.80984, and the collapsed 0.20 sits
    # on that edge as the one point there (lora-big, 2,800 parameters)
    bottom = ax.get_ylim()[0]
    assert bottom == pytest.approx(80.984)
    assert [line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"] == pytest.approx([81.2])
    at_edge = [tuple(xy) for c in ax.collections for xy in c.get_offsets() if abs(xy[1] - bottom) < 1e-9]
    assert at_edge == [(2800, pytest.approx(80.984))]
    # a collapse line far below the scores (CoLA's Matthews 0) stays out of view
    assert report_figures._budget_bottom([0.20, 0.25, 0.0], 0.0) == pytest.approx(0.20 - 0.02 * 0.10)
    write_rows(grid, rows)
    page = report_page.render(grid, tmp_path / "page.md").read_text()
    assert "## Score against parameter budget" in page and "(img/g-budget.png)" in page


def test_the_forest_axis_holds_every_difference_but_cuts_an_interval_a_collapse_widened():
    """The half-width is the largest of: 5 points, 1.25 × the largest difference or paper gap, and the 75th
    percentile of the interval ends (×100). One wide interval among few still sets it; among many it is cut."""
    narrow = [(f"c{i}", 0.01 * i, (0.01 * i - 0.01, 0.01 * i + 0.01), None) for i in (1, 2, 3)]
    wide = ("stsb", 0.17, (-0.95, 1.29), None)  # a collapsed seed's interval
    # |ends| sorted: 0, 1, 2, 2, 3, 4, 95, 129; index (3 · 8) // 4 = 6 → 95
    assert report_figures.forest_limit([*narrow, wide]) == pytest.approx(95.0)
    many = [*narrow, *[(f"d{i}", 0.0, (-0.02, 0.02), None) for i in range(4)], wide]
    # |ends| sorted: 0, 1, ten 2s, 3, 4, 95, 129; index 12 → 3; the largest difference 17 → 1.25 · 17 = 21.25
    assert report_figures.forest_limit(many) == pytest.approx(21.25)
    assert report_figures.forest_limit([("p", 0.0, None, 0.02)]) == 5.0  # a paper gap of 2: the floor


def test_a_failed_optimisation_sets_nothing_on_the_forest_axis_and_sits_at_its_edge_with_its_value(tmp_path,
                                                                                                 monkeypatch):
    trained = [("a: mrpc", 0.02, (0.01, 0.03), None), ("a: stsb", -0.04, (-0.06, -0.02), None)]
    failed = report_figures.ForestPoint("a: cola (optimisation failure)", -0.21, (-0.26, -0.16), None, True)
    # without the failed row: differences 2, 4 → 1.25 · 4 = 5; ends 1..6, the 75th percentile 6 → 6
    assert report_figures.forest_limit(trained) == pytest.approx(6.0)
    assert report_figures.forest_limit([*trained, failed]) == pytest.approx(6.0)
    assert report_figures.forest_limit([*trained, failed._replace(failed=False)]) == pytest.approx(26.25)
    figures = []
    monkeypatch.setattr(report_figures, "save_png", lambda fig, path, dpi: (figures.append(fig), Path(path))[1])
    report_figures.plot_forest([*trained, failed], tmp_path / "f.png")
    ax = figures[0].axes[0]
    assert ax.get_xlim() == pytest.approx((-6.24, 6.24))
    hollow = [line for line in ax.get_lines() if line.get_marker() == "o" and line.get_markerfacecolor() == "none"]
    assert [list(line.get_xdata()) for line in hollow] == [[-6.0]]  # at the edge, on the failed row (y 0)
    assert [t.get_text() for t in ax.texts] == ["-21.0"]
    assert ax.get_legend() is None  # no paper gap: no legend
    arrows = [(line.get_marker(), list(line.get_xdata())) for line in ax.get_lines() if line.get_marker() in "<>"]
    assert arrows == [("<", [-6.0])]  # an interval wholly left of the axis: one arrow, at the left edge
    assert all(-6.0 <= x <= 6.0 for line in ax.get_lines() for x in line.get_xdata())  # nothing past the edges


def test_a_bootstrap_with_no_resample_past_zero_prints_as_below_its_resolution():
    assert report_tables.bootstrap_words(0.0) == "< 0.002"  # two-sided, 1,000 resamples: 2 / 1000
    assert report_tables.bootstrap_words(0.0123) == "0.012" and report_tables.bootstrap_words(None) == "—"


def test_a_side_collapsed_at_every_seed_is_an_optimisation_failure_not_a_comparison(tmp_path):
    grid = load(tmp_path, '[[claim]]\ntext = "KronA beats LoRA"\nbetter = "krona"\nworse = "lora-r1"\n')
    majority = {"mrpc": {"majority_baseline": 0.745}, "rte": {}}  # rte: no majority score known, nothing flagged
    scores = {("mrpc", "krona"): [0.85, 0.83, 0.87], ("mrpc", "lora-r1"): [0.70, 0.71, 0.72],  # all <= 0.745
              ("rte", "krona"): [0.60, 0.62, 0.58], ("rte", "lora-r1"): [0.58, 0.57, 0.59]}
    write_rows(grid, [study_row(grid, t, n, 1e-3, s, v[s], **majority[t]) for (t, n), v in scores.items()
                      for s in range(3)])
    rows = report_tables.claim_rows(grid, report_stats.summarise(grid, read_results(grid.results)))
    # mrpc: +14.0 points with sd 2 and 1 would "hold", but every LoRA seed sits at or below the majority class;
    # the average spans mrpc, so it fails too; rte compares two trained cells (within noise, paired p 0.37)
    assert [(r.where, r.verdict) for r in rows] == [("mrpc", "optimisation failure"), ("rte", "within noise"),
                                                    ("average of 2 tasks", "optimisation failure")]
    assert rows[0].diff == pytest.approx(0.14) and rows[0].after_holm() == "optimisation failure"
    assert report_tables.forest_points(rows)[0][0] == "KronA beats LoRA: mrpc (optimisation failure)"
    page = report_page.render(grid, tmp_path / "page.md").read_text()
    assert "- Before Holm's correction: holds: 0, reversed: 0, within noise: 1, optimisation failure: 2." in page
    assert "- No comparison where an optimisation failed (every seed of one side collapsed): KronA beats LoRA " \
           "(`krona` vs `lora-r1`) on mrpc; KronA beats LoRA (`krona` vs `lora-r1`) on the average of 2 tasks." in page


def test_a_side_with_one_trained_seed_is_still_compared(tmp_path):
    grid = load(tmp_path, '[[claim]]\ntext = "KronA beats LoRA"\nbetter = "krona"\nworse = "lora-r1"\n')
    scores = {("mrpc", "krona"): [0.85, 0.83, 0.87], ("mrpc", "lora-r1"): [0.70, 0.71, 0.80]}  # 0.80 > 0.745
    results = [study_row(grid, t, n, 1e-3, s, v[s], majority_baseline=0.745) for (t, n), v in scores.items()
               for s in range(3)]
    rows = report_tables.claim_rows(grid, report_stats.summarise(grid, results))
    # diff 0.1133, Welch se sqrt(0.0004/3 + 0.003033/3) = 0.0338, t 3.35 on 2.5 df: the interval holds zero
    assert [(r.where, r.verdict) for r in rows][0] == ("mrpc", "within noise")
    assert rows[0].diff == pytest.approx(0.85 - 0.73667, abs=1e-4)


def test_under_the_selection_protocol_the_rate_tables_show_and_use_the_scores_that_chose(tmp_path):
    """KronA's sweep: 1e-3 wins on the selection split (0.70 vs 0.60) though dev prefers 1e-2 (0.80 vs 0.85) on
    both tasks. The table prints "selection / dev" and "one rate for every task" follows selection (dev chose
    nothing): 1e-3, 0.0 below the best; dev would have said 1e-2."""
    text = GRID.replace("lrs = [1e-3]\n\n[[method]]", "lrs = [1e-3, 1e-2]\n\n[[method]]", 1)
    text = text.replace("every_seed_every_rate = true\n", "")  # the sweep is finished at seed 0
    (tmp_path / "grid.toml").write_text(text.replace("{extra}", ""))
    grid = study_grid.load_grid(tmp_path / "grid.toml")
    grid.protocol = "selection"
    chosen = {1e-3: (0.80, 0.70), 1e-2: (0.85, 0.60)}  # lr: (dev, selection)
    write_rows(grid, [study_row(grid, task, "krona", lr, 0, dev, selection_score=sel)
                      for task in ("mrpc", "rte") for lr, (dev, sel) in chosen.items()])
    summary = report_stats.summarise(grid, read_results(grid.results))
    assert summary[("mrpc", "krona")]["lr"] == 1e-3
    assert report_stats.rate_across_tasks(grid, summary)["krona"] == (1e-3, 0.0, 2)
    page = report_page.render(grid, tmp_path / "page.md").read_text()
    assert "| krona | **0.001** ↓ (0.001: 70.0 / 80.0, 0.01: 60.0 / 85.0) |" in page
    assert "| **0.001** (0.0 below the best, on average over 2 tasks) |" in page
    assert "the selection split's, which chose the winner, then dev's (*selection / dev*)" in page
    assert "(the selection split chose the rate: its scores are in the table of learning rates)" in page


def test_a_grid_with_claims_but_no_pair_of_cells_says_so_instead_of_an_empty_table(tmp_path):
    """One task (no average row): before LoRA's first row the claim has no row at all."""
    (tmp_path / "grid.toml").write_text(GRID.replace('tasks = ["mrpc", "rte"]', 'tasks = ["mrpc"]').replace(
        "{extra}", '[[claim]]\ntext = "KronA beats LoRA"\nbetter = "krona"\nworse = "lora-r1"\n'))
    grid = study_grid.load_grid(tmp_path / "grid.toml")
    write_rows(grid, [study_row(grid, "mrpc", "krona", 1e-3, 0, 0.8)])  # lora-r1 has no row yet
    page = report_page.render(grid, tmp_path / "page.md").read_text()
    assert "- Nothing yet: none of the 1 claims has both its cells." in page
    assert "None of the 1 claims has both its cells yet." in page
    assert "| claim | task |" not in page and "0 claim rows" not in page


def test_a_summary_file_opens_the_page_under_its_title_and_a_missing_one_is_named(tmp_path):
    (tmp_path / "summary.md").write_text("**In short:** nothing beats LoRA here.\n")
    path = tmp_path / "grid.toml"
    path.write_text(GRID.replace('every_seed_every_rate = true', 'every_seed_every_rate = true\nsummary = "summary.md"')
                    .replace("{extra}", ""))
    grid = study_grid.load_grid(path)
    write_rows(grid, [study_row(grid, "mrpc", "krona", 1e-3, s, 0.8) for s in range(3)])
    page = report_page.render(grid, tmp_path / "page.md").read_text().splitlines()
    assert page[3].startswith("Rendered by") and page[5] == "**In short:** nothing beats LoRA here."
    for key in ("summary", "notes"):
        path.write_text(GRID.replace('every_seed_every_rate = true', f'every_seed_every_rate = true\n{key} = "gone.md"')
                        .replace("{extra}", ""))
        with pytest.raises(UsageError, match=rf"\[study\] {key} = 'gone.md': no file .*gone.md; write it beside"):
            study_grid.load_grid(path)


def test_no_paper_marker_note_where_no_claim_row_has_a_papers_gap(tmp_path):
    path = tmp_path / "grid.toml"  # one task: no average row, and neither paper prints KronA vs LoRA on MRPC
    path.write_text(GRID.replace('tasks = ["mrpc", "rte"]', 'tasks = ["mrpc"]').replace(
        "{extra}", '[[claim]]\ntext = "KronA beats LoRA"\nbetter = "krona"\nworse = "lora-r1"\n'))
    grid = study_grid.load_grid(path)
    write_rows(grid, [study_row(grid, "mrpc", n, 1e-3, s, v) for n, v in (("krona", 0.8), ("lora-r1", 0.7))
                      for s in range(3)])
    page = report_page.render(grid, tmp_path / "page.md").read_text()
    assert "![every claim: difference and 95 % interval]" in page and "Hollow diamonds" not in page
