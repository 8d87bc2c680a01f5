"""Captioning as tasks of the one training loop (:class:`~vlp.trainer.pretrain.Pretrainer`).

* ``CAPTION_XE``: teacher-forced cross-entropy on the pair's caption (``[CLS] w1 .. wn [SEP]``
  predicts ``w1 .. wn [SEP]``), mean over tokens.
* ``SCST``: self-critical sequence training (Rennie et al. 2017) with the CIDEr-D reward:
  ``samples`` captions per image are drawn from the model (plain sampling, from the loop's
  random generator, so a resumed run draws the same), each rewarded with CIDEr-D against
  the image's training references with document frequencies from all training references;
  the baseline of a sample is the mean reward of the image's other samples (Luo 2020's
  "new self-critical"); loss ``-(r - b) * log p(token)``, mean over sampled tokens.

:class:`CaptionModel` is a :class:`~vlp.trainer.tasks.PretrainModel` (so checkpoints, resume,
AMP, DDP and TensorBoard are the loop's) whose ``encoder`` is the
:class:`~vlp.trainer.captioning.model.CaptionerNet`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vlp.trainer.captioning.model import CaptionerNet, sample, texts
from vlp.trainer.data import PairDataset
from vlp.trainer.tasks import PretrainModel, Task


class CaptionXE(Task):
    name = "CAPTION_XE"

    def compute(self, net: CaptionerNet, batch: dict, generator, ctx):
        memory, pad = net.encode(*net.batch_inputs(batch))
        ids = batch["input_ids"]
        inputs, targets = ids[:, :-1], ids[:, 1:].clone()
        keep = batch["text_mask"][:, 1:].bool()
        targets[~keep] = -100
        logits = net.logits(memory, pad, inputs, token_pad=~batch["text_mask"][:, :-1].bool())
        logits = logits.float().masked_fill(torch.isinf(logits), -1e4)  # banned tokens: finite for the CE
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        with torch.no_grad():
            right = (logits.argmax(-1) == targets) & keep
            accuracy = right.sum().item() / max(1, int(keep.sum()))
        return loss, {"caption_acc": accuracy, "caption_n": int(keep.sum())}


class SCST(Task):
    name = "SCST"

    def __init__(self, weight: float = 1.0, *, scorer=None, tokenizer=None, samples: int = 5):
        super().__init__(weight)
        self.scorer, self.tokenizer, self.samples = scorer, tokenizer, int(samples)

    def rewards(self, captions: list[str], image_ids: list) -> torch.Tensor:
        from vlp.trainer.captioning.cider import simple_tokens

        return torch.tensor(self.scorer.scores([simple_tokens(c) for c in captions], image_ids), dtype=torch.float32)

    def compute(self, net: CaptionerNet, batch: dict, generator, ctx):
        k = self.samples
        features, boxes, mask = net.batch_inputs(batch)
        memory, pad = net.encode(features, boxes, mask)
        memory_k, pad_k = memory.repeat_interleave(k, 0), pad.repeat_interleave(k, 0)
        uniforms = torch.rand(memory_k.shape[0], net.config.max_caption_len + 1, generator=generator)
        was_training = net.training
        net.eval()
        try:
            seqs = sample(net, memory_k.detach(), pad_k, uniforms)
        finally:
            net.train(was_training)
        image_ids = [i for i in batch["image_id"] for _ in range(k)]
        captions = texts(self.tokenizer, seqs)
        reward = self.rewards(captions, image_ids).to(memory.device).view(-1, k)
        baseline = (reward.sum(1, keepdim=True) - reward) / (k - 1)
        advantage = (reward - baseline).view(-1)
        log_probs, keep = net.token_log_probs(memory_k, pad_k, seqs)
        loss = -(advantage[:, None] * log_probs).sum() / keep.sum().clamp(min=1)
        return loss, {"scst_reward": float(reward.mean()), "scst_greedy_len": float(keep.sum(1).float().mean())}


class CaptionModel(PretrainModel):
    """The captioner with one task (XE or SCST), runnable by the pretraining loop."""

    def __init__(self, net: CaptionerNet, task: Task, ctx):
        super().__init__(net, [task], ctx)
        self.task = task

    def forward(self, batch: dict, generator, *, prepared: bool = False, tasks=None):
        loss, metrics = self.task.compute(self.encoder, batch, generator, self.ctx)
        return loss, {self.task.name: loss}, metrics


class ImageDataset(PairDataset):
    """One example per image (its first pair) for SCST; ``max_images``: the first N images."""

    def __init__(self, *args, max_images: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        image_ids = self.pairs.column("image_id")
        seen, keep = set(), []
        for index in self.indices.tolist():
            image_id = image_ids[index]
            if image_id not in seen:
                seen.add(image_id)
                keep.append(index)
        if max_images:
            keep = keep[:max_images]
        import numpy as np

        self.indices = np.asarray(keep, dtype=np.int64)


def references_by_image(pairs, split) -> dict:
    """``{image_id: [caption, ...]}`` of the pairs of ``split`` (all pairs when None)."""
    from vlp.trainer.data import split_filter

    wanted = split_filter(pairs, list(split) if split else None)
    out: dict = {}
    for index, (image_id, text) in enumerate(zip(pairs.column("image_id"), pairs.column("text"))):
        if wanted is None or wanted[index]:
            out.setdefault(image_id, []).append(text or "")
    return out


def make_scorer(references: dict, df: Optional[object] = None):
    from vlp.trainer.captioning.cider import CiderD, simple_tokens

    return CiderD({k: [simple_tokens(t) for t in v] for k, v in references.items()}, df)
