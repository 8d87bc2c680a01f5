"""Importers of public annotation files into pair stores (``vlp-build import-*``).

Each importer maps the dataset's image naming to store image_ids with a documented
default template that matches what ``vlp-extract`` produces for the dataset's usual
folder layout, overridable with ``image_id_template`` (fields per importer below).
Malformed rows are counted and logged to ``OUT/errors.jsonl`` with ``file:line`` (line
formats) or ``file:[index]`` (JSON documents); ``strict=True`` stops at the first one.

=============  =========================  =====================  ==========================================
importer       input                      kind / pair_id         default image_id (fields)
=============  =========================  =====================  ==========================================
coco           captions_*.json            caption / coco/<ann>   ``{stem}`` = file_name w/o extension
               (+ Karpathy dataset_coco)                          (stem, file_name, id)
karpathy       dataset_{coco,flickr30k}   caption / <ds>/<sid>   ``{stem}`` (stem, filename, filepath, id)
cc             TSV caption<TAB>url or     caption / cc/<row>     ``{folder}/{key}``: the img2dataset layout
               url<TAB>caption, or an                            (row, key, shard, folder, url)
               img2dataset output folder
sbu            json {image_urls,captions} caption / sbu/<row>    ``{folder}/{key}`` as cc
vqa            v2 questions + annotations question / vqa/<qid>   ``COCO_{subtype}_{image_id:012d}``
                                                                 (image_id, subtype)
gqa            *_questions.json           question / gqa/<qid>   ``{image_id}`` (image_id)
nlvr2          *.json(l) lines            nlvr2 / nlvr2/<id>     ``{stem}`` = <split>-<set>-<pair>-img0/1
                                                                 (stem, split, directory)
snli-ve        snli_ve_*.jsonl            entailment /           ``{flickr_id}`` (flickr_id)
                                          snli-ve/<pairID>
=============  =========================  =====================  ==========================================
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

from vlp.builders.common import (Build, BuildResult, ImageIdTemplate, iter_jsonl, iter_lines, read_json,
                                 require_list, stem)
from vlp.builders.vqa_answers import answer_vocabulary, scored_answers
from vlp.schemas.errors import SchemaError

_URL = re.compile(r"^(https?|ftp)://\S+$", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def _text(value) -> Optional[str]:
    if not isinstance(value, str):
        return None
    value = _SPACE.sub(" ", value).strip()
    return value or None


def _split_from_name(path, known=("train", "val", "test", "testdev", "dev", "restval")) -> str:
    """"captions_train2014.json" -> "train", "snli_ve_dev.jsonl" -> "dev", "test1.json" -> "test"."""
    name = Path(path).name.lower()
    for token in re.split(r"[^a-z0-9]+", name):
        bare = token.rstrip("0123456789")
        if bare in known:
            return bare
    return ""


def _common(out, kind, sources, kw) -> Build:
    return Build(out, kind, sources=sources, overwrite=kw.get("overwrite", False), strict=kw.get("strict", False),
                 features=kw.get("features"), shard_size=kw.get("shard_size", 100_000),
                 desc=kw.get("desc", kind), unit=kw.get("unit", "pair"), progress=kw.get("progress", "auto"))


# --------------------------------------------------------------------------- COCO + Karpathy


def import_coco(caption_files, out, *, karpathy=None, image_id_template: str = "{stem}", split=None,
                **kw) -> BuildResult:
    """COCO captions json files (``captions_train2014.json`` ...) -> caption pairs.

    Split: from the Karpathy file (``dataset_coco.json``, by cocoid; "restval" is kept as
    its own split) when given, else from the file name (train/val), else ``split``.
    Without caption files, the Karpathy file's own sentences are imported.
    """
    caption_files = [Path(p) for p in caption_files]
    if not caption_files:
        if karpathy is None:
            raise SchemaError("import-coco needs COCO caption files or --karpathy dataset_coco.json")
        return import_karpathy(karpathy, out, dataset="coco", image_id_template=image_id_template, split=split, **kw)
    template = ImageIdTemplate(image_id_template, ("stem", "file_name", "id"))
    karpathy_split = {}
    if karpathy is not None:
        doc = read_json(karpathy, "Karpathy split file (dataset_coco.json)")
        for entry in require_list(doc, "images", karpathy, "Karpathy split file"):
            if isinstance(entry, dict) and "cocoid" in entry:
                karpathy_split[entry["cocoid"]] = entry.get("split", "")
    sources = [str(p) for p in caption_files] + ([str(karpathy)] if karpathy else [])
    with _common(out, "caption", sources, {**kw, "desc": "import-coco"}) as build:
        stats = build.stats
        stats.update({"captions": 0, "images": 0, "not_in_karpathy_split": 0})
        for path in caption_files:
            doc = read_json(path, "COCO captions json (images + annotations)")
            images = require_list(doc, "images", path, "COCO captions json")
            annotations = require_list(doc, "annotations", path, "COCO captions json")
            file_split = split if split is not None else _split_from_name(path)
            names = {}
            for i, image in enumerate(images):
                if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
                    build.bad.add(path, f"images[{i}]", "image without id or file_name")
                    continue
                names[image["id"]] = image["file_name"]
            stats["images"] += len(names)
            build.progress.total += len(annotations)
            for i, ann in enumerate(annotations):
                build.progress.update()
                caption = _text(ann.get("caption")) if isinstance(ann, dict) else None
                if caption is None or "id" not in ann:
                    build.bad.add(path, f"annotations[{i}]", "annotation without id or caption text")
                    continue
                file_name = names.get(ann.get("image_id"))
                if file_name is None:
                    build.bad.add(path, f"annotations[{i}]", f"image_id {ann.get('image_id')!r} is not in 'images'")
                    continue
                pair_split = file_split
                if karpathy is not None:
                    pair_split = karpathy_split.get(ann["image_id"])
                    if pair_split is None:
                        stats["not_in_karpathy_split"] += 1
                        pair_split = ""
                if build.add({"pair_id": f"coco/{ann['id']}", "text": caption, "source": "coco", "split": pair_split,
                              "image_id": template(stem=stem(file_name), file_name=file_name, id=ann["image_id"])},
                             (path, f"annotations[{i}]")):
                    stats["captions"] += 1
    return build.result


def import_karpathy(path, out, *, dataset: Optional[str] = None, image_id_template: str = "{stem}", split=None,
                    **kw) -> BuildResult:
    """Karpathy split json (``dataset_coco.json``, ``dataset_flickr30k.json``) -> caption pairs.

    text = each sentence's ``raw``; split = the image's ``split`` (``split`` overrides).
    """
    template = ImageIdTemplate(image_id_template, ("stem", "filename", "filepath", "id"))
    doc = read_json(path, "Karpathy split file (dataset_*.json)")
    images = require_list(doc, "images", path, "Karpathy split file")
    dataset = dataset or str(doc.get("dataset") or "karpathy")
    with _common(out, "caption", [path], {**kw, "desc": f"import-{dataset}"}) as build:
        build.progress.total = len(images)
        build.stats.update({"images": 0, "captions": 0})
        for i, image in enumerate(images):
            build.progress.update()
            if not isinstance(image, dict) or not isinstance(image.get("filename"), str) \
                    or not isinstance(image.get("sentences"), list):
                build.bad.add(path, f"images[{i}]", "image without filename or sentences")
                continue
            filename = image["filename"]
            image_id = template(stem=stem(filename), filename=filename, filepath=image.get("filepath", ""),
                                id=image.get("cocoid", image.get("imgid")))
            build.stats["images"] += 1
            for k, sentence in enumerate(image["sentences"]):
                text = _text(sentence.get("raw")) if isinstance(sentence, dict) else None
                if text is None or "sentid" not in sentence:
                    build.bad.add(path, f"images[{i}].sentences[{k}]", "sentence without sentid or raw text")
                    continue
                if build.add({"pair_id": f"{dataset}/{sentence['sentid']}", "image_id": image_id, "text": text,
                              "source": dataset, "split": split if split is not None else str(image.get("split", ""))},
                             (path, f"images[{i}].sentences[{k}]")):
                    build.stats["captions"] += 1
    return build.result


# --------------------------------------------------------------------------- CC, SBU (img2dataset naming)


class Img2datasetKeys:
    """img2dataset's naming of input row ``row``: shard folder ``{shard:05d}``, key =
    shard digits + row-in-shard zero-padded to ceil(log10(samples_per_shard)) digits."""

    def __init__(self, samples_per_shard: int = 10_000):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be at least 1")
        self.per_shard = samples_per_shard
        self.digits = max(1, math.ceil(math.log10(samples_per_shard)))

    def fields(self, row: int) -> dict:
        shard, index = divmod(row, self.per_shard)
        return {"row": row, "shard": shard, "folder": f"{shard:05d}", "key": f"{shard:05d}{index:0{self.digits}d}"}


_WEB_FIELDS = ("row", "key", "shard", "folder", "url")


def import_cc(source, out, *, columns: str = "auto", image_id_template: str = "{folder}/{key}",
              samples_per_shard: int = 10_000, split: str = "train", **kw) -> BuildResult:
    """Conceptual Captions TSV (CC3M ``caption<TAB>url``, CC12M ``url<TAB>caption``) or an
    img2dataset output folder -> caption pairs (with url), streamed.

    ``columns``: "auto" (per row, the column that looks like a URL is the url),
    "caption,url" or "url,caption". A first line naming the columns is skipped.
    """
    source = Path(source)
    if source.is_dir():
        return _import_img2dataset(source, out, image_id_template=image_id_template, split=split, **kw)
    if columns not in ("auto", "caption,url", "url,caption"):
        raise ValueError(f"columns must be auto, caption,url or url,caption, got {columns!r}")
    template = ImageIdTemplate(image_id_template, _WEB_FIELDS)
    keys = Img2datasetKeys(samples_per_shard)
    with _common(out, "caption", [source], {**kw, "desc": "import-cc"}) as build:
        build.stats.update({"rows": 0, "header_lines": 0})
        row = -1
        for number, line in iter_lines(source, "Conceptual Captions TSV"):
            build.progress.update()
            parts = line.split("\t")
            if number == 1 and {p.strip().lower() for p in parts} <= {"caption", "url", "image_url", "text"} \
                    and len(parts) == 2:
                build.stats["header_lines"] += 1
                continue
            if not line.strip():
                continue
            row += 1
            if len(parts) != 2:
                build.bad.add(source, number, f"expected 2 tab-separated columns, found {len(parts)}")
                continue
            if columns == "auto":
                is_url = [bool(_URL.match(p.strip())) for p in parts]
                if is_url.count(True) != 1:
                    build.bad.add(source, number, "cannot tell the url column (exactly one column must look like "
                                                  "a URL; use --columns)")
                    continue
                url, caption = (parts[0], parts[1]) if is_url[0] else (parts[1], parts[0])
            else:
                caption, url = parts if columns == "caption,url" else parts[::-1]
            caption, url = _text(caption), url.strip()
            if caption is None or not url:
                build.bad.add(source, number, "empty caption or url")
                continue
            image_id = template(**keys.fields(row), url=url)
            if build.add({"pair_id": f"cc/{row}", "image_id": image_id, "text": caption, "source": "cc",
                          "split": split, "url": url}, (source, number)):
                build.stats["rows"] += 1
    return build.result


def _import_img2dataset(folder: Path, out, *, image_id_template: str, split: str, **kw) -> BuildResult:
    """Pairs of an img2dataset output folder: the ``*.parquet`` of each shard, successful rows only."""
    import pyarrow.parquet as pq

    template = ImageIdTemplate(image_id_template, _WEB_FIELDS)
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder}: no img2dataset *.parquet files (and not a TSV file)")
    with _common(out, "caption", files, {**kw, "desc": "import-img2dataset"}) as build:
        build.stats.update({"rows": 0, "not_downloaded": 0})
        for path in files:
            table = pq.read_table(path)
            missing = {"key", "caption", "url"} - set(table.column_names)
            if missing:
                raise SchemaError(f"{path}: not an img2dataset shard table (no {', '.join(sorted(missing))} column)")
            statuses = table.column("status").to_pylist() if "status" in table.column_names else None
            for i, (key, caption, url) in enumerate(zip(*(table.column(c).to_pylist() for c in ("key", "caption", "url")))):
                build.progress.update()
                if statuses is not None and statuses[i] != "success":
                    build.stats["not_downloaded"] += 1
                    continue
                caption = _text(caption)
                if caption is None or not key:
                    build.bad.add(path, f"row {i}", "empty key or caption")
                    continue
                image_id = template(row=i, key=key, shard=path.stem, folder=path.stem, url=url or "")
                if build.add({"pair_id": f"img2dataset/{key}", "image_id": image_id, "text": caption,
                              "source": "img2dataset", "split": split, "url": url}, (path, f"row {i}")):
                    build.stats["rows"] += 1
    return build.result


def import_sbu(path, out, *, image_id_template: str = "{folder}/{key}", samples_per_shard: int = 10_000,
               split: str = "train", **kw) -> BuildResult:
    """SBU captions json (``{"image_urls": [...], "captions": [...]}``) -> caption pairs with url."""
    template = ImageIdTemplate(image_id_template, _WEB_FIELDS)
    keys = Img2datasetKeys(samples_per_shard)
    doc = read_json(path, "SBU captions json (image_urls + captions lists)")
    urls = require_list(doc, "image_urls", path, "SBU captions json")
    captions = require_list(doc, "captions", path, "SBU captions json")
    with _common(out, "caption", [path], {**kw, "desc": "import-sbu"}) as build:
        build.progress.total = max(len(urls), len(captions))
        build.stats.update({"rows": 0, "unpaired_entries": abs(len(urls) - len(captions))})
        for row in range(max(len(urls), len(captions))):
            build.progress.update()
            url = urls[row] if row < len(urls) else None
            caption = _text(captions[row]) if row < len(captions) else None
            if not isinstance(url, str) or not url.strip() or caption is None:
                build.bad.add(path, f"[{row}]", "missing or empty url or caption (the two lists must align)")
                continue
            if build.add({"pair_id": f"sbu/{row}", "image_id": template(**keys.fields(row), url=url.strip()),
                          "text": caption, "source": "sbu", "split": split, "url": url.strip()}, (path, f"[{row}]")):
                build.stats["rows"] += 1
    return build.result


# --------------------------------------------------------------------------- VQA v2, GQA


def import_vqa(files, out, *, image_id_template: str = "COCO_{subtype}_{image_id:012d}", min_count: int = 9,
               vocab_splits=("train",), answer_vocab=None, score_scheme: str = "vqa", **kw) -> BuildResult:
    """VQA v2 questions (+ annotations) json files -> question pairs with soft-scored answers.

    ``files``: questions and annotations files in any order (told apart by their
    "questions" / "annotations" lists, matched by question_id). The answer vocabulary
    is ``answer_vocab`` (a json list file) or built from the annotations of the questions
    files whose split is in ``vocab_splits`` (min_count); it is written to
    ``OUT/answer_vocab.json``. Answers outside it are left out of a pair (counted).
    Split = the questions file's data_subtype without digits ("train2014" -> "train").
    """
    import json

    template = ImageIdTemplate(image_id_template, ("image_id", "subtype"))
    question_docs, annotations = [], {}
    ann_where = {}
    for path in files:
        doc = read_json(path, "VQA questions or annotations json")
        if isinstance(doc, dict) and isinstance(doc.get("questions"), list):
            question_docs.append((Path(path), doc))
        elif isinstance(doc, dict) and isinstance(doc.get("annotations"), list):
            for i, ann in enumerate(doc["annotations"]):
                if isinstance(ann, dict) and "question_id" in ann:
                    annotations[ann["question_id"]] = ann
                    ann_where[ann["question_id"]] = (path, f"annotations[{i}]")
        else:
            raise SchemaError(f"{path}: neither a VQA questions file ('questions' list) nor an annotations "
                              "file ('annotations' list)")
    if not question_docs:
        raise SchemaError("import-vqa needs at least one questions file (v2_OpenEnded_mscoco_*_questions.json)")

    def subtype_of(path, doc) -> str:
        return str(doc.get("data_subtype") or _split_from_name(path))

    if answer_vocab is not None:
        vocab_list = read_json(answer_vocab, "answer vocabulary (a json list of answers)")
        if not isinstance(vocab_list, list):
            raise SchemaError(f"{answer_vocab}: expected a json list of answers")
        vocab_source = str(answer_vocab)
    else:
        consensus = []
        for path, doc in question_docs:
            if subtype_of(path, doc).rstrip("0123456789") in vocab_splits:
                for q in doc["questions"]:
                    ann = annotations.get(q.get("question_id")) if isinstance(q, dict) else None
                    if ann is not None and isinstance(ann.get("multiple_choice_answer"), str):
                        consensus.append(ann["multiple_choice_answer"])
        vocab_list = answer_vocabulary(consensus, min_count)
        vocab_source = f"answers given by >= {min_count} questions of {','.join(vocab_splits)}"
    vocabulary = set(vocab_list)

    sources = [str(p) for p in files]
    with _common(out, "question", sources, {**kw, "desc": "import-vqa"}) as build:
        build.stats.update({"questions": 0, "answer_vocab_size": len(vocab_list), "without_annotations": 0,
                            "without_answer_in_vocab": 0, "answers_out_of_vocab": 0})
        build.progress.total = sum(len(doc["questions"]) for _, doc in question_docs)
        for path, doc in question_docs:
            subtype = subtype_of(path, doc)
            pair_split = subtype.rstrip("0123456789")
            for i, q in enumerate(doc["questions"]):
                build.progress.update()
                text = _text(q.get("question")) if isinstance(q, dict) else None
                if text is None or not isinstance(q.get("question_id"), (int, str)) \
                        or not isinstance(q.get("image_id"), int):
                    build.bad.add(path, f"questions[{i}]", "question without question_id, integer image_id or text")
                    continue
                ann = annotations.get(q["question_id"])
                pair = {"pair_id": f"vqa/{q['question_id']}", "text": text, "source": "vqa", "split": pair_split,
                        "question_id": str(q["question_id"]),
                        "image_id": template(image_id=q["image_id"], subtype=subtype)}
                if ann is None:
                    build.stats["without_annotations"] += 1
                else:
                    raw = ann.get("answers")
                    if not isinstance(raw, list) or not all(isinstance(a, dict) and isinstance(a.get("answer"), str)
                                                            for a in raw):
                        build.bad.add(*ann_where[q["question_id"]], "annotation 'answers' is not a list of "
                                                                    "{answer: text}")
                        continue
                    given = [a["answer"] for a in raw]
                    answers, scores = scored_answers(given, vocabulary, score_scheme)
                    everything, _ = scored_answers(given, None, score_scheme)
                    build.stats["answers_out_of_vocab"] += len(everything) - len(answers)
                    if not answers:
                        build.stats["without_answer_in_vocab"] += 1
                    pair.update(answers=answers, answer_scores=scores, answer_type=ann.get("answer_type"),
                                question_type=ann.get("question_type"))
                if build.add(pair, (path, f"questions[{i}]")):
                    build.stats["questions"] += 1
        build.stats["vocab_source"] = vocab_source
    (Path(out) / "answer_vocab.json").write_text(json.dumps(vocab_list, ensure_ascii=False, indent=0))
    return build.result


def import_gqa(files, out, *, image_id_template: str = "{image_id}", split=None, **kw) -> BuildResult:
    """GQA questions json (``{qid: {imageId, question, answer, types}}``) -> question pairs.

    answers = [answer] with score 1 (GQA has one answer); answer_type = types.structural,
    question_type = types.detailed; split from the file name unless given.
    """
    template = ImageIdTemplate(image_id_template, ("image_id",))
    with _common(out, "question", files, {**kw, "desc": "import-gqa"}) as build:
        build.stats.update({"questions": 0, "without_answer": 0})
        for path in files:
            doc = read_json(path, "GQA questions json (question id -> question)")
            if not isinstance(doc, dict):
                raise SchemaError(f"{path}: expected an object of question id -> question")
            pair_split = split if split is not None else _split_from_name(path)
            build.progress.total += len(doc)
            for qid, q in doc.items():
                build.progress.update()
                text = _text(q.get("question")) if isinstance(q, dict) else None
                if text is None or not isinstance(q.get("imageId"), (str, int)):
                    build.bad.add(path, f"[{qid!r}]", "question without imageId or question text")
                    continue
                types = q.get("types") if isinstance(q.get("types"), dict) else {}
                answer = q.get("answer")
                pair = {"pair_id": f"gqa/{qid}", "image_id": template(image_id=q["imageId"]), "text": text,
                        "source": "gqa", "split": pair_split, "question_id": str(qid),
                        "answer_type": types.get("structural"), "question_type": types.get("detailed")}
                if isinstance(answer, str) and answer.strip():
                    pair.update(answers=[answer.strip()], answer_scores=[1.0])
                else:
                    build.stats["without_answer"] += 1
                if build.add(pair, (path, f"[{qid!r}]")):
                    build.stats["questions"] += 1
    return build.result


# --------------------------------------------------------------------------- NLVR2, SNLI-VE


def import_nlvr2(files, out, *, image_id_template: str = "{stem}", **kw) -> BuildResult:
    """NLVR2 json-lines files -> nlvr2 pairs (two images, label 1 = "True").

    identifier "dev-850-0-0" -> images "dev-850-0-img0" / "dev-850-0-img1" (the image
    files' stems); split = the identifier's first part.
    """
    template = ImageIdTemplate(image_id_template, ("stem", "split", "directory"))
    with _common(out, "nlvr2", files, {**kw, "desc": "import-nlvr2"}) as build:
        build.stats.update({"statements": 0, "true": 0})
        for path in files:
            for number, row in iter_jsonl(path, "NLVR2 json lines", build.bad):
                build.progress.update()
                identifier, text = row.get("identifier"), _text(row.get("sentence"))
                label = str(row.get("label", "")).lower()
                if not isinstance(identifier, str) or identifier.count("-") < 3 or text is None \
                        or label not in ("true", "false"):
                    build.bad.add(path, number, "needs identifier <split>-<set>-<pair>-<n>, sentence and "
                                                "label True/False")
                    continue
                base = identifier.rsplit("-", 1)[0]
                pair_split = identifier.split("-", 1)[0]
                fields = {"split": pair_split, "directory": str(row.get("directory", ""))}
                if build.add({"pair_id": f"nlvr2/{identifier}", "text": text, "source": "nlvr2",
                              "split": pair_split, "image_id": template(stem=f"{base}-img0", **fields),
                              "image_id_2": template(stem=f"{base}-img1", **fields), "label": int(label == "true")},
                             (path, number)):
                    build.stats["statements"] += 1
                    build.stats["true"] += int(label == "true")
    return build.result


def import_snli_ve(files, out, *, image_id_template: str = "{flickr_id}", split=None, **kw) -> BuildResult:
    """SNLI-VE json-lines files -> entailment pairs (text = the hypothesis sentence2)."""
    from vlp.schemas.pairs import ENTAILMENT_LABELS

    template = ImageIdTemplate(image_id_template, ("flickr_id",))
    with _common(out, "entailment", files, {**kw, "desc": "import-snli-ve"}) as build:
        build.stats.update({label: 0 for label in ENTAILMENT_LABELS})
        for path in files:
            pair_split = split if split is not None else _split_from_name(path)
            for number, row in iter_jsonl(path, "SNLI-VE json lines", build.bad):
                build.progress.update()
                flickr, text, label = row.get("Flickr30K_ID"), _text(row.get("sentence2")), row.get("gold_label")
                pair_id = row.get("pairID")
                if flickr is None or text is None or label not in ENTAILMENT_LABELS or not pair_id:
                    build.bad.add(path, number, "needs Flickr30K_ID, sentence2, pairID and gold_label "
                                                f"in {', '.join(ENTAILMENT_LABELS)}")
                    continue
                if build.add({"pair_id": f"snli-ve/{pair_id}", "image_id": template(flickr_id=flickr), "text": text,
                              "source": "snli-ve", "split": pair_split, "label": label}, (path, number)):
                    build.stats[label] += 1
    return build.result
