"""Region label words and topics: the text a feature record's labels give, in one place.

* :func:`region_label_words` - "attribute category" words per region, each linked to its
  region row (objects-labels pairs and the trainer's label tokens);
* :func:`topics` - W ∩ L, the words of a text (lemmatized) that are region labels of its image.

The trainer calls :func:`topics` and ``vlp-build topics`` stores it as the pairs' optional
``topics`` column.

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
import hashlib
import re
from typing import Iterable, Optional

import numpy as np

from vlp.schemas import vocab

#: BUTD's demo prints an attribute when its score exceeds 0.1 (attr_thresh); we keep that.
DEFAULT_ATTR_CONF_FLOOR = 0.1
DEFAULT_OBJ_CONF_FLOOR = 0.0
NAME_MODES = ("display", "synonyms")


def pick_name(voc, index: int, mode: str, image_id: str, row: int, salt: str) -> str:
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
        label = pick_name(objects, int(record.objects_id[row]), names, record.image_id, row, "o")
        if has_attrs and float(record.attrs_conf[row]) >= attr_conf_floor:
            label = pick_name(attributes, int(record.attrs_id[row]), names, record.image_id, row, "a") + " " + label
            counts["attributes_used"] += 1
        for word in label.split():
            words.append(word)
            regions.append(row)
    return words, regions, counts


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
