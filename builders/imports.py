"""Importers of public annotation files into pair stores (``vlp-build import-*``).

Each importer maps the dataset's image naming to store image_ids with a documented
default template that matches what ``vlp-extract`` produces for the dataset's usual
folder layout, overridable with ``image_id_template`` (fields per importer below).
Malformed rows (a missing or wrongly typed field, a line that is not UTF-8 or not JSON)
are counted and logged to ``OUT/errors.jsonl`` with ``file:line`` (line formats) or the
JSON path (``annotations[3]``) and the field; ``strict=True`` stops at the first one. A
file unusable as a whole (not JSON, not UTF-8, the wrong structure) is a SchemaError.

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
vqa            v2 questions + annotations question / vqa/<qid>   ``auto``: the first of VQA_TEMPLATES, or
                                                                 with ``features`` the one that finds the
                                                                 most images (image_id, subtype)
gqa            *_questions.json           question / gqa/<qid>   ``{image_id}`` (image_id)
nlvr2          *.json(l) lines            nlvr2 / nlvr2/<id>     ``{stem}`` = <split>-<set>-<pair>-img0/1
                                                                 (stem, split, directory)
snli-ve        snli_ve_*.jsonl            entailment /           ``{flickr_id}`` (flickr_id)
                                          snli-ve/<pairID>
vizwiz         {train,val,test}.json      question /             ``{stem}`` = image w/o extension
               (a list of questions)      vizwiz/<stem>          (stem, image)
mmimdb         dataset/<id>.json +        multilabel /           ``{id}`` = the json file's stem, as the
               split.json                 mmimdb/<id>            poster <id>.jpeg beside it (id)
=============  =========================  =====================  ==========================================
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

from vlp.builders.common import (Build, BuildResult, ImageIdTemplate, bad_field, count_lines, is_id, is_int,
                                 iter_jsonl, iter_lines, read_json, require_list, stem)
from vlp.schemas.answers import answer_vocabulary, scored_answers
from vlp.core.durable import atomic_write_json
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
                 optional=kw.get("optional", ()),
                 features=kw.get("features"), shard_size=kw.get("shard_size", 100_000),
                 desc=kw.get("desc", kind), unit=kw.get("unit", "pair"), progress=kw.get("progress", "auto"))


def _image_id(build: Build, template: ImageIdTemplate, where: tuple, **fields) -> Optional[str]:
    """The template's image id, or None after logging the row (the values do not fit the template)."""
    try:
        return template(**fields)
    except SchemaError as exc:
        build.bad.add(*where, str(exc), field="image id")
        return None


def _check(build: Build, path, where, row, checks) -> bool:
    """Check that ``row`` is an object and its fields: ``checks`` = [(field, test, expected)].
    The first failure is logged (file, where, field, reason) and False returned."""
    if not isinstance(row, dict):
        build.bad.add(path, where, bad_field(row, "an object"))
        return False
    for field, test, expected in checks:
        value = row.get(field)
        if not test(value):
            reason = f"missing (expected {expected})" if field not in row else bad_field(value, expected)
            build.bad.add(path, where, reason, field=field)
            return False
    return True


def _is_text(value) -> bool:
    return _text(value) is not None


def _optional_text(value) -> bool:
    return value is None or isinstance(value, str)


def _is_object(row) -> bool:
    return isinstance(row, dict)


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
    sources = [str(p) for p in caption_files] + ([str(karpathy)] if karpathy else [])
    with _common(out, "caption", sources, {**kw, "desc": "import-coco"}) as build:
        stats = build.stats
        stats.update({"captions": 0, "images": 0, "not_in_karpathy_split": 0})
        karpathy_split = {}
        if karpathy is not None:
            doc = read_json(karpathy, "Karpathy split file (dataset_coco.json)")
            for i, entry in enumerate(require_list(doc, "images", karpathy, "Karpathy split file")):
                if _check(build, karpathy, f"images[{i}]", entry, [
                        ("cocoid", is_int, "an integer COCO image id"), ("split", _is_text, "a split name")]):
                    karpathy_split[entry["cocoid"]] = entry["split"].strip()
        docs = []
        for path in caption_files:
            doc = read_json(path, "COCO captions json (images + annotations)")
            docs.append((path, require_list(doc, "images", path, "COCO captions json"),
                         require_list(doc, "annotations", path, "COCO captions json")))
        build.set_total(sum(len(annotations) for _, _, annotations in docs))
        for path, images, annotations in docs:
            file_split = split if split is not None else _split_from_name(path)
            names = {}
            for i, image in enumerate(images):
                where = f"images[{i}]"
                if _check(build, path, where, image, [("id", is_id, "an integer image id"),
                                                      ("file_name", _is_text, "a file name")]):
                    names[image["id"]] = image["file_name"]
            stats["images"] += len(names)
            for i, ann in enumerate(annotations):
                build.progress.update()
                where = f"annotations[{i}]"
                if not _check(build, path, where, ann, [("id", is_id, "an integer annotation id"),
                                                        ("image_id", is_id, "an integer image id"),
                                                        ("caption", _is_text, "a caption text")]):
                    continue
                file_name = names.get(ann["image_id"])
                if file_name is None:
                    build.bad.add(path, where, f"image_id {ann['image_id']!r} is not in 'images'", field="image_id")
                    continue
                pair_split = file_split
                if karpathy is not None:
                    pair_split = karpathy_split.get(ann["image_id"])
                    if pair_split is None:
                        stats["not_in_karpathy_split"] += 1
                        pair_split = ""
                image_id = _image_id(build, template, (path, where), stem=stem(file_name), file_name=file_name,
                                     id=ann["image_id"])
                if image_id is not None and build.add(
                        {"pair_id": f"coco/{ann['id']}", "text": _text(ann["caption"]), "source": "coco",
                         "split": pair_split, "image_id": image_id}, (path, where)):
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
    dataset = dataset or (doc.get("dataset") if _is_text(doc.get("dataset")) else "karpathy")
    with _common(out, "caption", [path], {**kw, "desc": f"import-{dataset}"}) as build:
        build.set_total(len(images))
        build.stats.update({"images": 0, "captions": 0})
        for i, image in enumerate(images):
            build.progress.update()
            where = f"images[{i}]"
            if not _check(build, path, where, image, [
                    ("filename", _is_text, "a file name"), ("sentences", lambda v: isinstance(v, list), "a list"),
                    ("filepath", _optional_text, "a folder name"), ("split", _optional_text, "a split name")]):
                continue
            filename = image["filename"]
            image_id = _image_id(build, template, (path, where), stem=stem(filename), filename=filename,
                                 filepath=image.get("filepath") or "", id=image.get("cocoid", image.get("imgid")))
            if image_id is None:
                continue
            build.stats["images"] += 1
            for k, sentence in enumerate(image["sentences"]):
                swhere = f"{where}.sentences[{k}]"
                if not _check(build, path, swhere, sentence, [("sentid", is_id, "an integer sentence id"),
                                                              ("raw", _is_text, "the sentence text")]):
                    continue
                if build.add({"pair_id": f"{dataset}/{sentence['sentid']}", "image_id": image_id,
                              "text": _text(sentence["raw"]), "source": dataset,
                              "split": split if split is not None else (image.get("split") or "")}, (path, swhere)):
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
    Progress counts the file's lines.
    """
    source = Path(source)
    if source.is_dir():
        return _import_img2dataset(source, out, image_id_template=image_id_template, split=split, **kw)
    if columns not in ("auto", "caption,url", "url,caption"):
        raise ValueError(f"columns must be auto, caption,url or url,caption, got {columns!r}")
    template = ImageIdTemplate(image_id_template, _WEB_FIELDS)
    keys = Img2datasetKeys(samples_per_shard)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file (Conceptual Captions TSV)")
    with _common(out, "caption", [source], {**kw, "desc": "import-cc", "unit": "line"}) as build:
        build.set_total(count_lines(source))
        build.stats.update({"rows": 0, "header_lines": 0})
        row = -1
        for number, line in iter_lines(source, "Conceptual Captions TSV", build.bad):
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
                                                  "a URL; use --columns)", field="url")
                    continue
                url, caption = (parts[0], parts[1]) if is_url[0] else (parts[1], parts[0])
            else:
                caption, url = parts if columns == "caption,url" else parts[::-1]
            caption, url = _text(caption), url.strip()
            if caption is None or not url:
                build.bad.add(source, number, "empty caption or url", field="url" if caption else "caption")
                continue
            image_id = _image_id(build, template, (source, number), **keys.fields(row), url=url)
            if image_id is not None and build.add({"pair_id": f"cc/{row}", "image_id": image_id, "text": caption,
                                                   "source": "cc", "split": split, "url": url}, (source, number)):
                build.stats["rows"] += 1
    return build.result


def _import_img2dataset(folder: Path, out, *, image_id_template: str, split: str, **kw) -> BuildResult:
    """Pairs of an img2dataset output folder: the ``*.parquet`` of each shard, successful rows only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    template = ImageIdTemplate(image_id_template, _WEB_FIELDS)
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder}: no img2dataset *.parquet files (and not a TSV file)")
    tables = []
    for path in files:
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise SchemaError(f"{path}: not a readable parquet table ({exc})") from None
        missing = {"key", "caption", "url"} - set(table.column_names)
        if missing:
            raise SchemaError(f"{path}: not an img2dataset shard table (no {', '.join(sorted(missing))} column)")
        tables.append((path, table))
    with _common(out, "caption", files, {**kw, "desc": "import-img2dataset", "unit": "row"}) as build:
        build.set_total(sum(table.num_rows for _, table in tables))
        build.stats.update({"rows": 0, "not_downloaded": 0})
        for path, table in tables:
            statuses = table.column("status").to_pylist() if "status" in table.column_names else None
            for i, (key, caption, url) in enumerate(zip(*(table.column(c).to_pylist() for c in ("key", "caption", "url")))):
                build.progress.update()
                where = f"row {i}"
                if statuses is not None and statuses[i] != "success":
                    build.stats["not_downloaded"] += 1
                    continue
                row = {"key": key, "caption": caption, "url": url}
                if not _check(build, path, where, row, [("key", _is_text, "a key text"),
                                                        ("caption", _is_text, "a caption text"),
                                                        ("url", _optional_text, "a url text")]):
                    continue
                image_id = _image_id(build, template, (path, where), row=i, key=key, shard=path.stem,
                                     folder=path.stem, url=url or "")
                if image_id is not None and build.add(
                        {"pair_id": f"img2dataset/{key}", "image_id": image_id, "text": _text(caption),
                         "source": "img2dataset", "split": split, "url": url}, (path, where)):
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
        build.set_total(max(len(urls), len(captions)))
        build.stats.update({"rows": 0, "unpaired_entries": abs(len(urls) - len(captions))})
        for row in range(max(len(urls), len(captions))):
            build.progress.update()
            where = f"[{row}]"
            url = urls[row] if row < len(urls) else None
            caption = _text(captions[row]) if row < len(captions) else None
            if not isinstance(url, str) or not url.strip():
                build.bad.add(path, where, "missing or empty url (the two lists must align)", field="image_urls")
                continue
            if caption is None:
                build.bad.add(path, where, "missing or empty caption (the two lists must align)", field="captions")
                continue
            image_id = _image_id(build, template, (path, where), **keys.fields(row), url=url.strip())
            if image_id is not None and build.add({"pair_id": f"sbu/{row}", "image_id": image_id, "text": caption,
                                                   "source": "sbu", "split": split, "url": url.strip()},
                                                  (path, where)):
                build.stats["rows"] += 1
    return build.result


# --------------------------------------------------------------------------- VQA v2, GQA

#: The image namings ``import-vqa`` tries by default (``image_id_template="auto"``), in this
#: order: vlp-extract over COCO 2014's train2014/ (or over its parent folder), COCO 2017's
#: zero-padded names, and plain ids (e.g. the synthetic world's images/<id>.jpg).
VQA_TEMPLATES = ("COCO_{subtype}_{image_id:012d}", "{subtype}/COCO_{subtype}_{image_id:012d}",
                 "{image_id:012d}", "{image_id}")
#: Without a feature store to check against, the questions file's ``data_type`` decides:
#: "mscoco" (VQA v2's own files) or none names images the COCO 2014 way, any other data set
#: (e.g. the synthetic world's "vlp-synth") by its plain image id.
VQA_COCO_DATA_TYPE = "mscoco"


def _choose_template(candidates, fields: list[dict], features) -> tuple[str, int]:
    """The candidate under which most of ``fields``' images are in ``features`` (ties: the
    earlier one; no features: the first), with its number of matches (-1 unchecked)."""
    if features is None or not fields:
        return candidates[0], -1
    from vlp.schemas import FeatureStore

    store = FeatureStore(features, warn=False) if isinstance(features, (str, Path)) else features
    best, best_hits = candidates[0], -1
    for candidate in candidates:
        hits = sum(candidate.format(**f) in store for f in fields)
        if hits > best_hits:
            best, best_hits = candidate, hits
    if store is not features:
        store.close()
    return best, best_hits


def import_vqa(files, out, *, image_id_template: str = "auto", min_count: int = 9,
               vocab_splits=("train",), answer_vocab=None, score_scheme: str = "vqa", **kw) -> BuildResult:
    """VQA v2 questions (+ annotations) json files -> question pairs with soft-scored answers.

    ``files``: questions and annotations files in any order (told apart by their
    "questions" / "annotations" lists, matched by question_id). The answer vocabulary
    is ``answer_vocab`` (a json list file) or built from the annotations of the questions
    files whose split is in ``vocab_splits`` (min_count); it is written to
    ``OUT/answer_vocab.json``. Answers outside it are left out of a pair (counted).
    Split = the questions file's data_subtype without digits ("train2014" -> "train").
    ``image_id_template="auto"``: with ``features``, the one of :data:`VQA_TEMPLATES` that
    finds the most question images in the feature store; without, the COCO 2014 naming for
    files whose ``data_type`` is "mscoco" and ``{image_id}`` for any other data set.
    """
    if image_id_template != "auto":
        ImageIdTemplate(image_id_template, ("image_id", "subtype"))
    question_docs, annotations = [], {}
    ann_where = {}
    annotation_files = []
    for path in files:
        doc = read_json(path, "VQA questions or annotations json")
        if isinstance(doc, dict) and isinstance(doc.get("questions"), list):
            question_docs.append((Path(path), doc))
        elif isinstance(doc, dict) and isinstance(doc.get("annotations"), list):
            annotation_files.append((Path(path), doc["annotations"]))
        else:
            raise SchemaError(f"{path}: neither a VQA questions file ('questions' list) nor an annotations "
                              "file ('annotations' list)")
    if not question_docs:
        raise SchemaError("import-vqa needs at least one questions file (v2_OpenEnded_mscoco_*_questions.json)")

    def subtype_of(path, doc) -> str:
        subtype = doc.get("data_subtype")
        return subtype.strip() if _is_text(subtype) else _split_from_name(path)

    sources = [str(p) for p in files]
    with _common(out, "question", sources, {**kw, "desc": "import-vqa", "optional": ("human_answers",)}) as build:
        for path, anns in annotation_files:
            for i, ann in enumerate(anns):
                where = f"annotations[{i}]"
                if _check(build, path, where, ann, [("question_id", is_id, "an integer question id")]):
                    annotations[ann["question_id"]] = ann
                    ann_where[ann["question_id"]] = (path, where)
        # The questions that can become pairs, checked once.
        valid = []
        for path, doc in question_docs:
            subtype = subtype_of(path, doc)
            for i, q in enumerate(doc["questions"]):
                where = f"questions[{i}]"
                if _check(build, path, where, q, [("question_id", is_id, "an integer question id"),
                                                  ("image_id", is_int, "an integer image id"),
                                                  ("question", _is_text, "the question text")]):
                    valid.append((path, where, subtype, q))
        if answer_vocab is not None:
            vocab_list = read_json(answer_vocab, "answer vocabulary (a json list of answers)")
            if not isinstance(vocab_list, list) or not all(isinstance(a, str) for a in vocab_list):
                raise SchemaError(f"{answer_vocab}: expected a json list of answers (texts)")
            vocab_source = str(answer_vocab)
        else:
            consensus = []
            for _, _, subtype, q in valid:
                if subtype.rstrip("0123456789") in vocab_splits:
                    ann = annotations.get(q["question_id"])
                    if ann is not None and isinstance(ann.get("multiple_choice_answer"), str):
                        consensus.append(ann["multiple_choice_answer"])
            vocab_list = answer_vocabulary(consensus, min_count)
            vocab_source = f"answers given by >= {min_count} questions of {','.join(vocab_splits)}"
        vocabulary = set(vocab_list)
        if image_id_template == "auto":
            fields = list({(q["image_id"], subtype): {"image_id": q["image_id"], "subtype": subtype}
                           for _, _, subtype, q in valid}.values())
            data_types = {doc.get("data_type") for _, doc in question_docs}
            candidates = (VQA_TEMPLATES if kw.get("features") is not None or data_types <= {VQA_COCO_DATA_TYPE, None}
                          else ("{image_id}",))
            chosen, hits = _choose_template(candidates, fields, kw.get("features"))
            build.stats["image_id_template"] = chosen
            if hits >= 0:
                build.stats["images_found_by_template"] = hits
        else:
            chosen = image_id_template
        template = ImageIdTemplate(chosen, ("image_id", "subtype"))

        build.stats.update({"questions": 0, "answer_vocab_size": len(vocab_list), "without_annotations": 0,
                            "without_answer_in_vocab": 0, "answers_out_of_vocab": 0})
        build.set_total(len(valid))
        for path, where, subtype, q in valid:
            build.progress.update()
            image_id = _image_id(build, template, (path, where), image_id=q["image_id"], subtype=subtype)
            if image_id is None:
                continue
            ann = annotations.get(q["question_id"])
            pair = {"pair_id": f"vqa/{q['question_id']}", "text": _text(q["question"]), "source": "vqa",
                    "split": subtype.rstrip("0123456789"), "question_id": str(q["question_id"]),
                    "image_id": image_id}
            if ann is None:
                build.stats["without_annotations"] += 1
            else:
                raw = ann.get("answers")
                if not isinstance(raw, list) or not all(isinstance(a, dict) and isinstance(a.get("answer"), str)
                                                        for a in raw):
                    build.bad.add(*ann_where[q["question_id"]], "expected a list of {answer: text}",
                                  field="answers")
                    continue
                if not _check(build, *ann_where[q["question_id"]], ann, [
                        ("answer_type", _optional_text, "a text"), ("question_type", _optional_text, "a text")]):
                    continue
                given = [a["answer"] for a in raw]
                answers, scores = scored_answers(given, vocabulary, score_scheme)
                everything, _ = scored_answers(given, None, score_scheme)
                build.stats["answers_out_of_vocab"] += len(everything) - len(answers)
                if not answers:
                    build.stats["without_answer_in_vocab"] += 1
                pair.update(answers=answers, answer_scores=scores, answer_type=ann.get("answer_type"),
                            question_type=ann.get("question_type"), human_answers=given)
            if build.add(pair, (path, where)):
                build.stats["questions"] += 1
        build.stats["vocab_source"] = vocab_source
        atomic_write_json(build.path / "answer_vocab.json", vocab_list, indent=0)
    return build.result


def import_gqa(files, out, *, image_id_template: str = "{image_id}", split=None, **kw) -> BuildResult:
    """GQA questions json (``{qid: {imageId, question, answer, types}}``) -> question pairs.

    answers = [answer] with score 1 (GQA has one answer); answer_type = types.structural,
    question_type = types.detailed; split from the file name unless given.
    """
    template = ImageIdTemplate(image_id_template, ("image_id",))
    with _common(out, "question", files, {**kw, "desc": "import-gqa"}) as build:
        build.stats.update({"questions": 0, "without_answer": 0})
        docs = []
        for path in files:
            doc = read_json(path, "GQA questions json (question id -> question)")
            if not isinstance(doc, dict):
                raise SchemaError(f"{path}: expected an object of question id -> question")
            docs.append((path, doc))
        build.set_total(sum(len(doc) for _, doc in docs))
        for path, doc in docs:
            pair_split = split if split is not None else _split_from_name(path)
            for qid, q in doc.items():
                build.progress.update()
                where = f"[{qid!r}]"
                if not isinstance(q, dict):
                    build.bad.add(path, where, bad_field(q, "an object"))
                    continue
                types = q.get("types") if q.get("types") is not None else {}
                row = {**q, "types": types}
                if not _check(build, path, where, row, [
                        ("imageId", is_id, "an image id"), ("question", _is_text, "the question text"),
                        ("types", lambda v: isinstance(v, dict) and all(_optional_text(v.get(k)) for k in
                                                                        ("structural", "detailed")),
                         "an object of texts")]):
                    continue
                image_id = _image_id(build, template, (path, where), image_id=q["imageId"])
                if image_id is None:
                    continue
                answer = q.get("answer")
                pair = {"pair_id": f"gqa/{qid}", "image_id": image_id, "text": _text(q["question"]),
                        "source": "gqa", "split": pair_split, "question_id": str(qid),
                        "answer_type": types.get("structural"), "question_type": types.get("detailed")}
                if isinstance(answer, str) and answer.strip():
                    pair.update(answers=[answer.strip()], answer_scores=[1.0])
                else:
                    build.stats["without_answer"] += 1
                if build.add(pair, (path, where)):
                    build.stats["questions"] += 1
    return build.result


# --------------------------------------------------------------------------- NLVR2, SNLI-VE


def _lines_total(files) -> int:
    return sum(count_lines(p) for p in files if Path(p).is_file())


def _nlvr2_identifier(value) -> bool:
    return isinstance(value, str) and value.count("-") >= 3 and all(value.split("-"))


def import_nlvr2(files, out, *, image_id_template: str = "{stem}", **kw) -> BuildResult:
    """NLVR2 json-lines files -> nlvr2 pairs (two images, label 1 = "True").

    identifier "dev-850-0-0" -> images "dev-850-0-img0" / "dev-850-0-img1" (the image
    files' stems); split = the identifier's first part. ``label`` must be the text
    "True" or "False" (any case); ``directory`` (train's folder number) an integer or text.
    """
    template = ImageIdTemplate(image_id_template, ("stem", "split", "directory"))
    with _common(out, "nlvr2", files, {**kw, "desc": "import-nlvr2", "unit": "line"}) as build:
        build.set_total(_lines_total(files))
        build.stats.update({"statements": 0, "true": 0})
        for path in files:
            for number, row in iter_jsonl(path, "NLVR2 json lines", build.bad):
                build.progress.update()
                if not _check(build, path, number, row, [
                        ("identifier", _nlvr2_identifier, "an identifier <split>-<set>-<pair>-<n>"),
                        ("sentence", _is_text, "the sentence text"),
                        ("label", lambda v: isinstance(v, str) and v.strip().lower() in ("true", "false"),
                         "the text True or False"),
                        ("directory", lambda v: v is None or is_id(v), "a folder number")]):
                    continue
                identifier, label = row["identifier"], row["label"].strip().lower()
                base = identifier.rsplit("-", 1)[0]
                pair_split = identifier.split("-", 1)[0]
                fields = {"split": pair_split, "directory": str(row.get("directory", ""))}
                first = _image_id(build, template, (path, number), stem=f"{base}-img0", **fields)
                second = _image_id(build, template, (path, number), stem=f"{base}-img1", **fields)
                if first is None or second is None:
                    continue
                if build.add({"pair_id": f"nlvr2/{identifier}", "text": _text(row["sentence"]), "source": "nlvr2",
                              "split": pair_split, "image_id": first, "image_id_2": second,
                              "label": int(label == "true")}, (path, number)):
                    build.stats["statements"] += 1
                    build.stats["true"] += int(label == "true")
    return build.result


def import_snli_ve(files, out, *, image_id_template: str = "{flickr_id}", split=None, **kw) -> BuildResult:
    """SNLI-VE json-lines files -> entailment pairs (text = the hypothesis sentence2)."""
    from vlp.schemas.pairs import ENTAILMENT_LABELS

    template = ImageIdTemplate(image_id_template, ("flickr_id",))
    with _common(out, "entailment", files, {**kw, "desc": "import-snli-ve", "unit": "line"}) as build:
        build.set_total(_lines_total(files))
        build.stats.update({label: 0 for label in ENTAILMENT_LABELS})
        for path in files:
            pair_split = split if split is not None else _split_from_name(path)
            for number, row in iter_jsonl(path, "SNLI-VE json lines", build.bad):
                build.progress.update()
                if not _check(build, path, number, row, [
                        ("Flickr30K_ID", is_id, "a Flickr30k image id"),
                        ("sentence2", _is_text, "the hypothesis text"),
                        ("pairID", _is_text, "a pair id text"),
                        ("gold_label", lambda v: isinstance(v, str) and v in ENTAILMENT_LABELS,
                         f"one of {', '.join(ENTAILMENT_LABELS)}")]):
                    continue
                image_id = _image_id(build, template, (path, number), flickr_id=row["Flickr30K_ID"])
                label = row["gold_label"]
                if image_id is not None and build.add(
                        {"pair_id": f"snli-ve/{row['pairID'].strip()}", "image_id": image_id,
                         "text": _text(row["sentence2"]), "source": "snli-ve", "split": pair_split, "label": label},
                        (path, number)):
                    build.stats[label] += 1
    return build.result


# --------------------------------------------------------------------------- VizWiz, MM-IMDB


def _answer_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(a, dict) and isinstance(a.get("answer"), str) and
                                           _optional_text(a.get("answer_confidence")) for a in value)


def import_vizwiz(files, out, *, image_id_template: str = "{stem}", split=None, min_count: int = 1,
                  vocab_splits=("train",), score_scheme: str = "vqa", **kw) -> BuildResult:
    """VizWiz VQA json files (``train.json``, ``val.json``, ``test.json``: lists of
    ``{image, question, answers: [{answer, answer_confidence}], answer_type, answerable}``)
    -> question pairs.

    answers = every normalized annotator answer (VQA normalization, "unanswerable" is an
    answer like any other) with soft score min(1, count / 3) (``score_scheme`` as import-vqa),
    human_answers = the raw answers; answer_type kept; question_type = "answerable" or
    "unanswerable" (the ``answerable`` flag; empty without it). A test file without answers
    gives pairs without answers. ``OUT/answer_vocab.json``: the consensus (most given)
    answers of at least ``min_count`` questions of ``vocab_splits``. question_id = pair_id
    tail = the image's stem (VizWiz has one question per image). Split from the file name
    unless given.
    """
    from collections import Counter

    from vlp.schemas.answers import normalize_answer

    template = ImageIdTemplate(image_id_template, ("stem", "image"))
    with _common(out, "question", files, {**kw, "desc": "import-vizwiz", "optional": ("human_answers",)}) as build:
        build.stats.update({"questions": 0, "unanswerable": 0, "without_answers": 0})
        docs = []
        for path in files:
            doc = read_json(path, "VizWiz annotations json (a list of questions)")
            if not isinstance(doc, list):
                raise SchemaError(f"{path}: expected a json list of questions (VizWiz annotations)")
            docs.append((Path(path), doc))
        build.set_total(sum(len(doc) for _, doc in docs))
        consensus = Counter()
        for path, doc in docs:
            pair_split = split if split is not None else _split_from_name(path)
            for i, q in enumerate(doc):
                build.progress.update()
                where = f"[{i}]"
                if not _check(build, path, where, q, [
                        ("image", _is_text, "an image file name"), ("question", _is_text, "the question text"),
                        ("answers", lambda v: v is None or _answer_list(v), "a list of {answer, answer_confidence}"),
                        ("answer_type", _optional_text, "a text"),
                        ("answerable", lambda v: v is None or (is_int(v) and v in (0, 1)), "0 or 1")]):
                    continue
                image = q["image"].strip()
                image_id = _image_id(build, template, (path, where), stem=stem(image), image=image)
                if image_id is None:
                    continue
                answerable = q.get("answerable")
                pair = {"pair_id": f"vizwiz/{stem(image)}", "image_id": image_id, "text": _text(q["question"]),
                        "source": "vizwiz", "split": pair_split, "question_id": stem(image),
                        "answer_type": q.get("answer_type"),
                        "question_type": {0: "unanswerable", 1: "answerable"}.get(answerable, "")}
                if q.get("answers"):
                    given = [a["answer"] for a in q["answers"]]
                    answers, scores = scored_answers(given, None, score_scheme)
                    pair.update(answers=answers, answer_scores=scores, human_answers=given)
                else:
                    build.stats["without_answers"] += 1
                if build.add(pair, (path, where)):
                    build.stats["questions"] += 1
                    build.stats["unanswerable"] += int(answerable == 0)
                    if q.get("answers") and pair_split in vocab_splits:
                        counts = Counter(normalize_answer(a) for a in pair["human_answers"])
                        consensus[min(counts, key=lambda a: (-counts[a], a))] += 1
        vocab_list = sorted(a for a, c in consensus.items() if c >= min_count and a)
        build.stats["answer_vocab_size"] = len(vocab_list)
        atomic_write_json(build.path / "answer_vocab.json", vocab_list, indent=0)
    return build.result


_MMIMDB_SPLITS = {"train": "train", "dev": "val", "val": "val", "test": "test"}


def import_mmimdb(dataset_dir, out, *, split_file=None, image_id_template: str = "{id}", **kw) -> BuildResult:
    """MM-IMDB ``dataset/<id>.json`` files ({title, plot: [texts], genres: [...]}) -> multilabel
    pairs: text = the first plot entry, labels = the genres, image = the poster ``<id>.jpeg``
    beside the json (id = the file's stem, as vlp-extract over ``dataset/`` names it).

    Split from ``split_file`` (``split.json`` {train, dev, test}: lists of ids; "dev" -> "val");
    by default the ``split.json`` beside ``dataset_dir`` when there is one. Movies in no
    split get an empty split (counted). ``OUT/labels.json``: the genres, most frequent first.
    """
    from collections import Counter

    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"{dataset_dir}: no such folder (MM-IMDB dataset/ with <id>.json files)")
    if split_file is None and (dataset_dir.parent / "split.json").is_file():
        split_file = dataset_dir.parent / "split.json"
    template = ImageIdTemplate(image_id_template, ("id",))
    paths = sorted(dataset_dir.glob("*.json"))
    sources = [str(dataset_dir)] + ([str(split_file)] if split_file is not None else [])
    with _common(out, "multilabel", sources, {**kw, "desc": "import-mmimdb", "unit": "movie"}) as build:
        build.stats.update({"movies": 0, "without_split": 0, "split_file": str(split_file) if split_file else None})
        split_of = {}
        if split_file is not None:
            doc = read_json(split_file, "MM-IMDB split file (split.json)")
            if not isinstance(doc, dict):
                raise SchemaError(f"{split_file}: expected an object of split name -> list of movie ids")
            for name, ids in doc.items():
                if not isinstance(ids, list):
                    build.bad.add(split_file, f"[{name!r}]", bad_field(ids, "a list of movie ids"))
                    continue
                for i, movie_id in enumerate(ids):
                    if not (is_id(movie_id) or _is_text(movie_id)):
                        build.bad.add(split_file, f"[{name!r}][{i}]", bad_field(movie_id, "a movie id"))
                        continue
                    split_of[str(movie_id).strip()] = _MMIMDB_SPLITS.get(name, name)
        build.set_total(len(paths))
        genres = Counter()
        for path in paths:
            build.progress.update()
            try:
                movie = read_json(path, "MM-IMDB movie json")
            except SchemaError as exc:
                build.bad.add(path, 1, str(exc).removeprefix(f"{path}: "))
                continue
            if not _check(build, path, 1, movie, [
                    ("plot", lambda v: isinstance(v, list) and bool(v) and _is_text(v[0]), "a list of plot texts"),
                    ("genres", lambda v: isinstance(v, list) and all(_is_text(g) for g in v), "a list of genres")]):
                continue
            movie_id = path.stem
            image_id = _image_id(build, template, (path, 1), id=movie_id)
            if image_id is None:
                continue
            pair_split = split_of.get(movie_id)
            if pair_split is None:
                build.stats["without_split"] += 1
                pair_split = ""
            labels = [g.strip() for g in movie["genres"]]
            if build.add({"pair_id": f"mmimdb/{movie_id}", "image_id": image_id, "text": _text(movie["plot"][0]),
                          "source": "mmimdb", "split": pair_split, "labels": labels}, (path, 1)):
                build.stats["movies"] += 1
                genres.update(labels)
        build.stats["genres"] = dict(sorted(genres.items(), key=lambda x: (-x[1], x[0])))
        atomic_write_json(build.path / "labels.json", list(build.stats["genres"]), indent=0)
    return build.result


# --------------------------------------------------------------------------- RefCOCO(+/g), VCR

#: RefCOCO splits the UNC refs file uses (RefCOCOg umd: train/val/test; google: train/val)
REFCOCO_SPLITS = ("train", "val", "test", "testA", "testB", "testC")
GT_BOXES_NAME = "gt_boxes.jsonl"


def _is_box(value, length: int = 4) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == length and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def _write_boxes(build: Build, boxes: dict) -> None:
    """OUT/gt_boxes.jsonl: one line per image {image, image_id, boxes: [[x1,y1,x2,y2]...], ids},
    the input of ``vlp-extract --boxes`` for ground-truth regions (given order = region order)."""
    import json

    from vlp.core.durable import atomic_write_text

    lines = [json.dumps({"image": image, "image_id": image_id, "boxes": [list(b) for b, _ in entries],
                         "ids": [i for _, i in entries]}, separators=(",", ":"))
             for (image, image_id), entries in sorted(boxes.items(), key=lambda item: item[0][1])]
    atomic_write_text(build.path / GT_BOXES_NAME, "".join(line + "\n" for line in lines))
    build.stats["gt_box_images"] = len(lines)


def read_refs_pickle(path) -> list:
    """The refs list of a UNC ``refs(unc).p`` / ``refs(umd).p`` / ``refs(google).p``, read with
    the restricted unpickler (plain types only); SchemaError names the file."""
    import pickle

    from vlp.schemas.safe_pickle import safe_load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (RefCOCO refs pickle)")
    try:
        with open(path, "rb") as handle:
            refs = safe_load(handle, source=str(path))
    except pickle.UnpicklingError as exc:
        raise SchemaError(f"{path}: {str(exc).removeprefix(f'{path}: ')}") from None
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, MemoryError,
            RecursionError, UnicodeDecodeError, OverflowError) as exc:
        raise SchemaError(f"{path}: not a readable refs pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(refs, list):
        raise SchemaError(f"{path}: expected a pickled list of refs, got {type(refs).__name__}")
    return refs


def import_refcoco(refs_file, instances_file, out, *, dataset: str = "refcoco+", image_id_template: str = "{stem}",
                   splits=None, **kw) -> BuildResult:
    """RefCOCO / RefCOCO+ / RefCOCOg (``refs(unc).p`` + ``instances.json``) -> refexp pairs.

    One pair per sentence: text = the sentence's ``sent``, target_box = the referred
    annotation's COCO bbox as x1, y1, x2, y2 pixels, ann_id / ref_id / category kept, the
    image's width and height from ``instances.json``. pair_id ``<dataset>/<sent_id>``.
    ``splits``: keep only refs of these splits (default: all; val/testA/testB are the
    evaluation splits). The image id comes from the instances image's ``file_name``
    (``{stem}``: COCO_train2014_000000581857, as vlp-extract over train2014/ names it).
    Also writes ``OUT/gt_boxes.jsonl``: every annotation box of each referred image (the
    ground-truth regions) for ``vlp-extract --boxes``.
    """
    template = ImageIdTemplate(image_id_template, ("stem", "file_name", "id"))
    wanted = set(splits) if splits else None
    refs = read_refs_pickle(refs_file)
    doc = read_json(instances_file, "COCO instances json (images + annotations + categories)")
    images = require_list(doc, "images", instances_file, "COCO instances json")
    annotations = require_list(doc, "annotations", instances_file, "COCO instances json")
    with _common(out, "refexp", [refs_file, instances_file], {**kw, "desc": f"import-{dataset}", "unit": "ref"}) as build:
        stats = build.stats
        stats.update({"refs": 0, "sentences": 0, "images": 0, "by_split": {}})
        image_info, categories, boxes_of = {}, {}, {}
        for i, category in enumerate(doc.get("categories") or []):
            if isinstance(category, dict) and is_int(category.get("id")) and _is_text(category.get("name")):
                categories[category["id"]] = category["name"].strip()
        for i, image in enumerate(images):
            if _check(build, instances_file, f"images[{i}]", image, [
                    ("id", is_id, "an integer image id"), ("file_name", _is_text, "a file name"),
                    ("width", lambda v: is_int(v) and v > 0, "a positive width"),
                    ("height", lambda v: is_int(v) and v > 0, "a positive height")]):
                image_info[image["id"]] = image
        anns = {}
        for i, ann in enumerate(annotations):
            where = f"annotations[{i}]"
            if not _check(build, instances_file, where, ann, [
                    ("id", is_id, "an annotation id"), ("image_id", is_id, "an image id"),
                    ("bbox", lambda v: _is_box(v) and v[2] >= 0 and v[3] >= 0, "a bbox [x, y, w, h]")]):
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            anns[ann["id"]] = (ann["image_id"], [x, y, x + w, y + h], ann.get("category_id"))
            boxes_of.setdefault(ann["image_id"], []).append(([x, y, x + w, y + h], ann["id"]))
        build.set_total(len(refs))
        referred = {}
        for i, ref in enumerate(refs):
            build.progress.update()
            where = f"refs[{i}]"
            if not _check(build, refs_file, where, ref, [
                    ("ref_id", is_id, "a ref id"), ("ann_id", is_id, "an annotation id"),
                    ("image_id", is_id, "an image id"), ("split", _is_text, "a split name"),
                    ("sentences", lambda v: isinstance(v, list), "a list of sentences")]):
                continue
            split = ref["split"].strip()
            if wanted is not None and split not in wanted:
                continue
            ann = anns.get(ref["ann_id"])
            if ann is None:
                build.bad.add(refs_file, where, f"ann_id {ref['ann_id']!r} is not in {Path(instances_file).name}",
                              field="ann_id")
                continue
            image = image_info.get(ann[0])
            if image is None or ann[0] != ref["image_id"]:
                build.bad.add(refs_file, where, f"image_id {ref['image_id']!r} is not the image of annotation "
                              f"{ref['ann_id']!r} in {Path(instances_file).name}", field="image_id")
                continue
            image_id = _image_id(build, template, (refs_file, where), stem=stem(image["file_name"]),
                                 file_name=image["file_name"], id=image["id"])
            if image_id is None:
                continue
            stats["refs"] += 1
            referred[(image["file_name"].strip(), image_id)] = boxes_of.get(image["id"], [])
            category = ref.get("category_id", ann[2])
            category = category if is_int(category) else ann[2] if is_int(ann[2]) else None
            for j, sentence in enumerate(ref["sentences"]):
                swhere = f"{where}.sentences[{j}]"
                if not _check(build, refs_file, swhere, sentence, [
                        ("sent_id", is_id, "a sentence id"), ("sent", _is_text, "the expression text")]):
                    continue
                if build.add({"pair_id": f"{dataset}/{sentence['sent_id']}", "image_id": image_id,
                              "text": _text(sentence["sent"]), "source": dataset, "split": split,
                              "ref_id": str(ref["ref_id"]), "ann_id": str(ref["ann_id"]), "target_box": ann[1],
                              "category": categories.get(category, str(category) if category is not None else ""),
                              "image_w": int(image["width"]), "image_h": int(image["height"])}, (refs_file, swhere)):
                    stats["sentences"] += 1
                    stats["by_split"][split] = stats["by_split"].get(split, 0) + 1
        stats["images"] = len(referred)
        _write_boxes(build, referred)
    return build.result


def _vcr_tokens(tokens, objects: list):
    """VCR token list -> (words, regions): an object tag (a list of detection indices) becomes
    each object's label words linked to its region, several joined by "and"; other words -1.
    None when a tag names an object the row does not have."""
    words, regions = [], []
    for token in tokens:
        if isinstance(token, list):
            if not token or not all(is_int(k) and 0 <= k < len(objects) for k in token):
                return None
            for n, k in enumerate(token):
                if n:
                    words.append("and")
                    regions.append(-1)
                label = objects[k].split()
                words += label
                regions += [k] * len(label)
        elif isinstance(token, str):
            if token.strip():
                words.append(token.strip())
                regions.append(-1)
        else:
            return None
    return words, regions


def _label(value) -> int:
    return -1 if value is None else int(value)


def _vcr_choices(value) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(isinstance(c, list) for c in value)


def import_vcr(files, out, *, images_dir=None, image_id_template: str = "{path}", split=None, **kw) -> BuildResult:
    """VCR json-lines files (``train.jsonl``, ``val.jsonl``, ``test.jsonl``) -> vcr pairs.

    Object tags in the question, answers and rationales (lists of detection indices) become
    the object's label text (the row's ``objects``) linked to region k = the k-th box of the
    image's metadata json, as LAMP's label-token links. text = the question as words;
    labels -1 where the file has none (test). pair_id ``vcr/<annot_id>``; split from the
    file name unless given. image id: ``{path}`` = img_fn without extension (as
    vlp-extract over vcr1images/ names it; fields path, stem, img_fn). With ``images_dir``
    (vcr1images/; default the vcr1images/ beside the files when it exists), each image's
    metadata json (``metadata_fn``) gives its boxes: ``OUT/gt_boxes.jsonl`` (for
    ``vlp-extract --boxes``), and a tag beyond the metadata's boxes is a malformed row.
    """
    files = [Path(p) for p in files]
    template = ImageIdTemplate(image_id_template, ("path", "stem", "img_fn"))
    if images_dir is None and files and (files[0].parent / "vcr1images").is_dir():
        images_dir = files[0].parent / "vcr1images"
    images_dir = Path(images_dir) if images_dir is not None else None
    with _common(out, "vcr", [str(p) for p in files] + ([str(images_dir)] if images_dir else []),
                 {**kw, "desc": "import-vcr", "unit": "line"}) as build:
        stats = build.stats
        stats.update({"questions": 0, "without_labels": 0, "metadata_missing": 0, "images_dir": str(images_dir)
                      if images_dir else None})
        build.set_total(_lines_total(files))
        boxes, metadata = {}, {}
        for path in files:
            pair_split = split if split is not None else _split_from_name(path)
            for number, row in iter_jsonl(path, "VCR json lines", build.bad):
                build.progress.update()
                if not _check(build, path, number, row, [
                        ("annot_id", is_id, "an annotation id"), ("img_fn", _is_text, "an image path"),
                        ("objects", lambda v: isinstance(v, list) and all(_is_text(o) for o in v),
                         "a list of object names"),
                        ("question", lambda v: isinstance(v, list), "a token list"),
                        ("answer_choices", _vcr_choices, "four token lists"),
                        ("rationale_choices", _vcr_choices, "four token lists"),
                        ("answer_label", lambda v: v is None or (is_int(v) and 0 <= v < 4), "0..3"),
                        ("rationale_label", lambda v: v is None or (is_int(v) and 0 <= v < 4), "0..3"),
                        ("metadata_fn", _optional_text, "a metadata json path")]):
                    continue
                objects = [o.strip() for o in row["objects"]]
                img_fn = row["img_fn"].strip()
                n_boxes = len(objects)
                if images_dir is not None:
                    meta_fn = (row.get("metadata_fn") or img_fn.rsplit(".", 1)[0] + ".json").strip()
                    if meta_fn not in metadata:
                        inside = not Path(meta_fn).is_absolute() and ".." not in Path(meta_fn).parts
                        metadata[meta_fn] = (_vcr_metadata(images_dir / meta_fn) if inside else
                                             f"metadata_fn {meta_fn!r} leads outside {images_dir}")
                    meta = metadata[meta_fn]
                    if isinstance(meta, str):
                        build.bad.add(path, number, meta, field="metadata_fn")
                        stats["metadata_missing"] += 1
                        continue
                    n_boxes = min(n_boxes, len(meta))
                question = _vcr_tokens(row["question"], objects[:n_boxes])
                answers = [_vcr_tokens(c, objects[:n_boxes]) for c in row["answer_choices"]]
                rationales = [_vcr_tokens(c, objects[:n_boxes]) for c in row["rationale_choices"]]
                if question is None or None in answers or None in rationales:
                    build.bad.add(path, number, f"an object tag is not a list of indices below {n_boxes} "
                                  "(the row's objects / the metadata's boxes)", field="question/answer/rationale")
                    continue
                path_id = img_fn.rsplit(".", 1)[0] if "." in img_fn.rsplit("/", 1)[-1] else img_fn
                image_id = _image_id(build, template, (path, number), path=path_id, stem=stem(img_fn), img_fn=img_fn)
                if image_id is None:
                    continue
                annot = str(row["annot_id"]).strip()
                pair = {"pair_id": f"vcr/{annot}", "image_id": image_id, "text": " ".join(question[0]),
                        "source": "vcr", "split": pair_split, "annot_id": annot,
                        "question_words": question[0], "question_regions": question[1],
                        "answer_words": [a[0] for a in answers], "answer_regions": [a[1] for a in answers],
                        "rationale_words": [r[0] for r in rationales],
                        "rationale_regions": [r[1] for r in rationales],
                        "answer_label": _label(row.get("answer_label")),
                        "rationale_label": _label(row.get("rationale_label")), "objects": objects}
                if build.add(pair, (path, number)):
                    stats["questions"] += 1
                    stats["without_labels"] += int(pair["answer_label"] < 0)
                    if images_dir is not None:
                        boxes[(img_fn, image_id)] = [(b, k) for k, b in enumerate(metadata[meta_fn])]
        if images_dir is not None:
            _write_boxes(build, boxes)
    return build.result


def _vcr_metadata(path: Path):
    """The boxes (x1, y1, x2, y2; the score column dropped) of a VCR metadata json, or the
    reason it cannot be used (a text)."""
    try:
        doc = read_json(path, "VCR metadata json (boxes, names, width, height)")
    except (FileNotFoundError, SchemaError) as exc:
        return str(exc)
    raw = doc.get("boxes") if isinstance(doc, dict) else None
    if not isinstance(raw, list) or not all(_is_box(b, 5) or _is_box(b, 4) for b in raw):
        return f"{path}: 'boxes' must be a list of [x1, y1, x2, y2(, score)]"
    return [[float(v) for v in b[:4]] for b in raw]
