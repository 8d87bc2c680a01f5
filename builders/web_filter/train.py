"""``vlp-build train-web-scorer``: fit the naturalness classifier and the semantic scorer.

Semantic scorer: positives are the pairs of a clean caption store (``--captions``, e.g. the
COCO import) whose images are in ``--caption-features``; negatives are the same captions
on shuffled images and junk alt texts. A labelled crawl (``--crawl``: records plus
``truth.jsonl`` with ``key`` and ``category``; ``--crawl-features``) adds its ``good`` rows
(positives; their selected text) and ``mismatch`` rows (negatives).

Naturalness classifier: the labelled crawl's rows that pass the image stage; positive
class ``unnatural``. Without a crawl the default model's classifier is kept.

Thresholds: naturalness 0.5; semantic the highest 2-decimal value (at most 0.5) that keeps
``keep_good`` (98%) of the positives it was trained on.

``--world DIR`` does all of it on a synthetic world: its COCO captions and oracle feature
store, and its ``web/`` crawl with the crawl's oracle features; that is how the shipped
``default_model.json`` was made (``vlp synth`` seed 0, 200 images).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from vlp.builders.web_filter.images import ImageRules, pixel_stats
from vlp.builders.web_filter.scorer import LogisticModel, WebScorer, semantic_features, train_naturalness, \
    train_semantic
from vlp.builders.web_filter.texts import select_text


def _crawl_rows(crawl_dir: Path):
    """(record dict, truth entry) of a labelled crawl folder."""
    truth_path = crawl_dir / "truth.jsonl"
    if not truth_path.is_file():
        raise FileNotFoundError(f"{truth_path}: no such file (a labelled crawl needs truth.jsonl: key, category)")
    truth = {}
    for number, line in enumerate(truth_path.read_text("utf-8").splitlines(), 1):
        try:
            entry = json.loads(line)
            truth[str(entry["key"])] = entry
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{truth_path}:{number}: not a JSON object with key and category") from None
    records = crawl_dir / "records.jsonl"
    for line in records.read_text("utf-8").splitlines():
        row = json.loads(line)
        if str(row.get("key")) in truth:
            yield row, truth[str(row["key"])]


def train_web_scorer(out, *, captions=None, caption_features=None, crawl=None, crawl_features=None,
                     keep_good: float = 0.98, seed: int = 0, meta: Optional[dict] = None) -> dict:
    """Fit and save a model file at ``out``; returns a summary."""
    from vlp.core.decode import DecodeError, decode_file
    from vlp.schemas import FeatureStore

    try:
        default = WebScorer.load()
    except FileNotFoundError:  # bootstrapping: no default model yet
        default = None
    extra_pos, extra_neg, natural_rows = [], [], []
    rules = ImageRules()
    if crawl is not None:
        if crawl_features is None:
            raise ValueError("--crawl needs --crawl-features (a feature store of the crawl's images, named by key)")
        crawl, store = Path(crawl), FeatureStore(crawl_features, warn=False)
        for row, truth in _crawl_rows(crawl):
            key = str(row["key"])
            if key not in store:
                continue
            record = store.get(key)
            path = crawl / row.get("image_path", "")
            try:
                data = path.read_bytes()
                if rules.check(data)[0]:
                    continue
                natural_rows.append((record, pixel_stats(decode_file(path)), truth.get("category") == "unnatural"))
            except (OSError, DecodeError):
                continue
            best, _ = select_text(row)
            if best is None:
                continue
            if truth.get("category") == "good":
                extra_pos.append((best["text"], record))
            elif truth.get("category") == "mismatch":
                extra_neg.append((best["text"], record))
    summary: dict = {}
    if natural_rows or default is None:
        naturalness, summary["naturalness"] = train_naturalness(natural_rows)
    else:
        naturalness = default.naturalness
        summary["naturalness"] = "kept from the default model"
    if captions is not None:
        if caption_features is None:
            raise ValueError("--captions needs --caption-features")
        features = FeatureStore(caption_features, warn=False)
        semantic, summary["semantic"] = train_semantic(captions, features, extra_positive=extra_pos,
                                                       extra_negative=extra_neg, seed=seed)
        positives = [semantic_features(t, r) for t, r in extra_pos]
        if not positives:
            from vlp.schemas.pairs import PairStore

            store = PairStore(captions)
            positives = [semantic_features(t, features.get(i)) for t, i in
                         list(zip(store.column("text"), store.column("image_id")))[:2000] if i in features]
        semantic.threshold = min(0.5, _threshold(semantic, np.array(positives), keep_good))
    elif default is None:
        raise ValueError("no default model to keep the semantic scorer of: pass --captions")
    else:
        semantic = default.semantic
        summary["semantic"] = "kept from the default model"
    scorer = WebScorer(naturalness, semantic, {"trained_with": meta or {}, "summary": summary})
    scorer.save(out)
    summary["thresholds"] = {"unnatural": naturalness.threshold, "semantic": semantic.threshold}
    return summary


def _threshold(model: LogisticModel, x: np.ndarray, share: float) -> float:
    from vlp.builders.web_filter.scorer import threshold_keeping

    return threshold_keeping(model, x, share)


def train_from_world(world_dir, out, *, keep_good: float = 0.98, seed: int = 0) -> dict:
    """The whole recipe on a synthetic world (see the module doc)."""
    from vlp.builders.imports import import_coco
    from vlp.synthetic.oracle import truth_feature_store
    from vlp.synthetic.web import web_feature_store

    world = Path(world_dir)
    if not (world / "world.json").is_file():
        raise FileNotFoundError(f"{world}: not a synthetic world (no world.json; make one with vlp synth)")
    with tempfile.TemporaryDirectory(prefix="vlp-web-scorer-") as tmp:
        tmp = Path(tmp)
        import_coco([world / "annotations/captions_train.json"], tmp / "captions", progress="off")
        truth_feature_store(world, tmp / "features")
        web_feature_store(world / "web", tmp / "web-features")
        meta = {"command": f"vlp-build train-web-scorer --world {world.name} --out {Path(out).name}",
                "world": json.loads((world / "world.json").read_text("utf-8"))["seed"],
                "world_images": json.loads((world / "world.json").read_text("utf-8"))["num_images"]}
        meta = {"command": meta["command"], "world_seed": meta["world"], "world_images": meta["world_images"]}
        return train_web_scorer(out, captions=tmp / "captions", caption_features=tmp / "features",
                                crawl=world / "web", crawl_features=tmp / "web-features", keep_good=keep_good,
                                seed=seed, meta=meta)
