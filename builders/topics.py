"""``vlp-build topics``: a copy of a pair store with the ``topics`` column (W ∩ L, see
:mod:`vlp.schemas.labels`)."""

from __future__ import annotations

from pathlib import Path

from vlp.schemas.labels import image_labels, topics
from vlp.schemas.pairs import PAIR_SHARD_SIZE


def build_topics(pairs_dir, features_dir, out, *, obj_conf_floor: float = 0.0, overwrite: bool = False,
                 shard_size: int = PAIR_SHARD_SIZE, progress: str = "auto"):
    """Copy a pair store with the ``topics`` column filled (None where the image has no features)."""
    from vlp.builders.common import Build
    from vlp.schemas import FeatureStore
    from vlp.schemas.pairs import PairStore

    pairs = PairStore(pairs_dir)
    features = FeatureStore(features_dir)
    if Path(out).resolve() == Path(pairs_dir).resolve():
        raise FileExistsError(f"{out}: write the copy with topics to another folder than {pairs_dir}")
    with Build(out, pairs.kind, overwrite=overwrite, sources=[pairs_dir, features_dir], optional=["topics"],
               shard_size=shard_size, total=len(pairs), desc="topics", progress=progress) as build:
        build.stats.update({"pairs": 0, "pairs_with_topics": 0, "pairs_missing_images": 0})
        cache: dict = {}
        for pair in pairs:
            pair = {k: v for k, v in pair.items() if k != "topics"}
            image_id = pair["image_id"]
            if image_id not in cache:
                if image_id in features:
                    record = features.get(image_id)
                    cache = {image_id: None if record.objects_id is None else
                             image_labels(record.objects_id, record.objects_conf, obj_conf_floor)}
                else:
                    cache = {image_id: None}
            labels = cache[image_id]
            if labels is None:
                build.stats["pairs_missing_images"] += 1
                pair["topics"] = None
            else:
                pair["topics"] = topics(pair["text"], labels)
                build.stats["pairs_with_topics"] += bool(pair["topics"])
            build.add(pair)
            build.stats["pairs"] += 1
            build.progress.update()
    features.close()
    return build.result
