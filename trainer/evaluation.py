"""Held-out evaluation of a :class:`~vlp.trainer.tasks.PretrainModel`.

* :func:`heldout_metrics` - MLM / MOC / ITM accuracy as correct/total over every scored
  token, region or pair of the evaluated batches (a mean of per-batch accuracies would
  over-weight small batches), with masking fixed by a seed;
* :func:`zero_shot_retrieval` - image<->text retrieval scored by the ITM head alone;
* :func:`retrieval_recall` - the ranking rule, on its own so it can be checked by hand;
* :func:`evaluate_during_training` - both, flat and prefixed, for the training loop.

Everything runs under ``torch.no_grad`` in eval mode (the model's mode is restored) and
touches neither the global RNG nor the training loop's masking generator, so evaluating
mid-run does not change what the run does next.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch

from vlp.trainer.data import LengthBucketBatchSampler, attach_label_tokens, collate, to_device
from vlp.trainer.tasks import IFRS, ITM, ITM_HS, LABEL_FIELDS, MRFR, link_to_shown_regions, prepare_batch

log = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)


def _device(model) -> torch.device:
    return next(model.parameters()).device


class _eval_mode:
    """no_grad + eval mode, the previous mode restored even when evaluation raises."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        self.no_grad.__exit__(*exc)
        return False


# -- held-out task metrics -------------------------------------------------------------

def _tally(metrics: dict) -> dict:
    """{name: (correct, total)} from what a task's loss reports: each rate (``<name>_acc``
    or ``moc_kl_agree``) with its count ``<name>_n``; a rate of None counts (0, 0)."""
    tally = {}
    for key, value in metrics.items():
        if key.endswith("_n"):
            continue
        name = key[:-4] if key.endswith("_acc") else key
        if value is None:
            tally[name] = (0, 0)
        elif f"{name}_n" in metrics:
            n = int(metrics[f"{name}_n"])
            tally[name] = (round(value * n), n)  # a rate of n items times n is a whole number
    return tally


def _scored(task, tally: dict, metrics: dict) -> bool:
    """Whether the task had targets in the batch (its loss is a placeholder 0 otherwise)."""
    if tally:
        return any(n for _, n in tally.values())
    if isinstance(task, (MRFR, IFRS)):
        return bool(metrics)  # they report their MSE only when something was masked/moved
    return True


def _eval_batches(dataset, batch_size: int, seed: int) -> list[list[int]]:
    # a seeded shuffle, not length order: with max_batches the subset must not be the shortest texts
    sampler = LengthBucketBatchSampler(dataset.text_lengths(), batch_size, shuffle=True, seed=seed)
    return sampler.batches(0)


def _heldout_tasks(model, dataset) -> list:
    """The model's tasks; ITM_HS scores in-batch negatives when the held-out pairs come
    without a hard-negatives store (its head is the same binary matcher)."""
    tasks = []
    for task in model.tasks:
        if isinstance(task, ITM_HS) and getattr(dataset, "hard_negatives", None) is None:
            plain = ITM(task.weight, **task.options)
            plain.name = task.name  # keeps its head
            task = plain
        tasks.append(task)
    return tasks


def heldout_metrics(model, dataset, *, batch_size: int = 64, seed: int = 1234,
                    max_batches: Optional[int] = None, text_mask_prob: float = 0.15,
                    region_mask_prob: float = 0.15) -> dict:
    """Held-out accuracies, weighted by what each batch scores.

    ``seed`` fixes both the batches (a seeded length-bucketed shuffle, so ``max_batches``
    takes a random subset rather than the shortest captions) and the masking, so two
    calls on the same weights agree exactly. Returns, for the model's tasks:
    ``mlm_acc``/``mlm_n``, ``moc_obj_acc``/``moc_obj_n``, ``moc_attr_acc``/``moc_attr_n``,
    ``moc_kl_agree``/``moc_kl_agree_n``, ``itm_acc``/``itm_n`` (an accuracy is left out
    when its count is 0), ``loss_<TASK>`` as the mean over the batches where the task had
    targets (a placeholder 0 would pull it down), ``loss`` (the weighted total, as
    trained) as the mean over all batches, and ``batches``.
    """
    generator = torch.Generator().manual_seed(seed)
    tasks = _heldout_tasks(model, dataset)
    batches = _eval_batches(dataset, batch_size, seed)
    if max_batches is not None:
        batches = batches[:max_batches]
    device = _device(model)
    counts: dict = {}
    loss_sums: dict = {}
    seen = 0
    with _eval_mode(model):
        for rows in batches:  # no DataLoader: its iterator draws a seed from the global RNG
            batch = to_device(collate([dataset[i] for i in rows], model.ctx.pad_id), device)
            prepared = prepare_batch(batch, tasks, generator, model.ctx, text_mask_prob, region_mask_prob)
            out = model.encode(prepared)
            total = 0.0
            for task in tasks:
                loss, metrics = task.loss(out, prepared, model.head(task.name), model.ctx)
                total += task.weight * loss.item()
                found = _tally(metrics)
                for key, (hit, n) in found.items():
                    old = counts.get(key, (0, 0))
                    counts[key] = (old[0] + hit, old[1] + n)
                if _scored(task, found, metrics):  # a batch with nothing to score says 0, not "perfect"
                    old = loss_sums.get(task.name, (0.0, 0))
                    loss_sums[task.name] = (old[0] + loss.item(), old[1] + 1)
            old = loss_sums.get(None, (0.0, 0))
            loss_sums[None] = (old[0] + total, old[1] + 1)
            seen += 1
    result: dict = {"batches": seen}
    for key, (hit, n) in counts.items():
        name = key if key.endswith("agree") else f"{key}_acc"
        if n:
            result[name] = hit / n
        result[f"{key}_n"] = n
    for name, (value, n) in loss_sums.items():
        result["loss" if name is None else f"loss_{name}"] = value / n
    return result


# -- zero-shot retrieval ------------------------------------------------------------------

def retrieval_recall(scores: torch.Tensor, ks: Sequence[int] = RECALL_KS) -> dict:
    """Recall@k both ways from ``scores[text, image]``, text i's true image being image i.

    Ties count against the true match: its rank is 1 + the number of other candidates
    scoring greater than *or equal to* it, so a constant scorer gets R@1 = 0 (for N > 1)
    rather than a lucky 1. ``ir_r{k}``: text->image (rank the images of each caption);
    ``tr_r{k}``: image->text (rank the captions of each image); fractions in [0, 1].
    """
    from vlp.trainer.metrics import retrieval_ranks

    scores = torch.as_tensor(scores).detach().double().cpu()
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be square [texts, images], got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN: rankings would be meaningless")
    n = scores.shape[0]
    # the finetuning evaluation's ranking rule (several captions per image there, one here)
    ir_rank, tr_rank = retrieval_ranks(scores.numpy(), np.arange(n))
    result = {}
    for k in ks:
        result[f"ir_r{k}"] = float((ir_rank <= k).mean())
    for k in ks:
        result[f"tr_r{k}"] = float((tr_rank <= k).mean())
    result["ir_mean_rank"] = float(ir_rank.mean())
    result["tr_mean_rank"] = float(tr_rank.mean())
    result["retrieval_n"] = n
    return result


def itm_head(model):
    """The model's ITM (or ITM_HS) head, or a ValueError saying how to get one."""
    for name in ("ITM", "ITM_HS"):
        if name in model.heads:
            return model.heads[name]
    raise ValueError("zero-shot retrieval needs an ITM head; add ITM to the stage's tasks")


def retrieval_examples(dataset, num_images: int, seed: Optional[int] = 0) -> list[int]:
    """Dataset indices of the first pair of ``num_images`` distinct images.

    ``seed`` None: the first images in dataset order; else a seeded sample of the images
    (in dataset order), so a fixed seed always scores the same set.
    """
    first: dict = {}
    pairs, indices = getattr(dataset, "pairs", None), getattr(dataset, "indices", None)
    if pairs is not None and indices is not None:  # no feature reads just to learn image ids
        column = pairs.column("image_id")
        image_ids = (column[int(i)] for i in indices)
    else:
        image_ids = (dataset[i]["image_id"] for i in range(len(dataset)))
    for i, image_id in enumerate(image_ids):
        first.setdefault(image_id, i)
    chosen = list(first.values())
    if len(chosen) < 2:
        raise ValueError(f"zero-shot retrieval needs at least 2 distinct images, the dataset has {len(chosen)}")
    if num_images < 2:
        raise ValueError(f"zero-shot retrieval needs at least 2 images, got num_images={num_images}")
    if seed is not None and num_images < len(chosen):
        pick = np.random.default_rng(seed).choice(len(chosen), num_images, replace=False)
        chosen = [chosen[i] for i in sorted(pick)]
    return chosen[:num_images]


def retrieval_scores(model, dataset, indices: Sequence[int], *, batch_size: int = 64) -> torch.Tensor:
    """``scores[i, j]``: ITM match score of the caption of example ``indices[i]`` with the
    image of example ``indices[j]`` (log-odds of "matched": the ranking of
    softmax(logits)[matched], without float32 saturating at 1.0 into false ties)."""
    head = itm_head(model)
    examples = [dataset[int(i)] for i in indices]
    n = len(examples)
    device = _device(model)
    batch = to_device(collate(examples, model.ctx.pad_id), device)
    text_len = batch["text_mask"].long().sum(1)
    region_len = batch["region_mask"].long().sum(1)
    scores = torch.empty(n * n)
    with _eval_mode(model):
        for start in range(0, n * n, batch_size):
            flat = torch.arange(start, min(start + batch_size, n * n), device=device)
            rows, cols = flat // n, flat % n
            t, r = int(text_len[rows].max()), int(region_len[cols].max())  # trim padding
            pairs = {"input_ids": batch["input_ids"][rows, :t], "text_mask": batch["text_mask"][rows, :t]}
            for key in ("region_features", "region_boxes", "region_mask"):
                pairs[key] = batch[key][cols, :r]
            # as in ITM training: label tokens take the geometry of the shown image's regions
            pairs["token_regions"] = link_to_shown_regions(batch["token_regions"][rows, :t], pairs["region_mask"])
            if "image_feature" in batch:
                pairs["image_feature"] = batch["image_feature"][cols]
            for key in LABEL_FIELDS:  # LAMP: the labels of the image shown, after the caption
                if key in batch:
                    pairs[key] = batch[key][cols]
            pairs = attach_label_tokens(pairs, model.ctx.sep_id, model.ctx.pad_id)
            logits = head(model.encode(pairs).pooled).float()
            scores[start:start + len(flat)] = (logits[:, 1] - logits[:, 0]).cpu()
    return scores.view(n, n)


def zero_shot_retrieval(model, dataset, *, num_images: int = 100, batch_size: int = 64,
                        seed: Optional[int] = 0) -> dict:
    """Image<->text retrieval with nothing trained for it: the ITM head scores all N x N
    (caption, image) pairs, one caption (its first pair) per image.

    Returns :func:`retrieval_recall`'s ``ir_r1/5/10``, ``tr_r1/5/10``, mean ranks and
    ``retrieval_n`` (chance R@k = k/N). Ties are pessimistic. ``num_images`` is capped at
    the dataset's distinct images; ``seed`` picks them (None: the first ones).
    """
    itm_head(model)  # fail before reading any example
    indices = retrieval_examples(dataset, num_images, seed)
    return retrieval_recall(retrieval_scores(model, dataset, indices, batch_size=batch_size))


# -- during training ---------------------------------------------------------------------

def evaluate_during_training(model, dataset, *, retrieval_images: int = 50, max_batches: Optional[int] = 8,
                             batch_size: int = 64, seed: int = 1234, retrieval_seed: Optional[int] = 0,
                             text_mask_prob: float = 0.15, region_mask_prob: float = 0.15,
                             prefix: str = "eval/") -> dict:
    """One flat dict for the training log, every key prefixed with ``prefix``.

    ``{prefix}<name>`` for each :func:`heldout_metrics` entry (``eval/mlm_acc``,
    ``eval/loss_MLM``, ...) and, when the model has an ITM/ITM_HS head and
    ``retrieval_images`` >= 2, ``{prefix}zs_<name>`` for each :func:`zero_shot_retrieval`
    entry (``eval/zs_ir_r1``, ``eval/zs_tr_r10``, ...). Defaults keep it cheap: 8 batches
    and 50 x 50 pairs. A dataset with fewer than 2 images skips retrieval (logged).
    """
    result = {f"{prefix}{k}": v for k, v in heldout_metrics(
        model, dataset, batch_size=batch_size, seed=seed, max_batches=max_batches,
        text_mask_prob=text_mask_prob, region_mask_prob=region_mask_prob).items()}
    has_itm = any(name in model.heads for name in ("ITM", "ITM_HS"))
    if has_itm and retrieval_images and retrieval_images >= 2:
        try:
            indices = retrieval_examples(dataset, retrieval_images, retrieval_seed)
        except ValueError as error:
            log.warning("zero-shot retrieval skipped: %s", error)
        else:
            recall = retrieval_recall(retrieval_scores(model, dataset, indices, batch_size=batch_size))
            result.update({f"{prefix}zs_{k}": v for k, v in recall.items()})
    return result
