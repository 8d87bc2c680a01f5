"""Scene description and sampling.

A :class:`Scene` holds everything needed to paint an image (background, clutter,
objects with their drawing parameters) and everything an annotation needs
(category, attributes, tight boxes, occlusion). Scenes are plain data and
round-trip through JSON exactly (``to_dict`` / ``from_dict``), so
``truth.json`` alone can re-render every image pixel for pixel.

Sampling rules (why they are what they are):

* image sides 240-640 px with aspect ratios up to 2:1, landscape or portrait,
  like the spread of photos in VG/COCO;
* muted mid-grey backgrounds (saturation <= 0.22, value 0.42-0.72) so that every
  object colour - including white and black - keeps contrast;
* clutter (thin lines, specks) in background-like greys: visible texture that is
  never confusable with a labelled object;
* object box sides at least max(24 px, 8% of the short side) so a stride-16
  detector sees each object on a few feature cells; "small" and "large" sizes
  sampled from separated area ranges so the size attribute is unambiguous;
* occlusion limited: later objects may cover at most 40% of an earlier object's
  box and at most 40% of its own pixels (placements breaking this are re-drawn).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from vlp.synthetic import palette
from vlp.synthetic.shapes import PATCH_MARGIN, extent, rasterize

MIN_SIDE, MAX_SIDE = 240, 640
MAX_OBJECTS = 8
MAX_OCCLUDED_FRACTION = 0.4
MIN_BOX_SIDE_PX = 24
MIN_BOX_SIDE_FRACTION = 0.08
PATTERN_PROBABILITY = 0.2
LARGE_PROBABILITY = 0.45
#: Target box-area fractions of the image for each size class (see palette.LARGE_AREA_FRACTION).
SMALL_AREA_RANGE = (0.0, 0.022)
LARGE_AREA_RANGE = (0.06, 0.16)
#: Rotation limits per category in degrees: none where it is meaningless (circle,
#: ring) and small where a large one would turn one shape into another (a box
#: rotated by 45 degrees is a diamond, a cross rotated by 45 degrees is an "x").
ROTATION_LIMITS = {"circle": 0.0, "ring": 0.0, "box": 12.0, "diamond": 12.0, "cross": 12.0,
                   "heart": 15.0, "triangle": 30.0, "star": 36.0}


@dataclass
class Background:
    """How the empty canvas is painted.

    kind: "solid" (colours[0]), "gradient" (colours[0] -> colours[1] along ``angle``)
    or "noise" (colours[0] plus Gaussian texture of ``noise_sigma`` drawn from
    ``noise_seed``, smoothed). ``name`` is the human description used in captions.
    """

    kind: str
    colours: list[tuple[int, int, int]]
    angle: float
    noise_sigma: float
    noise_seed: int
    name: str


@dataclass
class Clutter:
    """A distractor mark that is not an object: a thin line or a small speck."""

    kind: str  # "line" | "speck"
    points: list[float]  # line: x1, y1, x2, y2; speck: x, y
    thickness: int  # line width or speck radius in pixels
    rgb: tuple[int, int, int]


@dataclass
class DrawParams:
    """Geometry and paint of one object (see shapes.rasterize / pattern_coverage)."""

    cx: float
    cy: float
    size: float
    aspect: float
    inner_ratio: float
    rotation: float
    rgb: tuple[int, int, int]
    pattern_rgb: tuple[int, int, int] | None = None
    pattern_period: float = 0.0
    pattern_angle: float = 0.0
    pattern_phase: float = 0.0


@dataclass
class SceneObject:
    """One labelled object. ``box`` is x1, y1, x2, y2 in pixels, x2/y2 exclusive."""

    category: str
    colour: str
    size: str
    pattern: str | None
    box: tuple[int, int, int, int]
    draw: DrawParams
    occluded_box_fraction: float = 0.0
    occluded_mask_fraction: float = 0.0
    occluders: list[int] = field(default_factory=list)

    @property
    def category_id(self) -> int:
        return palette.category_id(self.category)

    @property
    def attribute_names(self) -> list[str]:
        """Colour first (the primary attribute), then size, then the pattern if any."""
        return [self.colour, self.size] + ([self.pattern] if self.pattern else [])

    @property
    def attribute_ids(self) -> list[int]:
        return [palette.attribute_id(name) for name in self.attribute_names]

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0)


@dataclass
class Scene:
    image_id: int
    width: int
    height: int
    background: Background
    clutter: list[Clutter]
    objects: list[SceneObject]

    def to_dict(self) -> dict:
        """JSON-ready dict; includes the derived VG ids so readers need no vocabulary."""
        data = asdict(self)
        for obj, raw in zip(self.objects, data["objects"]):
            raw["category_id"] = obj.category_id
            raw["attributes"] = obj.attribute_names
            raw["attribute_ids"] = obj.attribute_ids
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        def rgb(value):
            return None if value is None else tuple(int(c) for c in value)

        objects = []
        for raw in data["objects"]:
            draw = dict(raw["draw"])
            draw["rgb"] = rgb(draw["rgb"])
            draw["pattern_rgb"] = rgb(draw.get("pattern_rgb"))
            objects.append(SceneObject(
                category=raw["category"], colour=raw["colour"], size=raw["size"],
                pattern=raw["pattern"], box=tuple(raw["box"]), draw=DrawParams(**draw),
                occluded_box_fraction=raw["occluded_box_fraction"],
                occluded_mask_fraction=raw["occluded_mask_fraction"],
                occluders=list(raw["occluders"])))
        bg = dict(data["background"])
        bg["colours"] = [rgb(c) for c in bg["colours"]]
        clutter = [Clutter(kind=c["kind"], points=list(c["points"]), thickness=c["thickness"],
                           rgb=rgb(c["rgb"])) for c in data["clutter"]]
        return cls(image_id=data["image_id"], width=data["width"], height=data["height"],
                   background=Background(**bg), clutter=clutter, objects=objects)


# --------------------------------------------------------------------------- background


def _hsv_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (int(round(r * 255)), int(round(g * 255)), int(round(b * 255)))


def _muted_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    hue = float(rng.random())
    saturation = float(rng.uniform(0.0, 0.22)) if rng.random() < 0.7 else 0.0
    value = float(rng.uniform(0.42, 0.72))
    return _hsv_rgb(hue, saturation, value)


def describe_colour(rgb: tuple[int, int, int]) -> str:
    """A caption word for a muted background colour: "grey", "light bluish grey", "beige"..."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
    lightness = "light " if v > 0.62 else "dark " if v < 0.5 else ""
    if s < 0.1:
        return f"{lightness}grey"
    hue = h * 360.0
    if 20 <= hue < 55:
        return "beige" if v > 0.55 else "brownish grey"
    tint = ("reddish" if hue < 20 or hue >= 330 else "olive" if hue < 75 else
            "greenish" if hue < 165 else "bluish" if hue < 255 else "purplish")
    return f"{lightness}{tint} grey"


def _sample_background(rng: np.random.Generator) -> Background:
    kind = str(rng.choice(["solid", "gradient", "noise"], p=[0.4, 0.3, 0.3]))
    first = _muted_colour(rng)
    colours = [first]
    angle = 0.0
    sigma = 0.0
    if kind == "gradient":
        colours.append(_muted_colour(rng))
        angle = round(float(rng.uniform(0.0, 360.0)), 1)
    elif kind == "noise":
        sigma = round(float(rng.uniform(4.0, 10.0)), 2)
    seed = int(rng.integers(0, 2**31 - 1))
    name = describe_colour(first)
    if kind == "gradient":
        second = describe_colour(colours[1])
        name = f"{name} to {second} gradient" if second != name else f"{name} gradient"
    elif kind == "noise":
        name = f"textured {name}"
    return Background(kind, colours, angle, sigma, seed, name)


def _sample_clutter(rng: np.random.Generator, width: int, height: int,
                    background: Background) -> list[Clutter]:
    base = np.array(background.colours[0], float)
    items = []
    for _ in range(int(rng.integers(0, 5))):
        shift = float(rng.choice([-1.0, 1.0]) * rng.uniform(25.0, 45.0))
        grey = tuple(int(c) for c in np.clip(base + shift, 0, 255).round())
        x1, x2 = rng.uniform(0, width, 2)
        y1, y2 = rng.uniform(0, height, 2)
        items.append(Clutter("line", [round(float(v), 1) for v in (x1, y1, x2, y2)],
                             int(rng.integers(1, 3)), grey))
    for _ in range(int(rng.integers(0, 25))):
        shift = float(rng.choice([-1.0, 1.0]) * rng.uniform(20.0, 50.0))
        grey = tuple(int(c) for c in np.clip(base + shift, 0, 255).round())
        items.append(Clutter("speck", [round(float(rng.uniform(0, width)), 1),
                                       round(float(rng.uniform(0, height)), 1)],
                             int(rng.integers(1, 3)), grey))
    return items


# --------------------------------------------------------------------------- objects


class _Placed:
    """Bookkeeping for occlusion: an object's mask and what later objects covered."""

    def __init__(self, box, patch):
        x1, y1, x2, y2 = box
        self.box = box
        self.mask = np.zeros((y2 - y1, x2 - x1), bool)
        _paste_or(self.mask, box, patch)
        self.covered = np.zeros_like(self.mask)
        self.occluders: list[int] = []

    def coverage_with(self, patch) -> tuple[np.ndarray, bool]:
        extra = np.zeros_like(self.covered)
        touched = _paste_or(extra, self.box, patch) and bool((extra & self.mask).any())
        return self.covered | extra, touched

    def fractions(self, covered: np.ndarray) -> tuple[float, float]:
        return (float(covered.mean()),
                float((covered & self.mask).sum()) / max(1, int(self.mask.sum())))


def _paste_or(target: np.ndarray, box, patch) -> bool:
    """OR a patch's mask into ``target`` (which spans ``box``); return whether they overlap."""
    x1, y1, x2, y2 = box
    px1, py1 = patch.x0, patch.y0
    py2, px2 = py1 + patch.alpha.shape[0], px1 + patch.alpha.shape[1]
    ix1, iy1, ix2, iy2 = max(x1, px1), max(y1, py1), min(x2, px2), min(y2, py2)
    if ix1 >= ix2 or iy1 >= iy2:
        return False
    target[iy1 - y1:iy2 - y1, ix1 - x1:ix2 - x1] |= patch.mask[iy1 - py1:iy2 - py1,
                                                               ix1 - px1:ix2 - px1]
    return True


def _quantise(value: float, step: float = 1.0 / 16.0) -> float:
    return round(round(value / step) * step, 4)


def _sample_object(rng, width, height, category, colour, size_class, pattern):
    """Draw parameters for one object, or None when the sizes cannot fit this image."""
    short = min(width, height)
    min_side = max(MIN_BOX_SIDE_PX, MIN_BOX_SIDE_FRACTION * short)
    lo, hi = SMALL_AREA_RANGE if size_class == "small" else LARGE_AREA_RANGE
    nominal_min = max(min_side * 1.2, math.sqrt(lo * width * height))
    nominal_max = min(0.6 * short, math.sqrt(hi * width * height))
    if nominal_max < nominal_min:
        return None
    size = _quantise(float(rng.uniform(nominal_min, nominal_max)))
    aspect = 1.0
    if category == "box":
        aspect = round(float(math.exp(rng.uniform(math.log(0.6), math.log(1.6)))), 3)
    elif category == "diamond":
        aspect = round(float(rng.uniform(1.0, 1.5)), 3)
    inner = 0.0
    if category == "ring":
        inner = round(float(rng.uniform(0.45, 0.6)), 3)
    elif category == "star":
        inner = round(float(rng.uniform(0.42, 0.5)), 3)
    limit = ROTATION_LIMITS[category]
    rotation = round(float(rng.uniform(-limit, limit)), 1) if limit else 0.0
    ex1, ey1, ex2, ey2 = extent(category, size, aspect, inner, rotation)
    margin = PATCH_MARGIN + 2
    cx_lo, cx_hi = margin - ex1, width - margin - ex2
    cy_lo, cy_hi = margin - ey1, height - margin - ey2
    if cx_hi <= cx_lo or cy_hi <= cy_lo:
        return None
    base = np.array(palette.COLOURS[colour])
    rgb = tuple(int(c) for c in np.clip(base + rng.integers(-8, 9, 3), 0, 255))
    draw = DrawParams(cx=_quantise(float(rng.uniform(cx_lo, cx_hi))),
                      cy=_quantise(float(rng.uniform(cy_lo, cy_hi))),
                      size=size, aspect=aspect, inner_ratio=inner, rotation=rotation, rgb=rgb)
    if pattern:
        draw.pattern_rgb = palette.PATTERN_COLOURS[colour]
        draw.pattern_period = round(max(7.0, size / float(rng.uniform(3.5, 5.0))), 2)
        draw.pattern_angle = round(float(rng.uniform(0.0, 180.0)), 1)
        draw.pattern_phase = round(float(rng.random()), 3)
    return draw


def sample_scene(rng: np.random.Generator, image_id: int, *, min_side: int = MIN_SIDE,
                 max_side: int = MAX_SIDE, max_objects: int = MAX_OBJECTS) -> Scene:
    """Sample one scene. Deterministic in the state of ``rng``.

    ``generate`` seeds one generator per image (``numpy.random.default_rng([seed,
    image_id, 0])``), so an image does not depend on how many images the world has.
    """
    if not (16 <= min_side <= max_side):
        raise ValueError(f"need 16 <= min_side <= max_side, got {min_side}, {max_side}")
    if not 1 <= max_objects:
        raise ValueError("max_objects must be at least 1")
    long_side = int(rng.integers(max(min_side, int(0.75 * max_side)), max_side + 1))
    ratio = float(math.exp(rng.uniform(0.0, math.log(2.0))))
    short_side = int(min(long_side, max(min_side, round(long_side / ratio))))
    width, height = ((long_side, short_side) if rng.random() < 0.65 else (short_side, long_side))
    background = _sample_background(rng)
    clutter = _sample_clutter(rng, width, height, background)
    short = min(width, height)
    min_box_side = max(MIN_BOX_SIDE_PX, MIN_BOX_SIDE_FRACTION * short)

    wanted = int(rng.integers(1, max_objects + 1))
    objects: list[SceneObject] = []
    placed: list[_Placed] = []
    for _ in range(wanted):
        # Repeats make counting phrases ("two yellow triangles") and questions meaningful.
        if objects and rng.random() < 0.35:
            template = objects[int(rng.integers(len(objects)))]
            category = template.category
            colour = template.colour if rng.random() < 0.5 else str(rng.choice(list(palette.COLOURS)))
        else:
            category = str(rng.choice(palette.CATEGORIES))
            colour = str(rng.choice(list(palette.COLOURS)))
        pattern = str(rng.choice(palette.PATTERNS)) if rng.random() < PATTERN_PROBABILITY else None
        size_classes = ["large", "small"] if rng.random() < LARGE_PROBABILITY else ["small"]
        accepted = None
        for size_class in size_classes:
            for _attempt in range(25):
                draw = _sample_object(rng, width, height, category, colour, size_class, pattern)
                if draw is None:
                    break
                patch = rasterize(category, draw.cx, draw.cy, draw.size, draw.aspect,
                                  draw.inner_ratio, draw.rotation)
                box = patch.tight_box()
                if min(box[2] - box[0], box[3] - box[1]) < min_box_side:
                    continue
                updates = []
                for index, earlier in enumerate(placed):
                    covered, touched = earlier.coverage_with(patch)
                    box_fraction, mask_fraction = earlier.fractions(covered)
                    if max(box_fraction, mask_fraction) > MAX_OCCLUDED_FRACTION:
                        break
                    updates.append((index, covered, touched, box_fraction, mask_fraction))
                else:
                    accepted = (draw, patch, box, updates)
                    break
            if accepted:
                break
        if accepted is None:
            continue  # this object does not fit; the scene simply has fewer objects
        draw, patch, box, updates = accepted
        new_index = len(objects)
        for index, covered, touched, box_fraction, mask_fraction in updates:
            placed[index].covered = covered
            if touched:
                objects[index].occluders.append(new_index)
            objects[index].occluded_box_fraction = round(box_fraction, 4)
            objects[index].occluded_mask_fraction = round(mask_fraction, 4)
        area_fraction = (box[2] - box[0]) * (box[3] - box[1]) / float(width * height)
        size_label = "large" if area_fraction >= palette.LARGE_AREA_FRACTION else "small"
        objects.append(SceneObject(category, colour, size_label, pattern, box, draw))
        placed.append(_Placed(box, patch))
    return Scene(image_id, width, height, background, clutter, objects)
