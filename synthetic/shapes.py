"""Geometry and rasterisation of the eight world shapes.

Sampling (which needs exact masks to compute tight boxes and occlusion) and
rendering (which needs the same masks to paint) both go through
:func:`rasterize`, so the boxes written to the annotation files are, by
construction, the pixel extent of what is painted.

Shapes are polygons (a circle is a 96-gon) filled with OpenCV's anti-aliased
(or, for the wide world's aliased images, 8-connected) ``fillPoly`` at 1/16-pixel precision; the result is an alpha patch (uint8,
255 = fully inside) plus the patch origin in image coordinates. A pixel counts as
part of the object when its alpha is at least :data:`MASK_THRESHOLD` (more than
half covered).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

SUBPIXEL_BITS = 4
_SUBPIXEL = 1 << SUBPIXEL_BITS
MASK_THRESHOLD = 128
#: Pixels of empty border around a shape in its patch (room for anti-aliasing).
PATCH_MARGIN = 2


@dataclass(frozen=True)
class Patch:
    """An alpha patch placed at (x0, y0) in image coordinates."""

    alpha: np.ndarray  # uint8 [h, w]
    x0: int
    y0: int

    @property
    def mask(self) -> np.ndarray:
        return self.alpha >= MASK_THRESHOLD

    def tight_box(self) -> tuple[int, int, int, int]:
        """Pixel extent of the mask as x1, y1, x2, y2 with exclusive x2/y2 (so w = x2 - x1)."""
        mask = self.mask
        cols = np.flatnonzero(mask.any(axis=0))
        rows = np.flatnonzero(mask.any(axis=1))
        if cols.size == 0:
            raise ValueError("shape rasterised to an empty mask")
        return (self.x0 + int(cols[0]), self.y0 + int(rows[0]),
                self.x0 + int(cols[-1]) + 1, self.y0 + int(rows[-1]) + 1)


def _regular_polygon(n: int, radius: float, start_deg: float = -90.0) -> np.ndarray:
    angles = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


CLASSIC_CROSS_BAR = 0.34  # bar width / size


def outline(category: str, size: float, aspect: float, inner_ratio: float
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """Unrotated outline of a shape centred at the origin (y down), plus an optional hole.

    ``size`` is the nominal extent in pixels (diameter / side); ``aspect`` is
    width:height for boxes and height:width for diamonds, and for every other shape a
    stretch of width:height (1: the undistorted shape; an ellipse for a circle);
    ``inner_ratio`` is the hole radius of a ring or the inner radius of a star, relative
    to the outer radius, or the bar width of a cross relative to its size (0: 0.34, the
    classic world's bars).
    """
    body, hole = _unstretched(category, size, aspect, inner_ratio)
    if category in ("box", "diamond") or aspect == 1.0:
        return body, hole
    stretch = np.array([math.sqrt(aspect), 1.0 / math.sqrt(aspect)])
    return body * stretch, (None if hole is None else hole * stretch)


def _unstretched(category: str, size: float, aspect: float, inner_ratio: float
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    half = size / 2.0
    if category == "circle":
        return _regular_polygon(96, half), None
    if category == "ring":
        return _regular_polygon(96, half), _regular_polygon(96, half * inner_ratio)
    if category == "triangle":
        # Equilateral with side = size; shift so the box is centred vertically.
        tri = _regular_polygon(3, size / math.sqrt(3.0))
        tri[:, 1] -= (tri[:, 1].max() + tri[:, 1].min()) / 2.0
        return tri, None
    if category == "star":
        outer = _regular_polygon(5, half)
        inner = _regular_polygon(5, half * inner_ratio, start_deg=-90.0 + 36.0)
        star = np.empty((10, 2))
        star[0::2], star[1::2] = outer, inner
        return star, None
    if category == "box":
        w, h = size * math.sqrt(aspect) / 2.0, size / math.sqrt(aspect) / 2.0
        return np.array([[-w, -h], [w, -h], [w, h], [-w, h]]), None
    if category == "diamond":
        w, h = size / math.sqrt(aspect) / 2.0, size * math.sqrt(aspect) / 2.0
        return np.array([[0.0, -h], [w, 0.0], [0.0, h], [-w, 0.0]]), None
    if category == "cross":
        a, b = half, size * (inner_ratio or CLASSIC_CROSS_BAR) / 2.0
        return np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b],
                         [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]]), None
    if category == "heart":
        t = np.linspace(0.0, 2.0 * math.pi, 120, endpoint=False)
        x = 16.0 * np.sin(t) ** 3
        y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
        y -= (y.max() + y.min()) / 2.0
        return np.stack([x, y], axis=1) * (size / 32.0), None
    raise ValueError(f"unknown shape category {category!r}")


def _rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    return points @ np.array([[c, s], [-s, c]])


def local_polygons(category: str, size: float, aspect: float, inner_ratio: float,
                   rotation: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Rotated outline and hole relative to the centre."""
    body, hole = outline(category, size, aspect, inner_ratio)
    body = _rotate(body, rotation)
    return body, (None if hole is None else _rotate(hole, rotation))


def rasterize(category: str, cx: float, cy: float, size: float, aspect: float,
              inner_ratio: float, rotation: float, *, antialias: bool = True) -> Patch:
    """Alpha patch of a shape centred at (cx, cy) in image pixels: anti-aliased, or with
    ``antialias=False`` aliased (alpha 0 or 255; OpenCV's 8-connected fill)."""
    body, hole = local_polygons(category, size, aspect, inner_ratio, rotation)
    pts = body + (cx, cy)
    x0 = int(math.floor(pts[:, 0].min())) - PATCH_MARGIN
    y0 = int(math.floor(pts[:, 1].min())) - PATCH_MARGIN
    x1 = int(math.ceil(pts[:, 0].max())) + PATCH_MARGIN + 1
    y1 = int(math.ceil(pts[:, 1].max())) + PATCH_MARGIN + 1
    alpha = np.zeros((y1 - y0, x1 - x0), np.uint8)

    def fixed(points: np.ndarray) -> np.ndarray:
        return np.round((points - (x0, y0)) * _SUBPIXEL).astype(np.int32).reshape(-1, 1, 2)

    line = cv2.LINE_AA if antialias else cv2.LINE_8
    cv2.fillPoly(alpha, [fixed(pts)], 255, lineType=line, shift=SUBPIXEL_BITS)
    if hole is not None:
        cv2.fillPoly(alpha, [fixed(hole + (cx, cy))], 0, lineType=line, shift=SUBPIXEL_BITS)
    return Patch(alpha, x0, y0)


def extent(category: str, size: float, aspect: float, inner_ratio: float,
           rotation: float) -> tuple[float, float, float, float]:
    """Min/max x and y of the outline relative to its centre (for placing it inside an image)."""
    body, _ = local_polygons(category, size, aspect, inner_ratio, rotation)
    return (float(body[:, 0].min()), float(body[:, 1].min()),
            float(body[:, 0].max()), float(body[:, 1].max()))


def pattern_coverage(kind: str, shape: tuple[int, int], cx: float, cy: float,
                     period: float, angle: float, phase: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of stripes or spots over a patch.

    Computed analytically per pixel (distance to the nearest stripe centre line /
    dot centre), which is exact, deterministic and independent of drawing order.
    Stripes cover 30% of the period, dots ~20% of the area.
    """
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = math.radians(angle)
    u = (xs - cx) * math.cos(theta) + (ys - cy) * math.sin(theta)
    v = -(xs - cx) * math.sin(theta) + (ys - cy) * math.cos(theta)
    if kind == "striped":
        width = 0.3 * period
        offset = np.mod(u - phase * period, period) - period / 2.0
        return np.clip(width / 2.0 - np.abs(offset) + 0.5, 0.0, 1.0)
    if kind == "spotted":
        radius = 0.25 * period
        row = np.round(v / period)
        shift = 0.5 * np.mod(row, 2.0)
        col = np.round(u / period - shift - phase) + shift + phase
        dist = np.hypot(u - col * period, v - row * period)
        return np.clip(radius - dist + 0.5, 0.0, 1.0)
    raise ValueError(f"unknown pattern {kind!r}")
