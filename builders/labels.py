"""Pairs made from a feature store's own region labels.

* ``objects_labels`` (LAMP): per image, the label text of its regions, "attribute
  category" per region ("red circle"), with ``word_regions`` giving the region row of
  every word, so a trainer can give each label token its region's spatial embedding.
* ``labels_in_order`` (MSP token stage, IFRS): one category label per region, in region
  order, aligned 1:1 with the regions (``labels`` + ``label_ids``).

Names come from the BUTD vocabularies (:mod:`vlp.schemas.vocab`). ``names="display"``
uses the first name of a vocab line ("gray,grey" -> "gray"); ``names="synonyms"`` picks
one of the line's synonyms per region by a stable hash of (image_id, region row), so the
corpus sees every synonym while the same store is rebuilt byte-identically.
"""

from __future__ import annotations

import hashlib

import numpy as np

from vlp.builders.common import Build, BuildResult
from vlp.schemas import FeatureStore, vocab

#: BUTD's demo prints an attribute when its score exceeds 0.1 (attr_thresh); we keep that.
DEFAULT_ATTR_CONF_FLOOR = 0.1
DEFAULT_OBJ_CONF_FLOOR = 0.0
NAME_MODES = ("display", "synonyms")


def _pick_name(voc, index: int, mode: str, image_id: str, row: int, salt: str) -> str:
    if mode == "display":
        return voc.name(index)
    synonyms = voc.synonyms[index] if 0 <= index < len(voc) else (voc.name(index),)
    if len(synonyms) == 1:
        return synonyms[0]
    digest = hashlib.blake2b(f"{image_id}\x00{row}\x00{salt}".encode(), digest_size=4).digest()
    return synonyms[int.from_bytes(digest, "little") % len(synonyms)]


def region_label_words(record, *, attr_conf_floor: float = DEFAULT_ATTR_CONF_FLOOR,
                       obj_conf_floor: float = DEFAULT_OBJ_CONF_FLOOR, names: str = "display"
                       ) -> tuple[list[str], list[int], dict]:
    """``(words, word_regions, counts)`` of one feature record (see module doc).

    A region below ``obj_conf_floor`` is skipped; its attribute is used when
    ``attrs_conf >= attr_conf_floor``. Multi-word names ("tennis racket") give one word
    each, all pointing at the region.
    """
    if names not in NAME_MODES:
        raise ValueError(f"names must be one of {NAME_MODES}, got {names!r}")
    if record.objects_id is None:
        raise KeyError("objects_id")
    objects, attributes = vocab.objects(), vocab.attributes()
    words: list[str] = []
    regions: list[int] = []
    counts = {"regions": 0, "regions_skipped": 0, "attributes_used": 0}
    obj_conf = record.objects_conf if record.objects_conf is not None else np.ones(record.num_boxes)
    has_attrs = record.attrs_id is not None and record.attrs_conf is not None
    for row in range(record.num_boxes):
        if float(obj_conf[row]) < obj_conf_floor:
            counts["regions_skipped"] += 1
            continue
        counts["regions"] += 1
        label = _pick_name(objects, int(record.objects_id[row]), names, record.image_id, row, "o")
        if has_attrs and float(record.attrs_conf[row]) >= attr_conf_floor:
            label = _pick_name(attributes, int(record.attrs_id[row]), names, record.image_id, row, "a") + " " + label
            counts["attributes_used"] += 1
        for word in label.split():
            words.append(word)
            regions.append(row)
    return words, regions, counts


def _open_features(features_dir) -> FeatureStore:
    return FeatureStore(features_dir)


def _records_with_labels(store: FeatureStore, build: Build):
    """The store's records that carry detector labels; each other one is reported as bad."""
    for record in store:
        if record.objects_id is None:
            build.bad.add(store.root, f"image {record.image_id}", "record has no objects_id (labels)")
        else:
            yield record
        build.progress.update()


def build_objects_labels(features_dir, out, *, attr_conf_floor: float = DEFAULT_ATTR_CONF_FLOOR,
                         obj_conf_floor: float = DEFAULT_OBJ_CONF_FLOOR, names: str = "display",
                         overwrite: bool = False, shard_size: int = 100_000, split: str = "",
                         progress: str = "auto") -> BuildResult:
    """One ``objects_labels`` pair per image of the feature store ``features_dir``."""
    store = _open_features(features_dir)
    totals = {"images": 0, "regions": 0, "regions_skipped": 0, "attributes_used": 0, "words": 0,
              "images_without_words": 0}
    with Build(out, "objects_labels", overwrite=overwrite, sources=[features_dir], shard_size=shard_size,
               total=len(store), desc="objects-labels", unit="img", progress=progress) as build:
        build.stats = totals
        build.stats.update({"attr_conf_floor": attr_conf_floor, "obj_conf_floor": obj_conf_floor, "names": names})
        for record in _records_with_labels(store, build):
            words, regions, counts = region_label_words(
                record, attr_conf_floor=attr_conf_floor, obj_conf_floor=obj_conf_floor, names=names)
            totals["images"] += 1
            for key, value in counts.items():
                totals[key] += value
            totals["words"] += len(words)
            if not words:
                totals["images_without_words"] += 1
            build.add({"pair_id": f"{record.image_id}#objects_labels", "image_id": record.image_id,
                       "text": " ".join(words), "source": "features", "split": split,
                       "words": words, "word_regions": regions})
    store.close()
    return build.result


def build_labels_in_order(features_dir, out, *, names: str = "display", overwrite: bool = False,
                          shard_size: int = 100_000, split: str = "", progress: str = "auto") -> BuildResult:
    """One ``labels_in_order`` pair per image: the category of every region, in region order."""
    if names not in NAME_MODES:
        raise ValueError(f"names must be one of {NAME_MODES}, got {names!r}")
    store = _open_features(features_dir)
    objects = vocab.objects()
    with Build(out, "labels_in_order", overwrite=overwrite, sources=[features_dir], shard_size=shard_size,
               total=len(store), desc="labels-in-order", unit="img", progress=progress) as build:
        build.stats = {"images": 0, "regions": 0}
        for record in _records_with_labels(store, build):
            ids = [int(i) for i in record.objects_id]
            labels = [_pick_name(objects, i, names, record.image_id, row, "o") for row, i in enumerate(ids)]
            build.stats["images"] += 1
            build.stats["regions"] += len(ids)
            build.add({"pair_id": f"{record.image_id}#labels_in_order", "image_id": record.image_id,
                       "text": " ".join(labels), "source": "features", "split": split,
                       "labels": labels, "label_ids": ids})
    store.close()
    return build.result

