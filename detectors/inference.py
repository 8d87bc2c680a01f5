"""The Detector: images in, validated FeatureRecords out.

Input convention: ``detect`` takes uint8 ``H x W x 3`` arrays in **BGR** order (what
``cv2.imread`` returns), the order the Caffe-trained weights expect. Arrays in RGB order
(PIL, imageio, skimage) are passed with ``color="rgb"`` and are flipped to BGR first; the
two give identical results. 2-D grayscale arrays are accepted and replicated to 3 channels.

Batching: images are grouped by aspect ratio (so that padding stays small), padded
bottom/right with zeros after mean subtraction, and run together; results come back in
input order. The backbone zeroes the padded region before every layer that mixes
neighbouring positions and anchors/proposals are generated and clipped per image, so a
batched image gets the same result as the image run alone, up to the floating-point
summation order of the convolution kernels. Stated tolerance (enforced by the tests):
same number of boxes and labels, boxes within 1e-3 px, float32 features within 1e-4 of
their largest magnitude. Measured on CPU fp32 (R101, 480x640 + 600x1000 + 700x500 in one
batch): bit-identical.

Speed knobs that keep the outputs (to float rounding): frozen BN folded into the convs,
channels-last convolutions, res5 run once per distinct RoIPool input and in chunks of
RoIs (bounded memory). ``dtype="bfloat16"`` (autocast) is faster on GPUs (and on CPUs
with AVX512-BF16) at a per-box cosine similarity to fp32 of about 0.9999.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from vlp.detectors.checkpoint import GET_WEIGHTS_HELP, check_checkpoint, load_weights
from vlp.detectors.config import DetectorConfig, make_config
from vlp.detectors.errors import MissingWeightsError, ShippedWeightsError
from vlp.detectors.model import FasterRCNN, apply_deltas, clip_boxes, init_random_weights
from vlp.detectors.postprocess import NMS_METHODS, agnostic_loop_select, butd_select
from vlp.schemas.shards import sha256_file
from vlp.schemas.record import BOX_BORDER_TOLERANCE, MAX_BOXES, FeatureRecord

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Smallest resized side the stem's ceil-mode max-pool can take.
MIN_RESIZED_SIDE = 8
# File names looked for when ``weights`` is a directory.
WEIGHT_FILE_NAMES = ("pytorch_model.bin", "faster_rcnn_from_caffe_attr.pkl")


#: Weights shipped inside the package, by preset: file name under WEIGHTS_DIR and its sha256.
#: See detectors/weights/README.md for how each file was trained.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED_WEIGHTS = {
    "demo": ("demo-detector.pt", "815c02c6052a51391967f8a11640aa9cd7c0d4d4cb7e9b2b932850741d013f6e"),
}


def shipped_weights_path(preset: str) -> Path:
    """The verified path of the weights shipped for ``preset`` (sha256 checked)."""
    name, expected = SHIPPED_WEIGHTS[preset]
    path = WEIGHTS_DIR / name
    if not path.is_file():
        raise ShippedWeightsError(f"the {preset!r} detector weights {path} are missing from the installed "
                                  f"package (expected sha256 {expected}); reinstall vlp")
    actual = sha256_file(path)
    if actual != expected:
        raise ShippedWeightsError(f"{path}: sha256 mismatch for the shipped {preset!r} detector weights: "
                                  f"expected {expected}, got {actual}; the file is damaged or was replaced "
                                  f"(reinstall vlp, or retrain it as detectors/weights/README.md says)")
    return path


@dataclasses.dataclass
class PreparedImage:
    """One image resized and normalised for the network."""

    tensor: torch.Tensor  # [3, h, w] float32, BGR minus pixel mean
    original_size: tuple[int, int]  # (H, W) of the input image
    size: tuple[int, int]  # (h, w) after resizing
    scale: tuple[float, float]  # (sx, sy): network pixels = original pixels * scale
    # The further readings of the config's ``extra_min_sizes``, in that order (each with
    # no further readings of its own).
    extra: tuple = ()


def to_bgr(image: np.ndarray, color: str = "bgr", *, index: Optional[int] = None) -> np.ndarray:
    """Validate an image array and return it as contiguous uint8 H x W x 3 BGR."""
    where = "image" if index is None else f"image {index}"
    if color not in ("bgr", "rgb"):
        raise ValueError(f"color must be 'bgr' or 'rgb', got {color!r}")
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{where}: expected a numpy array (H x W x 3, uint8), got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{where}: expected dtype uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: expected shape H x W x 3 (or H x W grayscale), got {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{where}: empty image of shape {image.shape}")
    if color == "rgb":
        image = image[:, :, ::-1]
    return np.ascontiguousarray(image)


def resized_size(height: int, width: int, config: DetectorConfig) -> tuple[int, int, float]:
    """(h, w, scale) the preset's resize rule gives for an image of height x width."""
    short, long = min(height, width), max(height, width)
    if config.resize == "cv2":  # Caffe's prep_im_for_blob; cv2 rounds fx * size
        scale = float(config.min_size) / float(short)
        if np.round(scale * long) > config.max_size:
            scale = float(config.max_size) / float(long)
        return int(round(height * scale)), int(round(width * scale)), scale
    # detectron2 ResizeShortestEdge (HF demo)
    scale = config.min_size * 1.0 / short
    if height < width:
        new_h, new_w = config.min_size, scale * width
    else:
        new_h, new_w = scale * height, config.min_size
    if max(new_h, new_w) > config.max_size:
        shrink = config.max_size * 1.0 / max(new_h, new_w)
        new_h, new_w, scale = new_h * shrink, new_w * shrink, scale * shrink
    return int(new_h + 0.5), int(new_w + 0.5), scale


def extra_reading_configs(config: DetectorConfig) -> list[DetectorConfig]:
    """One config per ``extra_min_sizes`` entry: that shortest side, the longest-side cap
    scaled by the same factor, no further readings."""
    return [dataclasses.replace(config, min_size=size, max_size=int(round(config.max_size * size / config.min_size)),
                                extra_min_sizes=()) for size in config.extra_min_sizes]


def one_reading(config: DetectorConfig) -> DetectorConfig:
    """The config without further readings: given boxes are read at ``min_size`` alone."""
    return dataclasses.replace(config, extra_min_sizes=()) if config.extra_min_sizes else config


def prepare_image(image_bgr: np.ndarray, config: DetectorConfig, *, index: Optional[int] = None) -> PreparedImage:
    """Resize and mean-subtract one validated BGR uint8 image per the config (and once more
    per ``extra_min_sizes`` entry, in ``extra``)."""
    extra = tuple(prepare_image(image_bgr, reading, index=index) for reading in extra_reading_configs(config))
    height, width = image_bgr.shape[:2]
    new_h, new_w, scale = resized_size(height, width, config)
    if min(new_h, new_w) < MIN_RESIZED_SIDE:
        where = "image" if index is None else f"image {index}"
        raise ValueError(f"{where}: {width}x{height} becomes {new_w}x{new_h} after resizing "
                         f"(min_size={config.min_size}, max_size={config.max_size}); too elongated "
                         f"to run (each side must stay >= {MIN_RESIZED_SIDE} px)")
    mean = np.asarray(config.arch.pixel_mean, dtype=np.float32)
    if config.resize == "cv2":
        # Caffe subtracts the mean from the float image, then resizes it.
        im = image_bgr.astype(np.float32) - mean
        im = cv2.resize(im, None, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    else:
        im = np.asarray(Image.fromarray(image_bgr).resize((new_w, new_h), Image.BILINEAR))
        im = im.astype(np.float32) - mean
    h, w = im.shape[:2]
    if config.box_rescale == "scale":
        sx = sy = float(scale)
    else:
        sx, sy = w / float(width), h / float(height)
    tensor = torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1)))
    return PreparedImage(tensor, (height, width), (h, w), (sx, sy), extra)


def mirror_boxes(boxes, width: float):
    """[N, 4] x0, y0, x1, y1 boxes of an image ``width`` pixels wide, mirrored left-right: a
    new tensor or array of the same kind (torch for the mirrored reading, numpy for training's
    flips)."""
    mirrored = boxes[:, [2, 1, 0, 3]]  # a copy, x0 and x1 swapped
    mirrored[:, [0, 2]] = width - mirrored[:, [0, 2]]
    return mirrored


def _join_before_last(first: torch.Tensor, more: torch.Tensor, keep_last: bool) -> torch.Tensor:
    """``first`` then ``more``; with ``keep_last`` the last row of ``first`` (the whole image)
    stays last."""
    if keep_last:
        return torch.cat([first[:-1], more, first[-1:]])
    return torch.cat([first, more])


def resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Detector:
    """A loaded detector with its effective configuration.

    Attributes used by the extraction pipeline: ``config`` (JSON-able dict),
    ``config_hash``, ``weights_sha256`` (None for random weights), ``feature_dim``.
    """

    def __init__(self, model: FasterRCNN, config: DetectorConfig, *, device="auto",
                 weights_sha256: Optional[str] = None, weights_path: Optional[str] = None,
                 batch_size: Optional[int] = None, channels_last: Optional[bool] = None,
                 fold_norms: bool = True, dedupe_rois: bool = True, roi_chunk_size="auto",
                 nms_method: str = "auto"):
        self.detector_config = config.validate()
        self.device = resolve_device(device)
        self.dtype = _DTYPES[config.dtype]
        self.weights_sha256 = weights_sha256
        self.weights_path = weights_path
        self.batch_size = int(batch_size) if batch_size else (8 if self.device.type == "cuda" else 1)
        self.channels_last = True if channels_last is None else bool(channels_last)
        if nms_method not in NMS_METHODS:
            raise ValueError(f"nms_method must be one of {', '.join(NMS_METHODS)}, got {nms_method!r}")
        self.nms_method = nms_method
        model = model.eval().to(self.device)
        model.unfold_norms()
        if fold_norms:
            model.fold_norms()
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        model.roi_heads.channels_last = self.channels_last
        model.roi_heads.dedupe_rois = bool(dedupe_rois)
        if roi_chunk_size == "auto":  # CPU: small chunks bound memory at no cost; GPU: big GEMMs
            roi_chunk_size = 1024 if self.device.type == "cuda" else 50
        model.roi_heads.roi_chunk_size = roi_chunk_size
        self.model = model

    # -- description -------------------------------------------------------------

    @property
    def config(self) -> dict:
        return self.detector_config.to_dict()

    @property
    def config_hash(self) -> str:
        return self.detector_config.config_hash()

    @property
    def preset(self) -> str:
        return self.detector_config.preset

    @property
    def feature_dim(self) -> int:
        return self.detector_config.arch.feature_dim

    def describe(self) -> dict:
        """What a manifest records about the detector."""
        return {"preset": self.preset, "config": self.config, "config_hash": self.config_hash,
                "weights_sha256": self.weights_sha256, "feature_dim": self.feature_dim}

    def __repr__(self) -> str:
        return (f"Detector(preset={self.preset!r}, device={self.device}, dtype={self.detector_config.dtype}, "
                f"config_hash={self.config_hash}, weights_sha256={self.weights_sha256!r})")

    # -- public API ------------------------------------------------------------------

    def detect(self, images, image_ids: Optional[Sequence] = None, *, color: str = "bgr",
               batch_size: Optional[int] = None) -> list[FeatureRecord]:
        """Detect regions in each image; one validated FeatureRecord per image, in input order.

        images: a list of uint8 H x W x 3 arrays (BGR unless ``color="rgb"``), any sizes
            (a single H x W x 3 array is taken as a list of one).
        image_ids: one id per image (default: "0", "1", ... by position).
        Every image is checked before any is run: a bad one raises ValueError naming its
        position, and nothing is returned for the others.
        """
        if isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.dtype == np.uint8:
            images = [images]
        images = list(images)
        ids = self._ids(image_ids, len(images))
        bgr = [to_bgr(im, color, index=i) for i, im in enumerate(images)]
        readings = [self.detector_config, *extra_reading_configs(self.detector_config)]
        for i, im in enumerate(bgr):
            for reading in readings:
                h, w, _ = resized_size(*im.shape[:2], reading)
                if min(h, w) < MIN_RESIZED_SIDE:
                    prepare_image(im, reading, index=i)  # raises with the reason
        return self._run_batches(
            [im.shape[0] / im.shape[1] for im in bgr],
            lambda i: prepare_image(bgr[i], self.detector_config, index=i), ids, batch_size)

    def prepare(self, image: np.ndarray, *, color: str = "bgr") -> PreparedImage:
        """Validate, resize and normalise one image (CPU work; picklable result), so that
        decoding/resizing can run in other processes than ``detect_prepared``."""
        return prepare_image(to_bgr(image, color), self.detector_config)

    def detect_prepared(self, prepared: Sequence[PreparedImage], image_ids: Optional[Sequence] = None, *,
                        batch_size: Optional[int] = None) -> list[FeatureRecord]:
        """``detect`` for images already passed through ``prepare`` (same config)."""
        prepared = list(prepared)
        ids = self._ids(image_ids, len(prepared))
        return self._run_batches([p.original_size[0] / p.original_size[1] for p in prepared],
                                 lambda i: prepared[i], ids, batch_size)

    @staticmethod
    def _ids(image_ids, count: int) -> list[str]:
        ids = [str(i) for i in range(count)] if image_ids is None else [str(i) for i in image_ids]
        if len(ids) != count:
            raise ValueError(f"got {count} images but {len(ids)} image_ids")
        return ids

    def _run_batches(self, aspects, get_prepared, ids, batch_size) -> list[FeatureRecord]:
        size = max(1, int(batch_size or self.batch_size))
        # Aspect-ratio buckets: neighbours in this order have similar resized shapes, so
        # little padding; results go back to input order.
        order = sorted(range(len(aspects)), key=lambda i: (aspects[i], i))
        records: list[Optional[FeatureRecord]] = [None] * len(aspects)
        for start in range(0, len(order), size):
            batch = order[start:start + size]
            prepared = [get_prepared(i) for i in batch]
            for i, prep, out in zip(batch, prepared, self._detect_prepared(prepared)):
                records[i] = self._record(ids[i], prep, out, with_probs=None)
        return records

    def features_for_boxes(self, image: np.ndarray, boxes, image_id="0", *, color: str = "bgr") -> FeatureRecord:
        """Features and labels for given boxes (original-image pixels, x1 y1 x2 y2).

        The record holds the boxes as given, features [N, D], cls_prob [N, 1601]
        (background last), attr_prob [N, 401] (no-attribute last) and the argmax labels
        excluding background / no-attribute.
        """
        bgr = to_bgr(image, color)
        height, width = bgr.shape[:2]
        boxes = np.asarray(boxes, dtype=np.float32)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or not 1 <= boxes.shape[0] <= MAX_BOXES:
            raise ValueError(f"boxes must have shape [N, 4] with 1 <= N <= {MAX_BOXES}, got {boxes.shape}")
        if not np.all(np.isfinite(boxes)):
            raise ValueError("boxes contain NaN or inf")
        if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
            raise ValueError("boxes must be x1, y1, x2, y2 with x2 >= x1 and y2 >= y1")
        tol = BOX_BORDER_TOLERANCE
        if (boxes[:, :2].min() < -tol or boxes[:, 2].max() > width + tol or boxes[:, 3].max() > height + tol):
            raise ValueError(f"boxes extend outside the {width}x{height} image")
        prepared = prepare_image(bgr, one_reading(self.detector_config))
        sx, sy = prepared.scale
        scaled = torch.from_numpy(boxes) * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
        out = self._detect_prepared([prepared], given_boxes=[scaled])[0]
        return self._record(str(image_id), prepared, out, with_probs=True, given=boxes)

    # -- internals -------------------------------------------------------------------

    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def _detect_prepared(self, prepared: list[PreparedImage], given_boxes=None) -> list[dict]:
        cfg = self.detector_config
        whole = cfg.image_feature
        sizes = [p.size for p in prepared]
        rois, pooled = self._score_rois(prepared, given_boxes, whole=whole)
        # per RoI: found on the mirrored image (its box regression's x offset is mirrored too)
        mirrored = [torch.zeros(len(r), dtype=torch.bool, device=r.device) for r in rois]
        if given_boxes is None:
            readings = [([p.extra[k] for p in prepared], False) for k in range(len(cfg.extra_min_sizes))]
            if cfg.mirrored_reading:
                readings.append(([dataclasses.replace(p, tensor=p.tensor.flip(-1), extra=()) for p in prepared], True))
            for views, is_mirror in readings:
                more_rois, more_pooled = self._score_rois(views, None, whole=False)
                for i, (p, view) in enumerate(zip(prepared, views)):
                    boxes = mirror_boxes(more_rois[i], view.size[1]) if is_mirror else more_rois[i]
                    # into the first reading's pixels, where the selection and the record work
                    (sx, sy), (ex, ey) = p.scale, view.scale
                    ratio = torch.tensor([sx / ex, sy / ey, sx / ex, sy / ey], device=boxes.device)
                    rois[i] = _join_before_last(rois[i], boxes * ratio, whole)
                    pooled[i] = _join_before_last(pooled[i], more_pooled[i], whole)
                    mirrored[i] = _join_before_last(mirrored[i], torch.full((len(boxes),), is_mirror,
                                                                            device=boxes.device), whole)
        cls_logits = self.model.roi_heads.box_predictor.class_logits(torch.cat(pooled))
        outs = []
        for i, (roi, feat, logits) in enumerate(zip(rois, pooled, cls_logits.split([len(f) for f in pooled]))):
            image_feature, flipped = None, mirrored[i]
            if whole:
                image_feature, roi, feat, logits, flipped = feat[-1], roi[:-1], feat[:-1], logits[:-1], flipped[:-1]
            out = self._select(roi, feat, logits, sizes[i], given=given_boxes is not None, mirrored=flipped)
            if image_feature is not None:
                out["image_feature"] = image_feature
            outs.append(out)
        return outs

    def _score_rois(self, prepared: list[PreparedImage], given_boxes, *, whole: bool):
        """One reading of a batch: per image its RoIs (network pixels; the proposals, or
        the given boxes; plus the whole image last when ``whole``) and their pooled features."""
        cfg = self.detector_config
        model = self.model
        sizes = [p.size for p in prepared]
        height = max(h for h, _ in sizes)
        width = max(w for _, w in sizes)
        batch = torch.zeros((len(prepared), 3, height, width), dtype=torch.float32)
        for i, p in enumerate(prepared):
            batch[i, :, : p.size[0], : p.size[1]] = p.tensor
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        batch = batch.to(self.device).contiguous(memory_format=memory_format)
        with self._autocast():
            features, _ = model.backbone(batch, sizes)
            if given_boxes is None:
                feature_sizes = [model.backbone.feature_size(h, w) for h, w in sizes]
                proposals = model.proposal_generator(
                    features, feature_sizes, sizes, pre_nms_topk=cfg.rpn_pre_nms_topk,
                    nms_threshold=cfg.rpn_nms_threshold, post_nms_topk=cfg.rpn_post_nms_topk,
                    min_size=cfg.rpn_min_size)
                rois = []
                for (h, w), (boxes, _) in zip(sizes, proposals):
                    if boxes.shape[0] == 0:  # degenerate: fall back to the whole image
                        boxes = torch.tensor([[0.0, 0.0, float(w), float(h)]], device=features.device)
                    rois.append(boxes.float())
            else:
                rois = [b.to(features.device).float() for b in given_boxes]
            if whole:  # the whole image as one more RoI, pooled in the same pass, split off later
                rois = [torch.cat([r, torch.tensor([[0.0, 0.0, float(w), float(h)]], device=r.device)])
                        for r, (h, w) in zip(rois, sizes)]
            counts = [r.shape[0] for r in rois]
            batch_index = torch.cat([torch.full((n, 1), float(i), device=features.device)
                                     for i, n in enumerate(counts)])
            pooled = model.roi_heads.box_features(features, torch.cat([batch_index, torch.cat(rois)], dim=1))
        return rois, list(pooled.float().split(counts))

    def _select(self, rois, features, cls_logits, size, *, given: bool, mirrored: torch.Tensor) -> dict:
        cfg = self.detector_config
        predictor = self.model.roi_heads.box_predictor
        cls_prob = torch.softmax(cls_logits.float(), dim=-1)
        object_prob = cls_prob[:, :-1]
        boxes = rois
        if given:
            keep = torch.arange(rois.shape[0], device=rois.device)
        else:
            if cfg.boxes == "regressed":
                best = object_prob.argmax(dim=1)
                deltas = predictor.box_deltas(features).view(rois.shape[0], -1, 4)
                picked = deltas[torch.arange(rois.shape[0], device=rois.device), best]
                picked = torch.where(mirrored[:, None], picked * picked.new_tensor([-1.0, 1.0, 1.0, 1.0]), picked)
                boxes = clip_boxes(apply_deltas(picked, rois, cfg.arch.bbox_reg_weights), size[0], size[1])
            if cfg.selection == "per_class":
                keep, _ = butd_select(rois, object_prob, nms_threshold=cfg.nms_threshold,
                                      score_threshold=cfg.score_threshold, min_boxes=cfg.min_boxes,
                                      max_boxes=cfg.max_boxes, method=self.nms_method)
            else:
                keep = agnostic_loop_select(boxes, object_prob.max(dim=1).values, nms_thresholds=cfg.nms_thresholds,
                                            score_threshold=cfg.score_threshold, min_boxes=cfg.min_boxes,
                                            max_boxes=cfg.max_boxes)
        kept_features = features[keep]
        kept_logits = cls_logits[keep]
        attr_logits = predictor.attribute_logits(kept_features, kept_logits.argmax(dim=-1)).float()
        attr_prob = torch.softmax(attr_logits, dim=-1)
        if cfg.attr_softmax == "all":
            attrs_conf, attrs_id = attr_prob[:, :-1].max(dim=1)
        else:
            attrs_conf, attrs_id = torch.softmax(attr_logits[:, :-1], dim=-1).max(dim=1)
        objects_conf, objects_id = object_prob[keep].max(dim=1)
        return {"boxes": boxes[keep], "features": kept_features, "cls_prob": cls_prob[keep],
                "attr_prob": attr_prob, "objects_id": objects_id, "objects_conf": objects_conf,
                "attrs_id": attrs_id, "attrs_conf": attrs_conf}

    def _record(self, image_id: str, prepared: PreparedImage, out: dict, *, with_probs, given=None) -> FeatureRecord:
        height, width = prepared.original_size
        if given is not None:
            boxes = given
        else:
            sx, sy = prepared.scale
            scale = torch.tensor([sx, sy, sx, sy], dtype=torch.float32, device=out["boxes"].device)
            boxes = clip_boxes(out["boxes"].float() / scale, height, width).cpu().numpy()
        if with_probs is None:
            with_probs = self.detector_config.with_probs
        arrays = {k: out[k].cpu().numpy() for k in ("features", "objects_id", "objects_conf", "attrs_id",
                                                     "attrs_conf")}
        if with_probs:
            arrays["cls_prob"] = out["cls_prob"].cpu().numpy()
            arrays["attr_prob"] = out["attr_prob"].cpu().numpy()
        if "image_feature" in out:
            arrays["image_feature"] = out["image_feature"].cpu().numpy()
        record = FeatureRecord.from_arrays(image_id, width, height, boxes=boxes, **arrays)
        return record.validate(self.feature_dim)


def _resolve_weights_path(weights) -> Path:
    path = Path(weights)
    if path.is_dir():
        for name in WEIGHT_FILE_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} is a directory without {' or '.join(WEIGHT_FILE_NAMES)}.\n{GET_WEIGHTS_HELP}")
    return path


def describe_detector(weights=None, preset: str = "butd-10-100", dtype: str = "float32",
                      allow_random: bool = False, **overrides) -> dict:
    """What :meth:`Detector.describe` will say for these arguments, without building the
    network: lets a driver record and check the detector while workers load it. A checkpoint
    that the loader would refuse (not a readable file, pickled objects) is refused here
    already, with the same :class:`CheckpointError`; its tensors are not read."""
    config = make_config(preset, dtype=dtype, **overrides).validate()
    if weights is None and config.preset in SHIPPED_WEIGHTS:
        weights = shipped_weights_path(config.preset)
    if weights is None and not allow_random:
        raise MissingWeightsError(f"preset {config.preset!r} needs weights (no checkpoint was given).\n"
                                  f"{GET_WEIGHTS_HELP}")
    if weights is None:
        sha256 = None
    else:
        path = _resolve_weights_path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such detector checkpoint.\n{GET_WEIGHTS_HELP}")
        check_checkpoint(path)
        sha256 = sha256_file(path)
    return {"preset": config.preset, "config": config.to_dict(), "config_hash": config.config_hash(),
            "weights_sha256": sha256, "feature_dim": config.arch.feature_dim}


def load_detector(weights=None, preset: str = "butd-10-100", device="auto", dtype: str = "float32",
                  allow_random: bool = False, *, batch_size: Optional[int] = None, seed: int = 0,
                  channels_last: Optional[bool] = None, fold_norms: bool = True, dedupe_rois: bool = True,
                  roi_chunk_size="auto", nms_method: str = "auto", **overrides) -> Detector:
    """Build a detector from a preset (+ overrides) and a checkpoint file.

    weights: path of ``pytorch_model.bin`` (HF) or ``faster_rcnn_from_caffe_attr.pkl``
        (py-bottom-up-attention), or a directory holding one of them. ``None``: the weights
        shipped with vlp for presets that have them (``demo``: detectors/weights/
        demo-detector.pt, sha256-checked); otherwise requires ``allow_random=True``
        (deterministic random weights from ``seed``; tests/timing).
    preset: a name from :func:`vlp.detectors.preset_names`; ``overrides``: any config
        field by name (``score_threshold=0.3``, ``min_boxes=36``, ``blocks=(1,1,1,1)``, ...).
    device: "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    dtype: "float32" (default), "bfloat16" or "float16" (autocast; meant for CUDA).
    Runtime knobs that do not change the outputs beyond float rounding: batch_size,
    channels_last, fold_norms (fold frozen BN into convs), dedupe_rois (run res5 once
    per distinct pooled RoI), roi_chunk_size (RoIs per res5 call: "auto" = 50 on CPU, where
    it halves peak memory at no cost in speed, 1024 on CUDA; None = all at once), nms_method
    (the per-class NMS of the BUTD rule: "auto" = "sweep" on CPU, "matrix" on CUDA; "loop" =
    one torchvision NMS per class, see :func:`vlp.detectors.postprocess.per_class_nms_keep`).
    """
    config = make_config(preset, dtype=dtype, **overrides)
    model = FasterRCNN(config.arch)
    sha256 = path_text = None
    if weights is None and config.preset in SHIPPED_WEIGHTS:
        weights = shipped_weights_path(config.preset)
    if weights is None:
        if not allow_random:
            raise MissingWeightsError(f"load_detector needs weights (no checkpoint was given).\n{GET_WEIGHTS_HELP}")
        init_random_weights(model, seed)
    else:
        path = _resolve_weights_path(weights)
        info = load_weights(model, path)
        sha256, path_text = info["sha256"], info["path"]
    return Detector(model, config, device=device, weights_sha256=sha256, weights_path=path_text,
                    batch_size=batch_size, channels_last=channels_last, fold_norms=fold_norms,
                    dedupe_rois=dedupe_rois, roi_chunk_size=roi_chunk_size, nms_method=nms_method)
