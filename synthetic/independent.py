"""A second, independent renderer of shape worlds, for evaluating detectors only.

The training world (:mod:`vlp.synthetic.scene` / :mod:`~vlp.synthetic.shapes` /
:mod:`~vlp.synthetic.render`) fills OpenCV polygons at 1/16 pixel and blends them in
float. This module shares none of that code path: it draws with PIL's ``ImageDraw``
(ellipses, rectangles, polygons, pie slices) into a 4x supersampled mask which is
reduced with a box filter, builds its shapes differently (a heart from two discs and
a triangle, a cross from two bars, a ring as an ellipse minus an ellipse, isosceles
triangles, stars of 5 points with their own radius ratio), draws optional outlines of
1-3 px in a darker shade, uses its own reference RGB per colour word, its own
backgrounds (flat, checkerboard, soft stripes, radial gradient) and its own encoders
(PNG, or JPEG quality 80-95 without chroma subsampling). Only the vocabulary is shared:
the eight VG categories and the thirteen VG colour words of :mod:`vlp.synthetic.palette`.

Two kinds of sets, both in the layout :func:`vlp.detectors.evaluate.evaluate_detector`
reads (``images/<id>.png|jpg``, ``objects.json``, ``attributes.json``,
``image_data.json``, ``splits.json`` with every image in ``test``, ``truth.json``):

* :func:`generate_independent` - scenes of 1-6 objects that never overlap (so each
  annotated box is exactly the pixel extent of what was drawn: the pixels whose mask
  alpha is at least 50%, outline included);
* :func:`generate_single_shapes` - small PNGs (64-256 px), one flat shape on a plain
  white or light background: the case where a detector trained on grey backgrounds
  takes the background for a "white box".

Attributes are written as in the training world: colour first, then size ("large"
when the box covers at least ``palette.LARGE_AREA_FRACTION`` of the image; sizes are
sampled away from that threshold).
"""

from __future__ import annotations

import colorsys
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vlp.synthetic import palette

#: Supersampling factor of the shape masks.
SUPERSAMPLE = 4
#: Each colour word's reference RGB here (deliberately not the training palette's values).
RGB: dict[str, tuple[int, int, int]] = {
    "red": (200, 16, 46), "blue": (0, 90, 200), "green": (0, 140, 70), "yellow": (255, 225, 0),
    "orange": (255, 150, 0), "purple": (120, 40, 160), "white": (255, 255, 255), "black": (0, 0, 0),
    "gray": (140, 140, 140), "brown": (140, 80, 40), "pink": (255, 160, 200), "teal": (0, 140, 140),
    "tan": (205, 175, 130),
}
assert set(RGB) == set(palette.COLOURS)
#: Least RGB distance between an object's colour and its background's colours.
MIN_CONTRAST = 90.0


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (int(r * 255 + 0.5), int(g * 255 + 0.5), int(b * 255 + 0.5))


def _distance(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, float) - np.asarray(b, float)))


# --------------------------------------------------------------------------- shapes


def shape_mask(category: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """An 'L' mask of ``width`` x ``height`` (supersampled, then box-filtered) whose
    shape touches all four sides of its box (up to the reduction)."""
    s = SUPERSAMPLE
    W, H = width * s, height * s
    mask = Image.new("L", (W, H), 0)
    d = ImageDraw.Draw(mask)
    if category == "circle":
        d.ellipse([0, 0, W - 1, H - 1], fill=255)
    elif category == "ring":
        d.ellipse([0, 0, W - 1, H - 1], fill=255)
        f = float(rng.uniform(0.3, 0.42))
        d.ellipse([W * f, H * f, W * (1 - f) - 1, H * (1 - f) - 1], fill=0)
    elif category == "box":
        d.rectangle([0, 0, W - 1, H - 1], fill=255)
    elif category == "triangle":
        apex = float(rng.uniform(0.35, 0.65)) * (W - 1)
        d.polygon([(apex, 0), (W - 1, H - 1), (0, H - 1)], fill=255)
    elif category == "diamond":
        d.polygon([((W - 1) / 2, 0), (W - 1, (H - 1) / 2), ((W - 1) / 2, H - 1), (0, (H - 1) / 2)], fill=255)
    elif category == "cross":
        t = float(rng.uniform(0.26, 0.4))
        d.rectangle([W * (0.5 - t / 2), 0, W * (0.5 + t / 2) - 1, H - 1], fill=255)
        d.rectangle([0, H * (0.5 - t / 2), W - 1, H * (0.5 + t / 2) - 1], fill=255)
    elif category == "star":
        ratio = float(rng.uniform(0.36, 0.5))
        pts = []
        for k in range(10):
            angle = -math.pi / 2 + k * math.pi / 5
            r = 1.0 if k % 2 == 0 else ratio
            pts.append((math.cos(angle) * r, math.sin(angle) * r))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        d.polygon([((x - x0) / (x1 - x0) * (W - 1), (y - y0) / (y1 - y0) * (H - 1)) for x, y in pts], fill=255)
    elif category == "heart":
        # Two discs side by side on top and a triangle pointing down.
        r = W / 4.0
        top = min(2 * r, H * 0.55)
        d.ellipse([0, 0, 2 * r, top], fill=255)
        d.ellipse([W - 1 - 2 * r, 0, W - 1, top], fill=255)
        d.polygon([(W * 0.02, top * 0.62), (W * 0.98 - 1, top * 0.62), ((W - 1) / 2, H - 1)], fill=255)
    else:
        raise ValueError(f"unknown shape category {category!r}")
    return mask.resize((width, height), Image.BOX)


def _outline(mask: Image.Image, width: int) -> Image.Image:
    """The band of ``width`` px inside the mask's edge (for the darker outline)."""
    inner = mask.filter(ImageFilter.MinFilter(2 * width + 1))
    return Image.fromarray(np.clip(np.asarray(mask, np.int16) - np.asarray(inner, np.int16), 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------- backgrounds


def _background(rng: np.random.Generator, width: int, height: int, plain_light: bool = False):
    """(image, colours it contains, name)."""
    if plain_light:
        colour = _hsv(float(rng.random()), float(rng.uniform(0.0, 0.12)), float(rng.uniform(0.88, 1.0)))
        return Image.new("RGB", (width, height), colour), [colour], "plain"
    roll = float(rng.random())
    first = _hsv(float(rng.random()), float(rng.uniform(0.0, 1.0)), float(rng.uniform(0.0, 1.0)))
    if rng.random() < 0.3:
        first = _hsv(0.0, 0.0, float(rng.choice([1.0, 0.96, 0.92, 0.05, 0.5])))
    if roll < 0.4:
        return Image.new("RGB", (width, height), first), [first], "flat"
    second = tuple(int(c) for c in np.clip(np.array(first) + rng.choice([-1, 1]) * rng.integers(20, 50), 0, 255))
    if roll < 0.6:  # checkerboard
        cell = int(rng.integers(6, 40))
        ys, xs = np.mgrid[0:height, 0:width]
        board = ((xs // cell + ys // cell) % 2).astype(bool)
        arr = np.where(board[..., None], np.array(second, np.uint8), np.array(first, np.uint8))
        return Image.fromarray(arr.astype(np.uint8)), [first, second], "checkerboard"
    if roll < 0.8:  # soft stripes
        image = Image.new("RGB", (width, height), first)
        d = ImageDraw.Draw(image)
        step = int(rng.integers(8, 50))
        for x in range(-height, width + height, step):
            d.line([(x, 0), (x + height, height)], fill=second, width=max(1, step // 3))
        return image, [first, second], "stripes"
    # radial gradient
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = float(rng.uniform(0, width)), float(rng.uniform(0, height))
    t = np.hypot(xs - cx, ys - cy)
    t = (t / max(float(t.max()), 1.0))[..., None]
    arr = np.array(first, np.float32) * (1 - t) + np.array(second, np.float32) * t
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8)), [first, second], "radial"


# --------------------------------------------------------------------------- scenes


def _size_label(box, width, height) -> str:
    area = (box[2] - box[0]) * (box[3] - box[1]) / float(width * height)
    return "large" if area >= palette.LARGE_AREA_FRACTION else "small"


def draw_scene(rng: np.random.Generator, image_id: int, *, single: bool = False):
    """Sample and draw one image. Returns (PIL RGB image, image format, objects, background
    kind) where each object is {"category", "colour", "size", "box": [x1, y1, x2, y2]
    (x2/y2 exclusive)} and the background kind one of "plain" (single shapes), "flat",
    "checkerboard", "stripes", "radial"."""
    if single:
        width = height = int(rng.integers(64, 257))
        if rng.random() < 0.5:
            height = int(round(width * float(rng.uniform(0.7, 1.0))))
    else:
        width, height = int(rng.integers(64, 801)), int(rng.integers(64, 801))
        if max(width, height) > 2.2 * min(width, height):
            height = width
    background, bg_colours, bg_kind = _background(rng, width, height, plain_light=single)
    image = background
    wanted = 1 if single else int(rng.integers(1, 7))
    objects, occupied = [], []
    short = min(width, height)
    for _ in range(wanted * 20):
        if len(objects) >= wanted:
            break
        category = str(rng.choice(palette.CATEGORIES))
        allowed = [c for c in RGB if min(_distance(RGB[c], b) for b in bg_colours) >= MIN_CONTRAST]
        if not allowed:
            break
        colour = str(rng.choice(allowed))
        if single:
            side = float(rng.uniform(0.3, 0.8)) * short
        elif rng.random() < 0.5:  # small: box area well below 4% of the image
            side = float(rng.uniform(max(14.0, 0.07 * short), max(15.0, math.sqrt(0.02 * width * height))))
        else:  # large: box area well above 4%
            side = float(rng.uniform(math.sqrt(0.07 * width * height), 0.9 * short))
        aspect = 1.0
        if category == "box":
            aspect = float(math.exp(rng.uniform(math.log(0.3), math.log(3.3))))
        elif category in ("diamond", "triangle", "heart", "star", "cross"):
            aspect = float(rng.uniform(0.8, 1.25))
        w = int(round(side * math.sqrt(aspect)))
        h = int(round(side / math.sqrt(aspect)))
        if w < 8 or h < 8 or w > width - 4 or h > height - 4:
            continue
        x1 = int(rng.integers(2, width - w - 1))
        y1 = int(rng.integers(2, height - h - 1))
        if any(x1 < b[2] + 3 and b[0] < x1 + w + 3 and y1 < b[3] + 3 and b[1] < y1 + h + 3 for b in occupied):
            continue
        mask = shape_mask(category, w, h, rng)
        fill = tuple(int(c) for c in np.clip(np.array(RGB[colour]) + rng.integers(-6, 7, 3), 0, 255))
        layer = Image.new("RGB", (w, h), fill)
        if not single and rng.random() < 0.3:
            line = int(rng.integers(1, 4))
            shade = tuple(int(c * 0.6) for c in fill)
            band = _outline(mask, line)
            layer.paste(Image.new("RGB", (w, h), shade), (0, 0), band)
        image.paste(layer, (x1, y1), mask)
        arr = np.asarray(mask) >= 128
        cols, rows = np.flatnonzero(arr.any(0)), np.flatnonzero(arr.any(1))
        if cols.size == 0:
            continue
        box = [x1 + int(cols[0]), y1 + int(rows[0]), x1 + int(cols[-1]) + 1, y1 + int(rows[-1]) + 1]
        occupied.append(box)
        objects.append({"category": category, "colour": colour, "size": _size_label(box, width, height),
                        "box": box})
    fmt = "png" if single or rng.random() < 0.5 else "jpeg"
    return image, fmt, objects, bg_kind


def _encode(image: Image.Image, fmt: str, rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=9)
    else:
        image.save(buffer, format="JPEG", quality=int(rng.integers(80, 96)), subsampling=0)
    return buffer.getvalue()


def _write_set(out_dir, num_images: int, seed: int, single: bool) -> Path:
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    image_data, objects_json, attributes_json, truth = [], [], [], []
    for image_id in range(1, num_images + 1):
        rng = np.random.default_rng([seed, image_id, 77 if single else 66])
        image, fmt, objects, bg_kind = draw_scene(rng, image_id, single=single)
        name = f"{image_id}.{'png' if fmt == 'png' else 'jpg'}"
        (root / "images" / name).write_bytes(_encode(image, fmt, rng))
        image_data.append({"image_id": image_id, "width": image.width, "height": image.height,
                           "url": f"https://independent.invalid/{name}", "file_name": name})
        vg_objects, vg_attributes = [], []
        for k, obj in enumerate(objects):
            x1, y1, x2, y2 = obj["box"]
            record = {"object_id": image_id * 1000 + k + 1, "x": x1, "y": y1, "w": x2 - x1, "h": y2 - y1,
                      "names": [obj["category"]], "synsets": [palette.SYNSETS[obj["category"]]]}
            vg_objects.append(record)
            vg_attributes.append({**record, "attributes": [obj["colour"], obj["size"]]})
        objects_json.append({"image_id": image_id, "objects": vg_objects})
        attributes_json.append({"image_id": image_id, "attributes": vg_attributes})
        truth.append({"image_id": image_id, "file_name": name, "background": bg_kind, "objects": objects})
    ids = list(range(1, num_images + 1))

    def dump(name, obj):
        (root / name).write_text(json.dumps(obj, sort_keys=True, separators=(",", ":")), "utf-8")

    dump("image_data.json", image_data)
    dump("objects.json", objects_json)
    dump("attributes.json", attributes_json)
    dump("splits.json", {"train": [], "val": [], "test": ids})
    dump("truth.json", {"generator": "vlp.synthetic.independent", "seed": seed,
                        "kind": "single_shapes" if single else "independent", "images": truth})
    return root


def generate_independent(out_dir, num_images: int = 150, seed: int = 0) -> Path:
    """Scenes of 1-6 non-overlapping objects drawn by this module (see the module docstring)."""
    return _write_set(out_dir, num_images, seed, single=False)


def generate_single_shapes(out_dir, num_images: int = 200, seed: int = 0) -> Path:
    """Small PNGs of one flat shape on a plain white or light background."""
    return _write_set(out_dir, num_images, seed, single=True)
