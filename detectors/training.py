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
    logit). ``rois_per_image`` sampled at up to ``roi_positive_fraction`` foreground.
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
running_var at ``INPUT_STD**2``) and learns only scale/shift — it trained markedly slower.
The last norm of every residual branch starts at weight 0. Everything lives in the same
state-dict entries, so the checkpoint loads into the inference model with the strict
loader and gives the same outputs as the trained model in eval mode (tested).

Optimiser: AdamW with linear warmup and a cosine decay; horizontal flips; batches of a
few images padded bottom/right (the backbone masks the padding exactly as at inference).

Entry point::

    python -m vlp.detectors.training --world DIR --out PATH --iterations N --seed S
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from vlp.detectors.checkpoint import save_checkpoint
from vlp.detectors.config import DetectorConfig, make_config
from vlp.detectors.inference import prepare_image
from vlp.detectors.model import FasterRCNN, FrozenBatchNorm2d, ResNetC4, select_proposals

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
    attr_loss_weight: float = 1.0
    flip: bool = True
    # "batchnorm": batch statistics while training, running statistics exported (the
    # frozen norms of the inference model); "affine": fixed statistics, learnable scale/shift.
    norm: str = "batchnorm"
    seed: int = 0
    threads: int = 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class Annotation:
    """One image's ground truth: boxes x1 y1 x2 y2 (pixels), VG class ids, attribute ids."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 [G, 4]
    classes: np.ndarray  # int64 [G]
    attributes: list  # per object: list of VG attribute ids, primary first

    @property
    def primary_attributes(self) -> np.ndarray:
        """[G] the first attribute id of each object, -1 when it has none."""
        return np.asarray([a[0] if a else -1 for a in self.attributes], dtype=np.int64)


def _image_id(entry: dict) -> int:
    return int(entry["image_id"] if "image_id" in entry else entry["id"])


def load_vg_annotations(vg_dir, image_ids: Optional[Sequence[int]] = None) -> list[Annotation]:
    """Read VG objects.json / attributes.json / image_data.json and resolve images/<id>.jpg.

    Object names map to class ids with ``vocab.objects().id(names[0])``, attribute names
    with ``vocab.attributes().id``; names outside the vocabularies are dropped (objects
    with an unknown name are skipped). ``image_ids``: which images (default: all).
    """
    from vlp.schemas import vocab

    root = Path(vg_dir)
    objects_vocab, attributes_vocab = vocab.objects(), vocab.attributes()
    sizes = {_image_id(e): (int(e["width"]), int(e["height"]))
             for e in json.loads((root / "image_data.json").read_text("utf-8"))}
    attrs_by_object = {}
    attr_file = root / "attributes.json"
    if attr_file.is_file():
        for entry in json.loads(attr_file.read_text("utf-8")):
            for obj in entry.get("attributes", []):
                attrs_by_object[int(obj["object_id"])] = [attributes_vocab.id(a) for a in obj.get("attributes") or []
                                                          if a in attributes_vocab]
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    out = {}
    for entry in json.loads((root / "objects.json").read_text("utf-8")):
        image_id = _image_id(entry)
        if wanted is not None and image_id not in wanted:
            continue
        boxes, classes, attributes = [], [], []
        for obj in entry.get("objects", []):
            names = obj.get("names") or ([obj["name"]] if "name" in obj else [])
            if not names or names[0] not in objects_vocab:
                continue
            x, y, w, h = (float(obj[k]) for k in ("x", "y", "w", "h"))
            if w <= 0 or h <= 0:
                continue
            boxes.append([x, y, x + w, y + h])
            classes.append(objects_vocab.id(names[0]))
            attributes.append(attrs_by_object.get(int(obj["object_id"]), []))
        path = _image_path(root, image_id)
        width, height = sizes.get(image_id, (0, 0))
        out[image_id] = Annotation(image_id, path, width, height,
                                   np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                                   np.asarray(classes, dtype=np.int64), attributes)
    missing = sorted(wanted - set(out)) if wanted is not None else []
    if missing:
        raise ValueError(f"{root}: no objects.json entry for image ids {missing[:10]}")
    return [out[i] for i in sorted(out)]


def _image_path(root: Path, image_id: int) -> Path:
    for name in (f"images/{image_id}.jpg", f"images/{image_id}.png", f"{image_id}.jpg"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{root}: no image file for image id {image_id} (looked for images/{image_id}.jpg)")


def split_image_ids(vg_dir, split: str = "train") -> Optional[list[int]]:
    path = Path(vg_dir) / "splits.json"
    if not path.is_file():
        return None
    return [int(i) for i in json.loads(path.read_text("utf-8"))[split]]


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
    boxes = ann.boxes.copy()
    if flip:
        image = np.ascontiguousarray(image[:, ::-1])
        width = image.shape[1]
        boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
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


def sample_rois(proposals: torch.Tensor, gt: TrainImage, settings: TrainSettings, num_classes: int,
                generator: torch.Generator):
    """Proposals + GT boxes, matched and sampled. Returns (rois, labels, matched GT index)."""
    rois = torch.cat([proposals, gt.boxes])
    labels, matched = match_rois(rois, gt.boxes, gt.classes, background=num_classes,
                                 foreground_iou=settings.roi_foreground_iou)
    pos, neg = subsample(labels, settings.rois_per_image, settings.roi_positive_fraction,
                         positive=lambda x: x != num_classes, negative=lambda x: x == num_classes,
                         generator=generator)
    keep = torch.cat([pos, neg])
    return rois[keep], labels[keep], matched[keep]


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
        fh, fw = ResNetC4.feature_size(*im.size)
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


def export_model(model: FasterRCNN, path, *, half: bool = True) -> str:
    """Write the trained weights in the inference layout (strict-loadable); returns sha256."""
    return save_checkpoint(model, path, half=half)


def train_detector(vg_dir, out_path, *, preset: str = "demo", iterations: int = 2000, batch_size: int = 4,
                   seed: int = 0, image_ids: Optional[Sequence[int]] = None, log_every: int = 20,
                   checkpoint_every: int = 250, time_limit_s: Optional[float] = None,
                   eval_image_ids: Optional[Sequence[int]] = None, eval_every: Optional[int] = None,
                   eval_vg_dir=None,
                   config: Optional[DetectorConfig] = None, settings: Optional[TrainSettings] = None,
                   half: bool = True, log=print, return_model: bool = False, init_weights=None, **overrides):
    """Train a detector on a VG-format folder and write its checkpoint to ``out_path``.

    vg_dir: folder with objects.json, attributes.json, image_data.json, images/<id>.jpg
        (and splits.json: the default ``image_ids`` are its train split, else every image).
    preset / config: the architecture and input settings (``config`` wins when given).
    overrides: TrainSettings fields (lr, rois_per_image, ...).
    Writes ``out_path`` (fp16 unless ``half=False``) every ``checkpoint_every`` iterations
    and at the end, ``<out_path>.log.json`` (settings, losses, evaluations) alongside, and,
    when ``eval_image_ids`` are given (images of ``eval_vg_dir``, default ``vg_dir``), evaluates every ``eval_every`` iterations and also
    keeps the best checkpoint so far as ``<stem>.best<suffix>``. Stops early at
    ``time_limit_s`` (the checkpoint is written). Deterministic given ``seed`` (CPU torch).
    ``init_weights``: a checkpoint of the same architecture to start from (fine-tuning or
    continuing a run; the optimiser state starts afresh, with the warmup).
    Returns the log dict (and the trained model in eval mode when ``return_model``).
    """
    settings = dataclasses.replace(settings or TrainSettings(), iterations=int(iterations),
                                   batch_size=int(batch_size), seed=int(seed), **overrides)
    config = config or make_config(preset)
    torch.set_num_threads(settings.threads)
    torch.manual_seed(seed)
    random.seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    if image_ids is None:
        image_ids = split_image_ids(vg_dir, "train")
    annotations = [a for a in load_vg_annotations(vg_dir, image_ids) if a.boxes.shape[0] > 0]
    if not annotations:
        raise ValueError(f"{vg_dir}: no training images with objects")
    model = build_training_model(config, seed, settings.norm)
    if init_weights is not None:
        from vlp.detectors.checkpoint import match_state_dict, read_checkpoint
        state, _ = match_state_dict(read_checkpoint(init_weights), model, source=str(init_weights))
        model.load_state_dict(state, strict=True)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    best_path = out_path.with_name(out_path.stem + ".best" + out_path.suffix)
    log_path = out_path.with_name(out_path.name + ".log.json")
    record = {"vg_dir": os.fspath(vg_dir), "init_weights": None if init_weights is None else os.fspath(init_weights),
              "preset": config.preset, "config": config.to_dict(),
              "settings": settings.to_dict(), "num_train_images": len(annotations),
              "num_parameters": sum(p.numel() for p in model.state_dict().values()),
              "losses": [], "evaluations": [], "checkpoints": []}
    started = time.perf_counter()
    order: list[int] = []
    window: dict[str, list[float]] = {}
    best_score = -1.0
    iteration = 0

    def write_log():
        tmp = log_path.with_name(log_path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1), "utf-8")
        os.replace(tmp, log_path)

    def checkpoint(it):
        sha = export_model(model, out_path, half=half)
        record["checkpoints"].append({"iteration": it, "sha256": sha,
                                      "seconds": round(time.perf_counter() - started, 1)})
        return sha

    def evaluate(it):
        nonlocal best_score
        from vlp.detectors.evaluate import evaluate_detector
        from vlp.detectors.inference import load_detector
        model.eval()
        tmp = out_path.with_name(out_path.stem + ".eval" + out_path.suffix)
        export_model(model, tmp, half=half)
        detector = load_detector(tmp, preset=config.preset, device="cpu", **_config_overrides(config))
        result = evaluate_detector(detector, eval_vg_dir or vg_dir, eval_image_ids)
        model.train()
        score = result["mAP"] + result["attribute_accuracy"]
        entry = {"iteration": it, "mAP": result["mAP"], "attribute_accuracy": result["attribute_accuracy"],
                 "seconds": round(time.perf_counter() - started, 1)}
        record["evaluations"].append(entry)
        log(f"eval @ {it}: mAP@0.5 {result['mAP']:.4f}  attr acc {result['attribute_accuracy']:.4f}")
        if score > best_score:
            best_score = score
            os.replace(tmp, best_path)
            entry["best"] = True
        else:
            tmp.unlink()

    while iteration < settings.iterations:
        if time_limit_s is not None and time.perf_counter() - started > time_limit_s:
            log(f"time limit {time_limit_s:.0f} s reached at iteration {iteration}")
            record["stopped_early"] = iteration
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(iteration, settings)
        batch = []
        for _ in range(settings.batch_size):
            if not order:
                order = list(rng.permutation(len(annotations)))
            ann = annotations[order.pop()]
            flip = settings.flip and bool(rng.random() < 0.5)
            batch.append(load_train_image(ann, config, flip))
        losses = compute_losses(model, batch, settings, generator)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite loss at iteration {iteration}: "
                                     f"{ {k: float(v) for k, v in losses.items()} }")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
        iteration += 1
        for k, v in losses.items():
            window.setdefault(k, []).append(float(v.detach()))
        window.setdefault("total", []).append(float(total.detach()))
        if iteration % log_every == 0 or iteration == settings.iterations:
            entry = {"iteration": iteration, "lr": lr_at(iteration - 1, settings),
                     "seconds": round(time.perf_counter() - started, 1),
                     **{k: round(sum(v) / len(v), 5) for k, v in window.items()}}
            record["losses"].append(entry)
            window = {}
            log(" ".join(f"{k} {v}" for k, v in entry.items()))
            write_log()
        if checkpoint_every and iteration % checkpoint_every == 0 and iteration < settings.iterations:
            checkpoint(iteration)
        if eval_image_ids and eval_every and iteration % eval_every == 0 and iteration < settings.iterations:
            evaluate(iteration)
            write_log()
    record["iterations_done"] = iteration
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["sha256"] = checkpoint(iteration)
    if eval_image_ids:
        evaluate(iteration)
    write_log()
    if return_model:
        return record, model.eval()
    return record


def _config_overrides(config: DetectorConfig) -> dict:
    """The fields of ``config`` that differ from its preset (so load_detector rebuilds it)."""
    base = make_config(config.preset).to_dict()
    mine = config.to_dict()
    out = {k: v for k, v in mine.items() if k not in ("arch", "config_version", "preset", "dtype") and base.get(k) != v}
    out.update({k: v for k, v in mine["arch"].items() if base["arch"].get(k) != v})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlp.detectors.training",
                                     description="Train a Faster R-CNN detector on a VG-format world.")
    parser.add_argument("--world", required=True, help="VG-format folder (e.g. a vlp.synthetic world)")
    parser.add_argument("--out", required=True, help="checkpoint path (.pt)")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=TrainSettings.lr)
    parser.add_argument("--rois-per-image", type=int, default=TrainSettings.rois_per_image)
    parser.add_argument("--roi-positive-fraction", type=float, default=TrainSettings.roi_positive_fraction)
    parser.add_argument("--norm", choices=("batchnorm", "affine"), default=TrainSettings.norm)
    parser.add_argument("--warmup", type=int, default=TrainSettings.warmup_iterations)
    parser.add_argument("--init-weights", default=None, help="checkpoint to start from (continue a run)")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--time-limit", type=float, default=None, help="seconds")
    parser.add_argument("--eval-world", default=None, help="VG folder to evaluate on (default: --world)")
    parser.add_argument("--eval-split", default="test", help="split of the eval world (or 'all')")
    parser.add_argument("--eval-images", type=int, default=50, help="evaluate on the first N images of it")
    parser.add_argument("--eval-every", type=int, default=0, help="iterations between evaluations (0: only at the end)")
    parser.add_argument("--fp32", action="store_true", help="write float32 weights (default float16)")
    parser.add_argument("--threads", type=int, default=TrainSettings.threads,
                        help="torch CPU threads (torch.set_num_threads)")
    args = parser.parse_args(argv)
    eval_ids = None
    eval_world = args.eval_world or args.world
    if args.eval_images > 0:
        if args.eval_split == "all":
            eval_ids = [a.image_id for a in load_vg_annotations(eval_world)]
        else:
            eval_ids = split_image_ids(eval_world, args.eval_split)
        eval_ids = (eval_ids or [])[: args.eval_images] or None
    record = train_detector(args.world, args.out, preset=args.preset, iterations=args.iterations,
                            batch_size=args.batch_size, seed=args.seed, log_every=args.log_every,
                            checkpoint_every=args.checkpoint_every, time_limit_s=args.time_limit,
                            eval_image_ids=eval_ids, eval_every=args.eval_every or None, eval_vg_dir=eval_world,
                            half=not args.fp32, lr=args.lr, rois_per_image=args.rois_per_image,
                            roi_positive_fraction=args.roi_positive_fraction, norm=args.norm,
                            warmup_iterations=args.warmup, init_weights=args.init_weights, threads=args.threads)
    print(json.dumps({k: record[k] for k in ("iterations_done", "seconds", "sha256")}))
    if record["evaluations"]:
        print(json.dumps(record["evaluations"][-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
