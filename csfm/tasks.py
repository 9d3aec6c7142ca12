"""The kinds of prediction task, named once for heads, losses, metrics, probes and fine-tuning.

binary: one 0/1 label per record; multiclass: one of K classes; multilabel: L 0/1 labels;
regression: a real value; survival: (time, event). Each command takes the subset it supports.
"""
from __future__ import annotations

TASKS = ("binary", "multiclass", "multilabel", "regression", "survival")
PROBE_TASKS = tuple(t for t in TASKS if t != "survival")  # linear probes (logistic / ridge)
ONE_LABEL_TASKS = tuple(t for t in PROBE_TASKS if t != "multilabel")  # one label column per record: the CLIs
