"""Detection quality on VG-format ground truth: per-class AP@0.5, mAP, attribute accuracy.

Definitions
-----------
Matching (per class, VOC style)
    All predictions of a class, over all images, are ranked by ``objects_conf``
    (descending; ties by image order, then box order). Each is matched to the unmatched
    ground-truth box of that class in its image with the highest IoU; it is a true positive
    when that IoU is >= ``iou_threshold`` (0.5) and that GT box was not taken by a
    higher-ranked prediction, else a false positive (a duplicate of a taken GT is a false
    positive, as in VOC).
AP
    VOC all-point interpolated AP (VOC2010+): the area under the precision-recall curve
    after making precision monotonically non-increasing. Computed for every class present
    in the ground truth; ``mAP`` is their mean. Predictions of classes absent from the
    ground truth do not enter any AP (they are counted in ``precision``).
    The BUTD selection keeps at least 10 boxes per image, even when the image holds fewer
    objects; those low-confidence extras rank last and cost AP only where they come before
    a true positive.
Attribute accuracy
    Over the true positives of the matching above (a predicted box matched to a GT box at
    IoU >= 0.5 with the right class), whose GT object has at least one attribute: the
    fraction whose predicted ``attrs_id`` equals the GT's PRIMARY attribute id (the first
    listed; colour in the synthetic world).
Precision / recall at the score threshold
    Predictions with ``objects_conf >= score_threshold`` (the detector's, 0.2 for the BUTD
    presets): precision = their true positives / their count (all classes), recall = true
    positives / GT boxes.
Breakdowns
    ``attribute_accuracy_by_category`` / ``attribute_accuracy_by_colour``: the attribute
    accuracy above over the true positives of one GT category / one GT primary attribute
    (colour); ``recall_by_colour``: the recall at the score threshold over the GT boxes of
    one primary attribute. Each entry is ``{"value", "count"}`` (count: its denominator).
Top box (:func:`top_box_accuracy`, for images of one object each)
    The image's highest-``objects_conf`` prediction is a hit when its IoU with the GT box
    is >= ``iou_threshold`` and its class is right ("the top box is the shape, not the
    background"); ``colour`` also needs its ``attrs_id`` to be the GT's primary attribute.
Error anatomy (:func:`error_anatomy`, per GT object, any score)
    ``located``: some prediction of any class has IoU >= ``iou_threshold`` with it;
    ``class_found``: one of those has the object's class; ``class_first``: the
    highest-``objects_conf`` one of those has the object's class. ``located`` low means the
    proposals or boxes miss objects; ``class_found`` well below it, that the classifier
    names them wrongly; ``class_first`` below ``class_found``, that a wrong name outranks
    the right one on the same object (a false positive ranked above it in AP). Tabled by
    relative size, by category and by any labels the caller gives each object
    (``object_groups``).
False-positive anatomy (:func:`false_positive_anatomy`, per class)
    Each false positive as a duplicate, a localisation error, a confusion with another
    class's object or background; the AP with each kind removed, and the recall ceiling (the
    AP with every false positive removed).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import cv2
import numpy as np

from vlp.detectors.annotations import Annotation, load_vg_annotations


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [len(a), len(b)] of x1 y1 x2 y2 boxes (no +1, as detectron2)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clip(0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated AP (VOC2010+)."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def _get(pred, name):
    value = pred[name] if isinstance(pred, dict) else getattr(pred, name)
    return None if value is None else np.asarray(value)


def _flatten(predictions: Sequence) -> tuple[list[tuple], list[np.ndarray]]:
    """Predictions as (image index, box index, class, conf, attr) entries, and each image's boxes."""
    entries = []
    boxes_of = []
    for i, pred in enumerate(predictions):
        boxes = _get(pred, "boxes").reshape(-1, 4).astype(np.float64)
        classes = _get(pred, "objects_id").reshape(-1).astype(np.int64)
        confs = _get(pred, "objects_conf").reshape(-1).astype(np.float64)
        attrs = _get(pred, "attrs_id")
        attrs = np.full(len(classes), -1) if attrs is None else attrs.reshape(-1).astype(np.int64)
        boxes_of.append(boxes)
        for j in range(len(classes)):
            entries.append((i, j, int(classes[j]), float(confs[j]), int(attrs[j])))
    return entries, boxes_of


def _match_class(entries: list, boxes_of: list, ground_truth: Sequence[Annotation], c: int,
                 iou_threshold: float) -> tuple[list, np.ndarray, int]:
    """Class ``c``'s entries ranked and matched as the module docstring defines: returns (the
    ranked entries, the GT index each matched or -1 for a false positive, the GT count)."""
    ranked = sorted((e for e in entries if e[2] == c), key=lambda e: (-e[3], e[0], e[1]))
    gt_boxes = {i: np.nonzero(gt.classes == c)[0] for i, gt in enumerate(ground_truth)}
    taken = {i: np.zeros(len(idx), dtype=bool) for i, idx in gt_boxes.items()}
    n_pos = sum(len(idx) for idx in gt_boxes.values())
    matched = np.full(len(ranked), -1, dtype=np.int64)
    for k, (i, j, _, _, _) in enumerate(ranked):
        idx = gt_boxes[i]
        if len(idx) == 0:
            continue
        iou = box_iou_np(boxes_of[i][j:j + 1], ground_truth[i].boxes[idx])[0]
        iou = np.where(taken[i], -1.0, iou)  # the best still-unmatched GT box
        best = int(np.argmax(iou))
        if iou[best] >= iou_threshold:
            taken[i][best] = True
            matched[k] = int(idx[best])
    return ranked, matched, n_pos


def _ap(true_positive: np.ndarray, n_pos: int) -> float:
    """VOC AP of a ranked list of true / false positives against ``n_pos`` GT boxes."""
    if not len(true_positive):
        return 0.0
    ctp = np.cumsum(np.asarray(true_positive, dtype=np.float64))
    return voc_ap(ctp / max(n_pos, 1), ctp / np.arange(1, len(ctp) + 1))


def evaluate_predictions(predictions: Sequence, ground_truth: Sequence[Annotation], *,
                         iou_threshold: float = 0.5, score_threshold: float = 0.2) -> dict:
    """Score predictions (one per GT image, same order) against ground truth.

    predictions: FeatureRecords or dicts with ``boxes`` [N,4] (original pixels),
        ``objects_id`` [N], ``objects_conf`` [N] and optionally ``attrs_id`` [N].
    ground_truth: :class:`~vlp.detectors.annotations.Annotation` (boxes, classes, attributes).
    Returns {"mAP", "ap" {class name: AP}, "ap_by_id", "attribute_accuracy",
    "attribute_matches", "precision", "recall", "num_predictions_at_threshold",
    "num_gt", "num_images", ...}; see the module docstring for the definitions.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} predictions for {len(ground_truth)} ground-truth images")
    from vlp.schemas import vocab

    names = vocab.objects()
    entries, boxes_of = _flatten(predictions)
    gt_classes = sorted({int(c) for gt in ground_truth for c in gt.classes})
    num_gt = sum(len(gt.classes) for gt in ground_truth)
    tp_flags = {}  # (image, box) -> matched GT index, for true positives
    ap_by_id = {}
    for c in gt_classes:
        ranked, matched, n_pos = _match_class(entries, boxes_of, ground_truth, c, iou_threshold)
        for (i, j, _, _, _), g in zip(ranked, matched):
            if g >= 0:
                tp_flags[(i, j)] = g
        ap_by_id[c] = _ap(matched >= 0, n_pos)
    attr_names = vocab.attributes()
    attr_of = {(e[0], e[1]): e[4] for e in entries}
    attr_total = attr_right = 0
    by_category: dict[str, list[int]] = {}
    by_colour: dict[str, list[int]] = {}
    for (i, j), g in tp_flags.items():
        gt_attrs = ground_truth[i].attributes[g]
        if not gt_attrs:
            continue
        attr_total += 1
        right = int(attr_of[(i, j)] == gt_attrs[0])
        attr_right += right
        for table, key in ((by_category, names.name(int(ground_truth[i].classes[g]))),
                           (by_colour, attr_names.name(int(gt_attrs[0])))):
            table.setdefault(key, [0, 0])
            table[key][0] += right
            table[key][1] += 1
    above = [e for e in entries if e[3] >= score_threshold]
    tp_above = sum(1 for e in above if (e[0], e[1]) in tp_flags)
    found_above = {(e[0], tp_flags[(e[0], e[1])]) for e in above if (e[0], e[1]) in tp_flags}
    recall_colour: dict[str, list[int]] = {}
    for i, gt in enumerate(ground_truth):
        for g, attrs in enumerate(gt.attributes):
            if not attrs:
                continue
            key = attr_names.name(int(attrs[0]))
            recall_colour.setdefault(key, [0, 0])
            recall_colour[key][0] += int((i, g) in found_above)
            recall_colour[key][1] += 1

    def table(counts):
        return {k: {"value": right / total if total else 0.0, "count": total}
                for k, (right, total) in sorted(counts.items())}

    return {
        "mAP": float(np.mean(list(ap_by_id.values()))) if ap_by_id else 0.0,
        "ap": {names.name(c): ap_by_id[c] for c in gt_classes},
        "ap_by_id": {int(c): ap_by_id[c] for c in gt_classes},
        "attribute_accuracy": attr_right / attr_total if attr_total else 0.0,
        "attribute_matches": attr_total,
        "precision": tp_above / len(above) if above else 0.0,
        "recall": tp_above / num_gt if num_gt else 0.0,
        "score_threshold": score_threshold,
        "num_predictions": len(entries),
        "num_predictions_at_threshold": len(above),
        "num_gt": num_gt,
        "num_images": len(ground_truth),
        "iou_threshold": iou_threshold,
        "attribute_accuracy_by_category": table(by_category),
        "attribute_accuracy_by_colour": table(by_colour),
        "recall_by_colour": table(recall_colour),
    }


def top_box_accuracy(predictions: Sequence, ground_truth: Sequence[Annotation], *,
                     iou_threshold: float = 0.5) -> dict:
    """How often the top-scoring box of an image is its (single) object; see the module docstring.

    Images without exactly one GT box are skipped. Returns {"rate" (IoU and class right),
    "colour_rate" (and the attribute), "iou_rate" (IoU only), "images", "misses": [image ids]}.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} predictions for {len(ground_truth)} ground-truth images")
    hits = colour_hits = iou_hits = images = 0
    misses = []
    for pred, gt in zip(predictions, ground_truth):
        if len(gt.classes) != 1:
            continue
        images += 1
        confs = _get(pred, "objects_conf").reshape(-1)
        if confs.size == 0:
            misses.append(gt.image_id)
            continue
        k = int(np.argmax(confs))
        box = _get(pred, "boxes").reshape(-1, 4)[k]
        iou_ok = bool(box_iou_np(box, gt.boxes)[0, 0] >= iou_threshold)
        class_ok = int(_get(pred, "objects_id").reshape(-1)[k]) == int(gt.classes[0])
        attrs = _get(pred, "attrs_id")
        attr_ok = (attrs is not None and bool(gt.attributes[0])
                   and int(attrs.reshape(-1)[k]) == int(gt.attributes[0][0]))
        iou_hits += int(iou_ok)
        hits += int(iou_ok and class_ok)
        colour_hits += int(iou_ok and class_ok and attr_ok)
        if not (iou_ok and class_ok):
            misses.append(gt.image_id)
    return {"rate": hits / images if images else 0.0,
            "colour_rate": colour_hits / images if images else 0.0,
            "iou_rate": iou_hits / images if images else 0.0,
            "images": images, "misses": misses}


#: Object size bins of :func:`error_anatomy`: sqrt(box area) / the image's short side.
#: Detectors resize the short side to a fixed length (512 px for the demo preset), so this
#: is the object's size as the network sees it, whatever the image's own size.
ANATOMY_SIZE_EDGES = (0.1, 0.2, 0.4)


def error_anatomy(predictions: Sequence, ground_truth: Sequence[Annotation], *,
                  iou_threshold: float = 0.5, size_edges: Sequence[float] = ANATOMY_SIZE_EDGES,
                  object_groups: Optional[Mapping[str, Sequence[Sequence[str]]]] = None) -> dict:
    """Where a detector loses objects: located, named, named first (see the module docstring).

    Returns {"objects", "located", "class_found", "class_first" (fractions of all GT
    objects), "by_size": {bin label: {"objects", "located", "class_found", "class_first"}},
    "by_category": {class name: the same}}; size bins follow ``size_edges`` (relative
    sizes, ascending), labelled like "<0.1", "0.1-0.2", ">=0.4".

    object_groups: further tables, by name, each a label per GT object per image (e.g. how
    occluded each object is, known to a synthetic world's truth); adds "by_group": {table
    name: {label: the same four figures}}.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} predictions for {len(ground_truth)} ground-truth images")
    object_groups = dict(object_groups or {})
    for table, per_image in object_groups.items():
        if len(per_image) != len(ground_truth):
            raise ValueError(f"object group {table!r}: labels for {len(per_image)} images, "
                             f"{len(ground_truth)} ground-truth images")
        for labels_of, gt in zip(per_image, ground_truth):
            objects = np.asarray(gt.classes).reshape(-1).size
            if len(labels_of) != objects:
                raise ValueError(f"object group {table!r}, image {gt.image_id}: {len(labels_of)} labels "
                                 f"for {objects} objects")
    from vlp.schemas import vocab

    names = vocab.objects()
    edges = [float(e) for e in size_edges]
    if edges != sorted(edges) or len(set(edges)) != len(edges):
        raise ValueError(f"size_edges must be strictly ascending, got {list(size_edges)}")
    labels = ([f"<{edges[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(edges, edges[1:])]
              + [f">={edges[-1]:g}"]) if edges else ["all"]
    totals: dict[tuple, np.ndarray] = {}  # (table, key) -> [objects, located, found, first]

    def add(key, outcome):
        totals.setdefault(key, np.zeros(4, dtype=np.int64))
        totals[key] += outcome

    for index, (pred, gt) in enumerate(zip(predictions, ground_truth)):
        boxes = _get(pred, "boxes").reshape(-1, 4).astype(np.float64)
        classes = _get(pred, "objects_id").reshape(-1).astype(np.int64)
        confs = _get(pred, "objects_conf").reshape(-1).astype(np.float64)
        gt_boxes = np.asarray(gt.boxes, dtype=np.float64).reshape(-1, 4)
        iou = box_iou_np(boxes, gt_boxes) if len(boxes) else np.zeros((0, len(gt_boxes)))
        short_side = max(min(int(gt.width), int(gt.height)), 1)
        for g, cls in enumerate(np.asarray(gt.classes).reshape(-1)):
            near = np.nonzero(iou[:, g] >= iou_threshold)[0]
            named = near[classes[near] == cls]
            first = near[np.argmax(confs[near])] if len(near) else -1
            outcome = np.array([1, len(near) > 0, len(named) > 0, first >= 0 and classes[first] == cls])
            x1, y1, x2, y2 = gt_boxes[g]
            relative = np.sqrt(max(x2 - x1, 0.0) * max(y2 - y1, 0.0)) / short_side
            add(("all", ""), outcome)
            add(("size", labels[int(np.searchsorted(edges, relative, side="right"))]), outcome)
            add(("category", names.name(int(cls))), outcome)
            for table, per_image in object_groups.items():
                add((f"group:{table}", str(per_image[index][g])), outcome)

    def row(counts):
        n = int(counts[0])
        return {"objects": n, **{name: float(counts[k]) / n if n else 0.0
                                  for k, name in enumerate(("located", "class_found", "class_first"), 1)}}

    overall = row(totals.get(("all", ""), np.zeros(4, dtype=np.int64)))
    result = {**overall,
              "by_size": {label: row(totals[("size", label)]) for label in labels if ("size", label) in totals},
              "by_category": {key: row(counts) for (table, key), counts in sorted(totals.items())
                              if table == "category"}}
    if object_groups:
        result["by_group"] = {name: {key: row(counts) for (table, key), counts in sorted(totals.items())
                                     if table == f"group:{name}"} for name in object_groups}
    return result


#: False-positive kinds of :func:`false_positive_anatomy`, in the order they are tested.
FALSE_POSITIVE_KINDS = ("duplicate", "localisation", "confusion", "background")


def false_positive_anatomy(predictions: Sequence, ground_truth: Sequence[Annotation], *,
                           iou_threshold: float = 0.5, near_iou: float = 0.1) -> dict:
    """Where AP is lost to false positives, and what is lost to objects no box finds.

    Hoiem et al.'s diagnosis ("Diagnosing error in object detectors", 2012; COCO's analyze
    tool does the like): with the matching of :func:`evaluate_predictions`, each false
    positive of a class is a ``duplicate`` (IoU >= ``iou_threshold`` with a GT box of its
    class that a higher-ranked prediction took), a ``localisation`` error (IoU >= ``near_iou``
    with a GT box of its class), a ``confusion`` (IoU >= ``near_iou`` with a GT box of another
    class) or ``background`` (below ``near_iou`` with every GT box), tested in that order.

    Returns {"mAP", "recall_ceiling", "ap_without": {kind: mean}, "by_category": {class name:
    {"ap", "recall_ceiling", "ap_without": {kind: AP}, "false_positives": {kind: count}}}}.
    ``recall_ceiling``: the share of GT boxes matched at any score, which is the AP were every
    false positive removed. ``ap_without[kind]``: the AP with that kind's false positives
    removed from the ranking. ``false_positives`` counts those ranked before the class's last
    true positive (the ones that cost AP). "mAP" equals :func:`evaluate_predictions`' mAP.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} predictions for {len(ground_truth)} ground-truth images")
    if not 0.0 < near_iou < iou_threshold:
        raise ValueError(f"need 0 < near_iou < iou_threshold, got {near_iou}, {iou_threshold}")
    from vlp.schemas import vocab

    names = vocab.objects()
    entries, boxes_of = _flatten(predictions)
    by_category = {}
    for c in sorted({int(c) for gt in ground_truth for c in gt.classes}):
        ranked, matched, n_pos = _match_class(entries, boxes_of, ground_truth, c, iou_threshold)
        kinds = []
        for (i, j, _, _, _), g in zip(ranked, matched):
            if g >= 0:
                kinds.append("true")
                continue
            gt = ground_truth[i]
            iou = (box_iou_np(boxes_of[i][j:j + 1], gt.boxes)[0] if len(gt.boxes)
                   else np.zeros(0))
            own = np.asarray(gt.classes) == c
            best_own = float(iou[own].max()) if own.any() else 0.0
            best_other = float(iou[~own].max()) if (~own).any() else 0.0
            kinds.append("duplicate" if best_own >= iou_threshold else "localisation" if best_own >= near_iou
                         else "confusion" if best_other >= near_iou else "background")
        kinds = np.array(kinds, dtype=object)
        true = kinds == "true"
        costly = kinds[:int(np.nonzero(true)[0][-1])] if true.any() else kinds[:0]
        by_category[names.name(c)] = {
            "ap": _ap(true, n_pos),
            "recall_ceiling": int(true.sum()) / n_pos if n_pos else 0.0,
            "ap_without": {kind: _ap(true[kinds != kind], n_pos) for kind in FALSE_POSITIVE_KINDS},
            "false_positives": {kind: int((costly == kind).sum()) for kind in FALSE_POSITIVE_KINDS}}
    rows = list(by_category.values())

    def mean(values):
        values = list(values)
        return float(np.mean(values)) if values else 0.0

    return {"mAP": mean(r["ap"] for r in rows), "recall_ceiling": mean(r["recall_ceiling"] for r in rows),
            "ap_without": {kind: mean(r["ap_without"][kind] for r in rows) for kind in FALSE_POSITIVE_KINDS},
            "by_category": by_category}


def detect_vg(detector, vg_dir, image_ids: Optional[Sequence[int]] = None, *,
              batch_size: Optional[int] = None) -> tuple[list, list[Annotation]]:
    """Run ``detector.detect`` on the images of a VG-format folder (``images/<id>.jpg`` or
    ``.png``): returns (records, ground truth), in the same order."""
    ground_truth = load_vg_annotations(vg_dir, image_ids)
    images = []
    for gt in ground_truth:
        image = cv2.imread(str(gt.path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot read image {gt.path}")
        images.append(image)
    records = detector.detect(images, image_ids=[str(gt.image_id) for gt in ground_truth], batch_size=batch_size)
    return records, ground_truth


def evaluate_detector(detector, vg_dir, image_ids: Optional[Sequence[int]] = None, *,
                      iou_threshold: float = 0.5, score_threshold: Optional[float] = None,
                      batch_size: Optional[int] = None) -> dict:
    """Run ``detector.detect`` on VG images and score it (see the module docstring).

    vg_dir: folder with objects.json / attributes.json / image_data.json / images/<id>.jpg
        (or .png).
    image_ids: which images (default: all in objects.json).
    score_threshold: for precision/recall (default: the detector's ``score_threshold``).
    """
    return evaluate_detector_sets(detector, [(vg_dir, image_ids)], iou_threshold=iou_threshold,
                                  score_threshold=score_threshold, batch_size=batch_size)


def evaluate_detector_sets(detector, sets: Sequence[tuple], *, iou_threshold: float = 0.5,
                           score_threshold: Optional[float] = None,
                           batch_size: Optional[int] = None) -> dict:
    """``evaluate_detector`` on several VG folders scored as one pooled set.

    sets: (folder, image ids or None for all) pairs.
    """
    records, ground_truth = [], []
    for vg_dir, image_ids in sets:
        folder_records, folder_truth = detect_vg(detector, vg_dir, image_ids, batch_size=batch_size)
        records += folder_records
        ground_truth += folder_truth
    if score_threshold is None:
        score_threshold = float(getattr(detector, "detector_config").score_threshold)
    return evaluate_predictions(records, ground_truth, iou_threshold=iou_threshold,
                                score_threshold=score_threshold)
