"""Painting scenes into RGB arrays, and the deterministic JPEG / PNG encodings used on disk."""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
from PIL import Image

from vlp.synthetic.scene import Scene
from vlp.synthetic.shapes import pattern_coverage, rasterize

#: Main images are JPEG (what real V&L datasets ship): quality 90, 4:2:0 chroma
#: subsampling, baseline, no optimisation pass, no EXIF/ICC - libjpeg output for
#: fixed input and options is byte-identical across runs.
JPEG_OPTIONS = {"format": "JPEG", "quality": 90, "subsampling": 2, "optimize": False,
                "progressive": False}


def _background(scene: Scene) -> np.ndarray:
    bg = scene.background
    h, w = scene.height, scene.width
    first = np.array(bg.colours[0], np.float32)
    if bg.kind == "gradient":
        second = np.array(bg.colours[1], np.float32)
        theta = math.radians(bg.angle)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xs * math.cos(theta) + ys * math.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        return first + t[..., None] * (second - first)
    canvas = np.broadcast_to(first, (h, w, 3)).copy()
    if bg.kind == "noise":
        noise = np.random.default_rng(bg.noise_seed).standard_normal((h, w, 3), np.float32)
        # A light blur turns per-pixel noise into a paper-like texture.
        noise = cv2.GaussianBlur(noise, (0, 0), 1.2) * np.float32(bg.noise_sigma * 2.0)
        canvas += noise
    return canvas


def _draw_clutter(canvas: np.ndarray, scene: Scene) -> None:
    """Anti-aliased lines and specks (OpenCV anti-aliases only 8-bit images, so each
    mark is drawn into a uint8 alpha layer over its bounding rectangle and blended)."""
    h, w = canvas.shape[:2]
    line_type = cv2.LINE_AA if scene.antialias else cv2.LINE_8
    for item in scene.clutter:
        if item.kind == "line":
            xs, ys = item.points[0::2], item.points[1::2]
            pad = item.thickness + 2
        else:
            xs, ys = item.points[:1], item.points[1:]
            pad = item.thickness + 2
        x0 = max(0, int(math.floor(min(xs))) - pad)
        y0 = max(0, int(math.floor(min(ys))) - pad)
        x1 = min(w, int(math.ceil(max(xs))) + pad + 1)
        y1 = min(h, int(math.ceil(max(ys))) + pad + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        layer = np.zeros((y1 - y0, x1 - x0), np.uint8)
        if item.kind == "line":
            p1 = (int(round((xs[0] - x0) * 16)), int(round((ys[0] - y0) * 16)))
            p2 = (int(round((xs[1] - x0) * 16)), int(round((ys[1] - y0) * 16)))
            cv2.line(layer, p1, p2, 255, item.thickness, line_type, 4)
        else:
            centre = (int(round((xs[0] - x0) * 16)), int(round((ys[0] - y0) * 16)))
            cv2.circle(layer, centre, item.thickness * 16, 255, -1, line_type, 4)
        _composite(canvas, layer.astype(np.float32) / 255.0, x0, y0, item.rgb)


def _composite(canvas: np.ndarray, alpha: np.ndarray, x0: int, y0: int, colour) -> None:
    """Alpha-blend a flat colour through ``alpha`` (float [h, w] in 0..1) at (x0, y0), clipped."""
    h, w = canvas.shape[:2]
    ax1, ay1 = max(0, -x0), max(0, -y0)
    ax2, ay2 = min(alpha.shape[1], w - x0), min(alpha.shape[0], h - y0)
    if ax1 >= ax2 or ay1 >= ay2:
        return
    a = alpha[ay1:ay2, ax1:ax2, None]
    region = canvas[y0 + ay1:y0 + ay2, x0 + ax1:x0 + ax2]
    region *= 1.0 - a
    region += a * np.asarray(colour, np.float32)


def render_scene(scene: Scene) -> np.ndarray:
    """Paint a scene: returns an (H, W, 3) uint8 RGB array.

    Order: background, clutter, then objects in list order (later objects on top),
    each as its main colour plus an optional stripe/spot pattern inside its shape.
    """
    canvas = _background(scene)
    _draw_clutter(canvas, scene)
    for obj in scene.objects:
        d = obj.draw
        patch = rasterize(obj.category, d.cx, d.cy, d.size, d.aspect, d.inner_ratio, d.rotation,
                          antialias=scene.antialias)
        alpha = patch.alpha.astype(np.float32) / 255.0
        _composite(canvas, alpha, patch.x0, patch.y0, d.rgb)
        if obj.pattern:
            coverage = pattern_coverage(obj.pattern, alpha.shape, d.cx - patch.x0,
                                        d.cy - patch.y0, d.pattern_period, d.pattern_angle,
                                        d.pattern_phase)
            if not scene.antialias:
                coverage = (coverage >= 0.5).astype(np.float32)
            _composite(canvas, alpha * coverage, patch.x0, patch.y0, d.pattern_rgb)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def object_masks(scene: Scene, visible: bool = False) -> list[np.ndarray]:
    """Full-image boolean masks of each object (alpha >= 50%).

    With ``visible=True`` the parts covered by later-drawn objects are removed,
    i.e. the pixels where the object's own colour is what you see.
    """
    masks = []
    for obj in scene.objects:
        d = obj.draw
        patch = rasterize(obj.category, d.cx, d.cy, d.size, d.aspect, d.inner_ratio, d.rotation,
                          antialias=scene.antialias)
        full = np.zeros((scene.height, scene.width), bool)
        ph, pw = patch.alpha.shape
        x0, y0 = patch.x0, patch.y0
        sx1, sy1 = max(0, -x0), max(0, -y0)
        sx2, sy2 = min(pw, scene.width - x0), min(ph, scene.height - y0)
        full[y0 + sy1:y0 + sy2, x0 + sx1:x0 + sx2] = patch.mask[sy1:sy2, sx1:sx2]
        masks.append(full)
    if visible:
        for i in range(len(masks)):
            for later in masks[i + 1:]:
                masks[i] = masks[i] & ~later
    return masks


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """Deterministic JPEG bytes of an RGB uint8 array (see JPEG_OPTIONS)."""
    buffer = io.BytesIO()
    options = {**JPEG_OPTIONS, "quality": quality}
    Image.fromarray(np.ascontiguousarray(image, np.uint8)).save(buffer, **options)
    return buffer.getvalue()


#: Lossless images of the wide world: PNG, zlib level 6, no optimisation pass, no
#: metadata - byte-identical for fixed input with the same zlib.
PNG_OPTIONS = {"format": "PNG", "compress_level": 6, "optimize": False}


def encode_png(image: np.ndarray) -> bytes:
    """Deterministic PNG bytes of an RGB uint8 array (see PNG_OPTIONS)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, np.uint8)).save(buffer, **PNG_OPTIONS)
    return buffer.getvalue()


def encode_scene_image(scene: Scene, image: np.ndarray, jpeg_quality: int = 90) -> bytes:
    """The bytes of ``scene.file_name``: PNG when ``scene.image_format == "png"``, else JPEG."""
    return encode_png(image) if scene.image_format == "png" else encode_jpeg(image, jpeg_quality)


def decode_image(data: bytes) -> np.ndarray:
    """RGB uint8 array of encoded image bytes (for tests and consumers)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))
