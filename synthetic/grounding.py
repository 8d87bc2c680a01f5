"""RefCOCO+ and VCR data of the synthetic world, in the official layouts, from scene truth.

=====================================================  ========================================
``refcoco+/refs(unc).p``, ``refcoco+/instances.json``  RefCOCO+ (UNC layout): a pickled list of
                                                       refs (ref_id, ann_id, image_id, split,
                                                       sentences, category_id, file_name) and
                                                       COCO instances (every scene object an
                                                       annotation, bbox x, y, w, h)
``vcr/{train,val,test}.jsonl``,                        VCR: one multiple-choice question per
``vcr/vcr1images/synthetic/<id>.jpg`` + ``<id>.json``  image with object tags; the metadata
                                                       json holds the given boxes
=====================================================  ========================================

RefCOCO+ expressions never use location words: each names the target by the fewest of its
attributes (colour, size, pattern) that no other object of its category in the image shares
("the red star", "the small striped star"); only objects with at least one distractor of the
same category are referred to, and only when such a description exists. Splits: train, val,
and the world's test images alternate between testA and testB (by image id). Image
``file_name`` is ``<id>.jpg`` (the world's ``images/``), so the default image id matches
``vlp-extract images/``.

VCR questions (three per image) ask the colour of a tagged object ("what colour is [0] ?"): four answers
("[0] is red", ...), one right; four rationales "[0] is a <size> <colour> shape" over two
sizes and two colours (the answer's and another), one right. Q->A needs the region's
colour, QA->R its size: neither is in the text (text-only: 1/4 and 1/2). Object k of the
metadata is scene object k, so the given boxes are the scene's boxes in scene order.

Baselines (truth.json ``tasks``): RefCOCO+ chance = mean of 1/(objects in the image) with
ground-truth regions, and 1/(objects of the target's category) for a model that only knows
the category; VCR chance 1/4, 1/4, 1/16 and text-only 1/4, 1/2, 1/8.
"""

from __future__ import annotations

import itertools
import pickle
from collections import defaultdict

import numpy as np

from vlp.synthetic import palette

REFCOCO_DIR = "refcoco+"
VCR_DIR = "vcr"
VCR_MOVIE = "synthetic"
VCR_QUESTIONS_PER_IMAGE = 3
#: world split -> RefCOCO+ split (test: testA / testB by image id parity) and VCR split
VCR_SPLITS = {"train": "train", "val": "val", "test": "test"}
#: attribute order of a description: colour first, then size, then pattern
_ATTRIBUTES = ("colour", "size", "pattern")


def refcoco_split(split: str, image_id: int) -> str:
    if split == "test":
        return "testA" if image_id % 2 == 0 else "testB"
    return split


def _value(obj, attribute: str) -> str:
    if attribute == "pattern":
        return obj.pattern or "plain"
    return getattr(obj, attribute)


def describe(scene, index: int):
    """The shortest attribute description of object ``index`` that no other object of its
    category shares, as words ("small striped star"); None when it has no same-category
    distractor or no description singles it out."""
    target = scene.objects[index]
    others = [o for k, o in enumerate(scene.objects) if k != index and o.category == target.category]
    if not others:
        return None
    for size in (1, 2, 3):
        for combo in itertools.combinations(_ATTRIBUTES, size):
            if any(attribute == "pattern" and target.pattern is None for attribute in combo):
                continue  # "plain" is not said: an unpatterned target is described by colour and size
            if all(any(_value(o, a) != _value(target, a) for a in combo) for o in others):
                ordered = [a for a in ("size", "pattern", "colour") if a in combo]  # "small striped red star"
                return " ".join([_value(target, a) for a in ordered] + [target.category])
    return None


def _coco_bbox(box) -> list:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def refcoco_data(scenes, split_of: dict) -> tuple[list, dict, dict]:
    """``(refs, instances, truth)`` of the world."""
    refs, images, annotations = [], [], []
    categories = [{"id": palette.category_id(c), "name": c, "supercategory": "shape"} for c in palette.CATEGORIES]
    counts, chance, category_chance = defaultdict(int), defaultdict(list), defaultdict(list)
    sent_id = 0
    for s in scenes:
        images.append({"id": s.image_id, "file_name": s.file_name, "width": s.width, "height": s.height})
        for k, obj in enumerate(s.objects):
            ann_id = s.image_id * 100 + k
            x, y, w, h = _coco_bbox(obj.box)
            annotations.append({"id": ann_id, "image_id": s.image_id, "category_id": obj.category_id,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            phrase = describe(s, k)
            if phrase is None:
                continue
            split = refcoco_split(split_of[s.image_id], s.image_id)
            sentence = f"the {phrase}"
            refs.append({"ref_id": len(refs), "ann_id": ann_id, "image_id": s.image_id, "split": split,
                         "file_name": f"{s.image_id}_{ann_id}.jpg", "category_id": obj.category_id,
                         "sent_ids": [sent_id],
                         "sentences": [{"sent_id": sent_id, "sent": sentence, "raw": sentence.capitalize(),
                                        "tokens": sentence.split()}]})
            sent_id += 1
            counts[split] += 1
            chance[split].append(1.0 / len(s.objects))
            category_chance[split].append(1.0 / sum(o.category == obj.category for o in s.objects))
    instances = {"info": {"description": "synthetic RefCOCO+ instances"}, "images": images,
                 "annotations": annotations, "categories": categories}
    order = ("train", "val", "testA", "testB")
    truth = {"counts": {k: counts[k] for k in order}, "metric": "accuracy (IoU >= 0.5)",
             "baselines": {k: {"chance_gt_regions": float(np.mean(chance[k])) if chance[k] else None,
                               "category_only": float(np.mean(category_chance[k])) if category_chance[k] else None}
                           for k in order}}
    return refs, instances, truth


def _tag_words(words: str, index: int) -> list:
    """"[k] is red" -> [[k], "is", "red"]: VCR token lists hold object tags as lists of indices."""
    return [[index] if w == "[k]" else w for w in words.split()]


def vcr_question(scene, rng, split: str, number: int) -> dict:
    """One VCR row about a random object of ``scene`` (the official jsonl fields)."""
    k = int(rng.integers(len(scene.objects)))
    obj = scene.objects[k]
    colours = list(palette.COLOURS)
    wrong = [c for c in colours if c != obj.colour]
    answer_colours = [obj.colour] + [str(c) for c in rng.choice(wrong, size=3, replace=False)]
    order = rng.permutation(4)
    answers = [_tag_words(f"[k] is {answer_colours[j]}", k) for j in order]
    answer_label = int(np.argmax(order == 0))
    other = str(rng.choice(wrong))
    wrong_size = "large" if obj.size == "small" else "small"
    options = [(obj.size, obj.colour), (wrong_size, obj.colour), (obj.size, other), (wrong_size, other)]
    order = rng.permutation(4)
    rationales = [_tag_words(f"[k] is a {options[j][0]} {options[j][1]} shape", k) for j in order]
    rationale_label = int(np.argmax(order == 0))
    image = f"{VCR_MOVIE}/{scene.image_id}.jpg"
    annot = f"{split}-{scene.image_id}-{number}"
    return {"movie": VCR_MOVIE, "objects": [o.category for o in scene.objects], "img_fn": image,
            "metadata_fn": f"{VCR_MOVIE}/{scene.image_id}.json", "question": _tag_words("what colour is [k] ?", k),
            "answer_choices": answers, "answer_label": answer_label, "rationale_choices": rationales,
            "rationale_label": rationale_label, "img_id": f"{split}-{scene.image_id}", "annot_id": annot, "question_number": number,
            "answer_orig": " ".join(str(w) for w in answers[answer_label]),
            "question_orig": f"what colour is the {obj.category} ?", "rationale_orig": "",
            "answer_likelihood": "certain", "interesting_scores": [0]}


def vcr_metadata(scene) -> dict:
    return {"boxes": [[float(v) for v in o.box] + [1.0] for o in scene.objects], "names": [o.category for o in scene.objects],
            "width": scene.width, "height": scene.height, "segms": []}


def write_grounding(writer, scenes, jpegs, split_of: dict, seed: int, stream) -> dict:
    """Write RefCOCO+ and VCR through ``writer``; returns their truth.json ``tasks`` entries.
    ``stream(image_id, name)``: the random stream of an image for a task (name ``vcr``)."""
    refs, instances, ref_truth = refcoco_data(scenes, split_of)
    writer.bytes(f"{REFCOCO_DIR}/refs(unc).p", pickle.dumps(refs, protocol=2))
    writer.json(f"{REFCOCO_DIR}/instances.json", instances)
    rows, test_labels = defaultdict(list), {}
    for s in scenes:
        split = VCR_SPLITS[split_of[s.image_id]]
        if not s.objects:
            continue
        rng = stream(s.image_id, "vcr")
        for number in range(VCR_QUESTIONS_PER_IMAGE):
            row = vcr_question(s, rng, split, number)
            if split == "test":  # the official test file has no labels; truth.json keeps them
                test_labels[row["annot_id"]] = [row.pop("answer_label"), row.pop("rationale_label")]
            rows[split].append(row)
        writer.bytes(f"{VCR_DIR}/vcr1images/{VCR_MOVIE}/{s.image_id}.jpg", jpegs[s.image_id])
        writer.json(f"{VCR_DIR}/vcr1images/{VCR_MOVIE}/{s.image_id}.json", vcr_metadata(s))
    for split in VCR_SPLITS.values():
        writer.jsonl(f"{VCR_DIR}/{split}.jsonl", rows[split])
    vcr_truth = {"counts": {k: len(rows[k]) for k in VCR_SPLITS.values()}, "metric": "q_a, qa_r, q_ar accuracy",
                 "test_labels": test_labels,
                 "baselines": {"chance": {"q_a": 0.25, "qa_r": 0.25, "q_ar": 0.0625},
                               "text_only": {"q_a": 0.25, "qa_r": 0.5, "q_ar": 0.125}}}
    return {"refcoco+": ref_truth, "vcr": vcr_truth}
