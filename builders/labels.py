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

from vlp.builders.common import Build, BuildResult, SplitOf
from vlp.schemas import FeatureStore, vocab
from vlp.schemas.labels import (DEFAULT_ATTR_CONF_FLOOR, DEFAULT_OBJ_CONF_FLOOR, NAME_MODES, pick_name,
                               region_label_words)
from vlp.schemas.pairs import PAIR_SHARD_SIZE


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
                         overwrite: bool = False, shard_size: int = PAIR_SHARD_SIZE, split: str = "",
                         splits_from=None, progress: str = "auto") -> BuildResult:
    """One ``objects_labels`` pair per image of the feature store ``features_dir``.

    ``split``: every pair's split, or with ``splits_from`` (a pair store or split file) the
    split of images that source does not know.
    """
    split_of = SplitOf(splits_from, split)
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
                       "text": " ".join(words), "source": "features", "split": split_of(record.image_id),
                       "words": words, "word_regions": regions})
        build.stats.update(split_of.stats())
    store.close()
    return build.result


def build_labels_in_order(features_dir, out, *, names: str = "display", overwrite: bool = False,
                          shard_size: int = PAIR_SHARD_SIZE, split: str = "", splits_from=None,
                          progress: str = "auto") -> BuildResult:
    """One ``labels_in_order`` pair per image: the category of every region, in region order
    (``split`` / ``splits_from`` as :func:`build_objects_labels`)."""
    if names not in NAME_MODES:
        raise ValueError(f"names must be one of {NAME_MODES}, got {names!r}")
    split_of = SplitOf(splits_from, split)
    store = _open_features(features_dir)
    objects = vocab.objects()
    with Build(out, "labels_in_order", overwrite=overwrite, sources=[features_dir], shard_size=shard_size,
               total=len(store), desc="labels-in-order", unit="img", progress=progress) as build:
        build.stats = {"images": 0, "regions": 0}
        for record in _records_with_labels(store, build):
            ids = [int(i) for i in record.objects_id]
            labels = [pick_name(objects, i, names, record.image_id, row, "o") for row, i in enumerate(ids)]
            build.stats["images"] += 1
            build.stats["regions"] += len(ids)
            build.add({"pair_id": f"{record.image_id}#labels_in_order", "image_id": record.image_id,
                       "text": " ".join(labels), "source": "features", "split": split_of(record.image_id),
                       "labels": labels, "label_ids": ids})
        build.stats.update(split_of.stats())
    store.close()
    return build.result

