"""Visual-Genome-format ground truth: what detector training and evaluation both read.

A VG-format folder holds ``objects.json``, ``image_data.json``, optionally
``attributes.json`` and ``splits.json``, and the images as ``images/<id>.jpg`` (or .png)
— the layout of Visual Genome itself and of the worlds ``vlp synth`` writes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from vlp.detectors.errors import AnnotationError


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


def _read_json(path: Path, required: bool = True):
    if not path.is_file():
        if not required:
            return None
        raise AnnotationError(f"{path}: missing; a Visual-Genome-format folder holds objects.json, "
                              f"image_data.json and images/<id>.jpg (vlp synth writes one)")
    try:
        return json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(f"{path}: not valid JSON ({exc})") from None


# what a wrongly typed or missing field raises while an entry is read
_FORMAT_ERRORS = (KeyError, TypeError, ValueError, AttributeError, OverflowError)


def load_vg_annotations(vg_dir, image_ids: Optional[Sequence[int]] = None) -> list[Annotation]:
    """Read VG objects.json / attributes.json / image_data.json and resolve images/<id>.jpg.

    Object names map to class ids with ``vocab.objects().id(names[0])``, attribute names
    with ``vocab.attributes().id``; names outside the vocabularies are dropped (objects
    with an unknown name are skipped). ``image_ids``: which images (default: all).
    A missing or malformed file raises :class:`~vlp.detectors.errors.AnnotationError`
    naming it.
    """
    from vlp.schemas import vocab

    root = Path(vg_dir)
    objects_vocab, attributes_vocab = vocab.objects(), vocab.attributes()
    objects = _read_json(root / "objects.json")
    image_data = _read_json(root / "image_data.json")
    attribute_data = _read_json(root / "attributes.json", required=False) or []
    for name, data in (("objects.json", objects), ("image_data.json", image_data),
                       ("attributes.json", attribute_data)):
        if not isinstance(data, list):
            raise AnnotationError(f"{root / name}: not in VG's format (a JSON list of per-image entries, "
                                  f"found {type(data).__name__})")
    try:
        sizes = {_image_id(e): (int(e["width"]), int(e["height"])) for e in image_data}
        # keyed by image too: object ids are unique in VG itself, but not in folders merged from
        # several sources, where an object's attributes must not come from another image
        attrs_by_object = {}
        for entry in attribute_data:
            entry_image = _image_id(entry)
            for obj in entry.get("attributes", []):
                attrs_by_object[entry_image, int(obj["object_id"])] = [
                    attributes_vocab.id(a) for a in obj.get("attributes") or [] if a in attributes_vocab]
    except _FORMAT_ERRORS as exc:
        raise AnnotationError(f"{root}: image_data.json or attributes.json is not in VG's format "
                              f"({type(exc).__name__}: {exc})") from None
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    out = {}
    for entry in objects:
        try:
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
                attributes.append(attrs_by_object.get((image_id, int(obj["object_id"])), []))
        except _FORMAT_ERRORS as exc:
            raise AnnotationError(f"{root / 'objects.json'}: an entry is not in VG's format "
                                  f"({type(exc).__name__}: {exc})") from None
        path = _image_path(root, image_id)
        width, height = sizes.get(image_id, (0, 0))
        out[image_id] = Annotation(image_id, path, width, height,
                                   np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                                   np.asarray(classes, dtype=np.int64), attributes)
    missing = sorted(wanted - set(out)) if wanted is not None else []
    if missing:
        raise AnnotationError(f"{root}: no objects.json entry for image ids {missing[:10]}")
    return [out[i] for i in sorted(out)]


def _image_path(root: Path, image_id: int) -> Path:
    for name in (f"images/{image_id}.jpg", f"images/{image_id}.png", f"{image_id}.jpg"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{root}: no image file for image id {image_id} (looked for images/{image_id}.jpg)")


def split_image_ids(vg_dir, split: str = "train") -> Optional[list[int]]:
    """The image ids of ``split`` in ``vg_dir/splits.json``; None when there is no such file."""
    path = Path(vg_dir) / "splits.json"
    splits = _read_json(path, required=False)
    if splits is None:
        return None
    if not isinstance(splits, dict) or split not in splits:
        names = ", ".join(sorted(splits)) if isinstance(splits, dict) else "none"
        raise AnnotationError(f"{path}: no split {split!r} (splits: {names})")
    return [int(i) for i in splits[split]]


def pick_image_ids(vg_dir, split: str = "test", limit: Optional[int] = None) -> Optional[list[int]]:
    """The first ``limit`` image ids of ``split`` (``"all"``: every image in objects.json);
    None when ``vg_dir`` has no splits.json and ``split`` is not ``"all"``."""
    ids = ([a.image_id for a in load_vg_annotations(vg_dir)] if split == "all"
           else split_image_ids(vg_dir, split))
    if ids is None:
        return None
    return ids if limit is None else ids[:limit]
