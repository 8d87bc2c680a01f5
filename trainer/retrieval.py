"""Image-text retrieval: finetuning a cross-encoder and scoring N x M (text, image) pairs.

The task (``task: {name: retrieval}``) trains on caption pairs (``vlp-build import-coco
--karpathy`` / ``import-flickr30k``): a one-output head on the pooled [CLS] scores a
(caption, image) pair, and each positive pair of a batch meets negatives made by
:meth:`Retrieval.prepare`, which rewrites the batch into groups ``[positive, negative 1,
...]`` (group-major rows), so the one training loop encodes them all in one pass:

=======  =========================================================================  ==============
loss     negatives of each positive                                                 defaults
=======  =========================================================================  ==============
bce      ``negatives`` sampled ones (ImageBERT's best): another image for the       negatives 1
         caption or another caption for the image, alternating; BCE on all rows
ce       ``negatives`` = P-1 sampled ones as for bce (VOLTA: the first image        negatives 3
         negative is the hard one when a hard-negatives store gives one); CE over
         the group of P
hinge    UNITER's hard negatives: a pool of ``candidates`` images and captions      candidates 399,
         (the batch's own, then random training pairs) is scored without gradient   negatives 31,
         and in eval mode; the ``negatives`` hardest images of each caption and     margin 0.2
         the hardest captions of each image are kept; mean of
         max(0, margin - s(pos) + s(neg)) over both sides
=======  =========================================================================  ==============

A negative is never a caption or image of the same image id. ``hard_negatives`` (a
``hard_negatives`` pair store, ``vlp-build hard-negatives``) adds each image's hard
negative images to the candidates (the first image negative for bce/ce, the pool for hinge).

Evaluation (:func:`evaluate_retrieval`): every caption of the split against every distinct
image of the split, scored by the cross-encoder (:func:`score_matrix`: batched, on the
model's device, split over Ray workers with ``num_workers`` > 1, progress with ETA), then
:func:`vlp.trainer.metrics.retrieval_metrics` (and the COCO 1K folds when the split holds a
multiple of 1,000 images, at least 2,000). ``shortlist`` K is a first stage: a cheap
similarity (:func:`first_stage_similarity`) picks the top K images of each caption and the
top K captions of each image, only those pairs are cross-scored, and every other pair ranks
below them in first-stage order. The result is an approximation: a true match outside both
shortlists can never reach R@K <= K. With K >= the number of images (and captions) it is exact.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from vlp.trainer.data import collate, to_device
from vlp.trainer.downstream import DownstreamTask
from vlp.trainer.tasks import _pad_regions, link_to_shown_regions

log = logging.getLogger(__name__)

RETRIEVAL_LABELS = ("matched",)
IMAGE_FIELDS = ("region_features", "region_boxes", "region_mask")
TEXT_FIELDS = ("input_ids", "text_mask", "token_regions")
DEFAULTS = {"bce": {"negatives": 1, "candidates": 0}, "ce": {"negatives": 3, "candidates": 0},
            "hinge": {"negatives": 31, "candidates": 399}}
PREDICTION_TOP = 10
_BELOW = 1.0e9  # how far below every cross-encoder score a pair outside the shortlist ranks


# -- pair batches -----------------------------------------------------------------------

def _pad_text(tensor: torch.Tensor, length: int, value) -> torch.Tensor:
    if tensor.shape[1] >= length:
        return tensor
    pad = torch.full((tensor.shape[0], length - tensor.shape[1]), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, pad], 1)


def cat_texts(parts: list[dict], pad_id: int) -> dict:
    """One text side ([n, L] input_ids / text_mask / token_regions) from several."""
    length = max(p["input_ids"].shape[1] for p in parts)
    values = {"input_ids": pad_id, "text_mask": False, "token_regions": -1}
    return {k: torch.cat([_pad_text(p[k], length, v) for p in parts], 0) for k, v in values.items()}


def cat_images(parts: list[dict]) -> dict:
    """One image side ([n, R, ...] region tensors, [n, D] image_feature) from several."""
    n = max(p["region_features"].shape[1] for p in parts)
    out = {k: torch.cat([_pad_regions(p[k], n, k) for p in parts], 0) for k in IMAGE_FIELDS}
    if all("image_feature" in p for p in parts):
        out["image_feature"] = torch.cat([p["image_feature"] for p in parts], 0)
    return out


def pair_batch(texts: dict, images: dict, rows, cols) -> dict:
    """The encoder inputs of the pairs (text ``rows[k]``, image ``cols[k]``), padding trimmed
    to the longest text and image of them; label tokens take the geometry of the shown
    image's regions (as in ITM)."""
    rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
    t = int(texts["text_mask"][rows].sum(1).max())
    r = max(1, int(images["region_mask"][cols].sum(1).max()))
    out = {"input_ids": texts["input_ids"][rows, :t], "text_mask": texts["text_mask"][rows, :t]}
    for key in IMAGE_FIELDS:
        out[key] = images[key][cols, :r]
    out["token_regions"] = link_to_shown_regions(texts["token_regions"][rows, :t], out["region_mask"])
    if "image_feature" in images:
        out["image_feature"] = images["image_feature"][cols]
    return out


def head_score(model, pooled: torch.Tensor) -> torch.Tensor:
    """The finetuned retrieval head's score (its one output)."""
    return model.head(model.task.name)(pooled).float()[:, 0]


def itm_score(model, pooled: torch.Tensor) -> torch.Tensor:
    """Zero-shot: a pretraining ITM head's log-odds of "matched" (logit 1 - logit 0)."""
    from vlp.trainer.evaluation import itm_head

    logits = itm_head(model)(pooled).float()
    return logits[:, 1] - logits[:, 0]


@torch.no_grad()
def pair_scores(model, texts: dict, images: dict, rows, cols, *, batch_size: int = 256,
                score: Callable = head_score, progress=None) -> torch.Tensor:
    """Scores of the pairs (``rows[k]``, ``cols[k]``) in eval mode, ``batch_size`` at a time,
    on the model's device (float32 on the CPU). The model's mode is restored."""
    rows, cols = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
    device = next(model.parameters()).device
    texts, images = to_device(texts, device), to_device(images, device)
    out = torch.empty(len(rows))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            r, c = rows[start:start + batch_size].to(device), cols[start:start + batch_size].to(device)
            out[start:start + len(r)] = score(model, model.encode(pair_batch(texts, images, r, c)).pooled).cpu()
            if progress is not None:
                progress.update(len(r))
    finally:
        model.train(was_training)
    return out


# -- the task ---------------------------------------------------------------------------

class Retrieval(DownstreamTask):
    """Image-text retrieval finetuning (see the module docstring)."""

    name, key, pair_kind = "RETRIEVAL", "retrieval", "caption"
    main_metric = "r_mean"
    losses = ("bce", "ce", "hinge")

    def __init__(self, labels=RETRIEVAL_LABELS, *, negatives: Optional[int] = None,
                 candidates: Optional[int] = None, margin: float = 0.2, shortlist: Optional[int] = None, **kwargs):
        super().__init__(labels, **kwargs)
        if list(self.labels) != list(RETRIEVAL_LABELS):
            raise ValueError(f"task retrieval: labels must be {list(RETRIEVAL_LABELS)}")
        defaults = DEFAULTS[self.loss_name]
        self.negatives = int(defaults["negatives"] if negatives is None else negatives)
        self.candidates = int(defaults["candidates"] if candidates is None else candidates)
        self.margin = float(margin)
        if self.negatives < 1:
            raise ValueError(f"task retrieval: negatives must be at least 1, got {self.negatives}")
        self.shortlist = shortlist
        self.num_workers = 1  # evaluation: Ray workers scoring the N x M pairs
        self.progress = "off"
        self._model = None
        self._bank = None

    def bind(self, model, bank=None) -> None:
        """``model``: scores the hinge loss's candidate pool; ``bank``: the training dataset
        the extra candidates are drawn from."""
        self._model, self._bank = model, bank

    def target(self, pair):
        return {}

    def has_gold(self, pair):
        return True

    # -- negatives --------------------------------------------------------------------
    def _extra(self, count: int, generator, device, pad_id: int) -> Optional[dict]:
        if count <= 0 or self._bank is None or len(self._bank) == 0:
            return None
        picks = torch.randint(len(self._bank), (count,), generator=generator).tolist()
        examples = [self._bank.example(i) for i in picks]
        return to_device(collate(examples, pad_id), device)

    def prepare(self, batch, generator, ctx):
        size = batch["input_ids"].shape[0]
        device = batch["input_ids"].device
        text_parts = [{k: batch[k] for k in TEXT_FIELDS}]
        image_parts = [{k: batch[k] for k in IMAGE_FIELDS + ("image_feature",) if k in batch}]
        text_ids, image_ids = list(batch["image_id"]), list(batch["image_id"])
        hard_cols: dict[int, int] = {}  # batch row -> pool column of its hard negative image
        negative = batch.get("negative")
        if negative is not None:
            valid = negative.get("negative_valid")
            rows = [i for i in range(size) if valid is None or bool(valid[i])]
            if rows:
                part = {k: negative[k][rows] for k in IMAGE_FIELDS + ("image_feature",) if k in negative}
                for j, i in enumerate(rows):
                    hard_cols[i] = len(image_ids) + j
                image_parts.append(part)
                image_ids += [negative["image_id"][i] for i in rows]
        extra = self._extra(self.candidates - size, generator, device, ctx.pad_id)
        if extra is not None:
            text_parts.append({k: extra[k] for k in TEXT_FIELDS})
            image_parts.append({k: extra[k] for k in IMAGE_FIELDS + ("image_feature",) if k in extra})
            text_ids += list(extra["image_id"])
            image_ids += list(extra["image_id"])
        texts, images = cat_texts(text_parts, ctx.pad_id), cat_images(image_parts)
        own = list(batch["image_id"])
        image_ok = torch.tensor([[a != b for b in image_ids] for a in own], dtype=torch.bool)  # [B, Pi]
        text_ok = torch.tensor([[a != b for b in text_ids] for a in own], dtype=torch.bool)  # [B, Pt]
        if self.loss_name == "hinge":
            rows, cols, valid = self._hardest(texts, images, image_ok, text_ok, size)
        else:
            rows, cols, valid = self._sampled(image_ok, text_ok, hard_cols, size, generator)
        pairs = pair_batch(texts, images, rows.to(device), cols.to(device))
        for key in [k for k in ("image_feature",) if k in batch and k not in pairs]:
            batch.pop(key)
        batch.update(pairs)
        batch["retrieval_groups"] = int(len(rows) // size)
        batch["retrieval_valid"] = valid.to(device)

    def _sampled(self, image_ok, text_ok, hard_cols, size, generator):
        groups = 1 + self.negatives
        rows = torch.arange(size).repeat(groups)  # group-major: group g holds rows g*B .. g*B+B-1
        cols = torch.arange(size).repeat(groups)
        valid = torch.ones(size, groups, dtype=torch.bool)
        for g in range(1, groups):
            for i in range(size):
                k = g * size + i
                image_side = (i + g) % 2 == 1 or not text_ok[i].any()
                if g == 1 and i in hard_cols:
                    cols[k] = hard_cols[i]
                elif image_side and image_ok[i].any():
                    choices = torch.nonzero(image_ok[i]).flatten()
                    cols[k] = choices[int(torch.randint(len(choices), (1,), generator=generator))]
                elif text_ok[i].any():
                    choices = torch.nonzero(text_ok[i]).flatten()
                    rows[k] = choices[int(torch.randint(len(choices), (1,), generator=generator))]
                else:
                    valid[i, g] = False  # nothing to contrast with (a batch of one image)
        return rows, cols, valid

    def _hardest(self, texts, images, image_ok, text_ok, size):
        if self._model is None:
            raise RuntimeError("the hinge loss mines with the model: call Retrieval.bind(model) first")
        n = self.negatives
        # every caption of the batch against every pool image, every image against every pool caption
        pool_i, pool_t = images["region_mask"].shape[0], texts["input_ids"].shape[0]
        r1, c1 = torch.arange(size).repeat_interleave(pool_i), torch.arange(pool_i).repeat(size)
        r2, c2 = torch.arange(pool_t).repeat(size), torch.arange(size).repeat_interleave(pool_t)
        scores = pair_scores(self._model, texts, images, torch.cat([r1, r2]), torch.cat([c1, c2]),
                             batch_size=max(64, 4 * size))
        image_scores = scores[:len(r1)].view(size, pool_i).masked_fill(~image_ok, -float("inf"))
        text_scores = scores[len(r1):].view(size, pool_t).masked_fill(~text_ok, -float("inf"))
        k_i, k_t = min(n, pool_i), min(n, pool_t)
        hard_i = image_scores.topk(k_i, 1)
        hard_t = text_scores.topk(k_t, 1)
        groups = 1 + k_i + k_t
        rows = torch.arange(size).repeat(groups)
        cols = torch.arange(size).repeat(groups)
        valid = torch.ones(size, groups, dtype=torch.bool)
        for g in range(k_i):
            cols[(1 + g) * size:(2 + g) * size] = hard_i.indices[:, g]
            valid[:, 1 + g] = torch.isfinite(hard_i.values[:, g])
        for g in range(k_t):
            rows[(1 + k_i + g) * size:(2 + k_i + g) * size] = hard_t.indices[:, g]
            valid[:, 1 + k_i + g] = torch.isfinite(hard_t.values[:, g])
        return rows, cols, valid

    # -- loss ---------------------------------------------------------------------------
    def loss(self, out, batch, head, ctx):
        groups = batch["retrieval_groups"]
        valid = batch["retrieval_valid"]
        scores = head(out.pooled).float()[:, 0].view(groups, -1).t()  # [B, G], column 0 positive
        negatives = valid[:, 1:]
        if self.loss_name == "bce":
            target = torch.zeros_like(scores)
            target[:, 0] = 1.0
            loss = F.binary_cross_entropy_with_logits(scores[valid], target[valid])
        elif self.loss_name == "ce":
            masked = scores.masked_fill(~valid, -float("inf"))
            loss = F.cross_entropy(masked, torch.zeros(len(scores), dtype=torch.long, device=scores.device))
        else:
            hinge = (self.margin - scores[:, :1] + scores[:, 1:]).clamp(min=0)
            loss = hinge[negatives].mean() if negatives.any() else scores.sum() * 0.0
        scored = negatives.any(1)
        if not scored.any():
            return loss, {"retrieval_acc": None}
        best_negative = scores[:, 1:].masked_fill(~negatives, -float("inf")).max(1).values
        right = (scores[:, 0] > best_negative)[scored]
        return loss, {"retrieval_acc": right.float().mean().item(), "retrieval_n": int(scored.sum())}

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, model, dataset, *, batch_size: int = 64, max_items: Optional[int] = None):
        return evaluate_retrieval(model, dataset, batch_size=batch_size, max_images=max_items,
                                  shortlist=self.shortlist, num_workers=self.num_workers, progress=self.progress)

    def prediction_row(self, pair, prediction):
        return {"id": pair["pair_id"], "image_id": pair["image_id"], "prediction": prediction}

    def write_predictions(self, rows: list[dict], path) -> Path:
        """JSON lines ``{"pair_id", "image_id" (its own), "ranked_images": the top 10}``."""
        from vlp.core.durable import atomic_write_text

        lines = [json.dumps({"pair_id": str(r["id"]), "image_id": str(r["image_id"]),
                             "ranked_images": [str(i) for i in r["prediction"]]}) + "\n" for r in rows]
        return atomic_write_text(Path(path), "".join(lines))

    def to_dict(self):
        return {**super().to_dict(), "negatives": self.negatives, "candidates": self.candidates,
                "margin": self.margin}


# -- evaluation ---------------------------------------------------------------------------

def retrieval_sides(dataset, *, max_images: Optional[int] = None, pad_id: int = 0):
    """``(texts, images, text_image, image_ids, text_rows)`` of a dataset's split: every
    caption (its dataset index in ``text_rows``), every distinct image (first-seen order,
    the first ``max_images`` of them and their captions when given), ``text_image[t]`` the
    column of text t's image."""
    column = dataset.pairs.column("image_id")
    image_of = [column[int(i)] for i in dataset.indices]
    image_index: dict = {}
    for image_id in image_of:
        if image_id not in image_index and (max_images is None or len(image_index) < max_images):
            image_index[image_id] = len(image_index)
    text_rows = [i for i, image_id in enumerate(image_of) if image_id in image_index]
    first: dict = {}
    text_examples, image_examples = [], []
    for i in text_rows:
        example = dataset.example(i)
        if image_of[i] not in first:
            first[image_of[i]] = True
            image_examples.append(example)
        text_examples.append({k: example[k] for k in ("index", "pair_id", "image_id", "text", "input_ids",
                                                      "token_regions")}
                             | {k: example[k][:0] for k in ("region_features", "region_boxes")})
    order = {image_id: k for k, image_id in enumerate(e["image_id"] for e in image_examples)}
    images = {k: v for k, v in collate(image_examples, pad_id).items() if k in IMAGE_FIELDS + ("image_feature",)}
    texts = {k: v for k, v in collate(text_examples, pad_id).items() if k in TEXT_FIELDS}
    text_image = np.asarray([order[image_of[i]] for i in text_rows], dtype=np.int64)
    return texts, images, text_image, list(order), text_rows


def first_stage_similarity(model, texts: dict, images: dict, image_labels: Optional[list] = None) -> torch.Tensor:
    """Cosine similarity [texts, images] of cheap vectors, for ``--shortlist``: a text is the
    mean of its tokens' word embeddings; an image is the mean word embedding of its
    detector labels (``image_labels``: token id lists) when given, else the mean of its
    regions' features projected by the encoder's region projection (single-stream only)."""
    embed = model.encoder.word_embeddings
    with torch.no_grad():
        device = embed.weight.device
        ids = texts["input_ids"].to(device)
        special = torch.zeros_like(ids, dtype=torch.bool)
        for token in model.ctx.special_ids:
            special |= ids == token
        keep = (texts["text_mask"].to(device) & ~special).float()
        text_vec = (embed(ids) * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
        if image_labels is not None:
            image_vec = torch.stack([embed(torch.tensor(t or [model.ctx.pad_id], device=device)).mean(0)
                                     for t in image_labels])
        elif hasattr(model.encoder, "feature_proj"):
            mask = images["region_mask"].to(device).float()
            feats = model.encoder.feature_proj(images["region_features"].to(device))
            image_vec = (feats * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        else:
            raise ValueError("--shortlist needs detector labels in the feature store (objects_id) for this "
                             "encoder")
        return F.normalize(text_vec.float(), dim=-1).cpu() @ F.normalize(image_vec.float(), dim=-1).cpu().t()


def image_label_tokens(dataset, image_ids, tokenizer) -> Optional[list]:
    """Token ids of each image's detector label words (None when the store has no labels)."""
    from vlp.schemas.labels import region_label_words

    out = []
    for image_id in image_ids:
        record = dataset.features.get(image_id)
        if record.objects_id is None:
            return None
        words, _, _ = region_label_words(record)
        limit = dataset.max_regions
        out.append(tokenizer(" ".join(words[:3 * limit] if limit else words), add_special_tokens=False)["input_ids"]
                   if words else [])
    return out


def shortlist_pairs(similarity: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs (rows, cols) in the top ``k`` images of some text or the top ``k`` texts of
    some image, in row-major order."""
    n_texts, n_images = similarity.shape
    chosen = torch.zeros(n_texts, n_images, dtype=torch.bool)
    top_images = similarity.topk(min(k, n_images), 1).indices
    chosen.scatter_(1, top_images, True)
    top_texts = similarity.topk(min(k, n_texts), 0).indices
    chosen.scatter_(0, top_texts, True)
    rows, cols = torch.nonzero(chosen, as_tuple=True)
    return rows, cols


def score_matrix(model, texts: dict, images: dict, *, batch_size: int = 256, score: Callable = head_score,
                 shortlist: Optional[int] = None, similarity: Optional[torch.Tensor] = None, num_workers: int = 1,
                 progress: str = "off", device: Optional[str] = None) -> tuple[np.ndarray, dict]:
    """``scores[text, image]`` (float64) and ``info`` (pairs scored, seconds, pairs/s).

    ``shortlist`` K with ``similarity`` (:func:`first_stage_similarity`): only the pairs of
    :func:`shortlist_pairs` are cross-scored; the others get ``similarity - 1e9`` (below every
    scored pair, in first-stage order). ``num_workers`` > 1: the pairs are split into that
    many contiguous parts scored by Ray tasks (one CPU each, or a share of the GPU).
    """
    import time

    from vlp.core.progress import Progress

    n_texts, n_images = texts["input_ids"].shape[0], images["region_mask"].shape[0]
    if shortlist:
        if similarity is None:
            similarity = first_stage_similarity(model, texts, images)
        rows, cols = shortlist_pairs(similarity, int(shortlist))
    else:
        rows = torch.arange(n_texts).repeat_interleave(n_images)
        cols = torch.arange(n_images).repeat(n_texts)
    started = time.perf_counter()
    bar = Progress(len(rows), "retrieval scoring", unit="pair", mode=progress)
    try:
        if num_workers > 1:
            values = _ray_scores(model, texts, images, rows, cols, batch_size=batch_size, score=score,
                                 num_workers=num_workers, progress=bar, device=device)
        else:
            values = pair_scores(model, texts, images, rows, cols, batch_size=batch_size, score=score, progress=bar)
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    if shortlist:
        out = similarity.double().numpy() - _BELOW
    else:
        out = np.empty((n_texts, n_images), dtype=np.float64)
    out[rows.numpy(), cols.numpy()] = values.double().numpy()
    info = {"pairs_scored": int(len(rows)), "pairs_total": n_texts * n_images, "seconds": seconds,
            "pairs_per_s": len(rows) / seconds if seconds > 0 else None, "workers": num_workers}
    return out, info


def _score_part(model, texts, images, rows, cols, batch_size, score, device):
    torch.set_num_threads(1)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    return pair_scores(model, texts, images, rows, cols, batch_size=batch_size, score=score)


def _ray_scores(model, texts, images, rows, cols, *, batch_size, score, num_workers, progress, device):
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=num_workers, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        started = True
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        options = {"num_cpus": 1}
        if gpus and device != "cpu":
            options["num_gpus"] = min(1.0, gpus / num_workers)
        remote = ray.remote(**options)(_score_part)
        cpu_model = copy.deepcopy(model).cpu()
        refs = [ray.put(x) for x in (cpu_model, to_device(texts, "cpu"), to_device(images, "cpu"))]
        bounds = np.linspace(0, len(rows), num_workers + 1).astype(int)
        pending = {remote.remote(*refs, rows[a:b], cols[a:b], batch_size, score,
                                 None if options.get("num_gpus") else "cpu"): (a, b)
                   for a, b in zip(bounds[:-1], bounds[1:]) if b > a}
        out = torch.empty(len(rows))
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            a, b = pending.pop(done[0])
            out[a:b] = ray.get(done[0])
            progress.update(b - a)
        return out
    finally:
        if started:
            ray.shutdown()


def evaluate_retrieval(model, dataset, *, batch_size: int = 64, max_images: Optional[int] = None,
                       shortlist: Optional[int] = None, num_workers: int = 1, progress: str = "off",
                       score: Callable = head_score):
    """``(metrics, pairs, predictions)``: every caption of ``dataset`` against each of its
    distinct images; ``predictions[t]``: the image ids of caption t's top 10. ``score``:
    :func:`head_score` (finetuned) or :func:`itm_score` (zero-shot from a pretraining ITM head)."""
    from vlp.trainer.downstream import dataset_pairs
    from vlp.trainer.metrics import retrieval_fold_metrics, retrieval_metrics

    texts, images, text_image, image_ids, text_rows = retrieval_sides(dataset, max_images=max_images,
                                                                      pad_id=model.ctx.pad_id)
    if len(image_ids) < 2:
        raise ValueError(f"retrieval needs at least 2 images with captions, the split has {len(image_ids)}")
    similarity = None
    if shortlist:
        tokenizer = model.ctx.tokenizer
        labels = image_label_tokens(dataset, image_ids, tokenizer) if tokenizer is not None else None
        similarity = first_stage_similarity(model, texts, images, labels)
    scores, info = score_matrix(model, texts, images, batch_size=batch_size, score=score, shortlist=shortlist,
                                similarity=similarity, num_workers=num_workers, progress=progress)
    metrics = retrieval_metrics(scores, text_image)
    n_images = len(image_ids)
    if n_images >= 2000 and n_images % 1000 == 0:
        metrics.update({f"1k_{k}": v for k, v in retrieval_fold_metrics(scores, text_image, 1000).items()})
    metrics["n"] = int(len(text_image))
    metrics["pairs_scored"] = info["pairs_scored"]
    if shortlist:
        metrics["shortlist"] = int(shortlist)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :PREDICTION_TOP]
    predictions = [[image_ids[j] for j in row] for row in top.tolist()]
    all_pairs = dataset_pairs(dataset)
    return metrics, [all_pairs[i] for i in text_rows], predictions

