"""``generate``: a whole synthetic world on disk, in the real public file formats.

Layout under ``out_dir`` (all JSON written with sorted keys and compact separators,
so the same seed gives byte-identical files):

====================================  ==============================================
``images/<id>.jpg`` / ``.png``          the images, ids 1..N (JPEG q90 or PNG, see render.py;
                                       every annotation file names the real file)
``splits.json``                        {"train": [...], "val": [...], "test": [...]}
``image_data.json`` ``objects.json``   Visual Genome 1.4 style annotations
``attributes.json``
``region_descriptions.json``
``annotations/captions_{train,val}.json``  COCO captions (val file = val + test split,
                                       as Karpathy's val/test come from COCO val2014)
``annotations/dataset_coco.json``      Karpathy split file
``vqa/v2_OpenEnded_mscoco_{train,val}_questions.json``, ``vqa/v2_mscoco_{train,val}_annotations.json``
``cc/train.tsv``                       Conceptual Captions TSV (caption, url; no header)
``cc/img2dataset/``                    the same pairs as an img2dataset output folder
``web/records.jsonl``, ``web/truth.jsonl``, ``web/images/``  noisy web crawl + truth (``web/heldout/``: a
                                       held-out crawl; see :mod:`vlp.synthetic.web`)
``gqa/`` ``vizwiz/`` ``nlvr2/``         downstream tasks in their official layouts
``snli_ve/`` ``mmimdb/``               (see :mod:`vlp.synthetic.tasks`)
``truth.json``                         full scenes, planted verb regions, CC gaps, each
                                       task's counts and baselines (``tasks``), the
                                       NLVR2 image copies' scene ids (``nlvr2_images``)
``world.json``                         summary (written last)
====================================  ==============================================

Each image's scene and texts come from their own random streams
(``numpy.random.default_rng([seed, image_id, stream])``), so image k is the same in
a 20-image and a 2000-image world of the same seed.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from vlp.schemas import vocab
from vlp.synthetic import grounding, palette, tasks, text
from vlp.synthetic.render import encode_jpeg, encode_scene_image, render_scene
from vlp.synthetic.scene import (WIDE_ONLY_COLOUR_SETTINGS, Scene, check_colour_spread, check_object_colours,
                                 sample_scene)

GENERATOR = "vlp.synthetic"
# 1.1: the wide world stretches every shape, wider ring holes and cross bars;
# 1.2: half its rotatable shapes drawn upright; 1.3: no object touches one of a colour
# less than MIN_CONTRAST from its own (scenes without such a placement are unchanged).
GENERATOR_VERSION = "1.3"
URL_ROOT = "https://synthetic.invalid"

# Random streams: per image (second key = image id) or world-wide (second key 0).
_SCENE, _REGIONS, _CAPTIONS, _VQA, _CC, _WEB, _SPLITS = range(7)
#: Random streams of the downstream tasks (per image).
_TASK_STREAMS = {"gqa": 7, "vizwiz": 8, "nlvr2": 9, "snli_ve": 10, "mmimdb": 11, "vcr": 21}

#: Everything ``generate`` writes directly under out_dir (used to clear an old world).
_OUTPUTS = ("images", "annotations", "vqa", "cc", "web", "gqa", "vizwiz", "nlvr2", "snli_ve", "mmimdb", "refcoco+", "vcr", "splits.json", "image_data.json",
            "objects.json", "attributes.json", "region_descriptions.json", "truth.json",
            "world.json")

_DATE = "2024-01-01 00:00:00"  # fixed so files stay byte-identical


@dataclass
class WorldSummary:
    """What ``generate`` produced. ``seconds`` is measured, not written to any file."""

    out_dir: Path
    seed: int
    num_images: int
    splits: dict[str, list[int]]
    counts: dict[str, int]
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _stream(seed: int, key: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, key, stream])


def json_bytes(obj) -> bytes:
    """Canonical JSON encoding used for every file of the world."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class _Writer:
    """Writes files under the world root and remembers their relative paths."""

    def __init__(self, root: Path):
        self.root = root
        self.files: list[str] = []

    def bytes(self, relative: str, data: bytes) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.files.append(relative)
        return path

    def json(self, relative: str, obj) -> Path:
        return self.bytes(relative, json_bytes(obj))

    def jsonl(self, relative: str, rows) -> Path:
        return self.bytes(relative, b"".join(json_bytes(row) + b"\n" for row in rows))


def split_ids(num_images: int, seed: int, fractions) -> dict[str, list[int]]:
    """Partition ids 1..N into train/val/test by the given fractions (rounded).

    Val and test get at least one image each when their fraction is positive and the
    world has at least three images, so small test worlds still exercise every split.
    """
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"split_fractions must be three non-negative numbers, got {fractions}")
    total = float(sum(fractions))
    n_val = int(round(num_images * fractions[1] / total))
    n_test = int(round(num_images * fractions[2] / total))
    if num_images >= 3:
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
    n_val = min(n_val, num_images)
    n_test = min(n_test, num_images - n_val)
    order = _stream(seed, 0, _SPLITS).permutation(np.arange(1, num_images + 1))
    val = sorted(int(i) for i in order[:n_val])
    test = sorted(int(i) for i in order[n_val:n_val + n_test])
    train = sorted(int(i) for i in order[n_val + n_test:])
    return {"train": train, "val": val, "test": test}


def _prepare(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir}: directory is not empty (pass overwrite=True "
                                  "to replace a world generated there before)")
        if not (out_dir / "world.json").is_file():
            raise FileExistsError(f"{out_dir}: not empty and holds no world.json; refusing to "
                                  "delete files that generate() did not write")
        for name in _OUTPUTS:
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def generate(out_dir, num_images: int = 200, seed: int = 0,
             split_fractions=(0.8, 0.1, 0.1), *, vg_id_variant: str = "image_id",
             captions_per_image: int = 5, questions_per_image: int = 4,
             jpeg_quality: int = 90, overwrite: bool = False, progress=None,
             style: str = "wide", web: bool = True,
             object_colours: Optional[Sequence[str]] = None,
             colour_spread: Optional[int] = None) -> WorldSummary:
    """Generate a synthetic world of ``num_images`` images under ``out_dir``.

    ``vg_id_variant``: "image_id" writes Visual Genome 1.2/1.4 keys (image_data
    ``image_id``, regions ``region_id``); "id" writes the older variant (``id`` for
    both), which real readers still meet in old downloads.
    ``progress``: optional callable ``(done, total)`` called after each image.
    ``style``: "wide" (default: backgrounds of any colour, 13 colours, 48-1000 px, PNG and
    JPEG, aliased and anti-aliased edges; see :mod:`vlp.synthetic.scene`) or "classic"
    (the first worlds' sampler, image for image: grey backgrounds, eight colours, JPEG).
    The copies of the images in the task folders (CC img2dataset, NLVR2, VCR, MM-IMDB) are
    always JPEG, as in the real datasets.
    ``web``: also write the noisy web crawl ``web/`` (the web filter's input; it draws its
    own scenes, about half of the generation time); False leaves it out, nothing else changes.
    ``object_colours`` (wide style only): the colour words objects may take, e.g. ["gray",
    "brown"] for a world that drills the colours a detector finds hardest; None, all
    thirteen (see :func:`vlp.synthetic.scene.sample_scene`). ``colour_spread`` (wide style
    only): each channel of an object's colour within +- this of its word's reference RGB,
    still nearest its own word (None: the world's own +-10). The web crawl keeps its own
    scenes.
    """
    if style not in ("wide", "classic"):
        raise ValueError(f"style must be 'wide' or 'classic', got {style!r}")
    if (object_colours is not None or colour_spread is not None) and style != "wide":
        raise ValueError(WIDE_ONLY_COLOUR_SETTINGS)
    object_colours = check_object_colours(object_colours)
    colour_spread = check_colour_spread(colour_spread)
    if vg_id_variant not in ("image_id", "id"):
        raise ValueError(f"vg_id_variant must be 'image_id' or 'id', got {vg_id_variant!r}")
    if num_images < 1:
        raise ValueError("num_images must be at least 1")
    started = time.perf_counter()
    root = Path(out_dir)
    _prepare(root, overwrite)
    writer = _Writer(root)
    splits = split_ids(num_images, seed, split_fractions)
    split_of = {i: name for name, ids in splits.items() for i in ids}

    scenes: list[Scene] = []
    jpegs: dict[int, bytes] = {}  # JPEG bytes of every image (for the task folders' copies)
    for image_id in range(1, num_images + 1):
        scene = sample_scene(_stream(seed, image_id, _SCENE), image_id, style=style,
                             object_colours=object_colours, colour_spread=colour_spread)
        pixels = render_scene(scene)
        data = encode_scene_image(scene, pixels, jpeg_quality)
        writer.bytes(f"images/{scene.file_name}", data)
        scenes.append(scene)
        jpegs[image_id] = data if scene.image_format == "jpeg" else encode_jpeg(pixels, jpeg_quality)
        if progress is not None:
            progress(image_id, num_images)
    writer.json("splits.json", splits)

    regions = {s.image_id: text.region_descriptions(s, _stream(seed, s.image_id, _REGIONS),
                                                     s.image_id * 1000 + 1) for s in scenes}
    _write_visual_genome(writer, scenes, regions, vg_id_variant)
    captions = {s.image_id: text.captions(s, _stream(seed, s.image_id, _CAPTIONS), captions_per_image)
                for s in scenes}
    _write_coco(writer, scenes, captions, split_of)
    questions = {s.image_id: text.questions(s, _stream(seed, s.image_id, _VQA), questions_per_image)
                 for s in scenes}
    _write_vqa(writer, scenes, questions, split_of)
    cc_missing = _write_cc(writer, scenes, jpegs, seed)
    web_counts = _write_web(writer, scenes, jpegs, seed) if web else {}
    task_truth = tasks.write_tasks(writer, scenes, jpegs, split_of, seed,
                                   lambda key, name: _stream(seed, key, _TASK_STREAMS[name]))
    task_truth["tasks"].update(grounding.write_grounding(writer, scenes, jpegs, split_of, seed,
                                                         lambda key, name: _stream(seed, key, _TASK_STREAMS[name])))

    truth = {
        "generator": GENERATOR, "generator_version": GENERATOR_VERSION, "seed": seed,
        "box_format": "x1,y1,x2,y2 pixels, x2/y2 exclusive (VG w = x2 - x1)",
        "verbs": sorted(text.VERBS),
        "images": [{
            "image_id": s.image_id,
            "split": split_of[s.image_id],
            "scene": s.to_dict(),
            "regions": [{"region_id": r.region_id, "phrase": r.phrase, "object_indices": r.object_indices,
                         "verb": r.verb} for r in regions[s.image_id]],
            "verb_region_ids": [r.region_id for r in regions[s.image_id] if r.verb],
        } for s in scenes],
        "cc_missing": cc_missing,
        **task_truth,
    }
    writer.json("truth.json", truth)

    n_regions = sum(len(r) for r in regions.values())
    counts = {
        "images": num_images,
        "objects": sum(len(s.objects) for s in scenes),
        "regions": n_regions,
        "verb_regions": sum(1 for rs in regions.values() for r in rs if r.verb),
        "captions": sum(len(c) for c in captions.values()),
        "questions": sum(len(q) for q in questions.values()),
        "cc_rows": num_images + len(cc_missing),
        "cc_failed": len(cc_missing),
        **{f"web_{k}": v for k, v in web_counts.items()},
        **{f"{name}_{split}": n for name, entry in task_truth["tasks"].items()
           for split, n in entry["counts"].items()},
    }
    objects_vocab, attributes_vocab = vocab.objects(), vocab.attributes()
    world = {
        "generator": GENERATOR, "generator_version": GENERATOR_VERSION, "seed": seed,
        "num_images": num_images, "split_fractions": list(split_fractions),
        "splits": {name: len(ids) for name, ids in splits.items()},
        "image_format": (f"JPEG quality {jpeg_quality}, 4:2:0, baseline, RGB" if style == "classic" else
                         f"JPEG quality {jpeg_quality}, 4:2:0, baseline, RGB, or PNG (RGB, 8 bit): "
                         "images/<id>.jpg or images/<id>.png, named in every annotation file"),
        "style": style,
        "object_colours": list(object_colours or (palette.COLOURS if style == "wide" else palette.CLASSIC_COLOURS)),
        "colour_spread": colour_spread,
        "vg_id_variant": vg_id_variant,
        "categories": [{"name": c, "vg_id": palette.category_id(c), "synset": palette.SYNSETS[c]}
                       for c in palette.CATEGORIES],
        "attributes": {
            "colour": [{"name": c, "vg_id": palette.attribute_id(c), "rgb": list(rgb)}
                       for c, rgb in palette.COLOURS.items()],
            "size": [{"name": s, "vg_id": palette.attribute_id(s)} for s in palette.SIZES],
            "pattern": [{"name": p, "vg_id": palette.attribute_id(p)} for p in palette.PATTERNS],
        },
        "large_area_fraction": palette.LARGE_AREA_FRACTION,
        "vocab_sha256": {"objects": objects_vocab.sha256, "attributes": attributes_vocab.sha256},
        "counts": counts,
        "files": sorted(f for f in writer.files
                        if not f.endswith((".jpg", ".jpeg", ".png")) and not f.startswith("cc/img2dataset/00000/")
                        and not f.startswith("mmimdb/dataset/") and not f.startswith("vcr/vcr1images/")),
    }
    writer.json("world.json", world)
    return WorldSummary(root, seed, num_images, splits, counts, sorted(writer.files),
                        time.perf_counter() - started)


def image_path(out_dir, image_id) -> Path:
    """The file of image ``image_id`` of a generated world: ``images/<id>.jpg``, or
    ``images/<id>.png`` (the wide style stores some images as PNG)."""
    for suffix in (".jpg", ".png"):
        path = Path(out_dir) / "images" / f"{image_id}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"{out_dir}: no images/{image_id}.jpg or images/{image_id}.png")


def load_scenes(out_dir) -> dict[int, Scene]:
    """Scenes of a generated world, by image id, read back from ``truth.json``."""
    truth = json.loads((Path(out_dir) / "truth.json").read_text("utf-8"))
    return {entry["image_id"]: Scene.from_dict(entry["scene"]) for entry in truth["images"]}


# --------------------------------------------------------------------------- Visual Genome


def _vg_box(box) -> dict:
    x1, y1, x2, y2 = box
    return {"x": x1, "y": y1, "w": x2 - x1, "h": y2 - y1}


def _write_visual_genome(writer: _Writer, scenes, regions, variant: str) -> None:
    image_key = "image_id" if variant == "image_id" else "id"
    region_key = "region_id" if variant == "image_id" else "id"
    image_data, objects, attributes, descriptions = [], [], [], []
    for s in scenes:
        url = f"{URL_ROOT}/vg/images/{s.file_name}"
        image_data.append({image_key: s.image_id, "width": s.width, "height": s.height, "url": url,
                           "coco_id": s.image_id, "flickr_id": None})
        vg_objects, vg_attributes = [], []
        for index, obj in enumerate(s.objects):
            record = {"object_id": s.image_id * 1000 + index + 1, **_vg_box(obj.box),
                      "names": [obj.category], "synsets": [palette.SYNSETS[obj.category]]}
            vg_objects.append({**record, "merged_object_ids": []})
            vg_attributes.append({**record, "attributes": obj.attribute_names})
        objects.append({"image_id": s.image_id, "image_url": url, "objects": vg_objects})
        attributes.append({"image_id": s.image_id, "attributes": vg_attributes})
        descriptions.append({"id": s.image_id, "regions": [
            {region_key: r.region_id, "image_id": s.image_id, "phrase": r.phrase,
             "x": r.box[0], "y": r.box[1], "width": r.box[2] - r.box[0],
             "height": r.box[3] - r.box[1]} for r in regions[s.image_id]]})
    writer.json("image_data.json", image_data)
    writer.json("objects.json", objects)
    writer.json("attributes.json", attributes)
    writer.json("region_descriptions.json", descriptions)


# --------------------------------------------------------------------------- COCO captions


_COCO_LICENSES = [{"id": 1, "name": "Synthetic data, CC0",
                   "url": "https://creativecommons.org/publicdomain/zero/1.0/"}]


def _coco_split_file(split: str) -> str:
    return "train" if split == "train" else "val"


def _write_coco(writer: _Writer, scenes, captions, split_of) -> None:
    files = {name: {"images": [], "annotations": []} for name in ("train", "val")}
    karpathy = []
    sentence_id = 0
    for imgid, s in enumerate(scenes):
        target = files[_coco_split_file(split_of[s.image_id])]
        file_name = s.file_name
        target["images"].append({"id": s.image_id, "file_name": file_name, "width": s.width,
                                 "height": s.height, "license": 1, "date_captured": _DATE,
                                 "coco_url": f"{URL_ROOT}/coco/{file_name}", "flickr_url": ""})
        sentences, sentids = [], []
        for k, caption in enumerate(captions[s.image_id]):
            target["annotations"].append({"id": s.image_id * 10 + k, "image_id": s.image_id,
                                          "caption": caption})
            sentences.append({"tokens": text.tokens(caption), "raw": caption, "imgid": imgid,
                              "sentid": sentence_id})
            sentids.append(sentence_id)
            sentence_id += 1
        karpathy.append({"filepath": "images", "filename": file_name, "imgid": imgid,
                         "split": split_of[s.image_id], "cocoid": s.image_id, "sentids": sentids,
                         "sentences": sentences})
    for name, content in files.items():
        writer.json(f"annotations/captions_{name}.json", {
            "info": {"description": "vlp synthetic world captions (COCO format)",
                     "url": URL_ROOT, "version": GENERATOR_VERSION, "year": 2024,
                     "contributor": GENERATOR, "date_created": _DATE},
            "licenses": _COCO_LICENSES, **content})
    writer.json("annotations/dataset_coco.json", {"dataset": "coco", "images": karpathy})


# --------------------------------------------------------------------------- VQA v2


def _write_vqa(writer: _Writer, scenes, questions, split_of) -> None:
    out = {name: {"questions": [], "annotations": []} for name in ("train", "val")}
    for s in scenes:
        target = out[_coco_split_file(split_of[s.image_id])]
        for k, q in enumerate(questions[s.image_id]):
            question_id = s.image_id * 1000 + k
            target["questions"].append({"image_id": s.image_id, "question": q.question,
                                        "question_id": question_id})
            target["annotations"].append({
                "question_id": question_id, "image_id": s.image_id,
                "question_type": q.question_type, "answer_type": q.answer_type,
                "multiple_choice_answer": q.answer, "answers": q.answers})
    info = {"description": "vlp synthetic world questions (VQA v2 format)", "url": URL_ROOT,
            "version": "2.0", "year": 2024, "contributor": GENERATOR, "date_created": _DATE}
    license_ = {"name": _COCO_LICENSES[0]["name"], "url": _COCO_LICENSES[0]["url"]}
    for name, content in out.items():
        subtype = f"{name}2014"
        writer.json(f"vqa/v2_OpenEnded_mscoco_{name}_questions.json", {
            "info": info, "task_type": "Open-Ended", "data_type": "vlp-synth",
            "data_subtype": subtype, "license": license_, "questions": content["questions"]})
        writer.json(f"vqa/v2_mscoco_{name}_annotations.json", {
            "info": info, "license": license_, "data_subtype": subtype,
            "annotations": content["annotations"]})


# --------------------------------------------------------------------------- CC + img2dataset


def _write_cc(writer: _Writer, scenes, jpegs, seed: int) -> list[dict]:
    """CC TSV plus an img2dataset folder; one row's download "failed" (no image anywhere).

    Row k describes world image k (URL ``cc/<image_id>.jpg``) in web style, so every image,
    the held-out val/test ones included, has both a CC alt text and its COCO-style truth
    captions: generated captions (CCG) and CC texts can be scored against the same truth."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [(text.cc_alt_text(s, _stream(seed, s.image_id, _CC)), f"{URL_ROOT}/cc/{s.image_id}.jpg",
             s) for s in scenes]
    fail_at = int(_stream(seed, 0, _CC).integers(0, len(rows) + 1))
    rows.insert(fail_at, ("an abstract banner with simple shapes",
                          f"{URL_ROOT}/cc/missing-{fail_at}.jpg", None))
    writer.bytes("cc/train.tsv", "".join(f"{c}\t{u}\n" for c, u, _ in rows).encode("utf-8"))

    table = {name: [] for name in ("url", "key", "caption", "status", "error_message", "width",
                                   "height", "original_width", "original_height")}
    successes = 0
    for index, (caption, url, scene) in enumerate(rows):
        key = f"{0:05d}{index:04d}"
        if scene is None:
            meta = {"url": url, "key": key, "caption": caption, "status": "failed_to_download",
                    "error_message": "HTTP Error 404: Not Found", "width": None, "height": None,
                    "original_width": None, "original_height": None}
        else:
            successes += 1
            meta = {"url": url, "key": key, "caption": caption, "status": "success",
                    "error_message": None, "width": scene.width, "height": scene.height,
                    "original_width": scene.width, "original_height": scene.height}
            # img2dataset with resize_mode="no": the downloaded bytes are kept as they are.
            writer.bytes(f"cc/img2dataset/00000/{key}.jpg", jpegs[scene.image_id])
            writer.bytes(f"cc/img2dataset/00000/{key}.txt", caption.encode("utf-8"))
            writer.json(f"cc/img2dataset/00000/{key}.json", {**meta, "exif": None})
        for name in table:
            table[name].append(meta[name])
    schema = pa.schema([("url", pa.string()), ("key", pa.string()), ("caption", pa.string()),
                        ("status", pa.string()), ("error_message", pa.string()),
                        ("width", pa.int64()), ("height", pa.int64()),
                        ("original_width", pa.int64()), ("original_height", pa.int64())])
    path = writer.root / "cc/img2dataset/00000.parquet"
    pq.write_table(pa.table(table, schema=schema), path, compression="snappy")
    writer.files.append("cc/img2dataset/00000.parquet")
    writer.json("cc/img2dataset/00000_stats.json", {
        "count": len(rows), "successes": successes, "failed_to_download": len(rows) - successes,
        "failed_to_resize": 0, "status_dict": {"success": successes,
                                               "HTTP Error 404: Not Found": len(rows) - successes}})
    return [{"row": fail_at, "key": f"{0:05d}{fail_at:04d}", "url": rows[fail_at][1]}]


# --------------------------------------------------------------------------- web crawl


from vlp.synthetic import web as _web  # noqa: E402  (the crawl lives in web.py)

WEB_CATEGORIES = _web.WEB_CATEGORIES

#: Scenes of the held-out crawl (``web/heldout/``) per scene of the main crawl.
_HELDOUT_FRACTION = 0.5


def _write_web(writer: _Writer, scenes, jpegs, seed: int) -> dict[str, int]:
    """Noisy web-crawl records for the LAIT-style filter, with per-row ground truth
    (:mod:`vlp.synthetic.web`): ``web/`` with one crawl scene per world image, and
    ``web/heldout/``, a smaller crawl from other random streams."""
    counts = _web.write_crawl(writer.bytes, "web", seed, len(scenes), _WEB)
    held = _web.write_crawl(writer.bytes, "web/heldout", seed, max(6, round(_HELDOUT_FRACTION * len(scenes))), _WEB + 1000)
    counts["heldout_records"] = held["records"]
    return counts
