"""Topics of a pair: W ∩ L, the words of its text (lemmatized) that are region labels of its image.

This module is the one place that computes it; the trainer calls :func:`topics` and
``vlp-build topics`` stores it as the pairs' optional ``topics`` column.

* L: the object categories of the image's regions (``objects_id``; regions whose
  ``objects_conf`` is below ``obj_conf_floor`` are ignored), every synonym of a vocab line
  standing for its display name ("tv" and "television" -> "television").
* W: the text lower-cased and split into words (letters, digits, ``'`` and ``-``); a word
  matches a label when the word itself or one of its singular forms is the label
  ("dogs" -> dog, "boxes" -> box, "ponies" -> pony, "knives" -> knife, "men" -> man);
  multi-word labels ("stop sign", "tennis racket") match consecutive words, the last
  one singularized.
* Result: the matched labels' display names, sorted, without repeats.

The lemmatizer is a small rule set for English noun plurals (labels are nouns): it is
deterministic, needs no model and costs microseconds per pair, so the trainer can call it
per sample.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Iterable, Optional

from vlp.schemas import vocab

_WORD = re.compile(r"[a-z0-9][a-z0-9'\-]*")
_IRREGULAR = {"men": "man", "women": "woman", "people": "person", "children": "child", "feet": "foot",
              "teeth": "tooth", "mice": "mouse", "geese": "goose", "oxen": "ox", "sheep": "sheep", "fish": "fish",
              "deer": "deer", "dice": "die", "knives": "knife", "wives": "wife", "lives": "life", "leaves": "leaf",
              "shelves": "shelf", "loaves": "loaf", "halves": "half", "wolves": "wolf", "calves": "calf",
              "scarves": "scarf", "cacti": "cactus"}


def singular_forms(word: str) -> list[str]:
    """The word and its possible singulars, most likely first."""
    forms = [word]
    if word in _IRREGULAR:
        forms.append(_IRREGULAR[word])
    if word.endswith("'s"):
        forms.append(word[:-2])
    if len(word) > 3 and word.endswith("ies"):
        forms.append(word[:-3] + "y")
    if len(word) > 3 and word.endswith("ves"):
        forms += [word[:-3] + "f", word[:-3] + "fe"]
    if len(word) > 2 and word.endswith("es"):
        forms.append(word[:-2])
    if len(word) > 1 and word.endswith("s") and not word.endswith("ss"):
        forms.append(word[:-1])
    return forms


@functools.lru_cache(maxsize=None)
def _label_names(object_id: int) -> tuple[tuple[str, ...], ...]:
    """Every synonym of an object id, as word tuples."""
    return tuple(tuple(name.lower().split()) for name in vocab.objects().synonyms[object_id])


def image_labels(objects_id: Iterable[int], objects_conf: Optional[Iterable[float]] = None,
                 obj_conf_floor: float = 0.0) -> dict[tuple[str, ...], str]:
    """L of one image: word tuple of every synonym -> display name."""
    objects = vocab.objects()
    confs = list(objects_conf) if objects_conf is not None else None
    labels = {}
    for k, object_id in enumerate(objects_id):
        if confs is not None and float(confs[k]) < obj_conf_floor:
            continue
        for words in _label_names(int(object_id)):
            labels[words] = objects.name(int(object_id))
    return labels


def topics(text: str, labels) -> list[str]:
    """W ∩ L of one pair. ``labels``: object ids (ints), label names, or the dict of
    :func:`image_labels`."""
    if not isinstance(labels, dict):
        labels = list(labels)
        if labels and isinstance(labels[0], str):
            labels = {tuple(name.lower().split()): name for name in labels}
        else:
            labels = image_labels(labels)
    if not labels:
        return []
    longest = max(len(k) for k in labels)
    words = _WORD.findall(text.lower())
    found = set()
    for i in range(len(words)):
        for n in range(1, min(longest, len(words) - i) + 1):
            head = tuple(words[i:i + n - 1])
            for form in singular_forms(words[i + n - 1]):
                name = labels.get(head + (form,))
                if name is not None:
                    found.add(name)
                    break
    return sorted(found)


def build_topics(pairs_dir, features_dir, out, *, obj_conf_floor: float = 0.0, overwrite: bool = False,
                 shard_size: int = 100_000, progress: str = "auto"):
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
