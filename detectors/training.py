"""Faster R-CNN training (RPN + RoI head + attribute head) on Visual-Genome-format data.

Built on the inference model of :mod:`vlp.detectors.model` (same modules, same names),
so a trained model is written with :func:`save_checkpoint` and read back with the strict
loader; ``load_detector(weights=..., preset=...)`` then gives exactly the trained model.

Losses (detectron2 / BUTD conventions)
--------------------------------------
RPN
    Anchors from the model's anchor generator over each image's valid res4 grid. IoU
    matching: >= 0.7 positive, < 0.3 negative, in between ignored, and every GT box's
    best anchor(s) (ties included) positive. 256 anchors per image sampled at up to 50%
    positives. Objectness: binary cross-entropy; deltas: L1 (detectron2's default
    smooth-L1 beta 0) on the positives with Box2BoxTransform weights (1, 1, 1, 1); both
    summed and divided by 256 x images.
Proposals
    The RPN's detached outputs through the inference proposal selection (train-time
    pre-NMS ``rpn_pre_nms_topk`` / NMS 0.7 / post-NMS ``rpn_post_nms_topk``), then the GT
    boxes appended.
RoI head
    Match IoU >= 0.5 -> the GT's class id (0..1599), else background (1600, the LAST
    logit). ``rois_per_image`` sampled at up to ``roi_positive_fraction`` foreground;
    with ``roi_part_negatives`` > 0, that many sub-boxes of GT boxes are added (background
    unless another GT claims them), the hard negatives random sampling almost never draws;
    with ``roi_hard_negatives`` > 0, that many background proposals of the highest RPN
    objectness (groups of shapes, textures, near misses: what the detector itself takes for
    objects) are added before the random draw, which then samples from the rest.
    Cross-entropy over the 1601 logits; class-specific L1 box loss on the foreground
    (weights (10, 10, 5, 5), divided by the sampled RoI count, as detectron2).
Attributes
    Cross-entropy over the 401 attribute logits on foreground RoIs whose GT has
    attributes, target = the PRIMARY attribute (the first listed; colour in the synthetic
    world), with the GT class fed to the class embedding (teacher forcing, as BUTD trains).

Normalisation
-------------
The model's norms are frozen BatchNorms (``x * weight / sqrt(running_var + eps) + bias -
...``). For training from scratch their ``weight`` and ``bias`` become learnable
parameters, and (``norm="batchnorm"``, the default) in training mode they normalise with
batch statistics and update ``running_mean`` / ``running_var``; in eval mode they compute
exactly the frozen norm. ``norm="affine"`` keeps the statistics fixed (0/1; the stem's
running_var at ``INPUT_STD**2``) and learns only scale/shift — from scratch it trained
markedly slower. From trained weights (``init_weights``) it keeps their statistics, as
detectron2 fine-tunes with frozen BatchNorm: the demo detector's fine-tune on the classic +
wide worlds uses it (a batch-statistics run at twice the learning rate lost half its classic
mAP within 1,200 iterations; detectors/weights/README.md).
The last norm of every residual branch starts at weight 0. Everything lives in the same
state-dict entries, so the checkpoint loads into the inference model with the strict
loader and gives the same outputs as the trained model in eval mode (tested).

Optimiser: AdamW with linear warmup and a cosine decay; horizontal flips; batches of a
few images padded bottom/right (the backbone masks the padding exactly as at inference).

The loop is :class:`DetectorTrainer` (``step`` / ``run`` / ``save`` / ``resume``), run from the
command line by ``vlp train-detector``; :func:`train_detector` is the one-call form.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from vlp.core.durable import atomic_path, atomic_write, atomic_write_json
from vlp.detectors.annotations import Annotation, load_vg_annotations, split_image_ids
from vlp.detectors.checkpoint import match_state_dict, read_checkpoint, save_checkpoint
from vlp.detectors.config import DetectorConfig, make_config
from vlp.detectors.errors import AnnotationError, DetectorConfigError, TrainingStateError
from vlp.detectors.inference import mirror_boxes, prepare_image
from vlp.detectors.model import FasterRCNN, FrozenBatchNorm2d, select_proposals

#: The stem's fixed running_var is INPUT_STD**2: inputs are mean-subtracted pixels (no std).
INPUT_STD = 58.0
RPN_BG, RPN_IGNORE = 0, -1


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass
class TrainSettings:
    """Training hyper-parameters (the architecture and input size come from the preset)."""

    iterations: int = 2000
    batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_iterations: int = 100
    min_lr_fraction: float = 0.05  # cosine decays to lr * this
    grad_clip: float = 10.0
    # RPN
    rpn_positive_iou: float = 0.7
    rpn_negative_iou: float = 0.3
    rpn_batch_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_topk: int = 2000
    rpn_post_nms_topk: int = 500
    rpn_nms_threshold: float = 0.7
    # RoI head
    roi_foreground_iou: float = 0.5
    rois_per_image: int = 32
    roi_positive_fraction: float = 0.5
    # Part boxes: this many sub-boxes of GT boxes (IoU < roi_foreground_iou with their own box)
    # added per image to the sampled RoIs, background unless another GT claims them, so the
    # head sees a shape's hole, corner or half as not the shape (random negatives are almost
    # all empty background). 0: none, and no random draws.
    roi_part_negatives: int = 0
    # Hard negatives: this many of each image's background proposals with the highest RPN
    # objectness, added to the sampled RoIs (the random draw samples the rest). 0: none.
    roi_hard_negatives: int = 0
    attr_loss_weight: float = 1.0
    flip: bool = True
    # Multi-scale training (detectron2's MIN_SIZE_TRAIN): each image's shortest side is drawn
    # from these sizes (the preset's max_size still caps the longest side); empty: the
    # preset's min_size, the size inference uses.
    train_min_sizes: tuple = ()
    # "batchnorm": batch statistics while training, running statistics exported (the
    # frozen norms of the inference model); "affine": fixed statistics, learnable scale/shift.
    norm: str = "batchnorm"
    seed: int = 0
    threads: int = 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- data

# Annotation, load_vg_annotations and split_image_ids live in vlp.detectors.annotations
# (evaluation reads them too); importable from here as before.
__all__ = ["Annotation", "DetectorTrainer", "TrainImage", "TrainSettings", "load_vg_annotations",
           "split_image_ids", "train_detector"]


@dataclasses.dataclass
class TrainImage:
    tensor: torch.Tensor  # [3, h, w]
    size: tuple[int, int]
    boxes: torch.Tensor  # [G, 4] in network pixels
    classes: torch.Tensor  # [G]
    attributes: torch.Tensor  # [G] primary attribute id or -1


def load_train_image(ann: Annotation, config: DetectorConfig, flip: bool) -> TrainImage:
    image = cv2.imread(str(ann.path), cv2.IMREAD_COLOR)  # BGR, as the detector takes
    if image is None:
        raise ValueError(f"cannot read image {ann.path}")
    boxes = ann.boxes
    if flip:
        image = np.ascontiguousarray(image[:, ::-1])
        boxes = mirror_boxes(boxes, image.shape[1])
    prepared = prepare_image(image, config)
    sx, sy = prepared.scale
    boxes = boxes * np.asarray([sx, sy, sx, sy], dtype=np.float32)
    return TrainImage(prepared.tensor, prepared.size, torch.from_numpy(boxes),
                      torch.from_numpy(ann.classes), torch.from_numpy(ann.primary_attributes))


# --------------------------------------------------------------------------- model setup


class TrainingBatchNorm2d(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d that normalises with batch statistics in training mode and
    updates its running_mean / running_var (momentum ``BN_MOMENTUM``); in eval mode it is
    exactly the frozen norm (running statistics), i.e. what the inference model computes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=True,
                            momentum=BN_MOMENTUM, eps=self.eps)


BN_MOMENTUM = 0.1


def make_norms_trainable(model: FasterRCNN, mode: str = "batchnorm") -> FasterRCNN:
    """Turn every FrozenBatchNorm2d's weight/bias buffers into parameters (same names).

    mode "batchnorm": batch statistics while training (running statistics updated, stored
    in the same running_mean/running_var entries); "affine": statistics stay fixed.
    """
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            for name in ("weight", "bias"):
                value = m._buffers.pop(name)
                m.register_parameter(name, nn.Parameter(value.detach().clone()))
            if mode == "batchnorm":
                m.__class__ = TrainingBatchNorm2d
    return model


@torch.no_grad()
def init_training_weights(model: FasterRCNN, seed: int = 0) -> FasterRCNN:
    """Random init for training from scratch (deterministic in ``seed``)."""
    g = torch.Generator().manual_seed(seed)

    def normal_(t, std):
        t.copy_(torch.randn(t.shape, generator=g) * std)

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            normal_(m.weight, math.sqrt(2.0 / fan_out))  # He (fan_out), as torchvision ResNets
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, FrozenBatchNorm2d):
            m.weight.fill_(0.0 if name.endswith("conv3.norm") else 1.0)
            m.bias.zero_()
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
        elif isinstance(m, nn.Linear):
            normal_(m.weight, 0.01)
            m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            normal_(m.weight, 1.0)
    model.backbone.stem.conv1.norm.running_var.fill_(INPUT_STD ** 2 - model.backbone.stem.conv1.norm.eps)
    head = model.proposal_generator.rpn_head
    for conv in (head.objectness_logits, head.anchor_deltas):
        normal_(conv.weight, 0.01)
    predictor = model.roi_heads.box_predictor
    normal_(predictor.bbox_pred.weight, 0.001)
    return model


def build_training_model(config: DetectorConfig, seed: int = 0, norm: str = "batchnorm") -> FasterRCNN:
    model = FasterRCNN(config.arch)
    init_training_weights(model, seed)
    if norm == "batchnorm":  # the stem normalises its own input scale
        model.backbone.stem.conv1.norm.running_var.fill_(1.0)
    make_norms_trainable(model, norm)
    return model.train()


# --------------------------------------------------------------------------- targets


def encode_deltas(boxes: torch.Tensor, targets: torch.Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """detectron2 Box2BoxTransform.get_deltas: deltas moving ``boxes`` onto ``targets``."""
    wx, wy, ww, wh = weights
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    cx = boxes[:, 0] + 0.5 * w
    cy = boxes[:, 1] + 0.5 * h
    tw = targets[:, 2] - targets[:, 0]
    th = targets[:, 3] - targets[:, 1]
    tcx = targets[:, 0] + 0.5 * tw
    tcy = targets[:, 1] + 0.5 * th
    return torch.stack([wx * (tcx - cx) / w, wy * (tcy - cy) / h,
                        ww * torch.log(tw / w), wh * torch.log(th / h)], dim=1)


def match_anchors(anchors: torch.Tensor, gt_boxes: torch.Tensor, *, positive_iou: float = 0.7,
                  negative_iou: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """RPN matching. Returns (labels [A]: 1 positive, 0 negative, -1 ignored; matched GT index [A])."""
    num = anchors.shape[0]
    if gt_boxes.shape[0] == 0:
        return torch.zeros(num, dtype=torch.long), torch.zeros(num, dtype=torch.long)
    iou = box_iou(gt_boxes, anchors)  # [G, A]
    best_iou, matched = iou.max(dim=0)
    labels = torch.full((num,), RPN_IGNORE, dtype=torch.long)
    labels[best_iou < negative_iou] = RPN_BG
    labels[best_iou >= positive_iou] = 1
    # Low-quality matches: each GT's best anchor(s) (all ties) are positive.
    gt_best = iou.max(dim=1, keepdim=True).values
    ties = (iou == gt_best) & (gt_best > 0)
    labels[ties.any(dim=0)] = 1
    return labels, matched


def subsample(labels: torch.Tensor, num_samples: int, positive_fraction: float, *, positive,
              negative, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """detectron2's subsample_labels: indices of sampled positives and negatives."""
    pos = torch.nonzero(positive(labels)).flatten()
    neg = torch.nonzero(negative(labels)).flatten()
    num_pos = min(pos.numel(), int(num_samples * positive_fraction))
    num_neg = min(neg.numel(), num_samples - num_pos)
    pos = pos[torch.randperm(pos.numel(), generator=generator)[:num_pos]]
    neg = neg[torch.randperm(neg.numel(), generator=generator)[:num_neg]]
    return pos, neg


def match_rois(proposals: torch.Tensor, gt_boxes: torch.Tensor, gt_classes: torch.Tensor, *,
               background: int, foreground_iou: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """RoI labels: GT class where IoU >= foreground_iou, else ``background``; and matched GT index."""
    num = proposals.shape[0]
    if gt_boxes.shape[0] == 0:
        return torch.full((num,), background, dtype=torch.long), torch.zeros(num, dtype=torch.long)
    best_iou, matched = box_iou(gt_boxes, proposals).max(dim=0)
    labels = gt_classes[matched].clone()
    labels[best_iou < foreground_iou] = background
    return labels, matched


def part_boxes(gt_boxes: torch.Tensor, count: int, generator: torch.Generator,
               foreground_iou: float = 0.5) -> torch.Tensor:
    """``count`` boxes, each inside a random GT box, covering 5% to just under
    ``foreground_iou`` of its area, of any aspect.

    A box inside a GT box has IoU = its share of that box's area, so every part is a
    background RoI for its own GT (others may still claim it: matching decides).
    """
    if count <= 0 or gt_boxes.shape[0] == 0:
        return gt_boxes.new_zeros((0, 4))
    owner = gt_boxes[torch.randint(gt_boxes.shape[0], (count,), generator=generator)]
    area_share = 0.05 + (foreground_iou - 0.05 - 1e-3) * torch.rand(count, generator=generator)
    # Aspect: the part's width share is drawn between area_share (full height) and 1 (full width).
    width_share = area_share ** torch.rand(count, generator=generator)
    height_share = area_share / width_share
    size = owner[:, 2:] - owner[:, :2]
    part_size = size * torch.stack([width_share, height_share], dim=1)
    origin = owner[:, :2] + (size - part_size) * torch.rand(count, 2, generator=generator)
    return torch.cat([origin, origin + part_size], dim=1)


def sample_rois(proposals: torch.Tensor, gt: TrainImage, settings: TrainSettings, num_classes: int,
                generator: torch.Generator):
    """Proposals + GT boxes, matched and sampled, plus hard and part negatives.

    ``proposals`` come in decreasing RPN objectness (as ``select_proposals`` returns them):
    the first ``roi_hard_negatives`` background ones are taken as they are, the random draw
    of ``rois_per_image`` samples the others, then ``roi_part_negatives`` part boxes follow.
    Returns (rois, labels, matched GT index).
    """
    rois = torch.cat([proposals, gt.boxes])
    labels, matched = match_rois(rois, gt.boxes, gt.classes, background=num_classes,
                                 foreground_iou=settings.roi_foreground_iou)
    background = labels[: proposals.shape[0]] == num_classes
    hard = torch.nonzero(background).flatten()[: max(int(settings.roi_hard_negatives), 0)]
    drawable = labels.clone()
    drawable[hard] = -1  # neither foreground nor background: out of the random draw
    pos, neg = subsample(drawable, settings.rois_per_image, settings.roi_positive_fraction,
                         positive=lambda x: (x != num_classes) & (x >= 0), negative=lambda x: x == num_classes,
                         generator=generator)
    keep = torch.cat([pos, neg, hard])
    rois, labels, matched = rois[keep], labels[keep], matched[keep]
    parts = part_boxes(gt.boxes, settings.roi_part_negatives, generator, settings.roi_foreground_iou)
    if parts.shape[0]:
        part_labels, part_matched = match_rois(parts, gt.boxes, gt.classes, background=num_classes,
                                               foreground_iou=settings.roi_foreground_iou)
        rois, labels = torch.cat([rois, parts]), torch.cat([labels, part_labels])
        matched = torch.cat([matched, part_matched])
    return rois, labels, matched


# --------------------------------------------------------------------------- the loss


def batch_tensor(images: list[TrainImage]) -> torch.Tensor:
    height = max(im.size[0] for im in images)
    width = max(im.size[1] for im in images)
    batch = torch.zeros((len(images), 3, height, width), dtype=torch.float32)
    for i, im in enumerate(images):
        batch[i, :, : im.size[0], : im.size[1]] = im.tensor
    return batch


def compute_losses(model: FasterRCNN, images: list[TrainImage], settings: TrainSettings,
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
    arch = model.arch
    num_classes = arch.num_classes
    sizes = [im.size for im in images]
    features, _ = model.backbone(batch_tensor(images), sizes)
    rpn = model.proposal_generator
    logits, deltas = rpn.rpn_head(features)
    num_anchors = rpn.anchor_generator.num_anchors

    rpn_cls, rpn_reg, proposals = [], [], []
    for i, im in enumerate(images):
        fh, fw = model.backbone.feature_size(*im.size)
        lg = logits[i, :, :fh, :fw].permute(1, 2, 0).reshape(-1)
        dl = deltas[i, :, :fh, :fw].reshape(num_anchors, 4, fh, fw).permute(2, 3, 0, 1).reshape(-1, 4)
        anchors = rpn.anchor_generator.grid_anchors(fh, fw)
        labels, matched = match_anchors(anchors, im.boxes, positive_iou=settings.rpn_positive_iou,
                                        negative_iou=settings.rpn_negative_iou)
        pos, neg = subsample(labels, settings.rpn_batch_per_image, settings.rpn_positive_fraction,
                             positive=lambda x: x == 1, negative=lambda x: x == 0, generator=generator)
        sampled = torch.cat([pos, neg])
        rpn_cls.append(F.binary_cross_entropy_with_logits(lg[sampled], (labels[sampled] == 1).float(),
                                                          reduction="sum"))
        if pos.numel():
            target = encode_deltas(anchors[pos], im.boxes[matched[pos]])
            rpn_reg.append(F.l1_loss(dl[pos], target, reduction="sum"))
        with torch.no_grad():
            boxes, _ = select_proposals(anchors, lg.detach(), dl.detach(), im.size,
                                        pre_nms_topk=settings.rpn_pre_nms_topk,
                                        nms_threshold=settings.rpn_nms_threshold,
                                        post_nms_topk=settings.rpn_post_nms_topk, min_size=0.0)
        proposals.append(boxes)
    norm = float(settings.rpn_batch_per_image * len(images))
    losses = {"rpn_cls": torch.stack(rpn_cls).sum() / norm,
              "rpn_reg": (torch.stack(rpn_reg).sum() if rpn_reg else logits.sum() * 0) / norm}

    rois, labels, matched_boxes, attr_targets = [], [], [], []
    for i, (im, props) in enumerate(zip(images, proposals)):
        r, lab, m = sample_rois(props, im, settings, num_classes, generator)
        rois.append(torch.cat([torch.full((r.shape[0], 1), float(i)), r], dim=1))
        labels.append(lab)
        matched_boxes.append(im.boxes[m] if im.boxes.shape[0] else r)
        attr_targets.append(im.attributes[m] if im.boxes.shape[0] else torch.full_like(lab, -1))
    rois, labels = torch.cat(rois), torch.cat(labels)
    matched_boxes, attr_targets = torch.cat(matched_boxes), torch.cat(attr_targets)
    pooled = model.roi_heads.box_features(features, rois)
    predictor = model.roi_heads.box_predictor
    cls_logits = predictor.class_logits(pooled)
    losses["roi_cls"] = F.cross_entropy(cls_logits, labels)
    fg = torch.nonzero(labels != num_classes).flatten()
    box_deltas = predictor.box_deltas(pooled)
    if fg.numel():
        pred = box_deltas.view(-1, num_classes, 4)[fg, labels[fg]]
        target = encode_deltas(rois[fg, 1:], matched_boxes[fg], arch.bbox_reg_weights)
        losses["roi_reg"] = F.l1_loss(pred, target, reduction="sum") / float(labels.numel())
    else:
        losses["roi_reg"] = box_deltas.sum() * 0
    with_attr = fg[attr_targets[fg] >= 0]
    if with_attr.numel():
        attr_logits = predictor.attribute_logits(pooled[with_attr], labels[with_attr])  # teacher forcing
        losses["attr"] = settings.attr_loss_weight * F.cross_entropy(attr_logits, attr_targets[with_attr])
    else:
        losses["attr"] = pooled.sum() * 0
    return losses


# --------------------------------------------------------------------------- the loop


def lr_at(iteration: int, settings: TrainSettings) -> float:
    if iteration < settings.warmup_iterations:
        return settings.lr * (0.1 + 0.9 * iteration / settings.warmup_iterations)
    span = max(1, settings.iterations - settings.warmup_iterations)
    t = min(1.0, (iteration - settings.warmup_iterations) / span)
    low = settings.lr * settings.min_lr_fraction
    return low + (settings.lr - low) * 0.5 * (1.0 + math.cos(math.pi * t))


STATE_FORMAT = "vlp-detector-training-state"
STATE_VERSION = 1
# Settings that may differ between a run and its resumption (they do not change the results).
RESUMABLE_CHANGES = frozenset({"threads"})


def output_paths(out_path) -> dict[str, Path]:
    """The files a training run writes next to its checkpoint ``out_path``."""
    out_path = Path(out_path)
    return {"checkpoint": out_path,
            "state": out_path.with_name(out_path.name + ".state.pt"),
            "log": out_path.with_name(out_path.name + ".log.json"),
            "best": out_path.with_name(out_path.stem + ".best" + out_path.suffix),
            "eval": out_path.with_name(out_path.stem + ".eval" + out_path.suffix)}


def _in_own_threads(method):
    """Run a trainer method with torch's thread count at ``settings.threads``, then give the
    caller's count back: training in a notebook or a test must not leave the process at
    another thread count."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        before = torch.get_num_threads()
        torch.set_num_threads(self.settings.threads)
        try:
            return method(self, *args, **kwargs)
        finally:
            torch.set_num_threads(before)
    return wrapper


class DetectorTrainer:
    """Trains a detector on a VG-format folder, one :meth:`step` at a time.

    vg_dir: a VG-format folder, or a list of them whose training images are pooled (in the
        order given): objects.json, attributes.json, image_data.json, images/<id>.jpg (and
        splits.json: the default training images are its train split, else every image).
    image_ids: the training images of a single ``vg_dir`` (instead of its train split).
    config: the architecture and input settings (default: ``make_config(preset)``).
    settings: :class:`TrainSettings` (iterations, batch size, lr and schedule, sampling).
    eval_vg_dir, eval_image_ids: what to evaluate on every ``eval_every`` iterations and at
        the end, keeping the best checkpoint so far: a folder (default ``vg_dir``) and its
        image ids, or a list of folders and a list of id lists, one per folder, scored as
        one pooled set.
    init_weights: a checkpoint of the same architecture to start from (a new run from
        those weights: fresh optimiser and warmup). To continue an interrupted run with
        its optimiser, data order and random state, use :meth:`resume`.
    stored_classes: ``"all"`` writes the full 1600-class predictor; ``"trained"`` only the
        rows of the classes in the training annotations (a class-subset checkpoint,
        :mod:`vlp.detectors.checkpoint`: a smaller file that never predicts other classes).

    Files (:func:`output_paths`), all written atomically:

    - ``out_path``: the weights in the inference layout (fp16 unless ``half=False``),
      strict-loadable by ``load_detector``; every ``checkpoint_every`` iterations and at the end;
    - ``<out_path>.state.pt``: the training state (weights with trainable norms, AdamW,
      iteration, data order, random generators, the log), written with every checkpoint;
      :meth:`resume` continues from it bit-for-bit (CPU, same torch build and threads);
    - ``<out_path>.log.json``: settings, mean losses every ``log_every`` iterations,
      evaluations and checkpoints;
    - ``<stem>.best<suffix>``: with evaluation, the best checkpoint so far (mAP + attribute accuracy).
    """

    def __init__(self, vg_dir, out_path, *, config: Optional[DetectorConfig] = None, preset: str = "demo",
                 settings: Optional[TrainSettings] = None, image_ids: Optional[Sequence[int]] = None,
                 eval_vg_dir=None, eval_image_ids: Optional[Sequence[int]] = None, eval_every: Optional[int] = None,
                 log_every: int = 20, checkpoint_every: int = 250, half: bool = True, init_weights=None,
                 stored_classes: str = "all", log: Callable[[str], None] = print):
        self.settings = settings = settings or TrainSettings()
        self.config = config = config or make_config(preset)
        bad = [size for size in settings.train_min_sizes if not 0 < int(size) <= config.max_size]
        if bad:
            raise DetectorConfigError(f"train_min_sizes {bad}: each must be between 1 and the preset's "
                                      f"max_size ({config.max_size})")
        self.vg_dirs = _folders(vg_dir)
        if not self.vg_dirs:
            raise ValueError("no training folder given")
        self.eval_sets = _eval_sets(_folders(eval_vg_dir) if eval_vg_dir else self.vg_dirs, eval_image_ids)
        self.eval_every, self.log_every, self.checkpoint_every = eval_every, log_every, checkpoint_every
        self.half, self.log = half, log
        self.paths = output_paths(out_path)
        self.paths["checkpoint"].parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(settings.seed)
        random.seed(settings.seed)
        self.rng = np.random.default_rng(settings.seed)
        self.generator = torch.Generator().manual_seed(settings.seed)
        if image_ids is not None and len(self.vg_dirs) > 1:
            raise ValueError("image_ids selects the training images of one folder; several were given")
        self.annotations = []
        for folder in self.vg_dirs:
            ids = image_ids if image_ids is not None else split_image_ids(folder, "train")
            self.annotations += [a for a in load_vg_annotations(folder, ids) if a.boxes.shape[0] > 0]
        if not self.annotations:
            raise AnnotationError(f"{', '.join(map(os.fspath, self.vg_dirs))}: no training images with objects")
        if stored_classes not in ("all", "trained"):
            raise ValueError(f"stored_classes must be 'all' or 'trained', got {stored_classes!r}")
        self.stored_classes = (sorted({int(c) for a in self.annotations for c in a.classes})
                               if stored_classes == "trained" else None)
        self.model = build_training_model(config, settings.seed, settings.norm)
        if init_weights is not None:
            # classes a class-subset file left out start from this run's initialisation
            state, _ = match_state_dict(read_checkpoint(init_weights), self.model, source=str(init_weights),
                                        absent_classes="model")
            self.model.load_state_dict(state, strict=True)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.dim() > 1]
        no_decay = [p for p in self.params if p.dim() <= 1]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
        self.iteration = 0
        self.order: list[int] = []  # the rest of the current epoch's image order
        self.window: dict[str, list[float]] = {}  # losses since the last log entry
        self.best_score = -1.0
        self.seconds_before = 0.0  # training time of the runs this one resumes
        self._started = time.perf_counter()
        folders = [os.fspath(folder) for folder in self.vg_dirs]
        self.record = {"vg_dir": folders[0] if len(folders) == 1 else folders,
                       "init_weights": None if init_weights is None else os.fspath(init_weights),
                       "preset": config.preset, "config": config.to_dict(),
                       "settings": settings.to_dict(), "num_train_images": len(self.annotations),
                       "num_parameters": sum(p.numel() for p in self.model.state_dict().values()),
                       "stored_classes": self.stored_classes or "all",
                       "losses": [], "evaluations": [], "checkpoints": []}

    @property
    def finished(self) -> bool:
        return bool(self.record.get("finished"))

    def seconds(self) -> float:
        return round(self.seconds_before + time.perf_counter() - self._started, 1)

    # -- one iteration ----------------------------------------------------------------
    def lr(self, iteration: Optional[int] = None) -> float:
        return lr_at(self.iteration if iteration is None else iteration, self.settings)

    def next_batch(self) -> list[TrainImage]:
        batch = []
        for _ in range(self.settings.batch_size):
            if not self.order:
                self.order = [int(i) for i in self.rng.permutation(len(self.annotations))]
            ann = self.annotations[self.order.pop()]
            flip = self.settings.flip and bool(self.rng.random() < 0.5)
            config = self.config
            if self.settings.train_min_sizes:  # no draw otherwise: single-scale runs replay as before
                sizes = self.settings.train_min_sizes
                config = dataclasses.replace(config, min_size=int(sizes[int(self.rng.integers(len(sizes)))]))
            batch.append(load_train_image(ann, config, flip))
        return batch

    @_in_own_threads
    def step(self) -> dict[str, float]:
        """One optimiser step on the next batch; returns its losses (and ``total``)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr()
        losses = compute_losses(self.model, self.next_batch(), self.settings, self.generator)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite loss at iteration {self.iteration}: "
                                     f"{ {k: float(v) for k, v in losses.items()} }")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip)
        self.optimizer.step()
        self.iteration += 1
        values = {k: float(v.detach()) for k, v in losses.items()}
        values["total"] = float(total.detach())
        for k, v in values.items():
            self.window.setdefault(k, []).append(v)
        return values

    # -- the loop ----------------------------------------------------------------------
    @_in_own_threads
    def run(self, *, time_limit_s: Optional[float] = None,
            should_stop: Optional[Callable[[], bool]] = None) -> dict:
        """Train to ``settings.iterations``; returns the log record.

        Stops early after ``time_limit_s`` seconds of this call (then writes the checkpoint
        and evaluates, as at the end: ``record["stopped_early"]``). ``should_stop()`` is asked
        after every iteration; when it says so (Ctrl-C) the state is saved and the run
        returns at once (``record["interrupted"]``), to be continued with :meth:`resume`.
        """
        if self.finished:
            self.log(f"{self.paths['checkpoint']}: training already finished "
                     f"({self.record['iterations_done']} iterations)")
            return self.record
        self._started = time.perf_counter()
        self.record.pop("interrupted", None)
        total = self.settings.iterations
        while self.iteration < total:
            if time_limit_s is not None and time.perf_counter() - self._started > time_limit_s:
                self.log(f"time limit {time_limit_s:.0f} s reached at iteration {self.iteration}")
                self.record["stopped_early"] = self.iteration
                break
            self.step()
            it = self.iteration
            if it % self.log_every == 0 or it == total:
                self._log_losses()
            saved = bool(self.checkpoint_every and it % self.checkpoint_every == 0 and it < total)
            if saved:
                self.save()
            if self.eval_sets and self.eval_every and it % self.eval_every == 0 and it < total:
                self.evaluate()
                self._write_log()
            if should_stop is not None and it < total and should_stop():
                self.record["interrupted"] = it
                self.log(f"stopped at iteration {it}")
                if not saved:
                    self.save()
                return self.record
        self.record["iterations_done"] = self.iteration
        self.record["seconds"] = self.seconds()
        self.record["sha256"] = self.save()
        if self.eval_sets:
            self.evaluate()
        self.record["finished"] = True
        self.save_state()
        self._write_log()
        return self.record

    def _log_losses(self) -> None:
        entry = {"iteration": self.iteration, "lr": self.lr(self.iteration - 1), "seconds": self.seconds(),
                 **{k: round(sum(v) / len(v), 5) for k, v in self.window.items()}}
        self.record["losses"].append(entry)
        self.window = {}
        self.log(" ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()))
        self._write_log()

    def _write_log(self) -> None:
        atomic_write_json(self.paths["log"], self.record, indent=1)

    # -- checkpoints ------------------------------------------------------------------
    def export(self, path=None) -> str:
        """Write the weights in the inference layout (strict-loadable); returns sha256."""
        return save_checkpoint(self.model, path or self.paths["checkpoint"], half=self.half,
                               classes=self.stored_classes)

    def save(self) -> str:
        """Write the checkpoint, the training state and the log; returns the checkpoint's sha256."""
        sha = self.export()
        self.record["checkpoints"].append({"iteration": self.iteration, "sha256": sha, "seconds": self.seconds()})
        self.save_state()
        self._write_log()
        return sha

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "iteration": self.iteration,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "numpy_rng": self.rng.bit_generator.state, "generator": self.generator.get_state(),
                "torch_rng": torch.get_rng_state(), "order": list(self.order),
                "window": {k: list(v) for k, v in self.window.items()}, "best_score": self.best_score,
                "seconds": self.seconds(), "record": self.record,
                "train_image_ids": [int(a.image_id) for a in self.annotations],
                "train_annotations_sha256": annotations_digest(self.annotations)}

    def save_state(self) -> None:
        state = self.state_dict()
        atomic_write(self.paths["state"], lambda handle: torch.save(state, handle))

    def resume(self, path=None) -> None:
        """Continue the run whose state is at ``path`` (default ``<out_path>.state.pt``).

        The preset, architecture, training settings (all but ``threads``) and training
        images must be the ones the state was written with; a
        :class:`~vlp.detectors.errors.TrainingStateError` names what differs.
        """
        path = Path(path or self.paths["state"])
        if not path.is_file():
            raise TrainingStateError(f"{path}: no training state to resume (it is written with every "
                                     f"checkpoint; start without --resume)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise TrainingStateError(f"{path}: not a readable training state "
                                     f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise TrainingStateError(f"{path}: not a vlp detector training state")
        if state.get("version") != STATE_VERSION:
            raise TrainingStateError(f"{path}: training state version {state.get('version')}, this vlp reads "
                                     f"version {STATE_VERSION}")
        record = state["record"]
        changes = _changes(record["config"], self.config.to_dict(), "")
        # a setting added since the state was written had its behaviour-preserving default then
        saved_settings = {**TrainSettings().to_dict(), **record["settings"]}
        changes += [c for c in _changes(saved_settings, self.settings.to_dict(), "")
                    if c.split(":")[0] not in RESUMABLE_CHANGES]
        if state["train_image_ids"] != [int(a.image_id) for a in self.annotations]:
            changes.append(f"training images: {len(state['train_image_ids'])} then, "
                           f"{len(self.annotations)} now (or other ids)")
        elif state.get("train_annotations_sha256") not in (None, annotations_digest(self.annotations)):
            # (states written before the digest existed lack it)
            changes.append("training annotations: same image ids, other boxes, labels or sizes "
                           "(edited files, or folders in another order)")
        if changes:
            raise TrainingStateError(f"{path}: cannot resume with other settings: {'; '.join(changes)}")
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["numpy_rng"]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.iteration = int(state["iteration"])
        self.order = [int(i) for i in state["order"]]
        self.window = {k: [float(x) for x in v] for k, v in state["window"].items()}
        self.best_score = float(state["best_score"])
        self.seconds_before = float(state["seconds"])
        self._started = time.perf_counter()
        record["settings"] = self.settings.to_dict()
        record["stored_classes"] = self.stored_classes or "all"
        self.record = record
        self.log(f"resumed {path} at iteration {self.iteration}")

    # -- evaluation -------------------------------------------------------------------
    @_in_own_threads
    def evaluate(self) -> dict:
        """mAP@0.5 and attribute accuracy of the exported weights on the evaluation images
        (all evaluation folders pooled into one set).

        Evaluates the checkpoint as written (fp16 unless ``half=False``) through
        ``load_detector``; keeps it as ``<stem>.best<suffix>`` when it scores best so far.
        """
        from vlp.detectors.evaluate import evaluate_detector_sets
        from vlp.detectors.inference import load_detector

        self.model.eval()
        tmp = self.paths["eval"]
        try:
            self.export(tmp)
            detector = load_detector(tmp, preset=self.config.preset, device="cpu", **_config_overrides(self.config))
            result = evaluate_detector_sets(detector, self.eval_sets)
            score = result["mAP"] + result["attribute_accuracy"]
            entry = {"iteration": self.iteration, "mAP": result["mAP"],
                     "attribute_accuracy": result["attribute_accuracy"], "seconds": self.seconds()}
            self.record["evaluations"].append(entry)
            self.log(f"eval @ {self.iteration}: mAP@0.5 {result['mAP']:.4f}  "
                     f"attr acc {result['attribute_accuracy']:.4f}")
            if score > self.best_score:
                self.best_score = score
                with atomic_path(self.paths["best"]) as best:
                    shutil.copyfile(tmp, best)
                entry["best"] = True
        finally:
            tmp.unlink(missing_ok=True)
            self.model.train()
        return result


def annotations_digest(annotations: Sequence[Annotation]) -> str:
    """sha256 of the training ground truth in order (ids, sizes, boxes, classes, attributes):
    a resumed run must see the same data, which equal image ids alone do not prove when
    several folders number their images alike."""
    digest = hashlib.sha256()
    for ann in annotations:
        digest.update(json.dumps([int(ann.image_id), int(ann.width), int(ann.height),
                                  [[int(i) for i in attrs] for attrs in ann.attributes]]).encode())
        digest.update(np.ascontiguousarray(ann.boxes, dtype=np.float32).tobytes())
        digest.update(np.ascontiguousarray(ann.classes, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _folders(value) -> list:
    """One folder or a sequence of folders, as a list."""
    if isinstance(value, (str, os.PathLike)):
        return [value]
    return list(value)


def _eval_sets(folders: list, image_ids) -> list[tuple]:
    """(folder, image ids) pairs to evaluate on; empty without image ids."""
    if not image_ids:
        return []
    if len(folders) == 1 and all(isinstance(i, (int, np.integer)) for i in image_ids):
        return [(folders[0], [int(i) for i in image_ids])]
    if len(image_ids) != len(folders):
        raise ValueError(f"{len(folders)} evaluation folders but {len(image_ids)} lists of image ids")
    return [(folder, [int(i) for i in ids]) for folder, ids in zip(folders, image_ids) if ids]


def _changes(before: dict, after: dict, prefix: str) -> list[str]:
    out = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} then, {b!r} now")
    return out


def train_detector(vg_dir, out_path, *, preset: str = "demo", iterations: int = 2000, batch_size: int = 4,
                   seed: int = 0, image_ids: Optional[Sequence[int]] = None, log_every: int = 20,
                   checkpoint_every: int = 250, time_limit_s: Optional[float] = None,
                   eval_image_ids: Optional[Sequence[int]] = None, eval_every: Optional[int] = None,
                   eval_vg_dir=None, config: Optional[DetectorConfig] = None,
                   settings: Optional[TrainSettings] = None, half: bool = True, log=print,
                   return_model: bool = False, init_weights=None, resume: bool = False,
                   stored_classes: str = "all", **overrides):
    """Train a detector on a VG-format folder and write its checkpoint to ``out_path``: a
    :class:`DetectorTrainer` run in one call (see it for the arguments and the files).

    overrides: TrainSettings fields (lr, rois_per_image, warmup_iterations, threads, ...).
    ``resume``: continue the interrupted run at ``out_path`` instead of starting afresh.
    Returns the log record (and the trained model in eval mode when ``return_model``).
    """
    settings = dataclasses.replace(settings or TrainSettings(), iterations=int(iterations),
                                   batch_size=int(batch_size), seed=int(seed), **overrides)
    trainer = DetectorTrainer(vg_dir, out_path, config=config, preset=preset, settings=settings,
                              image_ids=image_ids, eval_vg_dir=eval_vg_dir, eval_image_ids=eval_image_ids,
                              eval_every=eval_every, log_every=log_every, checkpoint_every=checkpoint_every,
                              half=half, init_weights=init_weights, stored_classes=stored_classes, log=log)
    if resume:
        trainer.resume()
    record = trainer.run(time_limit_s=time_limit_s)
    if return_model:
        return record, trainer.model.eval()
    return record


def export_model(model: FasterRCNN, path, *, half: bool = True) -> str:
    """Write the trained weights in the inference layout (strict-loadable); returns sha256."""
    return save_checkpoint(model, path, half=half)


def _config_overrides(config: DetectorConfig) -> dict:
    """The fields of ``config`` that differ from its preset (so load_detector rebuilds it)."""
    base = make_config(config.preset).to_dict()
    mine = config.to_dict()
    out = {k: v for k, v in mine.items() if k not in ("arch", "config_version", "preset", "dtype") and base.get(k) != v}
    out.update({k: v for k, v in mine["arch"].items() if base["arch"].get(k) != v})
    return out
