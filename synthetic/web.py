"""The synthetic world's noisy web crawl: what ``vlp-build web-filter`` must catch, with truth.

:func:`write_crawl` writes one crawl folder (``records.jsonl``, ``truth.jsonl``,
``images/``). ``generate`` writes two: ``web/`` (the crawl the default filter models were
trained on) and ``web/heldout/`` (another crawl from other random streams: other scenes,
other junk, for the filter's figures).

Each crawl draws its own scenes, rendered with both sides >= 320 px (web photos, and above
ImageBERT's 300 px floor). Categories (``truth.jsonl`` ``category``; ``stage`` is the filter
stage that names it, :data:`EXPECTED_STAGE`):

==============  ==========================================================================
good            an English alt text describing the scene, a title, surrounding sentences
junk_text       file names, "click here", "image", boilerplate titles and page text
non_english     German / French / Spanish alt, title and text
profane         a description with a swear word in it
mismatch        an English description of ANOTHER scene (a caption that does not match)
unnatural       screenshots, text cards, flat graphics, logos (``subkind``), plausible text
shared_text     one short text ("free star clipart for your website") on 11-14 distinct images
duplicate       copies of good rows: the same row again, the same bytes at another url, a
                re-encoded (JPEG q75) or resized copy at another url with a reworded alt
                (``original`` = the good row's key; a copy always comes after it)
too_small       32-48 px icons
==============  ==========================================================================

``truth.jsonl`` also holds each row's ``regions``: what a detector would see, as
``[object name, attribute name, x1, y1, x2, y2, confidence]`` in VG vocabulary; natural
scenes sometimes carry a spurious low-confidence graphic label, unnatural images a shape
now and then. :func:`web_feature_store` turns them into a feature store named by key (the
crawl's oracle features, as ``truth_feature_store`` is the world's).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from vlp.synthetic import text
from vlp.synthetic.render import encode_jpeg, render_scene
from vlp.synthetic.scene import Scene, sample_scene

WEB_CATEGORIES = ("good", "junk_text", "duplicate", "non_english", "too_small", "profane", "mismatch",
                  "unnatural", "shared_text")
#: The web-filter stage that names each junk category.
EXPECTED_STAGE = {"too_small": "image", "unnatural": "naturalness", "junk_text": "text",
                  "non_english": "language", "profane": "text_rules", "mismatch": "semantic",
                  "shared_text": "aggregation", "duplicate": "aggregation"}
UNNATURAL_KINDS = ("screenshot", "text_card", "flat_graphic", "logo")
#: Mild swear words planted in "profane" rows (all on the filter's list).
PROFANE_WORDS = ("damn", "crappy", "shitty", "bloody", "freaking")
WEB_MIN_SIDE = 320
_HOSTS = ("shapes-blog.invalid", "free-clipart.invalid", "kids-learning.invalid", "cdn.example-img.invalid")
_UNNATURAL_TEXTS = {
    "screenshot": ["screenshot of the settings page of a drawing app", "screenshot of my desktop with open windows",
                   "screenshot of an online shop page"],
    "text_card": ["motivational quote card with a blue border", "inspirational words on a plain card",
                  "greeting card with a short message"],
    "flat_graphic": ["flat infographic with bars and numbers", "simple chart of monthly sales figures",
                     "flat vector diagram of a process"],
    "logo": ["company logo with a star and letters", "the new logo of our sports club",
             "brand logo on a white background"],
}
_UNNATURAL_LABELS = {
    "screenshot": ["screen", "words", "letters", "text", "computer", "menu"],
    "text_card": ["words", "letters", "text", "sign", "writing"],
    "flat_graphic": ["drawing", "design", "symbol", "words", "poster"],
    "logo": ["logo", "letters", "symbol", "sign", "words"],
}
_SPURIOUS = ("sign", "drawing", "design", "poster", "picture")
_COLOURS = ("red", "blue", "green", "yellow", "orange", "purple", "white", "black")


def _scene_regions(scene: Scene, rng: np.random.Generator, scale: float = 1.0) -> list:
    regions = [[o.category, o.colour, *[round(float(v) * scale, 1) for v in o.box], round(float(rng.uniform(0.75, 0.99)), 3)]
               for o in scene.objects]
    if rng.random() < 0.15:  # a detector's odd guess on a natural image
        w, h = scene.width * scale, scene.height * scale
        regions.append([str(rng.choice(_SPURIOUS)), str(rng.choice(_COLOURS)), 0.0, 0.0, round(w / 3, 1),
                        round(h / 3, 1), round(float(rng.uniform(0.2, 0.45)), 3)])
    return regions


def _put_text(canvas, words: str, x: int, y: int, scale: float, colour, thickness: int = 1) -> None:
    cv2.putText(canvas, words, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)


_LOREM = ("settings", "profile", "account", "privacy", "display", "sound", "network", "update", "help",
          "about", "share", "save", "open", "close", "print", "export", "search", "sales", "total")


def _unnatural_image(kind: str, rng: np.random.Generator) -> np.ndarray:
    """An RGB screenshot / text card / flat graphic / logo, both sides >= 320 px."""
    w, h = int(rng.integers(400, 641)), int(rng.integers(330, 481))
    words = lambda n: " ".join(str(rng.choice(_LOREM)) for _ in range(n))  # noqa: E731
    if kind == "screenshot":
        img = np.full((h, w, 3), 245, np.uint8)
        cv2.rectangle(img, (0, 0), (w, 28), (60, 60, 70), -1)
        _put_text(img, words(3), 8, 19, 0.5, (240, 240, 240))
        cv2.rectangle(img, (0, 28), (120, h), (225, 228, 235), -1)
        for k in range(int((h - 40) / 24)):
            _put_text(img, words(1), 8, 52 + 24 * k, 0.45, (40, 40, 40))
        for k in range(int((h - 50) / 20)):
            _put_text(img, words(int(rng.integers(3, 7))), 132, 50 + 20 * k, 0.42, (20, 20, 20))
    elif kind == "text_card":
        bg = tuple(int(c) for c in rng.integers(150, 256, 3))
        img = np.full((h, w, 3), bg, np.uint8)
        cv2.rectangle(img, (10, 10), (w - 10, h - 10), (30, 60, 160), 4)
        for k in range(int(rng.integers(3, 6))):
            _put_text(img, words(3).upper(), 30, 70 + 55 * k, 1.0, (20, 20, 20), 2)
    elif kind == "flat_graphic":
        img = np.full((h, w, 3), 255, np.uint8)
        bars = int(rng.integers(4, 9))
        for k in range(bars):
            top = int(rng.integers(60, h - 60))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            x0 = 40 + k * (w - 60) // bars
            cv2.rectangle(img, (x0, top), (x0 + (w - 60) // bars - 8, h - 40), colour, -1)
            _put_text(img, str(int(rng.integers(10, 99))), x0, top - 6, 0.5, (0, 0, 0))
        cv2.line(img, (30, h - 40), (w - 10, h - 40), (0, 0, 0), 2)
        _put_text(img, words(2).upper(), 30, 30, 0.8, (0, 0, 0), 2)
    else:  # logo
        img = np.full((h, w, 3), 255, np.uint8)
        colour = tuple(int(c) for c in rng.integers(0, 200, 3))
        cx, cy, r = w // 2, h // 2 - 30, min(w, h) // 5
        points = [(int(cx + (r if i % 2 == 0 else r // 2) * np.sin(i * np.pi / 5)),
                   int(cy - (r if i % 2 == 0 else r // 2) * np.cos(i * np.pi / 5))) for i in range(10)]
        cv2.fillPoly(img, [np.array(points, np.int32)], colour, cv2.LINE_AA)
        _put_text(img, words(1).upper(), cx - 90, cy + r + 50, 1.3, colour, 3)
    # scanner / screen-capture noise keeps the JPEG above a few KB, as real ones are
    noise = rng.normal(0, 2.5, img.shape)
    return np.clip(img.astype(np.float64) + noise, 0, 255).astype(np.uint8)


def _noise_tile(seed: int) -> np.ndarray:
    """Sensor noise (sigma 3) for one crawl, as int16, large enough for any scene plus an offset."""
    side = 640 + 16
    return np.rint(np.random.default_rng([seed, 77]).standard_normal((side, side, 3), dtype=np.float32) * 3.0
                   ).astype(np.int16)


def _photo(scene: Scene, noise: np.ndarray) -> np.ndarray:
    """The scene as a web photo: rendered, plus mild sensor noise, so that even a plain
    one-object picture is a JPEG of more than 5 KB, as photos are."""
    offset = scene.image_id % 16
    crop = noise[offset:offset + scene.height, offset:offset + scene.width]
    return np.clip(render_scene(scene).astype(np.int16) + crop, 0, 255).astype(np.uint8)


def _describe(scene: Scene, rng) -> str:
    return text.describe_scene_short(scene, rng)


def write_crawl(write_bytes: Callable[[str, bytes], object], prefix: str, seed: int, num_scenes: int,
                stream: int) -> dict[str, int]:
    """Write one crawl under ``prefix`` (``records.jsonl``, ``truth.jsonl``, ``images/``) through
    ``write_bytes(relative_path, data)``. Scenes and choices come from
    ``default_rng([seed, key, stream])``; returns counts per category."""
    def rng_of(key: int, sub: int = 0) -> np.random.Generator:
        return np.random.default_rng([seed, key, stream, sub])

    n = max(int(num_scenes), 6)
    rng = rng_of(0)
    noise = _noise_tile(seed)
    scenes = [sample_scene(rng_of(i + 1), i + 1, min_side=WEB_MIN_SIDE, style="classic") for i in range(n)]
    jpegs: dict[int, bytes] = {}

    def jpeg(scene: Scene) -> bytes:
        if scene.image_id not in jpegs:
            jpegs[scene.image_id] = encode_jpeg(_photo(scene, noise))
        return jpegs[scene.image_id]

    counter = iter(range(10**7))

    def new_key() -> str:
        return f"web{next(counter):06d}"

    def base_row(host_rng, path_tag: str, key: str, width: int, height: int) -> dict:
        host = _HOSTS[int(host_rng.integers(len(_HOSTS)))]
        return {"key": key, "url": f"https://{host}/{path_tag}/{key}.jpg", "image_path": f"images/{key}.jpg",
                "width": width, "height": height}

    kinds = ["good"] * n
    slots = [int(k) for k in rng.permutation(n)]
    quota = [("junk_text", 0.12), ("non_english", 0.12), ("profane", 0.06), ("mismatch", 0.10)]
    at = 0
    for kind, share in quota:
        for k in slots[at:at + max(1, round(share * n))]:
            kinds[k] = kind
        at += max(1, round(share * n))
    kinds[slots[-1]] = "good"  # at least one good row

    rows: list[tuple[dict, dict]] = []  # (record, truth)
    for index, (scene, kind) in enumerate(zip(scenes, kinds)):
        r = rng_of(index + 1, 1)
        key = new_key()
        row = base_row(r, "img", key, scene.width, scene.height)
        lang = "en"
        if kind == "non_english":
            lang = text.FOREIGN_LANGUAGES[int(r.integers(len(text.FOREIGN_LANGUAGES)))]
            row["alt"], row["title"], row["surrounding_text"] = text.foreign_texts(scene, r, lang)
        elif kind == "junk_text":
            row["alt"] = text.JUNK_ALTS[int(r.integers(len(text.JUNK_ALTS)))]
            row["title"] = str(r.choice(["Home", "Gallery", "Untitled document", ""]))
            row["surrounding_text"] = text.BOILERPLATE[int(r.integers(len(text.BOILERPLATE)))]
        else:
            described = scene
            if kind == "mismatch":  # another scene's description, sharing no shape with this one
                own = {o.category for o in scene.objects}
                others = [s for s in scenes if not {o.category for o in s.objects} & own] or \
                    [s for s in scenes if s is not scene]
                described = others[int(r.integers(len(others)))]
            alt = _describe(described, r)
            if kind == "profane":
                alt = f"{PROFANE_WORDS[int(r.integers(len(PROFANE_WORDS)))]} {alt}"
            row["alt"] = alt
            row["title"] = text.ENGLISH_TITLES[int(r.integers(len(text.ENGLISH_TITLES)))]
            row["surrounding_text"] = (text.ENGLISH_TEXTS[int(r.integers(len(text.ENGLISH_TEXTS)))]
                                       + " It shows " + _describe(described, r) + ".")
        if r.random() < 0.5:  # pages declare their language only sometimes
            row["lang_hint"] = lang
        write_bytes(f"{prefix}/{row['image_path']}", jpeg(scene))
        rows.append((row, {"key": key, "category": kind, "regions": _scene_regions(scene, r)}))

    order = [rows[int(k)] for k in rng.permutation(len(rows))]

    # near-duplicates of good rows, each placed after its original
    good = [(row, truth) for row, truth in order if truth["category"] == "good"]
    n_dup = min(len(good), max(4, round(0.12 * n)))
    picks = sorted(int(k) for k in rng.choice(len(good), n_dup, replace=False))
    scene_index = {row["key"]: i for i, (row, _) in enumerate(rows)}
    for number, pick in enumerate(picks):
        original, original_truth = good[pick]
        how = ("exact", "same_bytes", "reencoded", "resized")[number % 4]
        key = new_key()
        r = rng_of(10**6 + number, 2)
        if how == "exact":  # the same page crawled twice
            copy = {**original, "key": key}
            regions = original_truth["regions"]
        else:
            scene = scenes[scene_index[original["key"]]]
            copy = {**base_row(r, "mirror", key, scene.width, scene.height),
                    "alt": _describe(scene, r), "title": original["title"],
                    "surrounding_text": original["surrounding_text"]}
            scale = 1.0
            if how == "same_bytes":
                data = jpeg(scene)
            elif how == "resized" and min(scene.width, scene.height) * 0.85 > 300:
                scale = 0.85
                size = (round(scene.width * scale), round(scene.height * scale))
                data = encode_jpeg(cv2.resize(_photo(scene, noise), size, interpolation=cv2.INTER_AREA))
                copy["width"], copy["height"] = size
            else:
                how = "reencoded"
                data = encode_jpeg(_photo(scene, noise), 75)
            write_bytes(f"{prefix}/{copy['image_path']}", data)
            regions = [[*reg[:2], *[round(v * scale, 1) for v in reg[2:6]], reg[6]] for reg in original_truth["regions"]]
        position = next(i for i, (row, _) in enumerate(order) if row is original)
        order.insert(int(rng.integers(position + 1, len(order) + 1)),
                     (copy, {"key": key, "category": "duplicate", "original": original["key"], "how": how,
                             "regions": regions}))

    extra = 10**5  # scene ids of the extra images below

    # unnatural images with plausible English text
    n_unnatural = max(len(UNNATURAL_KINDS), round(0.10 * n))
    for k in range(n_unnatural):
        kind = UNNATURAL_KINDS[k % len(UNNATURAL_KINDS)]
        r = rng_of(2 * 10**6 + k, 3)
        image = _unnatural_image(kind, r)
        key = new_key()
        row = {**base_row(r, "uploads", key, image.shape[1], image.shape[0]),
               "alt": str(r.choice(_UNNATURAL_TEXTS[kind])), "title": "Our latest pictures",
               "surrounding_text": "Here is another picture from our site."}
        write_bytes(f"{prefix}/{row['image_path']}", encode_jpeg(image))
        labels = list(r.choice(_UNNATURAL_LABELS[kind], size=int(r.integers(2, 5)), replace=False))
        h, w = image.shape[:2]
        regions = [[str(name), str(r.choice(_COLOURS)), *[round(float(v), 1) for v in
                    (r.uniform(0, w / 2), r.uniform(0, h / 2), r.uniform(w / 2, w), r.uniform(h / 2, h))],
                    round(float(r.uniform(0.3, 0.8)), 3)] for name in labels]
        if r.random() < 0.3:
            regions.append(["star", str(r.choice(_COLOURS)), 10.0, 10.0, 90.0, 90.0, round(float(r.uniform(0.3, 0.7)), 3)])
        order.insert(int(rng.integers(0, len(order) + 1)),
                     (row, {"key": key, "category": "unnatural", "subkind": kind, "regions": regions}))

    # one short text on 11-14 distinct images that all show it (a stock site's template alt)
    groups = max(1, round(n / 120))
    for g in range(groups):
        r = rng_of(3 * 10**6 + g, 4)
        category = str(r.choice(["circle", "triangle", "star", "box", "heart", "cross", "ring", "diamond"]))
        shared = f"free {category} clipart for your website"
        for k in range(int(r.integers(11, 15))):
            for attempt in range(60):
                scene = sample_scene(rng_of(extra + g * 1000 + k, 10 + attempt), extra + g * 1000 + k,
                                     min_side=WEB_MIN_SIDE, style="classic")
                if any(o.category == category for o in scene.objects):
                    break
            key = new_key()
            row = {**base_row(r, "stock", key, scene.width, scene.height), "alt": shared,
                   "title": "Free clipart", "surrounding_text": ""}
            write_bytes(f"{prefix}/{row['image_path']}", encode_jpeg(_photo(scene, noise)))
            order.insert(int(rng.integers(0, len(order) + 1)),
                         (row, {"key": key, "category": "shared_text", "regions": _scene_regions(scene, r)}))

    # tiny icons
    for k in range(max(1, round(0.06 * n))):
        r = rng_of(4 * 10**6 + k, 5)
        scene = scenes[int(r.integers(n))]
        side = int(r.choice([32, 40, 48]))
        icon = cv2.resize(_photo(scene, noise), (side, side), interpolation=cv2.INTER_AREA)
        key = new_key()
        row = {**base_row(r, "icons", key, side, side), "alt": _describe(scene, r) + " icon",
               "title": "Shape icons", "surrounding_text": "Small icons for your website."}
        write_bytes(f"{prefix}/{row['image_path']}", encode_jpeg(icon))
        sx, sy = side / scene.width, side / scene.height
        regions = [[o.category, o.colour, round(o.box[0] * sx, 1), round(o.box[1] * sy, 1), round(o.box[2] * sx, 1),
                    round(o.box[3] * sy, 1), 0.5] for o in scene.objects]
        order.insert(int(rng.integers(0, len(order) + 1)),
                     (row, {"key": key, "category": "too_small", "regions": regions}))

    def lines(items) -> bytes:
        return b"".join(json.dumps(item, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
                        + b"\n" for item in items)

    for _, truth in order:
        truth["stage"] = EXPECTED_STAGE.get(truth["category"], "")
    write_bytes(f"{prefix}/records.jsonl", lines(row for row, _ in order))
    write_bytes(f"{prefix}/truth.jsonl", lines(truth for _, truth in order))
    counts = {"records": len(order)}
    for category in WEB_CATEGORIES:
        counts[category] = sum(1 for _, truth in order if truth["category"] == category)
    return counts


def read_truth(crawl_dir) -> dict[str, dict]:
    """``truth.jsonl`` of a crawl folder, by key."""
    path = Path(crawl_dir) / "truth.jsonl"
    return {entry["key"]: entry for entry in map(json.loads, path.read_text("utf-8").splitlines())}


def web_feature_store(crawl_dir, out, *, feature_dim: int = 16, storage: str = "arrow", seed: int = 0,
                      overwrite: bool = False) -> Path:
    """The crawl's oracle feature store (one record per key, regions from ``truth.jsonl``)."""
    from vlp.schemas import FeatureRecord, FeatureStoreWriter, vocab

    objects, attributes = vocab.objects(), vocab.attributes()
    rng = np.random.default_rng(seed)
    codes: dict = {}
    records = {json.loads(line)["key"]: json.loads(line)
               for line in (Path(crawl_dir) / "records.jsonl").read_text("utf-8").splitlines()}
    mode = "overwrite" if overwrite else "create"
    with FeatureStoreWriter(out, storage=storage, feature_dim=feature_dim, mode=mode,
                            detector={"name": "synthetic-web-truth"}) as writer:
        for key, truth in read_truth(crawl_dir).items():
            regions = truth["regions"]
            feats = []
            for k, region in enumerate(regions):
                code = codes.setdefault((region[0], region[1]),
                                        np.abs(rng.standard_normal(feature_dim)).astype(np.float32))
                noise = np.random.default_rng([seed, k, len(key)]).standard_normal(feature_dim)
                feats.append(np.maximum(code + 0.1 * noise, 0))
            m = len(regions)
            row = records[key]
            writer.add(FeatureRecord.from_arrays(
                key, int(row["width"]), int(row["height"]),
                boxes=np.array([reg[2:6] for reg in regions], dtype=np.float32).reshape(m, 4),
                features=np.array(feats, dtype=np.float32).reshape(m, feature_dim),
                objects_id=np.array([objects.id(reg[0]) for reg in regions], dtype=np.int64),
                objects_conf=np.array([reg[6] for reg in regions], dtype=np.float32),
                attrs_id=np.array([attributes.id(reg[1]) for reg in regions], dtype=np.int64),
                attrs_conf=np.array([0.9] * m, dtype=np.float32)))
    return Path(out)
