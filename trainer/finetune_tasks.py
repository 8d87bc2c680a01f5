"""Every finetuning task class by its config name (``task.name``), and each task's labels.

The tasks of :mod:`vlp.trainer.downstream` (VQA, VizWiz, GQA, SNLI-VE, NLVR2, MM-IMDB) and
those that live in their own modules (:mod:`~vlp.trainer.retrieval`,
:mod:`~vlp.trainer.grounding` for RefCOCO, :mod:`~vlp.trainer.vcr`), which import
``downstream`` for the base class: this module sits above them all, so the task modules
and ``downstream`` form no import cycle. The config and the finetune loop look tasks up here.
"""

from __future__ import annotations

from vlp.trainer.downstream import DOWNSTREAM_TASKS, task_labels as _base_labels
from vlp.trainer.grounding import RefCOCO
from vlp.trainer.retrieval import RETRIEVAL_LABELS, Retrieval
from vlp.trainer.vcr import VCR

TASKS = {**DOWNSTREAM_TASKS, "retrieval": Retrieval, RefCOCO.key: RefCOCO, VCR.key: VCR}


def task_class(name: str):
    if name not in TASKS:
        raise ValueError(f"unknown downstream task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def task_labels(key: str, pairs, *, split=None, answer_vocab=None) -> tuple[list[str], str]:
    """:func:`vlp.trainer.downstream.task_labels`, and the fixed labels of the tasks of their
    own modules (retrieval: matched; refcoco: one logit per region; vcr: the four choices)."""
    if key == "retrieval":
        return list(RETRIEVAL_LABELS), "fixed"
    if key in (RefCOCO.key, VCR.key):
        return list(TASKS[key].fixed_labels), "fixed"
    return _base_labels(key, pairs, split=split, answer_vocab=answer_vocab)
