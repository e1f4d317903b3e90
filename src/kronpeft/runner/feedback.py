"""What `kronpeft train`, `eval` and `generate` tell a user while they work: a line while a model loads,
a bar while the dev set is evaluated, and a warning when a run ends where it would have without training."""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def stderr_line(text: str):
    """`text` and its newline on stderr in one write: lines printed side by side by threads (a study's runs)
    never run together, as `print`'s separate newline lets them."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def show_bars() -> bool:
    """Bars for a person at a terminal (main process only), not in logs or captured output."""
    return is_main_process() and sys.stderr.isatty()


def batches(starts: range, desc: str = "evaluating", unit: str = "batch"):
    """`starts` (batch start indices), iterated with a transient progress bar on stderr when `show_bars()`."""
    from tqdm.auto import tqdm

    return tqdm(starts, desc=desc, unit=unit, leave=False, disable=not show_bars(), dynamic_ncols=True)


@contextmanager
def loading(what: str):
    """`kronpeft: loading <what>` on stderr before, and the seconds it took after, when `show_bars()` (in logs
    and captured output a failed command still prints its one error line alone)."""
    shown, started = show_bars(), time.perf_counter()
    if shown:
        print(f"kronpeft: loading {what} ...", file=sys.stderr, flush=True)
    yield
    if shown:
        print(f"kronpeft: loaded {what} in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def learned_nothing_warning(metrics: dict) -> str | None:
    """A warning when the run's final dev score is no better than always answering the majority class
    (STS-B: the mean score), with the usual causes; None when it beat that baseline by a point or more."""
    name = metrics.get("main_metric")
    baseline = (metrics.get("majority_baseline") or {}).get(name)
    final = (metrics.get("final") or {}).get(name)
    if baseline is None or final is None or final >= baseline + 0.01:
        return None
    args = metrics.get("args") or {}
    what = "mean-prediction" if name in ("pearson", "spearmanr", "combined") else "majority-class"
    causes = [f"a learning rate too low or too high for {metrics.get('method')} (this run: {args.get('lr')}; "
              f"try 3x up and down with --lr)",
              f"too few steps ({metrics.get('steps')} steps on {metrics.get('num_train_examples')} examples: "
              f"raise --epochs or --max-train-samples)"]
    if what == "mean-prediction":
        causes.append("a regression head starting far from the labels (try --label-mean-bias)")
    causes.append("a dev set too small to tell (raise --max-eval-samples)")
    return (f"kronpeft: warning: the final dev {name} {final:.4f} is no better than the {what} baseline "
            f"({baseline:.4f}): the model learned nothing measurable. Usual causes: " + "; ".join(causes) + ".")
