"""Issue 24 items 5, 9, 18 and 22 (study/report part): `report` overwrites only its own pages and writes
beside the grid by default; grid typos and wrong types are errors naming the key; a second runner does not
announce a run another runner holds."""
import json
import sys
import types

import pytest

from conftest import held_by_another_runner

from kronpeft.runner.study import execute as study_execute
from kronpeft.runner.study import grid as study_grid
from kronpeft.runner.study import plan as study_plan
from kronpeft.runner.cli import main
from kronpeft.runner.report.page import PAGE_MARK

GRID = """
[study]
name = "r"
tasks = ["mrpc"]
seeds = [0]
{extra}

[train]
epochs = 1

[[method]]
name = "krona"
method = "krona"
lrs = [1e-3]
{method}
"""


def write_grid(tmp_path, extra="", method=""):
    path = tmp_path / "g.toml"
    path.write_text(GRID.format(extra=extra, method=method))
    return path


def last_error(capsys):
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_report_refuses_a_file_it_did_not_write_unless_overwrite(here, capsys):
    grid = write_grid(here)
    out = here / "notes.md"
    out.write_text("# my notes\n\nhand-written\n")
    assert main(["report", str(grid), "--out", str(out)]) == 2
    assert "--overwrite" in last_error(capsys) and out.read_text() == "# my notes\n\nhand-written\n"
    assert main(["report", str(grid), "--out", str(out), "--overwrite"]) == 0
    assert out.read_text().splitlines()[0] == PAGE_MARK
    assert main(["report", str(grid), "--out", str(out)]) == 0  # its own page: re-rendered
    old = here / "old.md"  # a page from before the mark
    old.write_text("# Results\n\nRendered by `kronpeft report g.toml` from `results.jsonl` (0 runs) alone.\n")
    assert main(["report", str(grid), "--out", str(old)]) == 0


def test_report_without_out_writes_beside_its_grid_never_docs_results(here):
    (here / "docs").mkdir()
    (here / "docs" / "results.md").write_text("another grid's page\n")
    grid = write_grid(here)
    assert main(["report", str(grid)]) == 0
    assert (here / "g.md").read_text().splitlines()[0] == PAGE_MARK
    assert (here / "docs" / "results.md").read_text() == "another grid's page\n"
    grid = write_grid(here, 'page = "pages/main.md"')
    assert main(["report", str(grid)]) == 0 and (here / "pages" / "main.md").is_file()


@pytest.mark.parametrize("extra, method, word", [
    ("[trian]\nepochs = 2", "", "[trian]"),
    ('extend_edges = "false"', "", "extend_edges"),
    ("model = 5", "", "model"),
    ("sede = 3", "", "'sede'"),
    ("", "args = 4", "args"),
    ("", 'name2 = "x"', "'name2'"),
    ("", 'family = ["lora"]', "family"),
])
def test_grid_typos_and_wrong_types_are_errors_naming_the_key(here, capsys, extra, method, word):
    if extra.startswith("[trian]"):
        path = here / "g.toml"
        path.write_text(GRID.format(extra="", method="") + "\n" + extra + "\n")
    else:
        path = write_grid(here, extra, method)
    assert main(["study", str(path), "--dry-run"]) == 2
    assert word in last_error(capsys)


def test_a_method_name_that_is_a_list_is_an_error_naming_it(here, capsys):
    path = here / "g.toml"
    path.write_text(GRID.format(extra="", method="").replace('name = "krona"', 'name = ["bn"]'))
    assert main(["study", str(path), "--dry-run"]) == 2
    error = last_error(capsys)
    assert "name" in error and "['bn']" in error


def test_a_second_runner_does_not_announce_a_run_another_runner_holds(here, capsys, monkeypatch):
    grid = study_grid.load_grid(write_grid(here))
    run = study_plan.plan(grid, [])[0][0]
    monkeypatch.setattr(study_execute, "_train", lambda *a: pytest.fail("trained a run another runner holds"))
    monkeypatch.setattr(study_execute, "machine", lambda: {})
    with held_by_another_runner(run.folder(grid)):
        assert study_execute.run_grid(grid) == 0
    err = capsys.readouterr().err
    assert "start" not in err and "another runner" in err
    monkeypatch.setattr(study_execute, "_train", lambda grid_, run_, *a: {
        "key": run_.key(grid_), "grid": "r", "task": "mrpc", "name": "krona", "lr": 1e-3, "seed": 0, "score": 0.5,
        "stage": "sweep", "main_metric": "f1", "wall_seconds": 1.0})
    assert study_execute.run_grid(grid) == 1 and "start mrpc/krona" in capsys.readouterr().err
    assert json.loads(grid.results.read_text())["score"] == 0.5


def test_progress_lines_reach_stderr_whole_when_runs_print_side_by_side(here, monkeypatch):
    # two runs' threads print "start" together: each line must be one write, or the lines can run together
    # ("... (sweep)kronpeft study: start ..."), as print's separate newline let them
    writes = []
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(write=writes.append, flush=lambda: None))
    path = here / "g.toml"
    path.write_text(GRID.format(extra="", method="").replace("lrs = [1e-3]", "lrs = [1e-3, 2e-3]"))  # two runs
    grid = study_grid.load_grid(path)
    monkeypatch.setattr(study_execute, "machine", lambda: {})
    # every run fails, warning as the real _train does: nothing recorded
    monkeypatch.setattr(study_execute, "_train", lambda grid_, run_, *a: study_execute._warn(f"{run_.label()} failed"))
    assert study_execute.run_grid(grid, parallel=2) == 0
    starts = [w for w in writes if "start" in w]
    assert len(starts) == 2 and all(w.startswith("kronpeft study: start ") and w.endswith(")\n") for w in starts)
    failures = [w for w in writes if "failed" in w]
    assert len(failures) == 2 and all(w.startswith("kronpeft: warning: ") and w.endswith("failed\n") for w in failures)
