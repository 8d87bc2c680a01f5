"""RefCOCO / RefCOCO+ / RefCOCOg finetuning: pick the region an expression refers to.

Pairs of kind ``refexp`` (``vlp-build import-refcoco``): text = the expression, target_box
= the referred object's box. The regions are those of the feature store: ground-truth
boxes (``vlp-extract --boxes OUT/gt_boxes.jsonl``, the importer's file) or detected boxes
(a plain ``vlp-extract`` store). The head scores every region from its output (a linear /
MLP head on the encoder's per-region states, one logit each); the loss is an option:

* ``bce`` (VL-BERT): binary cross-entropy per region against the label IoU(region,
  target) >= 0.5, averaged over the real regions of the batch;
* ``ce`` (UNITER): cross-entropy over the image's regions, the target being the region of
  highest IoU with the target box (expressions where no region reaches IoU 0.5 are left out).

Metric (:func:`vlp.trainer.metrics.grounding_accuracy`): the share of expressions whose
best-scored region has IoU >= 0.5 with the target box; ``mean_iou``; and ``upper_bound``,
the share where any region reaches 0.5 (1 with ground-truth regions, the ceiling of
detected ones). IoU is computed on boxes normalised by the image size (the same for both
boxes, so the ratio is the pixel IoU); predictions are scaled back to pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlp.trainer.data import IGNORE
from vlp.trainer.downstream import DownstreamTask
from vlp.trainer.heads import build_head

IOU_THRESHOLD = 0.5


def region_iou(region_boxes: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of every region box [B, N, 4] with its row's target box [B, 4] -> [B, N]."""
    boxes = region_boxes[..., :4].float()
    target = target.float()[:, None, :]
    w = (torch.minimum(boxes[..., 2], target[..., 2]) - torch.maximum(boxes[..., 0], target[..., 0])).clamp(min=0)
    h = (torch.minimum(boxes[..., 3], target[..., 3]) - torch.maximum(boxes[..., 1], target[..., 1])).clamp(min=0)
    inter = w * h
    area = lambda b: (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)  # noqa: E731
    union = area(boxes) + area(target) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


class RefCOCO(DownstreamTask):
    name, key, pair_kind = "REFCOCO", "refcoco", "refexp"
    losses = ("bce", "ce")
    fixed_labels = ("region",)  # one logit per region

    def build_head(self, encoder, ctx):
        return build_head(self.head_name, encoder.hidden_size, 1)

    def logits(self, out, batch, head) -> torch.Tensor:
        """[B, N] region scores; padded regions -inf."""
        scores = head(out.regions).squeeze(-1).float()
        return scores.masked_fill(~batch["region_mask"].bool(), float("-inf"))

    def target(self, pair) -> dict:
        box = pair.get("target_box")
        w, h = max(1, int(pair.get("image_w") or 1)), max(1, int(pair.get("image_h") or 1))
        if box is None:
            return {"label": torch.full((4,), -1.0)}
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        return {"label": (torch.tensor([float(v) for v in box], dtype=torch.float32) / scale).clamp(0.0, 1.0)}

    def loss(self, out, batch, head, ctx):
        scores = self.logits(out, batch, head)
        valid = batch["region_mask"].bool()
        iou = region_iou(batch["region_boxes"], batch["label"]).masked_fill(~valid, -1.0)
        has_target = batch["label"][:, 0] >= 0
        if self.loss_name == "bce":
            rows = valid & has_target[:, None]
            if not rows.any():
                return scores.masked_fill(~valid, 0).sum() * 0.0, {"task_acc": None}
            loss = F.binary_cross_entropy_with_logits(scores[rows], (iou[rows] >= IOU_THRESHOLD).float())
        else:
            best_iou, best = iou.max(1)
            target = torch.where(has_target & (best_iou >= IOU_THRESHOLD), best, torch.full_like(best, IGNORE))
            if not (target != IGNORE).any():
                return scores.masked_fill(~valid, 0).sum() * 0.0, {"task_acc": None}
            loss = F.cross_entropy(scores, target, ignore_index=IGNORE)
        chosen = scores.argmax(1)
        hit = iou.gather(1, chosen[:, None]).squeeze(1) >= IOU_THRESHOLD
        return loss, {"task_acc": hit[has_target].float().mean().item() if has_target.any() else None,
                      "task_n": int(has_target.sum())}

    def predict_batch(self, logits, batch) -> list:
        chosen = logits.argmax(1)
        boxes = batch["region_boxes"][..., :4].float()
        picked = boxes[torch.arange(len(chosen), device=boxes.device), chosen]
        iou = region_iou(batch["region_boxes"], batch["label"]).masked_fill(~batch["region_mask"].bool(), -1.0)
        ceiling = iou.max(1).values >= IOU_THRESHOLD
        return [{"region": int(k), "box": [float(v) for v in box], "reachable": bool(c)}
                for k, box, c in zip(chosen.tolist(), picked.tolist(), ceiling.tolist())]

    def has_gold(self, pair) -> bool:
        return pair.get("target_box") is not None

    @staticmethod
    def pixel_box(pair, normalised) -> list:
        w, h = float(pair.get("image_w") or 1), float(pair.get("image_h") or 1)
        return [normalised[0] * w, normalised[1] * h, normalised[2] * w, normalised[3] * h]

    def score(self, pairs, predictions) -> dict:
        from vlp.trainer.metrics import grounding_accuracy

        kept = [(p, a) for p, a in zip(pairs, predictions) if self.has_gold(p)]
        if not kept:
            return {"n": 0}
        result = grounding_accuracy([self.pixel_box(p, a["box"]) for p, a in kept],
                                    [list(p["target_box"]) for p, _ in kept], IOU_THRESHOLD)
        return {"accuracy": result["accuracy"], "mean_iou": result["mean_iou"],
                "upper_bound": float(sum(a["reachable"] for _, a in kept) / len(kept)), "n": result["n"]}

    def prediction_row(self, pair, prediction) -> dict:
        return {"id": pair["pair_id"], "prediction": {"box": [round(v, 2) for v in self.pixel_box(pair, prediction["box"])],
                                                      "region": prediction["region"]}}
