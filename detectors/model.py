"""The bottom-up-attention Faster R-CNN (ResNet C4 + attribute head) in torch + torchvision ops.

Module and parameter names follow detectron2, so that ``state_dict()`` keys are exactly
those of the two checkpoints users have (HF ``unc-nlp/frcnn-vg-finetuned`` and
py-bottom-up-attention's ``faster_rcnn_from_caffe_attr.pkl``)::

    backbone.stem.conv1{.weight,.norm.*}
    backbone.res{2,3,4}.<i>.{shortcut,conv1,conv2,conv3}{.weight,.norm.*}
    proposal_generator.anchor_generator.cell_anchors.0
    proposal_generator.rpn_head.{conv,objectness_logits,anchor_deltas}.{weight,bias}
    roi_heads.res5.<i>.{shortcut,conv1,conv2,conv3}{.weight,.norm.*}
    roi_heads.box_predictor.{cls_score,bbox_pred,cls_embedding,fc_attr,attr_score}.*

The pieces are separate callables that return raw logits and deltas (``RPNHead``,
``Res5ROIHeads.box_features``, ``BoxPredictor.class_logits/box_deltas/attribute_logits``),
so a training-mode forward with losses can be built on them later; only inference is
implemented here (every norm is a frozen BatchNorm).

Batches are exact: images are padded bottom/right, and the padded region is set to zero
(what convolution padding supplies around a lone image) before every layer that mixes
neighbouring positions (the stem conv and max-pool, each 3x3 conv, the RPN conv and RoI
pooling), so every image's valid region sees exactly what it sees when run alone. The only remaining differences come from the convolution kernels'
floating-point summation order.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms, roi_align, roi_pool

from vlp.detectors.config import ArchitectureConfig

# Largest log-scale a box delta may apply (detectron2: a 16 px box grows to 1000 px at most).
SCALE_CLAMP = math.log(1000.0 / 16)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics: ``x * scale + shift`` (detectron2's FrozenBatchNorm2d)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_shift()
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class Conv2d(nn.Conv2d):
    """A conv with an optional frozen norm child (named ``norm``, as in detectron2).

    ``fold_norm()`` folds the norm into the conv weight and a bias (kept as
    non-persistent buffers, so ``state_dict()`` still holds the original values);
    ``unfold_norm()`` undoes it.
    """

    def __init__(self, *args, norm: Optional[nn.Module] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.register_buffer("folded_weight", None, persistent=False)
        self.register_buffer("folded_bias", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded_weight is not None:
            return F.conv2d(x, self.folded_weight, self.folded_bias, self.stride, self.padding,
                            self.dilation, self.groups)
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        return x

    @torch.no_grad()
    def fold_norm(self) -> None:
        if self.norm is None:
            return
        scale, shift = self.norm.scale_shift()
        weight = self.weight * scale.view(-1, 1, 1, 1)
        bias = shift if self.bias is None else self.bias * scale + shift
        self.folded_weight = weight.contiguous(memory_format=_memory_format(self.weight))
        self.folded_bias = bias.contiguous()

    def unfold_norm(self) -> None:
        self.folded_weight = None
        self.folded_bias = None


def _memory_format(t: torch.Tensor):
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class Bottleneck(nn.Module):
    """ResNet bottleneck; ``stride_in_1x1`` puts the stride on conv1 (MSRA / Caffe)."""

    def __init__(self, in_channels: int, bottleneck_channels: int, out_channels: int, *,
                 stride: int = 1, dilation: int = 1, stride_in_1x1: bool = True, eps: float = 1e-5):
        super().__init__()
        if in_channels != out_channels:
            self.shortcut = Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False,
                                   norm=FrozenBatchNorm2d(out_channels, eps))
        else:
            self.shortcut = None
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2d(in_channels, bottleneck_channels, kernel_size=1, stride=stride_1x1,
                            bias=False, norm=FrozenBatchNorm2d(bottleneck_channels, eps))
        self.conv2 = Conv2d(bottleneck_channels, bottleneck_channels, kernel_size=3, stride=stride_3x3,
                            padding=dilation, dilation=dilation, bias=False,
                            norm=FrozenBatchNorm2d(bottleneck_channels, eps))
        self.conv3 = Conv2d(bottleneck_channels, out_channels, kernel_size=1, bias=False,
                            norm=FrozenBatchNorm2d(out_channels, eps))

    def forward(self, x: torch.Tensor, masks: Optional["PadMasks"] = None) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        if masks is not None:
            out = masks.apply(out)
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out.add_(x if self.shortcut is None else self.shortcut(x))
        return F.relu_(out)


def make_stage(num_blocks: int, in_channels: int, bottleneck_channels: int, out_channels: int, *,
               first_stride: int, dilation: int, stride_in_1x1: bool, eps: float) -> nn.Sequential:
    blocks = []
    for i in range(num_blocks):
        blocks.append(Bottleneck(in_channels, bottleneck_channels, out_channels,
                                 stride=first_stride if i == 0 else 1, dilation=dilation,
                                 stride_in_1x1=stride_in_1x1, eps=eps))
        in_channels = out_channels
    return nn.Sequential(*blocks)


class PadMasks:
    """Zero-masks for the padded bottom/right region of each image in a padded batch.

    Holds each image's valid (height, width) at every resolution the backbone visits,
    keyed by the padded tensor's spatial shape (each resolution has its own shape).
    """

    def __init__(self):
        self.sizes: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self._cache: dict[tuple, torch.Tensor] = {}

    def add(self, shape: tuple[int, int], sizes: list[tuple[int, int]]) -> None:
        self.sizes.setdefault(tuple(shape), [tuple(s) for s in sizes])

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape[-2:])
        key = (shape, x.dtype, x.device)
        if key not in self._cache:
            if shape not in self.sizes:
                raise RuntimeError(f"no valid-size record for a padded {shape} feature map")
            m = torch.zeros((x.shape[0], 1) + shape, dtype=x.dtype, device=x.device)
            for i, (h, w) in enumerate(self.sizes[shape]):
                m[i, :, :h, :w] = 1
            self._cache[key] = m
        return self._cache[key]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask(x)


def conv_out_size(n: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (n + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def caffe_pool_out_size(n: int, kernel: int = 3, stride: int = 2) -> int:
    """Output size of max_pool2d(kernel, stride, padding=0, ceil_mode=True), PyTorch's rule."""
    out = -(-(n - kernel) // stride) + 1
    if (out - 1) * stride >= n:
        out -= 1
    return max(out, 1)


class BasicStem(nn.Module):
    """conv 7x7/2 + frozen BN + ReLU + Caffe max-pool (3x3/2, padding 0, ceil_mode)."""

    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=7, stride=2, padding=3, bias=False,
                            norm=FrozenBatchNorm2d(out_channels, eps))

    def forward(self, x: torch.Tensor, masks: Optional[PadMasks] = None) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        if masks is not None:
            x = masks.apply(x)  # post-ReLU values are >= 0, so max-pooling zeros is exact
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)


class ResNetC4(nn.Module):
    """Stem + res2..res4: stride 16, or 8 with ``res4_dilation=2`` (res4 keeps the res3
    grid and dilates its 3x3 convs, so each res4 cell sees what it saw at stride 16)."""

    def __init__(self, arch: ArchitectureConfig):
        super().__init__()
        eps = arch.frozen_bn_eps
        self.res4_stride = 2 // arch.res4_dilation
        self.stem = BasicStem(3, arch.stem_channels, eps)
        in_ch, bottleneck, out_ch = arch.stem_channels, arch.bottleneck_channels, arch.res2_channels
        strides = (1, 2, self.res4_stride)
        dilations = (1, 1, arch.res4_dilation)
        for index, name in enumerate(("res2", "res3", "res4")):
            self.add_module(name, make_stage(arch.blocks[index], in_ch, bottleneck, out_ch,
                                             first_stride=strides[index], dilation=dilations[index],
                                             stride_in_1x1=arch.stride_in_1x1, eps=eps))
            in_ch, bottleneck, out_ch = out_ch, bottleneck * 2, out_ch * 2
        self.out_channels = arch.res4_channels

    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """res4 (valid) size of an unpadded height x width input."""
        return tuple(_stage_sizes((height, width), self.res4_stride)[-1])

    def forward(self, x: torch.Tensor, image_sizes: Optional[list[tuple[int, int]]] = None):
        """x: [N,3,H,W] mean-subtracted, zero-padded; image_sizes: each image's (h, w).

        Returns (res4 features with the padded region zeroed, masks or None).
        """
        masks = None
        padded = (int(x.shape[-2]), int(x.shape[-1]))
        if image_sizes is not None and any(tuple(s) != padded for s in image_sizes):
            masks = PadMasks()
            masks.add(padded, [tuple(s) for s in image_sizes])
            per_image = [_stage_sizes(tuple(s), self.res4_stride) for s in image_sizes]
            for level, shape in enumerate(_stage_sizes(padded, self.res4_stride)):
                masks.add(shape, [sizes[level] for sizes in per_image])
            x = masks.apply(x)  # whatever the padding holds, the stem conv must read zeros
        x = self.stem(x, masks)
        for stage in (self.res2, self.res3, self.res4):
            for block in stage:
                x = block(x, masks)
        if masks is not None:
            x = masks.apply(x)  # RPN 3x3 conv and RoI pooling read beyond image borders
        return x, masks


def _stage_sizes(size: tuple[int, int], res4_stride: int = 2) -> list[tuple[int, int]]:
    """(h, w) after the stem conv, after the max-pool (res2), res3 and res4."""
    h, w = size
    out = []
    h, w = conv_out_size(h, 7, 2, 3), conv_out_size(w, 7, 2, 3)
    out.append((h, w))
    h, w = caffe_pool_out_size(h), caffe_pool_out_size(w)
    out.append((h, w))
    for stride in (2, res4_stride):  # res3, res4: one strided conv each (1x1 pad 0 or 3x3 pad 1: same size)
        h, w = (h - 1) // stride + 1, (w - 1) // stride + 1
        out.append((h, w))
    return out


# -- RPN -----------------------------------------------------------------------------


class _BufferList(nn.Module):
    """Buffers named 0, 1, ... (detectron2's BufferList, for ``cell_anchors.0`` keys)."""

    def __init__(self, buffers):
        super().__init__()
        for i, buffer in enumerate(buffers):
            self.register_buffer(str(i), buffer)

    def __getitem__(self, index: int) -> torch.Tensor:
        return getattr(self, str(index))

    def __len__(self) -> int:
        return len(self._buffers)


def generate_cell_anchors(sizes, ratios) -> torch.Tensor:
    """detectron2's layout: size-major, ratio-minor, centred on (0, 0), ratio = h / w."""
    anchors = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


class AnchorGenerator(nn.Module):
    def __init__(self, arch: ArchitectureConfig):
        super().__init__()
        self.stride = arch.feature_stride
        # The checkpoints carry this buffer; loading replaces it with their values.
        self.cell_anchors = _BufferList([generate_cell_anchors(arch.anchor_sizes, arch.anchor_ratios)])

    @property
    def num_anchors(self) -> int:
        return int(self.cell_anchors[0].shape[0])

    def grid_anchors(self, height: int, width: int) -> torch.Tensor:
        """[height * width * A, 4] anchors, location-major (matching the head's layout)."""
        cell = self.cell_anchors[0]
        device = cell.device
        xs = torch.arange(width, dtype=torch.float32, device=device) * self.stride
        ys = torch.arange(height, dtype=torch.float32, device=device) * self.stride
        sy, sx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([sx.reshape(-1), sy.reshape(-1), sx.reshape(-1), sy.reshape(-1)], dim=1)
        return (shifts[:, None, :] + cell.float()[None, :, :]).reshape(-1, 4)


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs to A objectness logits and 4A box deltas.

    ``dilation`` follows res4's, so the conv spans the same pixels at stride 8 as at 16."""

    def __init__(self, in_channels: int, hidden_channels: int, num_anchors: int, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden_channels, kernel_size=3, padding=dilation, dilation=dilation)
        self.objectness_logits = nn.Conv2d(hidden_channels, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(hidden_channels, num_anchors * 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = F.relu(self.conv(x))
        return self.objectness_logits(t), self.anchor_deltas(t)


class RPN(nn.Module):
    def __init__(self, arch: ArchitectureConfig):
        super().__init__()
        self.anchor_generator = AnchorGenerator(arch)
        self.rpn_head = RPNHead(arch.res4_channels, arch.rpn_channels, arch.num_anchors, arch.res4_dilation)

    def forward(self, features: torch.Tensor, feature_sizes: list[tuple[int, int]],
                image_sizes: list[tuple[int, int]], *, pre_nms_topk: int, nms_threshold: float,
                post_nms_topk: int, min_size: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image: (proposal boxes [R,4] in input pixels, objectness logits [R]), best first."""
        logits, deltas = self.rpn_head(features)
        num_anchors = self.anchor_generator.num_anchors
        results = []
        for i, ((fh, fw), (ih, iw)) in enumerate(zip(feature_sizes, image_sizes)):
            # (A, H, W) -> (H, W, A): the anchors' location-major order.
            lg = logits[i, :, :fh, :fw].permute(1, 2, 0).reshape(-1).float()
            dl = deltas[i, :, :fh, :fw].reshape(num_anchors, 4, fh, fw).permute(2, 3, 0, 1).reshape(-1, 4).float()
            anchors = self.anchor_generator.grid_anchors(fh, fw)
            results.append(select_proposals(anchors, lg, dl, (ih, iw), pre_nms_topk=pre_nms_topk,
                                            nms_threshold=nms_threshold, post_nms_topk=post_nms_topk,
                                            min_size=min_size))
        return results


def apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """detectron2's Box2BoxTransform.apply_deltas for [R, 4k] deltas on [R, 4] boxes."""
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=SCALE_CLAMP)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=SCALE_CLAMP)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    out = torch.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                       pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h], dim=2)
    return out.reshape(deltas.shape)


def clip_boxes(boxes: torch.Tensor, height: float, width: float) -> torch.Tensor:
    x1 = boxes[..., 0].clamp(0, width)
    y1 = boxes[..., 1].clamp(0, height)
    x2 = boxes[..., 2].clamp(0, width)
    y2 = boxes[..., 3].clamp(0, height)
    return torch.stack([x1, y1, x2, y2], dim=-1)


def ordered_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS with a deterministic order: score descending, ties by lower index first.

    Returns kept indices, best first. (torchvision's nms sorts internally; the order of
    tied scores is not specified there.)
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = stable_argsort_desc(scores)
    rank = torch.arange(order.numel(), 0, -1, dtype=torch.float32, device=boxes.device)
    keep = nms(boxes[order].float(), rank, float(iou_threshold))
    return order[keep]


def stable_argsort_desc(values: torch.Tensor) -> torch.Tensor:
    return torch.sort(values, descending=True, stable=True).indices


def select_proposals(anchors, logits, deltas, image_size, *, pre_nms_topk, nms_threshold, post_nms_topk,
                     min_size) -> tuple[torch.Tensor, torch.Tensor]:
    """detectron2's find_top_rpn_proposals for one image and one level."""
    height, width = image_size
    k = min(int(pre_nms_topk), logits.numel())
    order = stable_argsort_desc(logits)[:k]
    scores = logits[order]
    boxes = apply_deltas(deltas[order], anchors[order])
    boxes = clip_boxes(boxes, height, width)
    keep = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
    keep &= ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size)
    boxes, scores = boxes[keep], scores[keep]
    keep = ordered_nms(boxes, scores, nms_threshold)[: int(post_nms_topk)]
    return boxes[keep], scores[keep]


# -- RoI heads -----------------------------------------------------------------------


class BoxPredictor(nn.Module):
    """Class logits (background LAST), class-specific box deltas, attribute logits."""

    def __init__(self, arch: ArchitectureConfig):
        super().__init__()
        dim = arch.feature_dim
        self.num_classes = arch.num_classes
        self.cls_score = nn.Linear(dim, arch.num_classes + 1)
        self.bbox_pred = nn.Linear(dim, arch.num_classes * 4)
        self.cls_embedding = nn.Embedding(arch.num_classes + 1, arch.cls_embedding_dim)
        self.fc_attr = nn.Linear(dim + arch.cls_embedding_dim, arch.attr_hidden_dim)
        self.attr_score = nn.Linear(arch.attr_hidden_dim, arch.num_attributes + 1)

    def class_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.cls_score(features)

    def box_deltas(self, features: torch.Tensor) -> torch.Tensor:
        return self.bbox_pred(features)

    def attribute_logits(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """classes: the class fed to the embedding (at test time, the argmax over all
        1601 logits, background included, as in the Caffe model and both ports)."""
        x = torch.cat([features, self.cls_embedding(classes).to(features.dtype)], dim=-1)
        return self.attr_score(F.relu(self.fc_attr(x)))

    def forward(self, features: torch.Tensor):
        scores = self.class_logits(features)
        attr = self.attribute_logits(features, scores.argmax(dim=-1))
        return scores, attr, self.box_deltas(features)


class Res5ROIHeads(nn.Module):
    """RoIPool 14x14 at 1/16 on res4, res5 (stride 1, dilated), average pool, predictor."""

    def __init__(self, arch: ArchitectureConfig):
        super().__init__()
        self.pooler_resolution = arch.pooler_resolution
        self.pooler = arch.pooler
        self.spatial_scale = 1.0 / arch.feature_stride
        dilation = arch.res5_dilation
        self.res5 = make_stage(arch.blocks[3], arch.res4_channels, arch.bottleneck_channels * 8,
                               arch.feature_dim, first_stride=1 if dilation == 2 else 2, dilation=dilation,
                               stride_in_1x1=arch.stride_in_1x1, eps=arch.frozen_bn_eps)
        self.box_predictor = BoxPredictor(arch)
        # Inference knobs (not part of the model's outputs): RoIs per res5 call, skipping
        # RoIs whose pooled input is identical, channels-last for res5.
        self.roi_chunk_size: Optional[int] = None
        self.dedupe_rois = False
        self.channels_last = False

    def pool(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """rois: [K, 5] (batch index, x1, y1, x2, y2) in input pixels; pooled in float32."""
        if self.pooler == "roialign":
            pooled = roi_align(features.float(), rois.float(), self.pooler_resolution, self.spatial_scale,
                               sampling_ratio=0, aligned=True)
            return pooled.to(features.dtype)
        pooled = roi_pool(features.float(), rois.float(), self.pooler_resolution, self.spatial_scale)
        return pooled.to(features.dtype)

    def pooled_key(self, rois: torch.Tensor) -> torch.Tensor:
        """The integer feature-map box RoIPool actually reads (std::round of coord * scale)."""
        v = rois[:, 1:].float() * self.spatial_scale  # exact: the scale is a power of two
        fl = torch.floor(v)
        r = torch.where(v - fl >= 0.5, fl + 1, fl)  # round half away from zero (v >= 0 here)
        r = torch.where(v < 0, -torch.floor(-v + 0.5), r)
        return torch.cat([rois[:, :1].round(), r], dim=1).to(torch.int64)

    def box_features(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """Pooled res5 features [K, feature_dim] of each RoI."""
        if rois.shape[0] == 0:
            return features.new_zeros((0, self.box_predictor.cls_score.in_features))
        inverse = None
        if self.dedupe_rois and rois.shape[0] > 1 and self.pooler == "roipool":
            keys = self.pooled_key(rois)
            unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
            if unique.shape[0] < rois.shape[0]:
                first = torch.full((unique.shape[0],), rois.shape[0], dtype=torch.long, device=rois.device)
                first.scatter_reduce_(0, inverse, torch.arange(rois.shape[0], device=rois.device), "amin")
                rois = rois[first]
            else:
                inverse = None
        chunk = self.roi_chunk_size or rois.shape[0]
        outs = []
        for start in range(0, rois.shape[0], chunk):
            x = self.pool(features, rois[start:start + chunk])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x = self.res5(x)
            outs.append(x.mean(dim=(2, 3)))
        pooled = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
        if inverse is not None:
            pooled = pooled[inverse]
        return pooled


class FasterRCNN(nn.Module):
    """backbone (res4) + proposal_generator (RPN) + roi_heads (res5 + predictors)."""

    def __init__(self, arch: ArchitectureConfig):
        super().__init__()
        self.arch = arch
        self.backbone = ResNetC4(arch)
        self.proposal_generator = RPN(arch)
        self.roi_heads = Res5ROIHeads(arch)

    def conv_modules(self):
        return [m for m in self.modules() if isinstance(m, Conv2d)]

    def fold_norms(self) -> "FasterRCNN":
        """Fold every frozen BN into its conv (inference speed-up; state_dict unchanged)."""
        for m in self.conv_modules():
            m.fold_norm()
        return self

    def unfold_norms(self) -> "FasterRCNN":
        for m in self.conv_modules():
            m.unfold_norm()
        return self


@torch.no_grad()
def init_random_weights(model: FasterRCNN, seed: int = 0) -> FasterRCNN:
    """Deterministic random weights that keep activations in a sane range.

    For tests and timing only (``allow_random=True``): convs He-normal, frozen norms
    with random statistics near identity, last norm of each residual branch scaled
    down so 30+ blocks stay bounded, linear layers scaled so logits spread over a few
    units (detections with a range of confidences).
    """
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=g) * std

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
            m.weight.copy_(normal(m.weight.shape, math.sqrt(2.0 / fan_in)))
            if m.bias is not None:
                m.bias.copy_(normal(m.bias.shape, 0.1))
        if isinstance(m, FrozenBatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(normal((n,), 0.1))
            m.running_var.copy_(1.0 + torch.rand((n,), generator=g) * 0.2)
            m.weight.copy_(1.0 + normal((n,), 0.1))
            m.bias.copy_(normal((n,), 0.1))
            if name.endswith("conv3.norm"):
                m.weight.mul_(0.2)
        if isinstance(m, nn.Linear):
            m.weight.copy_(normal(m.weight.shape, 1.0 / math.sqrt(m.in_features)))
            m.bias.copy_(normal(m.bias.shape, 0.1))
        if isinstance(m, nn.Embedding):
            m.weight.copy_(normal(m.weight.shape, 1.0))
    # Inputs are mean-subtracted pixels (about +-128, no std division): scale the stem.
    model.backbone.stem.conv1.weight.div_(64.0)
    head = model.proposal_generator.rpn_head
    head.objectness_logits.weight.mul_(0.5)
    head.anchor_deltas.weight.mul_(0.05)
    head.anchor_deltas.bias.zero_()
    predictor = model.roi_heads.box_predictor
    predictor.cls_score.weight.mul_(4.0)
    predictor.bbox_pred.weight.mul_(0.1)
    return model
