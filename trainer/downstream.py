"""Downstream (finetuning) tasks: each a data reader, a head, a loss and a metric.

A downstream task is a :class:`~vlp.trainer.tasks.Task` like the pretraining ones, so the
one training loop (:class:`~vlp.trainer.pretrain.Pretrainer`) runs it unchanged: the
dataset adds each pair's target (``label``) through :meth:`DownstreamTask.target`,
:meth:`~DownstreamTask.prepare` reshapes the batch where a task needs it (NLVR2), and
:meth:`~DownstreamTask.loss` scores the head's logits.

=========  ==========  =======================  ====================================  ==================
task       pair kind   labels                   loss                                  metric (main first)
=========  ==========  =======================  ====================================  ==================
vqa        question    answer vocabulary        BCE on soft scores, mean x answers    VQA accuracy
vizwiz     question    answer vocabulary        BCE on soft scores, mean x answers    VQA accuracy
gqa        question    answer vocabulary        BCE (as VQA) or CE on the top answer  accuracy
snli_ve    entailment  entailment/neutral/      CE                                    accuracy
                       contradiction
nlvr2      nlvr2       False / True             CE (pair or triplet setting)          accuracy, consistency
mmimdb     multilabel  genres read from data    BCE (multi-label)                     micro-F1, macro-F1
refcoco    refexp      one logit per region     BCE per region vs IoU >= 0.5, or CE   accuracy (IoU of the
                       (vlp.trainer.grounding)  over regions                          best region >= 0.5)
vcr        vcr         four candidates          CE over the four (+ masked RoI        Q->AR, Q->A, QA->R
                       (vlp.trainer.vcr)        classification)
retrieval  caption     one score per (caption,  BCE / CE over sampled negatives, or   R-mean, IR/TR R@1/5/10
                       image) pair              hinge over mined hardest negatives    (N x M score matrix)
                       (vlp.trainer.retrieval)
=========  ==========  =======================  ====================================  ==================

NLVR2 ``setting: pair`` encodes (text, left) and (text, right) as two rows of one batch
and concatenates the two pooled outputs (head on 2h); ``setting: triplet`` puts both
images' regions in one sequence, each region tagged by a learned image-type embedding
(0 left, 1 right) added to its region embedding (:class:`FinetuneModel`).

Metrics come from :mod:`vlp.trainer.metrics` (imported when scoring).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlp.schemas.pairs import ENTAILMENT_LABELS
from vlp.trainer.data import IGNORE, Collator, to_device
from vlp.trainer.heads import build_head
from vlp.trainer.tasks import REGION_FIELDS, PretrainModel, Task, _pad_regions

NLVR2_LABELS = ("False", "True")
NLVR2_SETTINGS = ("pair", "triplet")
LABELS_FILE = "labels.json"


def _top_answer(pair: dict) -> Optional[str]:
    answers, scores = pair.get("answers") or [], pair.get("answer_scores") or []
    if not answers:
        return None
    best = max(range(len(answers)), key=lambda k: (scores[k] if k < len(scores) else 0.0, -k))
    return answers[best]


class DownstreamTask(Task):
    """Base class. ``labels``: the output classes (answers, genres, ...), in head order."""

    name = ""
    key = ""  # the config's task name
    pair_kind = ""
    main_metric = "accuracy"
    losses: tuple = ("ce",)
    second_image = False

    def __init__(self, labels, *, head: str = "mlp", loss: Optional[str] = None, setting: Optional[str] = None):
        super().__init__(1.0)
        self.labels = list(labels)
        if not self.labels:
            raise ValueError(f"task {self.key}: no labels (empty answer vocabulary or label list)")
        self.index = {label: k for k, label in enumerate(self.labels)}
        self.head_name = head
        self.loss_name = loss or self.losses[0]
        if self.loss_name not in self.losses:
            raise ValueError(f"task {self.key}: loss must be one of {', '.join(self.losses)}, got {loss!r}")
        self.setting = setting

    # -- model side ------------------------------------------------------------------
    def head_input(self, hidden: int) -> int:
        return hidden

    def build_head(self, encoder, ctx):
        return build_head(self.head_name, self.head_input(encoder.hidden_size), len(self.labels))

    def logits(self, out, batch, head) -> torch.Tensor:
        return head(out.pooled)

    def loss(self, out, batch, head, ctx):
        logits = self.logits(out, batch, head).float()
        target = batch["label"]
        if self.loss_name == "bce":
            # UNITER / LXMERT: mean over batch and answers, times the number of answers
            loss = F.binary_cross_entropy_with_logits(logits, target.float()) * logits.shape[1]
            return loss, {}
        ok = target != IGNORE
        if not ok.any():
            return logits.sum() * 0.0, {"task_acc": None}
        loss = F.cross_entropy(logits[ok], target[ok])
        return loss, {"task_acc": (logits[ok].argmax(-1) == target[ok]).float().mean().item(),
                      "task_n": int(ok.sum())}

    # -- data side -------------------------------------------------------------------
    def target(self, pair: dict) -> dict:
        """The example entries of one pair (``label``: the loss's target)."""
        raise NotImplementedError

    def predict(self, logits: torch.Tensor) -> list:
        """One prediction per row (an answer, a label, a bool, a genre list)."""
        return [self.labels[k] for k in logits.argmax(-1).tolist()]

    def predict_batch(self, logits: torch.Tensor, batch: dict) -> list:
        """:meth:`predict` with the batch at hand (refcoco: the region boxes; vcr: the sub-task)."""
        return self.predict(logits)

    def has_gold(self, pair: dict) -> bool:
        return pair.get("label") is not None

    def score(self, pairs: list, predictions: list) -> dict:
        """Metrics of ``predictions`` (row-aligned with ``pairs``) on the pairs with gold labels."""
        raise NotImplementedError

    def prediction_row(self, pair: dict, prediction) -> dict:
        return {"id": pair["pair_id"], "prediction": prediction}

    def to_dict(self) -> dict:
        return {"task": self.key, "labels": self.labels, "head": self.head_name, "loss": self.loss_name,
                "setting": self.setting}


class VQA(DownstreamTask):
    name, key, pair_kind = "VQA", "vqa", "question"
    losses = ("bce",)

    def target(self, pair):
        target = torch.zeros(len(self.labels))
        for answer, score in zip(pair.get("answers") or [], pair.get("answer_scores") or []):
            k = self.index.get(answer)
            if k is not None:
                target[k] = float(score)
        return {"label": target}

    def has_gold(self, pair):
        return bool(pair.get("human_answers") or pair.get("answers"))

    def score(self, pairs, predictions):
        from vlp.trainer.metrics import vqa_scores

        rows = [p for p in pairs if self.has_gold(p)]
        if not rows:
            return {"n": 0}
        predicted = {str(p["question_id"]): a for p, a in zip(pairs, predictions) if self.has_gold(p)}
        result = vqa_scores(predicted, rows)
        out = {"accuracy": float(result["accuracy"]), "n": int(result["n"])}
        for answer_type, value in sorted((result.get("per_answer_type") or {}).items()):
            out[f"accuracy[{answer_type}]"] = float(value)
        return out

    def prediction_row(self, pair, prediction):
        return {"id": pair["question_id"], "prediction": prediction, "image": pair["image_id"]}


class VizWiz(VQA):
    name, key = "VIZWIZ", "vizwiz"


class GQA(VQA):
    name, key = "GQA", "gqa"
    losses = ("bce", "ce")

    def target(self, pair):
        if self.loss_name == "bce":
            return super().target(pair)
        top = _top_answer(pair)
        return {"label": torch.tensor(self.index.get(top, IGNORE) if top is not None else IGNORE)}

    def has_gold(self, pair):
        return _top_answer(pair) is not None

    def score(self, pairs, predictions):
        from vlp.trainer.metrics import exact_match_accuracy

        gold = {str(p["question_id"]): _top_answer(p) for p in pairs if self.has_gold(p)}
        if not gold:
            return {"n": 0}
        predicted = {str(p["question_id"]): a for p, a in zip(pairs, predictions) if self.has_gold(p)}
        result = exact_match_accuracy(predicted, gold)
        return {"accuracy": float(result["accuracy"]), "n": int(result["n"])}

    def prediction_row(self, pair, prediction):
        return {"id": pair["question_id"], "prediction": prediction}


class SNLIVE(DownstreamTask):
    name, key, pair_kind = "SNLI_VE", "snli_ve", "entailment"

    def target(self, pair):
        return {"label": torch.tensor(self.index.get(pair.get("label"), IGNORE))}

    def score(self, pairs, predictions):
        from vlp.trainer.metrics import exact_match_accuracy

        gold = {p["pair_id"]: p["label"] for p in pairs if self.has_gold(p)}
        if not gold:
            return {"n": 0}
        result = exact_match_accuracy({p["pair_id"]: a for p, a in zip(pairs, predictions) if p["pair_id"] in gold},
                                      gold)
        return {"accuracy": float(result["accuracy"]), "n": int(result["n"])}


def nlvr2_identifier(pair: dict) -> str:
    pair_id = pair["pair_id"]
    return pair_id[len("nlvr2/"):] if pair_id.startswith("nlvr2/") else pair_id


class NLVR2(DownstreamTask):
    name, key, pair_kind = "NLVR2", "nlvr2", "nlvr2"
    second_image = True

    def __init__(self, labels=NLVR2_LABELS, **kwargs):
        kwargs.setdefault("setting", "pair")
        super().__init__(labels, **kwargs)
        if self.setting not in NLVR2_SETTINGS:
            raise ValueError(f"task nlvr2: setting must be pair or triplet, got {self.setting!r}")

    def head_input(self, hidden):
        return 2 * hidden if self.setting == "pair" else hidden

    def target(self, pair):
        label = pair.get("label")
        return {"label": torch.tensor(IGNORE if label is None else int(bool(label)))}

    def prepare(self, batch, generator, ctx):
        """pair: rows 0..B-1 show the left image, rows B..2B-1 the right one; triplet: one
        row with both images' regions and ``region_image`` (0 left, 1 right)."""
        right = batch.pop("image_2")
        left = {k: batch[k] for k in REGION_FIELDS + ("image_feature",) if k in batch}
        n = max(left["region_features"].shape[1], right["region_features"].shape[1])
        fields = [k for k in left if k in right]
        if self.setting == "pair":
            for key in ("input_ids", "text_mask", "token_regions"):
                batch[key] = torch.cat([batch[key], batch[key]], 0)
            for key in fields:
                a, b = left[key], right[key]
                if key != "image_feature":
                    a, b = _pad_regions(a, n, key), _pad_regions(b, n, key)
                batch[key] = torch.cat([a, b], 0)
            batch["nlvr2_rows"] = batch["input_ids"].shape[0] // 2
        else:
            n_left = left["region_features"].shape[1]
            for key in fields:
                if key != "image_feature":
                    batch[key] = torch.cat([left[key], right[key]], 1)
            batch.pop("image_feature", None)  # one whole-image token for two images would be wrong
            types = torch.zeros(batch["region_mask"].shape, dtype=torch.long, device=batch["region_mask"].device)
            types[:, n_left:] = 1
            batch["region_image"] = types
        for key in [k for k in REGION_FIELDS if k in batch and k not in fields]:
            batch.pop(key)  # only on one side: cannot be stacked

    def logits(self, out, batch, head):
        if self.setting == "pair":
            rows = batch["nlvr2_rows"]
            return head(torch.cat([out.pooled[:rows], out.pooled[rows:]], -1))
        return head(out.pooled)

    def predict(self, logits):
        return [bool(k) for k in logits.argmax(-1).tolist()]

    def score(self, pairs, predictions):
        from vlp.trainer.metrics import nlvr2_scores

        gold = {nlvr2_identifier(p): bool(p["label"]) for p in pairs if self.has_gold(p)}
        if not gold:
            return {"n": 0}
        predicted = {nlvr2_identifier(p): bool(a) for p, a in zip(pairs, predictions) if self.has_gold(p)}
        result = nlvr2_scores(predicted, gold)
        out = {"accuracy": float(result["accuracy"]), "n": int(result["n"])}
        if result.get("consistency") is not None:
            out["consistency"] = float(result["consistency"])
        return out

    def prediction_row(self, pair, prediction):
        return {"id": nlvr2_identifier(pair), "prediction": bool(prediction)}


class MMIMDB(DownstreamTask):
    name, key, pair_kind = "MMIMDB", "mmimdb", "multilabel"
    main_metric = "micro_f1"
    losses = ("bce",)

    def target(self, pair):
        target = torch.zeros(len(self.labels))
        for label in pair.get("labels") or []:
            if label in self.index:
                target[self.index[label]] = 1.0
        return {"label": target}

    def loss(self, out, batch, head, ctx):
        logits = self.logits(out, batch, head).float()
        return F.binary_cross_entropy_with_logits(logits, batch["label"].float()), {}

    def predict(self, logits):
        chosen = torch.sigmoid(logits.float()) > 0.5
        return [[self.labels[k] for k in torch.nonzero(row).flatten().tolist()] for row in chosen]

    def has_gold(self, pair):
        return pair.get("labels") is not None

    def score(self, pairs, predictions):
        from vlp.trainer.metrics import multilabel_f1

        kept = [(p, a) for p, a in zip(pairs, predictions) if self.has_gold(p)]
        if not kept:
            return {"n": 0}
        result = multilabel_f1([list(p["labels"]) for p, _ in kept], [list(a) for _, a in kept], self.labels)
        return {"micro_f1": float(result["micro_f1"]), "macro_f1": float(result["macro_f1"]), "n": int(result["n"])}


DOWNSTREAM_TASKS = {cls.key: cls for cls in (VQA, VizWiz, GQA, SNLIVE, NLVR2, MMIMDB)}


def task_class(name: str):
    """The tasks of this module; every task (retrieval, refcoco, vcr too): vlp.trainer.finetune_tasks."""
    if name not in DOWNSTREAM_TASKS:
        raise ValueError(f"unknown downstream task {name!r}; known: {', '.join(DOWNSTREAM_TASKS)}")
    return DOWNSTREAM_TASKS[name]


# -- label sets ------------------------------------------------------------------------

def read_answer_vocab(path) -> list[str]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read the answer vocabulary ({error})") from None
    if isinstance(data, dict):  # {"answers": [...]} or {answer: index}
        data = data.get("answers", data)
        if isinstance(data, dict):
            data = [a for a, _ in sorted(data.items(), key=lambda item: item[1])]
    if not isinstance(data, list) or not all(isinstance(a, str) for a in data) or not data:
        raise ValueError(f"{path}: expected a non-empty json list of answers")
    return list(dict.fromkeys(data))


def _train_rows(pairs, split) -> list[dict]:
    names = set(split) if split else None
    return [row for row in pairs if names is None or row.get("split") in names]


def task_labels(key: str, pairs, *, split=None, answer_vocab=None) -> tuple[list[str], str]:
    """The label list of a task and where it came from.

    vqa / vizwiz / gqa: ``answer_vocab`` (a json list), else the pair store's
    ``answer_vocab.json``, else every answer of the ``split`` pairs, most frequent
    first (ties alphabetical). snli_ve / nlvr2: fixed. mmimdb: the genres of the
    ``split`` pairs, most frequent first (ties alphabetical).
    """
    if key == "snli_ve":
        return list(ENTAILMENT_LABELS), "fixed"
    if key == "nlvr2":
        return list(NLVR2_LABELS), "fixed"
    if key in ("vqa", "vizwiz", "gqa"):
        if answer_vocab:
            return read_answer_vocab(answer_vocab), str(answer_vocab)
        shipped = Path(getattr(pairs, "root", "")) / "answer_vocab.json"
        if shipped.is_file():
            return read_answer_vocab(shipped), str(shipped)
        counts = collections.Counter(a for row in _train_rows(pairs, split) for a in (row.get("answers") or []))
        what = "answers"
    elif key == "mmimdb":
        counts = collections.Counter(g for row in _train_rows(pairs, split) for g in (row.get("labels") or []))
        what = "genres"
    else:
        raise ValueError(f"unknown downstream task {key!r}")
    labels = [a for a, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    return labels, f"the {what} of the {'/'.join(split) if split else 'all'} pairs"


# -- the model -------------------------------------------------------------------------

class FinetuneModel(PretrainModel):
    """An encoder with one downstream task's head (a PretrainModel, so the training loop
    and its checkpoints are the pretraining ones). ``image_type``: the image-type
    embedding of NLVR2's triplet setting, added to the region embeddings of the batch's
    ``region_image`` (a forward hook on the encoder's box projection, whose output is
    added to the region features' projection)."""

    def __init__(self, encoder, task: DownstreamTask, ctx):
        super().__init__(encoder, [task], ctx)
        self.task = task
        self._region_image = None
        if task.key == "nlvr2" and task.setting == "triplet":
            if not hasattr(encoder, "box_proj"):
                raise ValueError("the nlvr2 triplet setting needs the single-stream encoder")
            self.image_type = nn.Embedding(2, encoder.hidden_size)
            self.image_type.apply(encoder._init_weights)
            encoder.box_proj.register_forward_hook(self._add_image_type)

    def _add_image_type(self, module, inputs, output):
        types = self._region_image
        if types is None or output.dim() != 3 or tuple(output.shape[:2]) != tuple(types.shape):
            return None
        return output + self.image_type(types).to(output.dtype)

    def encode(self, batch):
        self._region_image = batch.get("region_image")
        try:
            return super().encode(batch)
        finally:
            self._region_image = None

    def freeze_base(self) -> int:
        """Freeze the encoder (embeddings included) and the image-type embedding; returns
        how many parameters stay trainable (the head's)."""
        for name, param in self.named_parameters():
            if not name.startswith("heads."):
                param.requires_grad_(False)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def head_logits(self, batch: dict) -> torch.Tensor:
        batch = dict(batch)
        self.task.prepare(batch, None, self.ctx)
        return self.task.logits(self.encode(batch), batch, self.head(self.task.name))


@torch.no_grad()
def predict(model: FinetuneModel, dataset, *, batch_size: int = 64, max_items: Optional[int] = None) -> list:
    """The model's prediction for every example of ``dataset`` (in dataset order), in eval
    mode without touching any random generator; the model's mode is restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = Collator(model.ctx.pad_id)
    total = len(dataset) if max_items is None else min(len(dataset), max_items)
    out: list = []
    try:
        for start in range(0, total, batch_size):
            batch = collate([dataset.example(i) for i in range(start, min(total, start + batch_size))])
            batch = to_device(batch, device)
            out.extend(model.task.predict_batch(model.head_logits(batch), batch))
    finally:
        model.train(was_training)
    return out


def dataset_pairs(dataset, count: Optional[int] = None) -> list[dict]:
    """The pair rows of ``dataset``'s examples (in dataset order)."""
    indices = dataset.indices if count is None else dataset.indices[:count]
    return [dataset.pairs[int(i)] for i in indices]


def evaluate_task(model: FinetuneModel, dataset, *, batch_size: int = 64, max_items: Optional[int] = None):
    """``(metrics, pairs, predictions)`` of the model on ``dataset``; a task with its own
    ``evaluate`` (retrieval: an N x M score matrix, not one prediction per example) runs it."""
    if hasattr(model.task, "evaluate"):
        return model.task.evaluate(model, dataset, batch_size=batch_size, max_items=max_items)
    predictions = predict(model, dataset, batch_size=batch_size, max_items=max_items)
    pairs = dataset_pairs(dataset, len(predictions))
    return model.task.score(pairs, predictions), pairs, predictions
