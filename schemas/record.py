"""The feature record: one image's regions, as every store holds it.

Field names follow the LXMERT / VOLTA TSV tradition. Storage dtypes are fixed
(``FIELD_DTYPES``); ``FeatureRecord.from_arrays`` converts inputs to them and
``validate`` enforces the shape and value rules, naming the field at fault.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from vlp.schemas import vocab
from vlp.schemas.errors import SchemaError

SCHEMA_VERSION = 1
DEFAULT_FEATURE_DIM = 2048
MIN_BOXES, MAX_BOXES = 1, 1000
NUM_CLS_PROB = vocab.NUM_OBJECTS + 1  # detector classes, background last
NUM_ATTR_PROB = vocab.NUM_ATTRIBUTES + 1  # detector attributes, no-attribute last
MAX_IMAGE_ID_BYTES = 500  # LMDB keys are at most 511 bytes
# Boxes may overshoot the image border by this many pixels: exporters differ in
# clipping to W or W-1 and in rounding after rescaling.
BOX_BORDER_TOLERANCE = 1.0

# Per-box arrays in storage dtype; the first dimension is always num_boxes.
FIELD_DTYPES = {
    "boxes": np.dtype("<f4"),
    "features": np.dtype("<f2"),
    "objects_id": np.dtype("<i4"),
    "objects_conf": np.dtype("<f4"),
    "attrs_id": np.dtype("<i4"),
    "attrs_conf": np.dtype("<f4"),
    "cls_prob": np.dtype("<f2"),
    "attr_prob": np.dtype("<f2"),
}
# Whole-image array (not per box).
IMAGE_FEATURE_DTYPE = np.dtype("<f2")
LABEL_FIELDS = ("objects_id", "objects_conf", "attrs_id", "attrs_conf")
ARRAY_FIELDS = tuple(FIELD_DTYPES) + ("image_feature",)
OPTIONAL_FIELDS = LABEL_FIELDS + ("cls_prob", "attr_prob", "image_feature")


@dataclasses.dataclass
class FeatureRecord:
    """Regions of one image. Arrays read from a store are read-only views."""

    image_id: str
    image_w: int
    image_h: int
    boxes: np.ndarray  # float32 [N, 4], x1 y1 x2 y2 in original-image pixels
    features: np.ndarray  # float16 [N, D]
    objects_id: Optional[np.ndarray] = None  # int32 [N], 0..1599
    objects_conf: Optional[np.ndarray] = None  # float32 [N]
    attrs_id: Optional[np.ndarray] = None  # int32 [N], 0..399
    attrs_conf: Optional[np.ndarray] = None  # float32 [N]
    cls_prob: Optional[np.ndarray] = None  # float16 [N, 1601], background last
    attr_prob: Optional[np.ndarray] = None  # float16 [N, 401], no-attribute last
    image_feature: Optional[np.ndarray] = None  # float16 [D]

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    def present_fields(self) -> tuple[str, ...]:
        """Names of the array fields this record carries, in canonical order."""
        return tuple(f for f in ARRAY_FIELDS if getattr(self, f) is not None)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in self.present_fields()}

    @classmethod
    def from_arrays(cls, image_id, image_w, image_h, **arrays) -> "FeatureRecord":
        """Build a record, converting every array to its storage dtype.

        float32 features become float16 here; values beyond the float16 range
        then fail validation instead of silently becoming inf.
        """
        unknown = set(arrays) - set(ARRAY_FIELDS)
        if unknown:
            raise SchemaError(f"unknown record field(s): {', '.join(sorted(unknown))}")
        converted = {}
        for name, value in arrays.items():
            if value is None:
                continue
            dtype = IMAGE_FEATURE_DTYPE if name == "image_feature" else FIELD_DTYPES[name]
            array = np.asarray(value)
            if name in ("objects_id", "attrs_id") and array.dtype.kind == "f":
                if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
                    raise SchemaError(f"{name}: ids must be whole numbers")
            with np.errstate(over="ignore"):  # overflow to inf is reported by validate()
                converted[name] = np.ascontiguousarray(array, dtype=dtype)
        if "boxes" not in converted or "features" not in converted:
            raise SchemaError("a record needs 'boxes' and 'features'")
        return cls(image_id=str(image_id), image_w=int(image_w), image_h=int(image_h), **converted)

    def validate(self, feature_dim: Optional[int] = None) -> "FeatureRecord":
        """Check every rule of the schema; raise SchemaError naming the field."""
        where = f"record {self.image_id!r}"
        _check_image_id(self.image_id)
        if self.image_w <= 0 or self.image_h <= 0:
            raise SchemaError(f"{where}: image size {self.image_w}x{self.image_h} must be positive")
        n = self.num_boxes
        if not MIN_BOXES <= n <= MAX_BOXES:
            raise SchemaError(f"{where}: num_boxes={n}, must be between {MIN_BOXES} and {MAX_BOXES}")
        labels = [f for f in LABEL_FIELDS if getattr(self, f) is not None]
        if labels and len(labels) != len(LABEL_FIELDS):
            missing = sorted(set(LABEL_FIELDS) - set(labels))
            raise SchemaError(f"{where}: label fields come together; missing {', '.join(missing)}")
        for name, array in self.arrays().items():
            expected = _expected_shape(name, n, self.feature_dim)
            dtype = IMAGE_FEATURE_DTYPE if name == "image_feature" else FIELD_DTYPES[name]
            if array.dtype != dtype:
                raise SchemaError(f"{where}: field {name} has dtype {array.dtype}, expected {dtype}")
            if array.shape != expected:
                raise SchemaError(f"{where}: field {name} has shape {array.shape}, expected {expected}")
            nonfinite = _nonfinite(array)
            if nonfinite:
                bad = nonfinite
                raise SchemaError(f"{where}: field {name} has {bad} non-finite value(s) (NaN/inf; "
                                  "float16 fields overflow above 65504)")
        if feature_dim is not None and self.feature_dim != feature_dim:
            raise SchemaError(f"{where}: features are {self.feature_dim}-d, the store holds {feature_dim}-d")
        _check_boxes(where, self.boxes, self.image_w, self.image_h)
        if labels:
            _check_ids(where, "objects_id", self.objects_id, vocab.NUM_OBJECTS)
            _check_ids(where, "attrs_id", self.attrs_id, vocab.NUM_ATTRIBUTES)
            for name in ("objects_conf", "attrs_conf"):
                values = getattr(self, name)
                if np.any(values < 0) or np.any(values > 1):
                    raise SchemaError(f"{where}: field {name} must lie in [0, 1]")
        return self

    def features_float32(self) -> np.ndarray:
        """Features as a new float32 array.

        numpy's float16 -> float32 ``astype`` is slow (about 300 us for 36x2048 values
        on a 2-core machine, 20x a whole store read); torch's conversion is exact and
        about 10 us.
        """
        import torch

        return torch.from_numpy(np.array(self.features, copy=True)).float().numpy()

    def equals(self, other: "FeatureRecord") -> bool:
        """Bit-exact equality of all fields."""
        if (self.image_id, self.image_w, self.image_h) != (other.image_id, other.image_w, other.image_h):
            return False
        if self.present_fields() != other.present_fields():
            return False
        return all(
            a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
            for a, b in zip(self.arrays().values(), other.arrays().values())
        )


def _nonfinite(array: np.ndarray) -> int:
    """Count of NaN/inf values; for float16 via the exponent bits (5x faster than isfinite)."""
    if array.dtype == np.float16:
        return int(np.count_nonzero((array.view(np.uint16) & 0x7C00) == 0x7C00))
    if array.dtype.kind == "f":
        return int(np.count_nonzero(~np.isfinite(array)))
    return 0


def _expected_shape(name: str, n: int, dim: int) -> tuple:
    if name == "boxes":
        return (n, 4)
    if name == "features":
        return (n, dim)
    if name == "cls_prob":
        return (n, NUM_CLS_PROB)
    if name == "attr_prob":
        return (n, NUM_ATTR_PROB)
    if name == "image_feature":
        return (dim,)
    return (n,)


def _check_image_id(image_id: str) -> None:
    if not isinstance(image_id, str) or not image_id:
        raise SchemaError(f"image_id must be a non-empty string, got {image_id!r}")
    if "\x00" in image_id:
        raise SchemaError(f"image_id {image_id!r} contains a NUL character")
    if len(image_id.encode("utf-8")) > MAX_IMAGE_ID_BYTES:
        raise SchemaError(f"image_id {image_id[:40]!r}... is longer than {MAX_IMAGE_ID_BYTES} bytes")


def _check_boxes(where: str, boxes: np.ndarray, width: int, height: int) -> None:
    x1, y1, x2, y2 = boxes.T
    tol = BOX_BORDER_TOLERANCE
    if np.any(x2 < x1) or np.any(y2 < y1):
        i = int(np.flatnonzero((x2 < x1) | (y2 < y1))[0])
        raise SchemaError(f"{where}: box {i} {boxes[i].tolist()} has x2<x1 or y2<y1")
    outside = (x1 < -tol) | (y1 < -tol) | (x2 > width + tol) | (y2 > height + tol)
    if np.any(outside):
        i = int(np.flatnonzero(outside)[0])
        raise SchemaError(f"{where}: box {i} {boxes[i].tolist()} lies outside the "
                          f"{width}x{height} image")


def _check_ids(where: str, name: str, ids: np.ndarray, size: int) -> None:
    if np.any(ids < 0) or np.any(ids >= size):
        bad = ids[(ids < 0) | (ids >= size)]
        raise SchemaError(f"{where}: field {name} has id {int(bad[0])} outside 0..{size - 1}")
