"""`kronpeft train`/`merge` outputs that do not mislead: the majority-class baseline beside the scores,
markers on short curves, GLUE label names in merged models; `--mixed-precision`."""
import json

import numpy as np
import pytest

from kronpeft.runner import cli
from kronpeft.runner.metrics import constant_baseline
from test_cli import GLUE, assert_usage_error, train

pytestmark = pytest.mark.skipif(not (GLUE / "RTE" / "train.tsv").is_file(), reason=f"no GLUE data in {GLUE}")


def test_constant_baseline():
    assert constant_baseline("rte", [1, 1, 0, 1]) == {"accuracy": 0.75}
    assert constant_baseline("rte", [0, 1]) == {"accuracy": 0.5}  # tie: the smallest id
    mrpc = constant_baseline("mrpc", np.array([1, 1, 0]))
    assert mrpc["accuracy"] == pytest.approx(2 / 3) and mrpc["f1"] == pytest.approx(0.8)
    assert constant_baseline("stsb", [0.5, 4.0])["pearson"] == 0.0


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; a `kronpeft train` process creates it once, but these
    in-process runs share a worker with others, so a new mixed-precision setting needs a reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_summary_shows_majority_baseline_and_merge_names_labels(tmp_path, capsys, fresh_accelerate_state):
    from kronpeft.runner.data import limit, load_split

    assert train(tmp_path / "run", "--mixed-precision", "bf16") == 0
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    labels = [e.label for e in limit(load_split("rte", "dev", GLUE), 15, 0)]  # the runs of test_cli.train
    want = max(labels.count(0), labels.count(1)) / len(labels)
    assert metrics["majority_baseline"] == {"accuracy": pytest.approx(want)}
    assert "majority-class baseline" in printed and f"(majority-class baseline: {want:.4f})" in printed
    assert metrics["args"]["mixed_precision"] == "bf16"

    assert cli.main(["merge", "--adapter", str(tmp_path / "run" / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["id2label"] == {"0": "entailment", "1": "not_entailment"}
    assert config["label2id"] == {"entailment": 0, "not_entailment": 1}


def test_fp16_on_cpu_is_refused(tmp_path, capsys):
    code = train(tmp_path / "run", "--mixed-precision", "fp16", "--cpu")
    assert_usage_error(capsys, code, "--mixed-precision fp16 needs a CUDA GPU", "bf16")
    assert not (tmp_path / "run").exists()


def test_short_loss_curves_get_markers(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from kronpeft.runner.plots import MARKERS_UP_TO, plot_curves

    markers = []
    real_savefig = Figure.savefig

    def savefig(fig, *args, **kwargs):
        markers.append(fig.axes[0].lines[0].get_marker())
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    for n in (3, MARKERS_UP_TO + 1):
        records = [{"type": "train", "step": s, "loss": 1.0 / (s + 1)} for s in range(n)]
        plot_curves(records + [{"type": "eval", "step": 0, "accuracy": 0.5}], tmp_path / "c.png", "accuracy")
    assert markers == ["o", "None"]
