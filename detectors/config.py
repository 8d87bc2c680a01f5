"""Detector configuration: the architecture, the pre/post-processing settings, the presets.

A detector is described by one :class:`DetectorConfig`: its :class:`ArchitectureConfig`
(what the network is: depth, widths, anchors, class counts) plus every setting that
turns images into records (resize rule, RPN numbers, box selection). ``to_dict()`` is the
effective configuration as plain JSON, and ``config_hash()`` a stable hash of it; the
extraction pipeline records both in its manifest, so every threshold that shaped an
output is written next to it.

Presets
-------
Named presets are a registry (:data:`PRESETS`, :func:`register_preset`); every field can
still be overridden by name (``load_detector(..., score_threshold=0.3)``). An unknown preset or
setting name, or a value of the wrong type, raises :class:`~vlp.detectors.errors.DetectorConfigError`
(a ValueError) whose message lists the valid names.

``butd-10-100`` (default)
    Anderson et al.'s ``generate_tsv.py`` rules, as used for the 10-100 box BUTD
    features: BGR input minus the pixel means, shortest side 600 and longest <= 1000
    (cv2 bilinear on the float image, Caffe's rule), RPN pre-NMS top 6000 / NMS 0.7 /
    post-NMS top 300; for every object class an NMS at 0.3 over the RoIs, each RoI keeps
    its best surviving class score ("max_conf"); RoIs with max_conf >= 0.2 are kept,
    at least 10 and at most 100, sorted by max_conf. Boxes are the RoIs (proposals)
    scaled back to the original image; features are the pooled res5 features of the
    kept RoIs.
``butd-36``
    The same with exactly 36 boxes (``min_boxes = max_boxes = 36``), the fixed-36
    features of LXMERT/UNITER-era releases.
``lxmert-36``
    The Hugging Face LXMERT demo (``unc-nlp/frcnn-vg-finetuned``) settings: shortest
    side 800, longest <= 1333 (PIL bilinear, detectron2's rounding), boxes regressed with
    the class-specific deltas of each RoI's best class, a class-agnostic NMS tried at
    increasing thresholds (``nms_thresholds``, 0.3 to 1.0 by 0.1 here; set it to the list
    in your copy of the demo's config.yaml if it differs) until at least 36 boxes survive,
    then the best 36; attribute confidences from a softmax over the 400 real attributes.
    Without the demo's bugs: the input is BGR (the demo fed RGB to the BGR model), and
    when no threshold leaves 36 boxes the survivors of the last threshold are topped up
    with the best remaining RoIs (the demo silently reused the previous image's boxes).

All presets follow detectron2's conventions where the Caffe original differs (the
checkpoints are detectron2 conversions): IoU and box sizes without the legacy +1,
RoIPool as in torchvision, the anchors stored in the checkpoint.

``demo``
    The embedded slim detector trained on the synthetic world (`vlp synth`) and shipped
    as ``detectors/weights/demo-detector.pt``: ResNet C4 of the same family (blocks
    1,1,2,2; res2 48 channels, feature dim 384), res4 and the RPN at stride 8
    (``res4_dilation=2``: the weights trained at stride 16 read on a twice denser grid),
    RoIAlign 14x14, anchors 32..512, input upsampled to a 512 px short side (<= 800) and
    read again at 800 (<= 1250) (``extra_min_sizes``: a multi-scale test, both
    readings' RoIs go to one selection; ``extra_min_sizes=[800, 384]`` with
    ``mirrored_reading=true`` adds a 384 px and a mirrored 512 px reading), BUTD's RPN
    numbers (pre/post-NMS 6000/300), the ``butd-10-100`` selection (10..100 boxes, score
    0.2) with ``boxes="regressed"``: each kept RoI is moved by the class-specific deltas
    of its best class (the detector is trained with box regression; on held-out synthetic
    worlds this gives about +0.01 mAP@0.5 over the raw RoIs). Pass ``boxes="rois"`` for
    BUTD's raw proposals. ``load_detector(preset="demo")`` loads the
    shipped weights (sha256-checked).

Choices where the references are silent or disagree are documented on the fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from typing import Callable

from vlp.detectors.errors import DetectorConfigError, UnknownOptionError, UnknownPresetError

CONFIG_VERSION = 1

# Pixel means of the Caffe ResNet-101 in BGR order; no std division.
BGR_PIXEL_MEAN = (102.9801, 115.9465, 122.7717)


@dataclasses.dataclass(frozen=True)
class ArchitectureConfig:
    """The network: a ResNet C4 Faster R-CNN with an attribute head.

    Defaults are the real BUTD ResNet-101. Widths double from stage to stage:
    res2 outputs ``res2_channels`` with ``bottleneck_channels`` inside, res3 twice that,
    res4 four times (the RPN and RoI pooling input), res5 eight times (the feature dim).
    """

    blocks: tuple = (3, 4, 23, 3)  # res2, res3, res4, res5
    stem_channels: int = 64
    res2_channels: int = 256
    bottleneck_channels: int = 64
    res5_dilation: int = 2  # res5: stride 1 in block 0, dilation 2 / padding 2 in every 3x3
    # 2: res4 at stride 8 as well (stride 1 in block 0, dilation 2 in its 3x3 convs and in the
    # RPN conv; feature_stride 8). The weights are those of stride 16, the receptive fields the
    # same, the res4 grid twice as dense: the slim ``demo`` detector's small objects get four
    # times the cells. BUTD's checkpoints use 1.
    res4_dilation: int = 1
    stride_in_1x1: bool = True  # MSRA/Caffe ResNet: the stride sits on the 1x1 conv
    rpn_channels: int = 512
    anchor_sizes: tuple = (64, 128, 256, 512)
    anchor_ratios: tuple = (0.5, 1.0, 2.0)
    feature_stride: int = 16
    pooler_resolution: int = 14
    # "roipool": torchvision RoIPool (max), as BUTD and both checkpoints; "roialign":
    # RoIAlign (aligned=True, adaptive sampling, detectron2's ROIAlignV2), used by the
    # slim ``demo`` detector, whose small objects cover only a few res4 cells.
    pooler: str = "roipool"
    num_classes: int = 1600  # + background, the LAST logit
    num_attributes: int = 400  # + no-attribute, the LAST logit
    cls_embedding_dim: int = 256
    attr_hidden_dim: int = 512
    bbox_reg_weights: tuple = (10.0, 10.0, 5.0, 5.0)
    frozen_bn_eps: float = 1e-5
    pixel_mean: tuple = BGR_PIXEL_MEAN

    @property
    def res4_channels(self) -> int:
        return self.res2_channels * 4

    @property
    def feature_dim(self) -> int:
        return self.res2_channels * 8

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_sizes) * len(self.anchor_ratios)

    def validate(self) -> "ArchitectureConfig":
        if len(self.blocks) != 4 or any(int(b) < 1 for b in self.blocks):
            raise DetectorConfigError(f"blocks must be 4 positive block counts (res2..res5), got {self.blocks}")
        for name in ("stem_channels", "res2_channels", "bottleneck_channels", "rpn_channels",
                     "pooler_resolution", "num_classes", "num_attributes", "cls_embedding_dim",
                     "attr_hidden_dim"):
            if int(getattr(self, name)) < 1:
                raise DetectorConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.pooler not in ("roipool", "roialign"):
            raise DetectorConfigError(f"pooler must be 'roipool' or 'roialign', got {self.pooler!r}")
        if self.res5_dilation not in (1, 2):
            raise DetectorConfigError(f"res5_dilation must be 1 or 2, got {self.res5_dilation}")
        if self.res4_dilation not in (1, 2):
            raise DetectorConfigError(f"res4_dilation must be 1 or 2, got {self.res4_dilation}")
        if self.res4_dilation == 2 and not self.stride_in_1x1:
            # With the stride on the 3x3 conv, res4's first 3x3 would need dilation 1 and the
            # others 2 for the stride-16 weights to keep their meaning; not built.
            raise DetectorConfigError("res4_dilation 2 needs stride_in_1x1 (the stride on the 1x1 conv)")
        if self.feature_stride != 16 // self.res4_dilation:
            raise DetectorConfigError(
                f"feature_stride must be {16 // self.res4_dilation} with res4_dilation {self.res4_dilation}, "
                f"got {self.feature_stride}")
        if len(self.pixel_mean) != 3:
            raise DetectorConfigError("pixel_mean needs 3 values (B, G, R)")
        return self


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Everything that decides what the detector writes for an image."""

    preset: str = "butd-10-100"
    arch: ArchitectureConfig = dataclasses.field(default_factory=ArchitectureConfig)
    # -- input -------------------------------------------------------------------
    min_size: int = 600  # shortest side after resizing
    max_size: int = 1000  # longest side cap
    # Further readings of each image at these shortest sides (the longest-side cap scaled
    # alike): every reading's scored RoIs join one pool before the box selection, so a
    # small object can be found where it is large and a large one where the anchors fit
    # (detectron2's multi-scale test, TEST.AUG.MIN_SIZES, with BUTD's selection). Empty: one
    # reading at min_size, as BUTD. Given boxes are always read at min_size alone.
    extra_min_sizes: tuple = ()
    # Read the image mirrored left-right as well, at min_size: its RoIs, mirrored back (the
    # boxes, and the x offset of their box regression), join the same pool (detectron2's
    # TEST.AUG.FLIP, at one size, with BUTD's selection). Given boxes are never mirrored.
    mirrored_reading: bool = False
    # "cv2": Caffe's rule (scale = min_size/short side, capped when round(scale*long) >
    # max_size; cv2.resize INTER_LINEAR with fx=fy=scale on the mean-subtracted float
    # image). "pil": detectron2's ResizeShortestEdge (int(x + 0.5) sizes, PIL bilinear on
    # the uint8 image), as the HF demo does.
    resize: str = "cv2"
    # "scale": boxes are divided by the single resize factor (Caffe); "per_axis": by the
    # per-axis ratio resized/original (detectron2/HF). Boxes are clipped to the image.
    box_rescale: str = "scale"
    # -- RPN (test) ----------------------------------------------------------------
    rpn_pre_nms_topk: int = 6000
    rpn_nms_threshold: float = 0.7
    rpn_post_nms_topk: int = 300
    rpn_min_size: float = 0.0  # proposals need width and height > this (detectron2)
    # -- box selection -------------------------------------------------------------
    # "per_class": generate_tsv (per-class NMS over the RoIs, max_conf, threshold,
    # floor/cap). "agnostic_loop": the HF demo's class-agnostic NMS threshold loop.
    selection: str = "per_class"
    nms_threshold: float = 0.3  # per_class NMS IoU threshold
    # agnostic_loop: IoU thresholds tried in order. Ending at 1.0 (nothing overlaps more
    # than that) guarantees min_boxes whenever there are that many RoIs; the top-up
    # fallback then only matters for custom lists or tiny images.
    nms_thresholds: tuple = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    score_threshold: float = 0.2
    min_boxes: int = 10
    max_boxes: int = 100
    # "rois": the proposals themselves (BUTD); "regressed": the RoI moved by the
    # class-specific deltas of its best class (HF demo).
    boxes: str = "rois"
    # "all": attribute softmax over all 401 logits, confidence = best of the 400 real
    # attributes (generate_tsv); "attributes": softmax over the 400 real attributes only
    # (HF demo). attr_prob in records is always the 401-way softmax.
    attr_softmax: str = "all"
    # Records carry cls_prob [N,1601] and attr_prob [N,401] when True.
    with_probs: bool = False
    # Records carry image_feature [D]: the RoI feature of the whole image (a box over all of
    # it, pooled with the regions in the same pass), VL-BERT's visual clue for text tokens.
    image_feature: bool = False
    # Compute dtype: "float32" (reference), "bfloat16" or "float16" (autocast).
    dtype: str = "float32"

    def validate(self) -> "DetectorConfig":
        self.arch.validate()
        _choice("resize", self.resize, ("cv2", "pil"))
        _choice("box_rescale", self.box_rescale, ("scale", "per_axis"))
        _choice("selection", self.selection, ("per_class", "agnostic_loop"))
        _choice("boxes", self.boxes, ("rois", "regressed"))
        _choice("attr_softmax", self.attr_softmax, ("all", "attributes"))
        _choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if not 0 < self.min_size <= self.max_size:
            raise DetectorConfigError(f"need 0 < min_size <= max_size, got {self.min_size}/{self.max_size}")
        for size in self.extra_min_sizes:
            if size <= 0 or size == self.min_size or list(self.extra_min_sizes).count(size) > 1:
                raise DetectorConfigError(f"extra_min_sizes must be distinct positive sizes other than min_size "
                                          f"({self.min_size}), got {list(self.extra_min_sizes)} (extra_min_sizes=[] "
                                          f"reads each image once)")
        if not 1 <= self.min_boxes <= self.max_boxes:
            raise DetectorConfigError(f"need 1 <= min_boxes <= max_boxes, got {self.min_boxes}/{self.max_boxes}")
        if self.max_boxes > 1000:
            raise DetectorConfigError("max_boxes above 1000 is not storable (records hold at most 1000 boxes)")
        for name in ("rpn_pre_nms_topk", "rpn_post_nms_topk"):
            if getattr(self, name) < 1:
                raise DetectorConfigError(f"{name} must be positive")
        for name in ("rpn_nms_threshold", "nms_threshold"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise DetectorConfigError(f"{name} must lie in (0, 1], got {getattr(self, name)}")
        if not self.nms_thresholds or any(not 0.0 < t <= 1.0 for t in self.nms_thresholds):
            raise DetectorConfigError(f"nms_thresholds must be IoU values in (0, 1], got {self.nms_thresholds}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise DetectorConfigError(f"score_threshold must lie in [0, 1], got {self.score_threshold}")
        return self

    def to_dict(self) -> dict:
        """The effective configuration as JSON-able plain data (tuples become lists)."""
        data = _plain(dataclasses.asdict(self))
        data["config_version"] = CONFIG_VERSION
        return data

    def config_hash(self) -> str:
        """sha256 (first 16 hex digits) of the canonical JSON of ``to_dict()``."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def replace(self, **overrides) -> "DetectorConfig":
        """A copy with fields replaced; architecture fields may be given flat too."""
        return apply_overrides(self, overrides)


def _choice(name, value, allowed):
    if value not in allowed:
        raise DetectorConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_DETECTOR_FIELDS = {f.name for f in dataclasses.fields(DetectorConfig)} - {"arch", "preset"}
_ARCH_FIELDS = {f.name for f in dataclasses.fields(ArchitectureConfig)}

_DEFAULTS = {**{f.name: getattr(ArchitectureConfig(), f.name) for f in dataclasses.fields(ArchitectureConfig)},
             **{f.name: getattr(DetectorConfig(), f.name) for f in dataclasses.fields(DetectorConfig)
                if f.name in _DETECTOR_FIELDS}}


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


#: Element samples of list settings whose default is empty (the type check needs one).
_EMPTY_LIST_SAMPLES = {"extra_min_sizes": 0}


def _checked(name: str, value):
    """``value`` for field ``name`` if it has the field's type (ints become floats where the
    field holds floats, lists become tuples); otherwise a DetectorConfigError."""
    default = _DEFAULTS[name]
    items = isinstance(default, tuple)
    if items:
        if not isinstance(value, (list, tuple)):
            raise DetectorConfigError(f"detector setting {name} must be a list, e.g. {list(default)}, got {value!r}")
        values, sample = list(value), (default[0] if default else _EMPTY_LIST_SAMPLES[name])
    else:
        values, sample = [value], default
    out = []
    for item in values:
        if isinstance(sample, bool):
            ok, kind = isinstance(item, bool), "true or false"
        elif isinstance(sample, int):
            ok, kind = isinstance(item, int) and not isinstance(item, bool), "an integer"
        elif isinstance(sample, float):
            ok, kind = isinstance(item, (int, float)) and not isinstance(item, bool), "a number"
            item = float(item) if ok else item
        else:
            ok, kind = isinstance(item, str), "a string"
        if not ok:
            what = f"a list of {kind.replace('an ', '').replace('a ', '')}s" if items else kind
            raise DetectorConfigError(f"detector setting {name} must be {what}, got {value!r}")
        out.append(item)
    return tuple(out) if items else out[0]


def apply_overrides(config: DetectorConfig, overrides: dict) -> DetectorConfig:
    """Replace fields by name; an unknown name raises :class:`UnknownOptionError` listing the
    valid ones, a value of the wrong type or out of range a :class:`DetectorConfigError`."""
    overrides = dict(overrides)
    arch_overrides = overrides.pop("arch", None) or {}
    if isinstance(arch_overrides, ArchitectureConfig):
        arch_overrides = dataclasses.asdict(arch_overrides)
    arch_overrides = dict(arch_overrides)
    for name in list(overrides):
        if name in _ARCH_FIELDS and name not in _DETECTOR_FIELDS:
            arch_overrides[name] = overrides.pop(name)
    valid = sorted(_DETECTOR_FIELDS | _ARCH_FIELDS)
    unknown = sorted(set(overrides) - _DETECTOR_FIELDS - {"preset"}) + sorted(set(arch_overrides) - _ARCH_FIELDS)
    if unknown:
        hints = ", ".join(f"{name}{_did_you_mean(name, valid)}" for name in unknown)
        raise UnknownOptionError(f"unknown detector setting{'s' if len(unknown) > 1 else ''} {hints}; "
                                 f"valid settings: {', '.join(valid)}")
    if "preset" in overrides and not isinstance(overrides["preset"], str):
        raise DetectorConfigError(f"preset must be a string, got {overrides['preset']!r}")
    for bag in (overrides, arch_overrides):
        for name, value in bag.items():
            if name != "preset":
                bag[name] = _checked(name, value)
    arch = dataclasses.replace(config.arch, **arch_overrides) if arch_overrides else config.arch
    return dataclasses.replace(config, arch=arch, **overrides).validate()


def parse_setting_pairs(pairs) -> dict:
    """``--set`` strings ``KEY=VALUE`` as overrides: a value is read as JSON where it parses
    (``24``, ``0.3``, ``true``, ``[1, 2]``), else kept as a string. ValueError for a pair
    without ``=`` or without a key (:func:`apply_overrides` then checks names and types)."""
    overrides = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def config_from_dict(data: dict) -> DetectorConfig:
    """Inverse of ``DetectorConfig.to_dict()``."""
    data = dict(data)
    data.pop("config_version", None)
    return apply_overrides(DetectorConfig(), data)


# -- presets -------------------------------------------------------------------------

PRESETS: dict[str, Callable[[], DetectorConfig]] = {}
RESERVED_PRESETS: dict[str, str] = {}


def register_preset(name: str, factory: Callable[[], DetectorConfig], *, replace: bool = False) -> None:
    """Add a named preset: ``factory()`` returns its DetectorConfig."""
    if name in PRESETS and not replace:
        raise ValueError(f"preset {name!r} is already registered")
    PRESETS[name] = factory
    RESERVED_PRESETS.pop(name, None)


def get_preset(name: str) -> DetectorConfig:
    if name not in PRESETS:
        if name in RESERVED_PRESETS:
            raise UnknownPresetError(f"preset {name!r} is reserved for {RESERVED_PRESETS[name]}; "
                                     f"available presets: {', '.join(sorted(PRESETS))}")
        raise UnknownPresetError(f"unknown detector preset {name!r}{_did_you_mean(str(name), PRESETS)}; "
                                 f"available presets: {', '.join(sorted(PRESETS))}")
    config = PRESETS[name]()
    if config.preset != name:
        config = dataclasses.replace(config, preset=name)
    return config.validate()


def preset_names() -> list[str]:
    return sorted(PRESETS)


def make_config(preset: str = "butd-10-100", **overrides) -> DetectorConfig:
    """The preset's config with ``overrides`` applied."""
    return apply_overrides(get_preset(preset), overrides)


register_preset("butd-10-100", lambda: DetectorConfig(preset="butd-10-100"))
register_preset("butd-36", lambda: DetectorConfig(preset="butd-36", min_boxes=36, max_boxes=36))
register_preset("lxmert-36", lambda: DetectorConfig(
    preset="lxmert-36", min_size=800, max_size=1333, resize="pil", box_rescale="per_axis",
    selection="agnostic_loop", boxes="regressed", attr_softmax="attributes",
    # The demo passes its 0.2 score threshold to its NMS helper, which never applies it.
    score_threshold=0.0, min_boxes=36, max_boxes=36))


DEMO_ARCH = ArchitectureConfig(
    blocks=(1, 1, 2, 2), stem_channels=32, res2_channels=48, bottleneck_channels=24,
    rpn_channels=128, anchor_sizes=(32, 64, 128, 256, 512), anchor_ratios=(0.5, 1.0, 2.0),
    res4_dilation=2, feature_stride=8, pooler="roialign", cls_embedding_dim=64, attr_hidden_dim=128)

register_preset("demo", lambda: DetectorConfig(
    preset="demo", arch=DEMO_ARCH, min_size=512, max_size=800, extra_min_sizes=(800,),
    boxes="regressed"))
