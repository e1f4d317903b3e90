"""The papers' reported scores (the project's papers.md), keyed by the grids' `family` of the method each paper
row names, and the gap a paper reports for a claim (the forest plot marks it beside ours)."""
from __future__ import annotations

import statistics
from typing import Sequence

# papers.md §1, "Reported results (T5-base, GLUE, all PET methods at about the same budget)": KronA's paper
# gives the GLUE average only ("Adapter" is a bottleneck adapter; "Parallel adapter" has no family here).
KRONA_T5_GLUE_AVERAGE = {"full": 85.65, "bitfit": 84.17, "bottleneck": 85.30, "lora": 85.73, "compacter": 85.82,
                         "parallel-adapter": 85.86, "krona": 86.14, "kronab": 86.28, "kronab-res": 86.57}

# papers.md §2, "Reported results (BERT-base, GLUE dev ...)": AdaKron's paper gives every task (MRPC, QQP F1;
# CoLA Matthews; STS-B Pearson; the rest accuracy). "Pfeiffer (r=48)" is the bottleneck family.
_ADAKRON_TASKS = ("mnli", "qnli", "sst2", "qqp", "mrpc", "cola", "rte", "stsb")
ADAKRON_BERT_DEV = {family: dict(zip(_ADAKRON_TASKS, scores)) for family, scores in {
    "full": (83.2, 90.0, 91.6, 87.4, 90.9, 62.1, 66.4, 89.8),
    "houlsby": (83.1, 90.6, 91.9, 86.8, 89.9, 61.5, 71.8, 88.6),
    "bottleneck": (83.3, 91.1, 92.0, 87.5, 90.7, 60.3, 67.6, 89.6),
    "lora": (82.5, 89.9, 91.5, 86.0, 90.0, 60.5, 71.5, 85.7),
    "bitfit": (81.4, 90.2, 92.1, 84.0, 90.4, 58.8, 72.3, 89.2),
    "adamix": (84.7, 91.5, 92.4, 87.6, 92.4, 62.9, 74.7, 89.9),
    "adakron": (83.5, 91.1, 92.0, 87.1, 90.8, 61.1, 73.8, 89.4),
}.items()}


def reported_gap(better: str, worse: str, tasks: Sequence[str]) -> float | None:
    """A paper's `better` − `worse` (families) in its printed points (score ×100), for a claim row on `tasks`:
    on one task, AdaKron's per-task scores; on several (an average row), KronA's GLUE average where it has
    both families, else the mean of AdaKron's per-task gaps on those tasks. None where no paper has both."""
    if len(tasks) > 1 and better in KRONA_T5_GLUE_AVERAGE and worse in KRONA_T5_GLUE_AVERAGE:
        return round(KRONA_T5_GLUE_AVERAGE[better] - KRONA_T5_GLUE_AVERAGE[worse], 2)
    if better in ADAKRON_BERT_DEV and worse in ADAKRON_BERT_DEV and set(tasks) <= set(_ADAKRON_TASKS):
        return round(statistics.fmean(ADAKRON_BERT_DEV[better][t] - ADAKRON_BERT_DEV[worse][t] for t in tasks), 4)
    return None
