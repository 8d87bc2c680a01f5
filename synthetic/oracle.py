"""A feature store made from a synthetic world's ground truth, without a detector.

For tests, benchmarks and demos of the builders: one record per image, one region per
scene object (ground-truth box, category, colour attribute), features a fixed random
code of (category, colour) plus noise, so images that share objects are similar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from vlp.schemas import FeatureRecord, FeatureStoreWriter


def truth_feature_store(world_dir, out, *, feature_dim: int = 64, storage: str = "arrow", seed: int = 0,
                        image_ids: Optional[list] = None,
                        attrs_conf: Callable[[int, int], float] = lambda image_id, row: 0.9,
                        objects_conf: Callable[[int, int], float] = lambda image_id, row: 0.95,
                        overwrite: bool = False, nlvr2_images: bool = False) -> Path:
    """Write the oracle feature store of ``world_dir`` to ``out``; image_id = str(world id).

    ``nlvr2_images``: also one record per NLVR2 image copy (``nlvr2/images/<stem>.jpg``) named
    ``<stem>``, as ``vlp-extract`` over ``nlvr2/images`` names them (the scene's record under
    the copy's name; truth.json ``nlvr2_images`` maps stems to scene ids).

    ``attrs_conf`` / ``objects_conf``: confidence of region ``row`` of an image, so tests
    can put regions on either side of a floor.
    """
    import json

    from vlp.synthetic import load_scenes

    scenes = load_scenes(world_dir)
    aliases = {}
    if nlvr2_images:
        truth = json.loads((Path(world_dir) / "truth.json").read_text("utf-8"))
        aliases = truth.get("nlvr2_images", {})
    rng = np.random.default_rng(seed)
    codes: dict = {}
    mode = "overwrite" if overwrite else "create"
    with FeatureStoreWriter(out, storage=storage, feature_dim=feature_dim, mode=mode,
                            detector={"name": "synthetic-truth"}) as writer:
        names = [(str(i), i) for i in sorted(scenes)] + sorted(aliases.items())
        for name, image_id in names:
            if image_ids is not None and image_id not in image_ids:
                continue
            scene = scenes[image_id]
            objs = scene.objects
            feats = []
            for obj in objs:
                key = (obj.category, obj.colour)
                if key not in codes:
                    codes[key] = np.abs(rng.standard_normal(feature_dim)).astype(np.float32)
                noise = np.random.default_rng([seed, image_id, len(feats)]).standard_normal(feature_dim)
                feats.append(np.maximum(codes[key] + 0.1 * noise, 0))
            n = len(objs)
            writer.add(FeatureRecord.from_arrays(
                name, scene.width, scene.height,
                boxes=np.array([o.box for o in objs], dtype=np.float32).reshape(n, 4),
                features=np.array(feats, dtype=np.float32).reshape(n, feature_dim),
                objects_id=np.array([o.category_id for o in objs]),
                objects_conf=np.array([objects_conf(image_id, r) for r in range(n)]),
                attrs_id=np.array([o.attribute_ids[0] for o in objs]),
                attrs_conf=np.array([attrs_conf(image_id, r) for r in range(n)])))
    return Path(out)
