"""Stage 1 of the web filter (the image) and the pixel statistics stage 2 reads.

An image passes when it decodes by the extract pipeline's rules
(:func:`vlp.core.decode.decode_image`: EXIF orientation, bomb guard, ...), its file has
at least ``min_bytes`` (COYO: 5 KB), both sides are larger than ``min_side`` (ImageBERT:
300 px; COYO uses 200) and the aspect ratio long/short is at most ``max_aspect`` (3).

For every image that passes, :func:`image_facts` also gives the sha256 of the file, a
64-bit perceptual hash (imagehash's DCT pHash) for near-copies, and three pixel
statistics on a copy shrunk to at most 128 px: ``colour_count`` (distinct colours at
4 bits per channel, as log2), ``flat_share`` (the share of 8x8 blocks whose grey
standard deviation is under 4) and ``edge_density`` (the share of Canny edge pixels).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

DEFAULT_MIN_BYTES = 5 * 1024
DEFAULT_MIN_SIDE = 300
DEFAULT_MAX_ASPECT = 3.0


@dataclass
class ImageRules:
    min_bytes: int = DEFAULT_MIN_BYTES
    min_side: int = DEFAULT_MIN_SIDE
    max_aspect: float = DEFAULT_MAX_ASPECT

    def check(self, data: bytes) -> tuple[str, dict, object]:
        """("", facts, bgr array) when the image passes, else (reason, values, None)."""
        from vlp.core.decode import DecodeError, decode_image

        if len(data) < self.min_bytes:
            return "file_too_small", {"bytes": len(data), "min_bytes": self.min_bytes}, None
        try:
            bgr = decode_image(data)
        except DecodeError as exc:
            return "undecodable", {"why": str(exc)[:200], "kind": exc.kind}, None
        h, w = bgr.shape[:2]
        if min(w, h) <= self.min_side:
            return "too_small", {"width": w, "height": h, "min_side": self.min_side}, None
        aspect = max(w, h) / min(w, h)
        if aspect > self.max_aspect:
            return "aspect", {"width": w, "height": h, "aspect": round(aspect, 3)}, None
        return "", {"width": w, "height": h, "bytes": len(data)}, bgr


def phash_hex(bgr: np.ndarray) -> str:
    import imagehash
    from PIL import Image

    return str(imagehash.phash(Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))))


def pixel_stats(bgr: np.ndarray) -> dict:
    import cv2

    h, w = bgr.shape[:2]
    scale = min(1.0, 128.0 / max(h, w))
    small = cv2.resize(bgr, (max(8, round(w * scale)), max(8, round(h * scale))), interpolation=cv2.INTER_AREA)
    quant = (small >> 4).reshape(-1, 3).astype(np.int32)
    codes = np.unique(quant[:, 0] * 256 + quant[:, 1] * 16 + quant[:, 2])
    grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    bh, bw = grey.shape[0] // 8, grey.shape[1] // 8
    blocks = grey[:bh * 8, :bw * 8].reshape(bh, 8, bw, 8).astype(np.float32)
    flat = float((blocks.std(axis=(1, 3)) < 4.0).mean()) if bh and bw else 0.0
    edges = cv2.Canny(grey, 100, 200)
    return {"colour_count": round(float(np.log2(len(codes))), 4), "flat_share": round(flat, 4),
            "edge_density": round(float((edges > 0).mean()), 4)}


def image_facts(data: bytes, bgr: np.ndarray) -> dict:
    """sha256, pHash and pixel statistics of an image that passed."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "phash": phash_hex(bgr), **pixel_stats(bgr)}
