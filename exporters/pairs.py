"""``vlp export-pairs``: pair stores as the annotation JSON files other trainers read.

* ``lxmert-pretrain`` - LXMERT's pretraining files (``mscoco_train.json`` ...): a list with one
  entry per image, ``{"img_id", "sentf": {source: [sentences]}, "labelf": {source: [{answer:
  score}]}}``; captions and questions of several pair stores are grouped by image, questions
  add their soft answer scores under ``labelf`` in the same order as their ``sentf`` list.
  Sources use LXMERT's names (``coco`` -> ``mscoco``; others as the store says).
* ``lxmert-vqa`` - LXMERT's VQA / GQA split files: a list of ``{"question_id", "img_id",
  "sent", "label": {answer: score}, "answer_type", "question_type"}`` (question ids become
  integers when they are numbers, as in LXMERT's files).
* ``coco-captions`` - the COCO captions annotation file (``captions_train2014.json`` layout
  read by pycocotools and the captioning repos): ``images`` [{id, file_name, width, height}]
  and ``annotations`` [{id, image_id, caption}], integer ids from ``id_format``; width and
  height come from a feature store when one is given.

Like feature exports the result is atomic (written under a temporary name, renamed at the
end) with a sidecar ``OUT.vlp-export.json`` and ``OUT.errors.jsonl`` for pairs the target
cannot hold (a non-numeric id for an integer-id format, a kind the format does not take).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from vlp import __version__
from vlp.core.durable import atomic_path, atomic_write_json
from vlp.core.errors_log import ERRORS_NAME, ErrorLog
from vlp.core.progress import Progress
from vlp.exporters.common import SIDECAR_NAME, ExportError, ExportStats, IdMap, RecordIssue
from vlp.schemas.manifest import now_iso
from vlp.schemas.pairs import PairStore

PAIR_FORMATS = {
    "lxmert-pretrain": ("caption", "question"),
    "lxmert-vqa": ("question",),
    "coco-captions": ("caption",),
}
#: LXMERT's names for the sources it pretrains on
LXMERT_SOURCES = {"coco": "mscoco", "mscoco": "mscoco", "vg": "vg", "visual_genome": "vg",
                  "vqa": "vqa", "gqa": "gqa", "visual7w": "visual7w"}


def _label(pair: dict) -> dict:
    answers = pair.get("answers") or []
    scores = pair.get("answer_scores") or [1.0] * len(answers)
    # scores are float32 in the store: 0.3 comes back as 0.30000001192...; 6 decimals say it as written
    return {answer: round(float(score), 6) for answer, score in zip(answers, scores)}


def _question_id(value: str):
    return int(value) if value and value.isascii() and value.isdigit() else value


def export_pairs(pair_dirs: Iterable, out, fmt: str, *, features=None, split: Optional[str] = None,
                 id_format: Optional[str] = None, file_ext: str = ".jpg", overwrite: bool = False,
                 progress: str = "auto") -> ExportStats:
    """Write the pair stores ``pair_dirs`` as ``fmt`` to the file ``out`` (see module doc).

    ``split``: only pairs of this split. ``features``: a feature store whose image sizes
    fill coco-captions' width/height. ``id_format`` (coco-captions): int or trailing-int.
    """
    if fmt not in PAIR_FORMATS:
        raise ExportError(f"unknown pair export format {fmt!r}; known: {', '.join(PAIR_FORMATS)}")
    if id_format is not None and fmt != "coco-captions":
        raise ExportError(f"{fmt} keeps vlp's image ids; --id-format applies to coco-captions")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists; pass --overwrite to replace it")
    if out.is_dir():
        raise ExportError(f"{out}: is a folder; {fmt} writes one JSON file")
    stores = [PairStore(d) for d in pair_dirs]
    if not stores:
        raise ExportError("give at least one pair store")
    for store in stores:
        if store.kind not in PAIR_FORMATS[fmt]:
            raise ExportError(f"{store.root}: holds {store.kind} pairs; {fmt} takes "
                              f"{' and '.join(PAIR_FORMATS[fmt])} pairs")
    feature_store = None
    if features is not None:
        from vlp.schemas import FeatureStore

        feature_store = FeatureStore(features)
    out.parent.mkdir(parents=True, exist_ok=True)
    errors_path = out.with_name(out.name + "." + ERRORS_NAME)
    sidecar_path = out.with_name(out.name + "." + SIDECAR_NAME)
    errors = ErrorLog(out.with_name(f".{out.name}.errors.partial"))
    errors.remove()
    stats = ExportStats(out=out, unit="pair")
    bar = Progress(sum(len(s) for s in stores), f"export-pairs {fmt}", unit="pair", mode=progress)

    def pairs():
        for store in stores:
            for pair in store:
                bar.update(1)
                if split is not None and pair.get("split") != split:
                    continue
                yield store, pair

    def skip(pair: dict, reason: str) -> None:
        errors.add({"pair_id": pair.get("pair_id"), "image_id": pair.get("image_id"), "reason": reason})
        stats.skipped += 1

    try:
        if fmt == "lxmert-vqa":
            data = _lxmert_vqa(pairs(), stats)
        elif fmt == "lxmert-pretrain":
            data = _lxmert_pretrain(pairs(), stats)
        else:
            data = _coco_captions(pairs(), stats, skip, IdMap(id_format or "int"), feature_store, file_ext)
        if stats.exported == 0:
            raise ExportError(f"no pair could be exported to {fmt}"
                              + (f" (first reason: {errors.read()[0]['reason']})" if stats.skipped else ""))
        with atomic_path(out) as tmp:
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(data, handle, ensure_ascii=False)
            errors.close()
            if stats.skipped:
                errors.path.replace(errors_path)
            else:
                errors_path.unlink(missing_ok=True)
            atomic_write_json(sidecar_path, {
                "format": fmt, "complete": True, "created": now_iso(), "vlp_version": __version__,
                "sources": [{"path": str(s.root.resolve()), "kind": s.kind, "pairs": len(s)} for s in stores],
                "settings": {"split": split, "id_format": id_format, "file_ext": file_ext,
                             "features": str(features) if features is not None else None},
                "records": {"exported": stats.exported, "skipped": stats.skipped},
                "errors_file": errors_path.name if stats.skipped else None})
    except BaseException:
        errors.remove()
        raise
    finally:
        bar.close()
        if feature_store is not None:
            feature_store.close()
    stats.sidecar = sidecar_path
    stats.errors_file = errors_path if stats.skipped else None
    return stats


def _lxmert_vqa(pairs, stats) -> list:
    data = []
    for _store, pair in pairs:
        data.append({"question_id": _question_id(pair.get("question_id") or pair["pair_id"]),
                     "img_id": pair["image_id"], "sent": pair["text"], "label": _label(pair),
                     "answer_type": pair.get("answer_type") or "", "question_type": pair.get("question_type") or ""})
        stats.exported += 1
    return data


def _lxmert_pretrain(pairs, stats) -> list:
    images: dict[str, dict] = {}
    for store, pair in pairs:
        source = LXMERT_SOURCES.get(pair.get("source") or "", pair.get("source") or store.kind)
        entry = images.setdefault(pair["image_id"], {"img_id": pair["image_id"], "labelf": {}, "sentf": {}})
        entry["sentf"].setdefault(source, []).append(pair["text"])
        if store.kind == "question":
            entry["labelf"].setdefault(source, []).append(_label(pair))
        stats.exported += 1
    for entry in images.values():
        for source, labels in entry["labelf"].items():
            if len(labels) != len(entry["sentf"][source]):
                raise ExportError(f"image {entry['img_id']!r}: source {source!r} mixes captions and "
                                  "questions; LXMERT aligns labelf with sentf per source")
    return list(images.values())


def _coco_captions(pairs, stats, skip, ids: IdMap, features, file_ext: str) -> dict:
    images: dict[str, dict] = {}
    annotations = []
    for _store, pair in pairs:
        image_id = pair["image_id"]
        if image_id not in images:
            try:
                number = ids(image_id)
            except RecordIssue as issue:
                skip(pair, str(issue))
                continue
            entry = {"id": number, "file_name": image_id + file_ext}
            if features is not None:
                try:
                    record = features.get(image_id)
                except KeyError:
                    skip(pair, f"image {image_id!r} is not in the feature store")
                    continue
                entry.update(width=record.image_w, height=record.image_h)
            images[image_id] = entry
        annotations.append({"id": len(annotations) + 1, "image_id": images[image_id]["id"],
                            "caption": pair["text"]})
        stats.exported += 1
    return {"info": {"description": "exported by vlp export-pairs", "version": __version__},
            "licenses": [], "type": "captions", "images": list(images.values()), "annotations": annotations}
