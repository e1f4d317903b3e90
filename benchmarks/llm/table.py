"""The SmolLM2 tables of docs/llm.md, from the rows `kronpeft study benchmarks/llm/*.toml` recorded.

    python benchmarks/llm/table.py [benchmarks/llm/results.jsonl]

One Markdown table per task: dev accuracy before and after training, trainable parameters, learning
rate, training seconds (the optimizer steps alone) and the run's wall seconds (model load and dev
evaluations included), the process's peak resident memory (evaluation included), the first and last
logged training loss (each the mean over `--log-every` steps), and the 1-minute load average when the
run ended. The base model's accuracy ("before") is evaluated once per task (by the krona run) and once
per method whose step 0 is not the identity (AdaKron's paper init); a run that skipped that evaluation
shows the measured one in parentheses (see `before_accuracy`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = {"sst2": "SST-2", "bbc-news": "BBC News"}


def first_losses(row: dict) -> tuple[float | None, float | None]:
    """(first, last) logged training loss of a run, from its log.jsonl (None when the run folder is gone)."""
    log = Path(row["flags"]["output_dir"]) / "log.jsonl"
    if not log.is_file():
        return None, None
    losses = [r["loss"] for r in map(json.loads, log.read_text().splitlines()) if r.get("type") == "train"]
    return (losses[0], losses[-1]) if losses else (None, None)


def before_accuracy(row: dict, rows: list[dict]) -> str:
    """A run's dev accuracy before training: its own, else (in parentheses) that of a run of the same
    method that measured it (the same init), else the base model's (the krona run's)."""
    if row.get("before_training"):
        return f"{row['before_training']['accuracy']:.3f}"
    for name in (row["name"], "krona"):
        measured = [r for r in rows if r["name"] == name and r.get("before_training")]
        if measured:
            return f"({measured[0]['before_training']['accuracy']:.3f})"
    return "-"


def task_table(rows: list[dict]) -> list[str]:
    """Rows grouped by method (in order of first appearance), each group in recorded order."""
    names = list(dict.fromkeys(r["name"] for r in rows))
    rows = sorted(rows, key=lambda r: names.index(r["name"]))
    lines = ["| method | grid | lr | trainable params | dev acc. before | dev acc. after | train s | wall s "
             "| peak RSS MB | first → last logged loss | load avg |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        before = before_accuracy(r, rows)
        first, last = first_losses(r)
        loss = f"{first:.2f} → {last:.2f}" if first is not None else "-"
        lines.append(f"| {r['name']} | {r['grid']} | {r['lr']:g} | {r['trainable_params']:,} | {before} "
                     f"| {r['final']['accuracy']:.3f} | {r['train_seconds']:.0f} | {r['wall_seconds']:.0f} "
                     f"| {r['peak_memory_mb']:,.0f} | {loss} "
                     f"| {r['load_average'][0]:.1f} |")
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else HERE / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = []
    for task, title in TASKS.items():
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        flags = mine[0]["flags"]
        out += [f"**{title}** ({flags['max_train_samples']} training examples, 1 epoch of batch "
                f"{flags['batch_size']}, max length {flags['max_length']}, {flags['max_eval_samples']} dev "
                f"examples; seed {mine[0]['seed']}; {mine[0]['cpu']}, 1 thread)", "", *task_table(mine), ""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
