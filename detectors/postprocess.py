"""Box selection rules, as pure tensor functions (testable on hand-made scores).

``butd_select`` is generate_tsv.py's rule: for every object class an NMS over the RoIs;
each RoI keeps its best class score among the classes where it survived (``max_conf``);
RoIs with ``max_conf >= score_threshold`` are kept, at least ``min_boxes`` and at most
``max_boxes``. Unlike generate_tsv (which keeps the in-between case in proposal order and
breaks ties with an unstable argsort), the result is always sorted by max_conf,
descending, ties broken by proposal rank (the RPN's order) — deterministic.

``agnostic_loop_select`` is the HF LXMERT demo's rule: class-agnostic NMS over each RoI's
best (non-background) class score, tried at increasing IoU thresholds until at least
``min_boxes`` survive; at most ``max_boxes`` are kept. If no threshold gives enough, the
survivors of the last threshold are topped up with the best remaining RoIs (the demo
reused the previous image's boxes instead).

NMS follows torchvision/detectron2 (IoU without the legacy +1; suppress when IoU >
threshold) with a deterministic order (score descending, ties by lower index).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torchvision.ops import box_iou

from vlp.detectors.model import ordered_nms, stable_argsort_desc


NMS_METHODS = ("auto", "sweep", "matrix", "loop")


def per_class_nms_keep(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                       method: str = "auto") -> torch.Tensor:
    """[R, C] bool: RoI r survives the NMS of class c (all classes share the RoI boxes).

    ``method``: "sweep" (all classes at once, one rank at a time; fast on CPU), "matrix"
    (all classes at once by a fixed-point iteration on the overlap graph; fast on GPU),
    "loop" (one torchvision NMS per class, as generate_tsv runs it: the reference the
    tests hold the other two to); "auto" picks by device. All give the same result.
    """
    if method == "auto":
        method = "matrix" if boxes.is_cuda else "sweep"
    num_rois, num_classes = scores.shape
    if num_rois == 0:
        return torch.zeros((0, num_classes), dtype=torch.bool, device=scores.device)
    if method == "sweep":
        return _sweep_nms(boxes, scores, iou_threshold)
    if method == "loop":
        keep = torch.zeros((num_rois, num_classes), dtype=torch.bool, device=scores.device)
        boxes = boxes.float()
        for c in range(num_classes):
            keep[ordered_nms(boxes, scores[:, c], iou_threshold), c] = True
        return keep
    if method == "matrix":
        return _fixed_point_nms(boxes, scores, iou_threshold)
    raise ValueError(f"unknown per-class NMS method {method!r}")


def _sweep_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS for all classes at once, rank by rank.

    Step k visits every class's k-th best RoI (score descending, ties by lower index, as
    :func:`ordered_nms`): it is kept unless a RoI kept earlier in that class overlaps it,
    and a kept RoI marks the ones it overlaps. R vectorised steps replace C NMS calls
    (1600 for the VG detector), which dominated the demo detector's time per image.
    """
    num_rois, num_classes = scores.shape
    # IoU in float32 against the threshold in double, as torchvision's CPU kernel compares
    overlap = box_iou(boxes.float(), boxes.float()).double() > iou_threshold  # [R, R]
    order = torch.sort(scores.t().float(), dim=1, descending=True, stable=True).indices  # [C, R]
    classes = torch.arange(num_classes, device=scores.device)
    suppressed = torch.zeros((num_classes, num_rois), dtype=torch.bool, device=scores.device)
    keep = torch.zeros((num_classes, num_rois), dtype=torch.bool, device=scores.device)
    for rank in range(num_rois):
        roi = order[:, rank]
        kept = ~suppressed[classes, roi]
        keep[classes, roi] = kept
        suppressed |= overlap[roi] & kept[:, None]
    return keep.t()


def _fixed_point_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                     max_elements: Optional[int] = None, work_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Greedy NMS for all classes at once.

    kept[c, i] = no kept j precedes i in class c's order with IoU(i, j) > threshold.
    Iterating this from "all kept" settles rank by rank and stops at the greedy result
    (the fixed point is unique, so stopping when nothing changes is exact).
    """
    num_rois, num_classes = scores.shape
    if max_elements is None:  # [classes, R, R] work tensors per chunk
        max_elements = (1 << 28) if scores.is_cuda else (1 << 24)
    if work_dtype is None:  # 0/1 entries, sums <= num_rois: exact in float16 up to 2048
        work_dtype = torch.float16 if scores.is_cuda and num_rois <= 2048 else torch.float32
    # IoU in float32 against the threshold in double, as torchvision's CPU kernel compares
    overlap = box_iou(boxes.float(), boxes.float()).double() > iou_threshold  # [i, j]
    index = torch.arange(num_rois, device=scores.device)
    earlier_index = index[None, :] < index[:, None]  # [i, j]: j has the lower index
    out = torch.empty((num_classes, num_rois), dtype=torch.bool, device=scores.device)
    step = max(1, max_elements // (num_rois * num_rois))
    s_all = scores.t().float()  # [C, R]
    for c0 in range(0, num_classes, step):
        s = s_all[c0:c0 + step]
        si, sj = s[:, :, None], s[:, None, :]
        precedes = (sj > si) | ((sj == si) & earlier_index[None])  # [c, i, j]: j before i
        graph = (precedes & overlap[None]).to(work_dtype)
        kept = torch.ones(s.shape, dtype=work_dtype, device=s.device)
        for _ in range(num_rois + 1):
            new = (torch.bmm(graph, kept[:, :, None])[:, :, 0] == 0).to(work_dtype)
            if torch.equal(new, kept):
                break
            kept = new
        out[c0:c0 + step] = kept.bool()
    return out.t()


def max_conf_after_nms(boxes: torch.Tensor, class_scores: torch.Tensor, iou_threshold: float,
                       method: str = "auto") -> torch.Tensor:
    """generate_tsv's max_conf: each RoI's best score among the classes where it survives
    that class's NMS (0 if it survives none). class_scores: [R, C], background excluded.

    Classes that score exactly 0 on every RoI skip the NMS: they add 0 to each RoI's max,
    which the clamp gives anyway, so the result is the same. A class-subset checkpoint
    (the demo detector keeps 8 of 1,600) scores every other class 0, and the NMS over all
    of them was a fifth of its time per image."""
    live = (class_scores != 0).any(dim=0)
    if not bool(live.all()):
        class_scores = class_scores[:, live]
    if class_scores.shape[1] == 0:
        return torch.zeros(class_scores.shape[0], dtype=torch.float32, device=class_scores.device)
    keep = per_class_nms_keep(boxes, class_scores, iou_threshold, method)
    kept_scores = torch.where(keep, class_scores.float(), torch.zeros((), device=class_scores.device))
    return kept_scores.amax(dim=1).clamp_min(0.0)


def select_by_confidence(max_conf: torch.Tensor, score_threshold: float, min_boxes: int,
                         max_boxes: int) -> torch.Tensor:
    """Indices of kept RoIs, best first: all with max_conf >= threshold, clamped to
    [min_boxes, max_boxes] (fewer only if there are fewer RoIs)."""
    order = stable_argsort_desc(max_conf.float())
    passed = int((max_conf >= score_threshold).sum())
    count = min(max(passed, int(min_boxes)), int(max_boxes), int(max_conf.numel()))
    return order[:count]


def butd_select(boxes: torch.Tensor, class_scores: torch.Tensor, *, nms_threshold: float,
                score_threshold: float, min_boxes: int, max_boxes: int, method: str = "auto"):
    """generate_tsv's selection. Returns (indices best first, max_conf of all RoIs)."""
    max_conf = max_conf_after_nms(boxes, class_scores, nms_threshold, method)
    return select_by_confidence(max_conf, score_threshold, min_boxes, max_boxes), max_conf


def agnostic_loop_select(boxes: torch.Tensor, scores: torch.Tensor, *, nms_thresholds: Sequence[float],
                         score_threshold: float, min_boxes: int, max_boxes: int) -> torch.Tensor:
    """The HF demo's class-agnostic NMS loop (without its stale-result bug).

    boxes [R,4] (each RoI's box for its best class), scores [R] (that class's score).
    Returns indices, best first.
    """
    num = scores.numel()
    candidates = torch.nonzero(scores >= score_threshold).flatten()
    keep = candidates[:0]
    for threshold in nms_thresholds:
        keep = candidates[ordered_nms(boxes[candidates], scores[candidates], threshold)][: int(max_boxes)]
        if keep.numel() >= min_boxes:
            return keep
    # No threshold left enough boxes: top up with the best remaining RoIs.
    want = min(int(min_boxes), num)
    if keep.numel() < want:
        taken = torch.zeros(num, dtype=torch.bool, device=scores.device)
        taken[keep] = True
        rest = stable_argsort_desc(scores.float())
        rest = rest[~taken[rest]][: want - keep.numel()]
        keep = torch.cat([keep, rest])
    return keep
