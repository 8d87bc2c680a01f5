"""Downstream metrics and the official prediction-file formats (numpy / scikit-learn, no torch).

Each metric follows the task's official evaluation script; the procedures were read from the
originals and reproduced here:

* VQA v2 / VizWiz (:func:`vqa_accuracy`, :func:`vqa_scores`): ``vqaEval.py`` of the VQA API
  (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation, the 2021 revision "Fixed processing
  answers bug"). Per question: newlines/tabs of the prediction and of every human answer become
  spaces and both are stripped; *only if the human answers are not all identical* are the human
  answers and the prediction normalized (processPunctuation then processDigitArticle, i.e.
  :func:`vlp.schemas.answers.normalize_answer`); then for each annotator, the number of the
  *other* annotators whose answer equals the prediction, ``min(1, matches / 3)``, averaged over
  the annotators. With 10 annotators an answer given by ``c`` of them scores ``min(1, 0.3 c)``.
  The official script reports percentages rounded to 2 decimals; these functions return
  unrounded fractions.
* GQA (:func:`exact_match_accuracy`): the GQA ``eval.py`` compares ``prediction == answer`` as
  raw strings, no normalization; its headline accuracy counts balanced questions only (the pair
  store holds whatever questions were imported). SNLI-VE: label equality.
* NLVR2 (:func:`nlvr2_scores`): ``nlvr2/eval/metrics.py`` of lil-lab/nlvr: accuracy ("precision"
  in its output) over all examples; consistency = the share of sentences all of whose examples
  are right, a sentence being the identifier ``split-set-pair-sentence`` with its third field
  (the image-pair index) blanked.
* MM-IMDB (:func:`multilabel_f1`): scikit-learn ``f1_score`` with ``average="micro"`` and
  ``"macro"`` over the binarized label sets.
* Image-text retrieval (:func:`retrieval_metrics`, :func:`retrieval_fold_metrics`,
  :func:`coco_retrieval_metrics`): a score matrix texts x images; IR R@K = share of texts whose
  image is in their top K, TR R@K = share of images with any of their captions in the top K
  (UNITER's and VOLTA's evaluation), ties counted against the true match; COCO 1K = the mean
  over the five 1K folds of the 5K test images.

:func:`write_predictions` writes each official prediction format; :func:`results_table` renders
``vlp-train evaluate`` results as a markdown table.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import numpy as np

from vlp.core.durable import atomic_write_json, atomic_write_text
from vlp.schemas.answers import normalize_answer

__all__ = ["vqa_accuracy", "vqa_accuracy_from_count", "vqa_scores", "exact_match_accuracy", "nlvr2_scores",
           "nlvr2_sentence", "multilabel_f1", "write_predictions", "results_table", "PREDICTION_TASKS",
           "retrieval_ranks", "retrieval_metrics", "retrieval_fold_metrics", "coco_retrieval_metrics",
           "box_iou", "grounding_accuracy", "vcr_scores"]

#: The tasks :func:`write_predictions` knows, each with the file it writes.
PREDICTION_TASKS = {
    "refcoco": 'JSON lines {"pair_id": str, "prediction": {"box": [x1, y1, x2, y2], "region": int}}',
    "vcr": 'JSON lines {"pair_id": "<pair_id>#q_a" or "#qa_r", "prediction": {"choice": int}} (choices 0..3)',
    "vqa": 'JSON list [{"question_id": int, "answer": str}] (VQA evaluation server / vqaEval.py)',
    "vizwiz": 'JSON list [{"image": str, "answer": str}] (VizWiz evaluation server)',
    "gqa": 'JSON list [{"questionId": str, "prediction": str}] (GQA eval.py)',
    "nlvr2": "CSV lines identifier,True|False, no header (nlvr2/eval/metrics.py)",
    "snli_ve": 'JSON lines {"pair_id": str, "prediction": str}',
    "mmimdb": 'JSON lines {"pair_id": str, "prediction": [genre, ...]}',
}
NLVR2_PREFIX = "nlvr2/"
_ANNOTATORS = 10  # VQA v2 and VizWiz collect ten answers per question
_SCORE_TOLERANCE = 1e-4  # answer_scores are stored as float32


def _clean(text: str) -> str:
    """The official first step for every answer: newline and tab become a space, then strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


# --------------------------------------------------------------------------------------- VQA


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """The official per-question VQA accuracy (``vqaEval.py``) of ``prediction`` against the raw
    annotator answers of one question (10 for VQA v2 / VizWiz; any number >= 1 is averaged the
    same way). See the module docstring for the procedure, quirk included: when all human
    answers are identical (after strip), neither they nor the prediction are normalized, so
    "Yes" scores 0 against ten "yes" while "yes " scores 1."""
    if not human_answers:
        raise ValueError("vqa_accuracy: a question needs at least one human answer")
    prediction = _clean(str(prediction))
    humans = [_clean(str(a)) for a in human_answers]
    if len(set(humans)) > 1:
        humans = [normalize_answer(a) for a in humans]
        prediction = normalize_answer(prediction)
    matching = sum(1 for a in humans if a == prediction)
    # leave-one-out: annotator i is compared with the others only
    per_annotator = [min(1.0, (matching - (a == prediction)) / 3.0) for a in humans]
    return float(sum(per_annotator)) / len(per_annotator)


def vqa_accuracy_from_count(count: int, annotators: int = _ANNOTATORS) -> float:
    """Official accuracy of an answer given by ``count`` of ``annotators`` (all others different):
    the leave-one-out mean, = min(1, 0.3 count) for 10 annotators."""
    if not 0 <= count <= annotators:
        raise ValueError(f"count must be in 0..{annotators}, got {count}")
    inside = min(1.0, (count - 1) / 3.0) if count else 0.0
    outside = min(1.0, count / 3.0)
    return (count * inside + (annotators - count) * outside) / annotators


def _count_from_score(score: float) -> Optional[int]:
    """Annotator count behind a stored soft score below 1: ``min(1, c/3)`` (scheme "vqa") or
    ``min(1, 0.3 c)`` (scheme "butd"); None for a score of 1 (c not recoverable)."""
    if score >= 1.0 - _SCORE_TOLERANCE:
        return None
    for unit in (1.0 / 3.0, 0.3):
        count = round(score / unit)
        if abs(count * unit - score) < _SCORE_TOLERANCE:
            return int(count)
    raise ValueError(f"answer score {score!r} is not a VQA soft score (c/3 or 0.3c)")


def _reconstructed_accuracy(prediction: str, answers: list[str], scores: list[float]) -> float:
    predicted = normalize_answer(str(prediction))
    for answer, score in zip(answers, scores):
        if answer == predicted:
            count = _count_from_score(float(score))
            return 1.0 if count is None else vqa_accuracy_from_count(count)
    return 0.0


def vqa_scores(predictions: Mapping[str, str], pairs: Iterable[dict]) -> dict:
    """VQA accuracy of ``predictions`` (question_id -> answer) over question pairs.

    Each pair (a pair-store row) is scored with :func:`vqa_accuracy` on its ``human_answers``
    when it has them (exactly the official figure). Otherwise the annotator count ``c`` of the
    predicted answer is reconstructed from the stored normalized ``answers`` / ``answer_scores``
    (scheme "vqa" ``s = min(1, c/3)`` or "butd" ``s = min(1, 0.3 c)``, told apart by value:
    c = round(3 s) or round(s / 0.3) for s < 1) and scored ``min(1, 0.3 c)``; a prediction not
    among the stored answers scores 0. What is exact and what is not:

    * s < 1 gives c exactly (c = 0, 1, 2 under "vqa"; 0..3 under "butd"), so those scores are exact;
    * s = 1 is scored 1.0. Under "butd" s = 1 means c >= 4, where the official accuracy is 1.0:
      exact. Under "vqa" s = 1 means c >= 3: exact for c >= 4, but c = 3 officially scores 0.9,
      so such a question is over-scored by 0.1;
    * the stored answers are always normalized, while the official script leaves answers and
      prediction raw when all ten annotators wrote the identical string; a prediction that
      differs from that string only in normalization (case, articles, punctuation) scores 1.0
      here and 0 officially;
    * answers dropped by the importer's answer vocabulary are gone; only a prediction outside
      that vocabulary is affected (scored 0), and the counts assume 10 annotators.

    Every pair needs a prediction (as the official script demands); predictions for questions
    not in ``pairs`` are ignored. Returns ``{"accuracy", "n", "per_answer_type"}``, accuracies
    as fractions (the official script prints percentages); rows whose answer_type is empty or
    missing count in the overall accuracy only.
    """
    total, n = 0.0, 0
    by_type: dict[str, list[float]] = defaultdict(list)
    for pair in pairs:
        qid = str(pair["question_id"])
        if qid not in predictions:
            raise ValueError(f"no prediction for question {qid}")
        prediction = predictions[qid]
        humans = pair.get("human_answers")
        if humans:
            accuracy = vqa_accuracy(prediction, list(humans))
        else:
            answers = list(pair.get("answers") or [])
            scores = list(pair.get("answer_scores") or [])
            if len(answers) != len(scores):
                raise ValueError(f"question {qid}: answers and answer_scores differ in length")
            accuracy = _reconstructed_accuracy(prediction, answers, scores)
        total += accuracy
        n += 1
        if pair.get("answer_type"):
            by_type[str(pair["answer_type"])].append(accuracy)
    if n == 0:
        raise ValueError("vqa_scores: no questions to score")
    return {"accuracy": total / n, "n": n,
            "per_answer_type": {t: float(sum(v)) / len(v) for t, v in sorted(by_type.items())}}


# ------------------------------------------------------------------------ GQA, SNLI-VE, NLVR2


def _missing(predictions: Mapping, gold: Mapping, what: str) -> None:
    missing = [k for k in gold if k not in predictions]
    if missing:
        raise ValueError(f"{what}: no prediction for {len(missing)} of {len(gold)} items (first: {missing[0]})")
    if not gold:
        raise ValueError(f"{what}: nothing to score")


def exact_match_accuracy(predictions: Mapping[str, str], gold: Mapping[str, str]) -> dict:
    """Share of ``gold`` items whose prediction equals the gold answer as a raw string (GQA's
    ``eval.py`` compares ``predicted == gold`` with no normalization; SNLI-VE compares labels).
    Every gold item needs a prediction; extra predictions are ignored."""
    _missing(predictions, gold, "exact_match_accuracy")
    correct = sum(1 for k, answer in gold.items() if predictions[k] == answer)
    return {"accuracy": correct / len(gold), "n": len(gold)}


def nlvr2_sentence(identifier: str) -> Optional[str]:
    """The sentence an NLVR2 example belongs to, as the official metrics.py forms it: the
    identifier ``split-set-pair-sentence`` with its third field blanked ("dev-850-1-0" ->
    "dev-850--0"); None for an identifier without that field."""
    if identifier.startswith(NLVR2_PREFIX):
        identifier = identifier[len(NLVR2_PREFIX):]
    fields = identifier.split("-")
    if len(fields) < 3:
        return None
    fields[2] = ""
    return "-".join(fields)


def _as_bool(value, where: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"{where}: expected True/False, got {value!r}")


def nlvr2_scores(predictions: Mapping[str, bool], gold: Mapping[str, bool]) -> dict:
    """NLVR2 accuracy and consistency as ``nlvr2/eval/metrics.py`` computes them, keyed by
    identifier (a "nlvr2/" pair-id prefix is allowed). Consistency is None when an identifier
    lacks the ``split-set-pair-sentence`` form (the official script would fail on it)."""
    _missing(predictions, gold, "nlvr2_scores")
    correct = 0
    sentences: dict[str, bool] = {}
    grouped = True
    for key, label in gold.items():
        right = _as_bool(predictions[key], f"prediction {key}") == _as_bool(label, f"label {key}")
        correct += right
        sentence = nlvr2_sentence(str(key))
        if sentence is None:
            grouped = False
        else:
            sentences[sentence] = sentences.get(sentence, True) and right
    consistency = sum(sentences.values()) / len(sentences) if grouped else None
    return {"accuracy": correct / len(gold), "consistency": consistency, "n": len(gold)}


# -------------------------------------------------------------------------------- MM-IMDB


def multilabel_f1(true: list[list[str]], predicted: list[list[str]], labels: list[str]) -> dict:
    """Micro- and macro-F1 (scikit-learn ``f1_score``) of predicted label sets against true
    ones over ``labels`` (the genre list read from the data).

    ``zero_division=0`` is passed explicitly: a label that is neither true nor predicted in any
    example has an undefined F1 and counts as 0 in the macro mean (scikit-learn's default
    value, which MMF's F1 metrics use, without its warning); micro-F1 is undefined only when
    nothing is true or predicted at all, and is then 0. Labels outside ``labels`` are an error.
    """
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    if len(true) != len(predicted):
        raise ValueError(f"multilabel_f1: {len(true)} true label sets but {len(predicted)} predicted")
    if not true:
        raise ValueError("multilabel_f1: nothing to score")
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError("multilabel_f1: labels must be a non-empty list without repeats")
    known = set(labels)
    for name, sets in (("true", true), ("predicted", predicted)):
        unknown = sorted({label for s in sets for label in s} - known)
        if unknown:
            raise ValueError(f"multilabel_f1: {name} labels not in the label list: {', '.join(unknown[:5])}")
    binarizer = MultiLabelBinarizer(classes=list(labels))
    y_true = binarizer.fit_transform([list(s) for s in true])
    y_pred = binarizer.transform([list(s) for s in predicted])
    return {"micro_f1": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "n": len(true)}


# ------------------------------------------------------------------------ prediction files


def _strip_prefix(identifier: str) -> str:
    return identifier[len(NLVR2_PREFIX):] if identifier.startswith(NLVR2_PREFIX) else identifier


def write_predictions(task: str, rows: list[dict], path: Union[str, os.PathLike]) -> Path:
    """Write ``rows`` ({"id", "prediction", ...}) in ``task``'s official format (see
    :data:`PREDICTION_TASKS`) to ``path`` atomically; returns the path.

    ids: VQA question_id (written as an int), VizWiz the image file name (``row["image"]`` when
    present, else the id), GQA questionId (written as a string, the key type of its questions
    file), NLVR2 identifier (a "nlvr2/" pair-id prefix is dropped; prediction True/False, as
    bool, 0/1 or string), SNLI-VE / MM-IMDB pair_id. Repeated ids are an error.
    """
    if task not in PREDICTION_TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(PREDICTION_TASKS)}")
    path = Path(path)
    seen: set = set()

    def key(row: dict, value) -> object:
        if value in seen:
            raise ValueError(f"write_predictions: id {value!r} appears twice")
        seen.add(value)
        return value

    if task == "vqa":
        out = []
        for row in rows:
            try:
                qid = int(row["id"])
            except (TypeError, ValueError):
                raise ValueError(f"write_predictions vqa: question_id must be an integer, got {row['id']!r}") from None
            out.append({"question_id": key(row, qid), "answer": str(row["prediction"])})
        return atomic_write_json(path, out, indent=None)
    if task == "vizwiz":
        out = [{"image": key(row, str(row.get("image") or row["id"])), "answer": str(row["prediction"])}
               for row in rows]
        return atomic_write_json(path, out, indent=None)
    if task == "gqa":
        out = [{"questionId": key(row, str(row["id"])), "prediction": str(row["prediction"])} for row in rows]
        return atomic_write_json(path, out, indent=None)
    if task == "nlvr2":
        lines = []
        for row in rows:
            identifier = key(row, _strip_prefix(str(row["id"])))
            if "," in identifier or "\n" in identifier:
                raise ValueError(f"write_predictions nlvr2: identifier {identifier!r} cannot go in the CSV")
            lines.append(f"{identifier},{_as_bool(row['prediction'], identifier)}\n")
        return atomic_write_text(path, "".join(lines))
    # snli_ve, mmimdb: one JSON object a line
    lines = []
    for row in rows:
        prediction = row["prediction"]
        if task == "mmimdb":
            prediction = [str(label) for label in prediction]
        elif not isinstance(prediction, dict):  # refcoco, vcr: an object
            prediction = str(prediction)
        lines.append(json.dumps({"pair_id": key(row, str(row["id"])), "prediction": prediction}) + "\n")
    return atomic_write_text(path, "".join(lines))


# --------------------------------------------------------------------------- results table


def _flatten(metrics: Mapping, prefix: str = "") -> dict:
    flat = {}
    for name, value in metrics.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{float(value):.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def results_table(results: dict) -> str:
    """A markdown table of evaluation results, one row per task and split, one column per metric.

    ``results`` is ``{task: {split: {metric: value}}}``; a task whose value holds any plain value
    (a metric dict such as ``{"accuracy": .., "n": ..}``) is one row with split "–". Nested metric dicts become dotted
    columns ("per_answer_type.yes/no"); columns appear in first-seen order; fractions are
    printed with 4 decimals, a missing metric as "–"."""
    rows: list[tuple[str, str, dict]] = []
    for task, by_split in results.items():
        if not isinstance(by_split, Mapping):
            raise ValueError(f"results_table: results[{task!r}] must be a mapping")
        if by_split and all(isinstance(v, Mapping) for v in by_split.values()):
            for split, metrics in by_split.items():
                rows.append((str(task), str(split), _flatten(metrics)))
        else:
            rows.append((str(task), "–", _flatten(by_split)))
    columns: list[str] = []
    for _, _, flat in rows:
        columns += [c for c in flat if c not in columns]
    header = ["task", "split"] + columns
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * len(columns)) + "|"]
    for task, split, flat in rows:
        cells = [_cell(task), _cell(split)] + [_cell(flat.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ image-text retrieval

RETRIEVAL_KS = (1, 5, 10)


def _retrieval_inputs(scores, text_image) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    text_image = np.asarray(text_image)
    if scores.ndim != 2 or scores.shape[0] < 1 or scores.shape[1] < 1:
        raise ValueError(f"retrieval scores must be a [texts, images] matrix, got shape {scores.shape}")
    if text_image.shape != (scores.shape[0],) or not np.issubdtype(text_image.dtype, np.integer):
        raise ValueError(f"text_image must hold one image index per text ({scores.shape[0]}), "
                         f"got shape {text_image.shape}")
    if text_image.min() < 0 or text_image.max() >= scores.shape[1]:
        raise ValueError(f"text_image holds an image index outside 0..{scores.shape[1] - 1}")
    if np.isnan(scores).any():
        raise ValueError("retrieval scores contain NaN: rankings would be meaningless")
    captioned = np.bincount(text_image, minlength=scores.shape[1])
    if (captioned == 0).any():
        raise ValueError(f"image {int(np.argmin(captioned))} has no caption among the texts: "
                         "every scored image needs at least one")
    return scores, text_image.astype(np.int64)


def retrieval_ranks(scores, text_image) -> tuple[np.ndarray, np.ndarray]:
    """``(ir_rank, tr_rank)`` from ``scores[text, image]`` and ``text_image[text]`` (the index
    of each text's own image; an image may have several texts).

    ``ir_rank[t]``: the rank of text t's image among all images, 1 + the number of *other*
    images scoring greater than or equal to it (ties count against the true match, so a
    constant scorer ranks it last). ``tr_rank[i]``: the rank of image i's best-ranked
    caption among all texts, 1 + the number of texts that are *not* its captions scoring at
    least its best caption's score (its other captions never push it down).
    """
    scores, text_image = _retrieval_inputs(scores, text_image)
    texts = np.arange(scores.shape[0])
    true = scores[texts, text_image]
    ir_rank = (scores >= true[:, None]).sum(1)  # counts the true image itself once: = 1 + others
    own = np.zeros(scores.shape, dtype=bool)
    own[texts, text_image] = True
    best = np.where(own, scores, -np.inf).max(0)  # each image's best caption score
    tr_rank = 1 + ((scores >= best[None, :]) & ~own).sum(0)
    return ir_rank.astype(np.int64), tr_rank.astype(np.int64)


def retrieval_metrics(scores, text_image, ks=RETRIEVAL_KS) -> dict:
    """Image-text retrieval as the field reports it (UNITER, ImageBERT, VOLTA), fractions in [0, 1].

    ``ir_r{k}`` (image retrieval, text -> image): share of texts whose image is in their top
    k images; ``tr_r{k}`` (text retrieval, image -> text): share of images with any of their
    captions in the top k texts; ``ir_mean`` / ``tr_mean``: the mean of each side's R@k;
    ``r_mean``: the mean of all of them (UNITER's "R-mean"); mean ranks; ``n_texts``,
    ``n_images``. Ties are pessimistic (:func:`retrieval_ranks`).
    """
    ir_rank, tr_rank = retrieval_ranks(scores, text_image)
    out: dict = {}
    for k in ks:
        out[f"ir_r{k}"] = float((ir_rank <= k).mean())
    for k in ks:
        out[f"tr_r{k}"] = float((tr_rank <= k).mean())
    out["ir_mean"] = float(np.mean([out[f"ir_r{k}"] for k in ks]))
    out["tr_mean"] = float(np.mean([out[f"tr_r{k}"] for k in ks]))
    out["r_mean"] = float(np.mean([out[f"ir_r{k}"] for k in ks] + [out[f"tr_r{k}"] for k in ks]))
    out["ir_mean_rank"] = float(ir_rank.mean())
    out["tr_mean_rank"] = float(tr_rank.mean())
    out["n_texts"], out["n_images"] = int(len(ir_rank)), int(len(tr_rank))
    return out


def retrieval_fold_metrics(scores, text_image, fold_images: int = 1000, ks=RETRIEVAL_KS) -> dict:
    """COCO's "1K test": the images split into consecutive folds of ``fold_images`` (the
    Karpathy 5K test images in file order give five), each fold scored on its own images and
    their captions, the metrics averaged over the folds. The number of images must be a
    multiple of ``fold_images``. Returns the averaged :func:`retrieval_metrics` (counts are
    per fold) and ``folds``."""
    scores, text_image = _retrieval_inputs(scores, text_image)
    n_images = scores.shape[1]
    if fold_images < 1 or n_images % fold_images:
        raise ValueError(f"{n_images} images do not split into folds of {fold_images}")
    folds = []
    for start in range(0, n_images, fold_images):
        texts = np.nonzero((text_image >= start) & (text_image < start + fold_images))[0]
        folds.append(retrieval_metrics(scores[np.ix_(texts, np.arange(start, start + fold_images))],
                                       text_image[texts] - start, ks))
    out = {key: float(np.mean([fold[key] for fold in folds])) for key in folds[0]}
    out["n_texts"] = float(out["n_texts"])
    out["n_images"] = int(fold_images)
    out["folds"] = len(folds)
    return out


def coco_retrieval_metrics(scores, text_image, ks=RETRIEVAL_KS) -> dict:
    """``{"5k": ..., "1k": ...}`` for a COCO Karpathy test split of 5,000 images (or any
    multiple of 1,000 above it): all images at once, and the mean over the 1K folds."""
    return {"5k": retrieval_metrics(scores, text_image, ks), "1k": retrieval_fold_metrics(scores, text_image, 1000, ks)}


# ------------------------------------------------------------------ referring expressions, VCR


def box_iou(a, b) -> np.ndarray:
    """Pairwise IoU of boxes ``a`` [N, 4] and ``b`` [M, 4] (x1, y1, x2, y2 in continuous
    pixels, width = x2 - x1 as COCO's bbox w); [N, M]. Empty boxes have IoU 0 with everything."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def grounding_accuracy(predicted_boxes, target_boxes, threshold: float = 0.5) -> dict:
    """RefCOCO(+/g) accuracy (MAttNet's, VL-BERT's and UNITER's evaluation): the share of
    expressions whose chosen box has IoU >= ``threshold`` with the target box; also the mean
    IoU. Row i of both is one expression."""
    predicted = np.asarray(predicted_boxes, dtype=np.float64).reshape(-1, 4)
    target = np.asarray(target_boxes, dtype=np.float64).reshape(-1, 4)
    if predicted.shape != target.shape:
        raise ValueError(f"{len(predicted)} predicted boxes for {len(target)} targets")
    if not len(target):
        return {"accuracy": None, "mean_iou": None, "n": 0}
    iou = np.array([box_iou(p, t)[0, 0] for p, t in zip(predicted, target)])
    return {"accuracy": float(np.mean(iou >= threshold)), "mean_iou": float(iou.mean()), "n": int(len(iou))}


def vcr_scores(answers: Mapping[str, int], rationales: Mapping[str, int], gold_answers: Mapping[str, int],
               gold_rationales: Mapping[str, int]) -> dict:
    """VCR accuracies (the leaderboard's): Q->A over the questions with an answer prediction,
    QA->R over those with a rationale prediction (chosen given the right answer), Q->AR over
    those with both = the share where both are right. Keys are annotation ids; a prediction
    without a gold label is an error."""
    for predicted, gold, what in ((answers, gold_answers, "answer"), (rationales, gold_rationales, "rationale")):
        extra = [k for k in predicted if k not in gold]
        if extra:
            raise ValueError(f"VCR {what}: {len(extra)} prediction(s) without a gold label (first: {extra[0]})")
    out: dict = {}
    if answers:
        out["q_a"] = float(np.mean([int(answers[k]) == int(gold_answers[k]) for k in answers]))
    if rationales:
        out["qa_r"] = float(np.mean([int(rationales[k]) == int(gold_rationales[k]) for k in rationales]))
    both = [k for k in answers if k in rationales]
    if both:
        out["q_ar"] = float(np.mean([int(answers[k]) == int(gold_answers[k]) and
                                     int(rationales[k]) == int(gold_rationales[k]) for k in both]))
    out["n"] = int(max(len(answers), len(rationales)))
    return out
