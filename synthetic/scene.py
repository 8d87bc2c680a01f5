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

Those are the rules of ``style="classic"`` (the world before issue 19; kept so old
figures stay reproducible, and used by the web crawl). ``style="wide"`` (the default of
``generate``) widens every distribution so that a detector trained on it does not
learn "background = muted grey":

* image sides 48-1000 px (log-uniform long side, aspect up to 2.2:1), PNG for ~35% of
  the images and JPEG for the rest, aliased edges for ~30% of them;
* backgrounds of any colour - near-white, near-black, saturated, the objects' own
  colours (:data:`palette.COLOURS`), muted greys, pastels - flat, gradient or textured;
  about half the scenes have no clutter at all;
* one object alone in ~40% of the images, up to ``max_objects`` otherwise;
* thirteen VG colours (:data:`palette.COLOURS`); an object's colour is always at least
  :data:`MIN_CONTRAST` (RGB distance) from every colour of its background, and from the
  colour of every object it touches (generator 1.3; before, a small object could sit
  invisibly inside a larger one of its own colour and still be annotated);
* boxes from max(10 px, 6% of the short side) to nearly the whole frame, rectangles of
  aspect ratio 1:4 to 4:1; half the rotatable shapes exactly upright, the rest tilted
  within :data:`ROTATION_LIMITS`; the small/large size rule is unchanged (box area below
  ~2.2% or above 6% of the image, threshold :data:`palette.LARGE_AREA_FRACTION`).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Optional, Sequence

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
    #: "classic" or "wide" (the sampler that drew it; see the module docstring).
    style: str = "classic"
    #: Whether shapes and clutter are drawn with anti-aliased edges.
    antialias: bool = True
    #: "jpeg" or "png": how the image is stored (``file_name``).
    image_format: str = "jpeg"

    @property
    def file_name(self) -> str:
        """The image's file name in a world's ``images/``: ``<id>.jpg`` or ``<id>.png``."""
        return f"{self.image_id}.{'png' if self.image_format == 'png' else 'jpg'}"

    def to_dict(self) -> dict:
        """JSON-ready dict; includes the derived VG ids so readers need no vocabulary.

        A classic scene's dict has no style / antialias / image_format keys (as before
        the wide style existed, so a classic world's truth.json is unchanged)."""
        data = asdict(self)
        if self.style == "classic" and self.antialias and self.image_format == "jpeg":
            for key in ("style", "antialias", "image_format"):
                data.pop(key)
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
                   background=Background(**bg), clutter=clutter, objects=objects,
                   style=data.get("style", "classic"), antialias=bool(data.get("antialias", True)),
                   image_format=data.get("image_format", "jpeg"))


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
    return Background(kind, colours, angle, sigma, seed, _background_name(kind, colours, describe_colour))


def _background_name(kind: str, colours: list, describe) -> str:
    """"grey", "grey to blue gradient", "textured grey": the colour words by ``describe``."""
    name = describe(colours[0])
    if kind == "gradient":
        second = describe(colours[1])
        return f"{name} to {second} gradient" if second != name else f"{name} gradient"
    return f"textured {name}" if kind == "noise" else name


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


def _occlusion_updates(placed: list, patch) -> Optional[list]:
    """What a new object drawn as ``patch`` would cover of each placed one, or None when it
    would hide any of them beyond MAX_OCCLUDED_FRACTION."""
    updates = []
    for index, earlier in enumerate(placed):
        covered, touched = earlier.coverage_with(patch)
        box_fraction, mask_fraction = earlier.fractions(covered)
        if max(box_fraction, mask_fraction) > MAX_OCCLUDED_FRACTION:
            return None
        updates.append((index, covered, touched, box_fraction, mask_fraction))
    return updates


def _record_occlusion(objects: list, placed: list, updates: list) -> None:
    """Record on the placed objects what the object about to be appended covers of them."""
    new_index = len(objects)
    for index, covered, touched, box_fraction, mask_fraction in updates:
        placed[index].covered = covered
        if touched:
            objects[index].occluders.append(new_index)
        objects[index].occluded_box_fraction = round(box_fraction, 4)
        objects[index].occluded_mask_fraction = round(mask_fraction, 4)


def _quantise(value: float, step: float = 1.0 / 16.0) -> float:
    return round(round(value / step) * step, 4)


@dataclass(frozen=True)
class ShapeRanges:
    """The per-style ranges of an object's shape parameters and colour jitter."""

    box_aspect: tuple[float, float]  # log-uniform
    diamond_aspect: tuple[float, float]
    ring_inner: tuple[float, float]
    star_inner: tuple[float, float]
    rgb_jitter: int  # each channel of the palette colour +- this
    min_pattern_period: float
    # Width:height stretch of the other shapes (log-uniform; ellipses, stretched stars, ...)
    # and the bar width of a cross (relative to its size). A range of one value draws
    # nothing: the classic world's draws stay as they were.
    stretch: tuple[float, float] = (1.0, 1.0)
    cross_bar: tuple[float, float] = (0.0, 0.0)
    # Share of rotatable shapes drawn exactly upright (0 draws nothing, as in the classic
    # world): people draw boxes axis-aligned and triangles apex-up far more often than at
    # a uniformly random tilt, and a detector that has seldom seen a frame-filling
    # axis-aligned rectangle takes it for a background crop.
    upright: float = 0.0


#: Why the classic style refuses object_colours / colour_spread.
WIDE_ONLY_COLOUR_SETTINGS = ("object_colours and colour_spread are settings of the wide style; the classic world "
                             "keeps its eight colours")

#: Draws of an object's colour under a colour test (``colour_spread``) before its reference
#: colour is taken instead.
MAX_COLOUR_DRAWS = 50

CLASSIC_SHAPES = ShapeRanges(box_aspect=(0.6, 1.6), diamond_aspect=(1.0, 1.5), ring_inner=(0.45, 0.6),
                             star_inner=(0.42, 0.5), rgb_jitter=8, min_pattern_period=7.0)


def _place_object(rng, width, height, category, colour, pattern, nominal_min, nominal_max,
                  ranges: ShapeRanges, colour_ok=None) -> Optional[DrawParams]:
    """Size, shape, position and colour of one object (the draws in a fixed order: the
    classic world is reproduced image for image), or None when it cannot fit.

    ``colour_ok``: None, or a test ``(rgb, colour word) -> bool`` of a drawn colour; one
    failing it is drawn again (up to :data:`MAX_COLOUR_DRAWS` times, then the reference
    colour itself is taken)."""
    size = _quantise(float(rng.uniform(nominal_min, nominal_max)))
    aspect = 1.0
    if category == "box":
        lo, hi = ranges.box_aspect
        aspect = round(float(math.exp(rng.uniform(math.log(lo), math.log(hi)))), 3)
    elif category == "diamond":
        aspect = round(float(rng.uniform(*ranges.diamond_aspect)), 3)
    elif ranges.stretch[0] < ranges.stretch[1]:
        lo, hi = ranges.stretch
        aspect = round(float(math.exp(rng.uniform(math.log(lo), math.log(hi)))), 3)
    inner = 0.0
    if category == "ring":
        inner = round(float(rng.uniform(*ranges.ring_inner)), 3)
    elif category == "star":
        inner = round(float(rng.uniform(*ranges.star_inner)), 3)
    elif category == "cross" and ranges.cross_bar[0] < ranges.cross_bar[1]:
        inner = round(float(rng.uniform(*ranges.cross_bar)), 3)
    limit = ROTATION_LIMITS[category]
    rotation = 0.0
    if limit and not (ranges.upright and rng.random() < ranges.upright):
        rotation = round(float(rng.uniform(-limit, limit)), 1)
    ex1, ey1, ex2, ey2 = extent(category, size, aspect, inner, rotation)
    margin = PATCH_MARGIN + 2
    cx_lo, cx_hi = margin - ex1, width - margin - ex2
    cy_lo, cy_hi = margin - ey1, height - margin - ey2
    if cx_hi <= cx_lo or cy_hi <= cy_lo:
        return None
    base = np.array(palette.COLOURS[colour])
    jitter = ranges.rgb_jitter
    rgb = tuple(int(c) for c in np.clip(base + rng.integers(-jitter, jitter + 1, 3), 0, 255))
    draws = 1
    while colour_ok is not None and not colour_ok(rgb, colour):
        if draws == MAX_COLOUR_DRAWS:
            rgb = tuple(int(c) for c in base)
            break
        rgb = tuple(int(c) for c in np.clip(base + rng.integers(-jitter, jitter + 1, 3), 0, 255))
        draws += 1
    draw = DrawParams(cx=_quantise(float(rng.uniform(cx_lo, cx_hi))),
                      cy=_quantise(float(rng.uniform(cy_lo, cy_hi))),
                      size=size, aspect=aspect, inner_ratio=inner, rotation=rotation, rgb=rgb)
    if pattern:
        draw.pattern_rgb = palette.PATTERN_COLOURS[colour]
        draw.pattern_period = round(max(ranges.min_pattern_period, size / float(rng.uniform(3.5, 5.0))), 2)
        draw.pattern_angle = round(float(rng.uniform(0.0, 180.0)), 1)
        draw.pattern_phase = round(float(rng.random()), 3)
    return draw


def _sample_object(rng, width, height, category, colour, size_class, pattern):
    """Draw parameters for one object, or None when the sizes cannot fit this image."""
    short = min(width, height)
    min_side = max(MIN_BOX_SIDE_PX, MIN_BOX_SIDE_FRACTION * short)
    lo, hi = SMALL_AREA_RANGE if size_class == "small" else LARGE_AREA_RANGE
    nominal_min = max(min_side * 1.2, math.sqrt(lo * width * height))
    nominal_max = min(0.6 * short, math.sqrt(hi * width * height))
    if nominal_max < nominal_min:
        return None
    return _place_object(rng, width, height, category, colour, pattern, nominal_min, nominal_max, CLASSIC_SHAPES)


def sample_scene(rng: np.random.Generator, image_id: int, *, min_side: Optional[int] = None,
                 max_side: Optional[int] = None, max_objects: int = MAX_OBJECTS,
                 style: str = "classic", object_colours: Optional[Sequence[str]] = None,
                 colour_spread: Optional[int] = None) -> Scene:
    """Sample one scene. Deterministic in the state of ``rng``.

    ``generate`` seeds one generator per image (``numpy.random.default_rng([seed,
    image_id, 0])``), so an image does not depend on how many images the world has.
    ``style``: "classic" (the default here, the sampler of the first worlds: 240-640 px,
    grey backgrounds, eight colours) or "wide" (the default of ``generate``; see the
    module docstring). ``min_side`` / ``max_side`` default to the style's range.
    ``object_colours`` (wide only): objects take only these colour words of
    :data:`palette.COLOURS`; a background that leaves none of them
    :data:`MIN_CONTRAST` away is drawn again. None (all colours) draws exactly the scenes
    of the unrestricted world.
    ``colour_spread`` (wide only): each channel of an object's colour is drawn within +- this
    of its word's reference RGB (the world's own jitter is +-10), again until the colour is
    nearer its own word than any other and :data:`MIN_CONTRAST` from the background. None
    keeps the world's own jitter, scene for scene.
    """
    if style == "wide":
        return _sample_wide_scene(rng, image_id, WIDE_MIN_SIDE if min_side is None else min_side,
                                  WIDE_MAX_SIDE if max_side is None else max_side, max_objects,
                                  check_object_colours(object_colours), check_colour_spread(colour_spread))
    if style != "classic":
        raise ValueError(f"style must be 'classic' or 'wide', got {style!r}")
    if object_colours is not None or colour_spread is not None:
        raise ValueError(WIDE_ONLY_COLOUR_SETTINGS)
    min_side = MIN_SIDE if min_side is None else min_side
    max_side = MAX_SIDE if max_side is None else max_side
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
            colour = template.colour if rng.random() < 0.5 else str(rng.choice(list(palette.CLASSIC_COLOURS)))
        else:
            category = str(rng.choice(palette.CATEGORIES))
            colour = str(rng.choice(list(palette.CLASSIC_COLOURS)))
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
                updates = _occlusion_updates(placed, patch)
                if updates is not None:
                    accepted = (draw, patch, box, updates)
                    break
            if accepted:
                break
        if accepted is None:
            continue  # this object does not fit; the scene simply has fewer objects
        draw, patch, box, updates = accepted
        _record_occlusion(objects, placed, updates)
        area_fraction = (box[2] - box[0]) * (box[3] - box[1]) / float(width * height)
        size_label = "large" if area_fraction >= palette.LARGE_AREA_FRACTION else "small"
        objects.append(SceneObject(category, colour, size_label, pattern, box, draw))
        placed.append(_Placed(box, patch))
    return Scene(image_id, width, height, background, clutter, objects)


# --------------------------------------------------------------------------- the wide style

WIDE_MIN_SIDE, WIDE_MAX_SIDE = 48, 1000
WIDE_MAX_ASPECT = 2.2
WIDE_MIN_BOX_SIDE_PX = 10
WIDE_MIN_BOX_SIDE_FRACTION = 0.06
WIDE_SINGLE_PROBABILITY = 0.4
WIDE_LARGE_PROBABILITY = 0.5
WIDE_LARGE_AREA_RANGE = (0.06, 0.8)
WIDE_PNG_PROBABILITY = 0.35
WIDE_ALIASED_PROBABILITY = 0.3
WIDE_CLUTTER_PROBABILITY = 0.5
#: No wide object's box covers a fraction of the image inside this band (the size label's
#: threshold palette.LARGE_AREA_FRACTION lies in it), so "small" / "large" stay unambiguous.
WIDE_SIZE_GAP = (0.028, 0.05)
#: Box aspect ratio (width:height) range of a rectangle ("box") in the wide world.
WIDE_BOX_ASPECT = (0.25, 4.0)
#: Least RGB distance between an object's reference colour and any colour of its
#: background (the segment between a gradient's two ends counts as background), and between
#: the drawn colours of two objects that touch.
MIN_CONTRAST = 80.0


def _wide_background_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """Any colour: near-white, near-black, saturated, an object colour, muted or pastel."""
    roll = float(rng.random())
    hue = float(rng.random())
    if roll < 0.25:
        return _hsv_rgb(hue, float(rng.uniform(0.0, 0.08)), float(rng.uniform(0.9, 1.0)))
    if roll < 0.35:
        return _hsv_rgb(hue, float(rng.uniform(0.0, 0.3)), float(rng.uniform(0.0, 0.15)))
    if roll < 0.55:
        return _hsv_rgb(hue, float(rng.uniform(0.5, 1.0)), float(rng.uniform(0.5, 1.0)))
    if roll < 0.7:
        name = str(rng.choice(list(palette.COLOURS)))
        base = np.array(palette.COLOURS[name]) + rng.integers(-12, 13, 3)
        return tuple(int(c) for c in np.clip(base, 0, 255))
    if roll < 0.85:
        return _muted_colour(rng)
    return _hsv_rgb(hue, float(rng.uniform(0.0, 0.5)), float(rng.uniform(0.2, 1.0)))


def describe_any_colour(rgb: tuple[int, int, int]) -> str:
    """A caption word for any background colour: greys by lightness, else the nearest
    colour word of the palette ("white", "light gray", "teal", "pink"...)."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
    if v < 0.18:
        return "black"
    if s < 0.12:
        return "white" if v > 0.88 else "light gray" if v > 0.65 else "gray" if v > 0.38 else "dark gray"
    return palette.nearest_colour(rgb)


def _sample_wide_background(rng: np.random.Generator) -> Background:
    kind = str(rng.choice(["solid", "gradient", "noise"], p=[0.45, 0.25, 0.3]))
    first = _wide_background_colour(rng)
    colours = [first]
    angle = 0.0
    sigma = 0.0
    if kind == "gradient":
        if rng.random() < 0.5:
            colours.append(_wide_background_colour(rng))
        else:
            shift = float(rng.choice([-1.0, 1.0]) * rng.uniform(30.0, 70.0))
            colours.append(tuple(int(c) for c in np.clip(np.array(first) + shift, 0, 255)))
        angle = round(float(rng.uniform(0.0, 360.0)), 1)
    elif kind == "noise":
        sigma = round(float(rng.uniform(2.0, 14.0)), 2)
    seed = int(rng.integers(0, 2**31 - 1))
    return Background(kind, colours, angle, sigma, seed, _background_name(kind, colours, describe_any_colour))


def _distance_to_background(rgb, background: Background) -> float:
    """Least RGB distance from ``rgb`` to the background's colours (a gradient: its segment)."""
    point = np.asarray(rgb, float)
    a = np.asarray(background.colours[0], float)
    if background.kind != "gradient":
        # Texture moves pixels by about 2 sigma around the base colour.
        return max(0.0, float(np.linalg.norm(point - a)) - 2.0 * background.noise_sigma)
    b = np.asarray(background.colours[1], float)
    span = b - a
    t = float(np.clip(np.dot(point - a, span) / max(float(np.dot(span, span)), 1e-9), 0.0, 1.0))
    return float(np.linalg.norm(point - (a + t * span)))


def _colour_keeps_its_word(rgb, colour: str, background: Background) -> bool:
    """A spread object colour stays nearest its own word and MIN_CONTRAST from the background."""
    return _distance_to_background(rgb, background) >= MIN_CONTRAST and palette.nearest_colour(rgb) == colour


def contrasting_colours(background: Background) -> list[str]:
    """The palette colours at least MIN_CONTRAST from every colour of ``background``."""
    return [name for name, rgb in palette.COLOURS.items()
            if _distance_to_background(rgb, background) >= MIN_CONTRAST]


WIDE_SHAPES = ShapeRanges(box_aspect=WIDE_BOX_ASPECT, diamond_aspect=(0.6, 1.7), ring_inner=(0.2, 0.72),
                          star_inner=(0.32, 0.56), rgb_jitter=10, min_pattern_period=5.0,
                          stretch=(0.6, 1.67), cross_bar=(0.2, 0.46), upright=0.5)


def _sample_wide_object(rng, width, height, category, colour, size_class, pattern, shapes=None,
                        colour_ok=None):
    """Draw parameters for one object of the wide world, or None when it cannot fit."""
    short = min(width, height)
    min_side = max(WIDE_MIN_BOX_SIDE_PX, WIDE_MIN_BOX_SIDE_FRACTION * short)
    if size_class == "small":
        nominal_min = min_side * 1.2
        nominal_max = math.sqrt(SMALL_AREA_RANGE[1] * width * height)
    else:
        lo, hi = WIDE_LARGE_AREA_RANGE
        nominal_min = math.sqrt(lo * width * height)
        nominal_max = min(0.95 * short, math.sqrt(hi * width * height))
    if nominal_max < nominal_min:
        return None
    return _place_object(rng, width, height, category, colour, pattern, nominal_min, nominal_max,
                         shapes or WIDE_SHAPES, colour_ok)


def _blends_into(objects: list, updates: list, rgb) -> bool:
    """Whether an object of colour ``rgb`` would touch an earlier object whose colour is less
    than MIN_CONTRAST from it. Two such objects read as one blob: a small one drawn inside a
    larger one of its colour is invisible, yet it would be annotated."""
    point = np.asarray(rgb, float)
    return any(touched and float(np.linalg.norm(point - np.asarray(objects[index].draw.rgb, float))) < MIN_CONTRAST
               for index, _covered, touched, _box_fraction, _mask_fraction in updates)


def check_object_colours(object_colours: Optional[Sequence[str]]) -> Optional[tuple[str, ...]]:
    """``object_colours`` as a tuple in palette order (None stays None), or a ValueError
    naming the words that are not colours of the world."""
    if object_colours is None:
        return None
    names = [str(name) for name in object_colours]
    unknown = [name for name in names if name not in palette.COLOURS]
    if unknown or not names:
        what = (f"{unknown[0]!r} is not a colour" if len(unknown) == 1 else
                f"{', '.join(map(repr, unknown))} are not colours" if unknown else "an empty list names no colour")
        raise ValueError(f"object_colours: {what} of the world; choose among {', '.join(palette.COLOURS)}")
    return tuple(name for name in palette.COLOURS if name in names)


def check_colour_spread(colour_spread: Optional[int]) -> Optional[int]:
    """``colour_spread`` as an int (None stays None), or a ValueError saying the range."""
    if colour_spread is None:
        return None
    if isinstance(colour_spread, bool) or int(colour_spread) != colour_spread or not 0 <= colour_spread <= 127:
        raise ValueError(f"colour_spread must be a whole number of RGB units from 0 to 127, got {colour_spread!r}")
    return int(colour_spread)


#: Background draws a restricted scene may take before giving up (each leaves some colour of
#: the world MIN_CONTRAST away; one leaving a given colour is typically met within a few).
MAX_BACKGROUND_DRAWS = 200


def _sample_wide_scene(rng: np.random.Generator, image_id: int, min_side: int, max_side: int,
                       max_objects: int, object_colours: Optional[tuple[str, ...]] = None,
                       colour_spread: Optional[int] = None) -> Scene:
    if not (16 <= min_side <= max_side):
        raise ValueError(f"need 16 <= min_side <= max_side, got {min_side}, {max_side}")
    if not 1 <= max_objects:
        raise ValueError("max_objects must be at least 1")
    long_side = int(round(math.exp(rng.uniform(math.log(min_side), math.log(max_side)))))
    ratio = float(math.exp(rng.uniform(0.0, math.log(WIDE_MAX_ASPECT))))
    short_side = int(min(long_side, max(min_side, round(long_side / ratio))))
    width, height = ((long_side, short_side) if rng.random() < 0.5 else (short_side, long_side))
    antialias = bool(rng.random() >= WIDE_ALIASED_PROBABILITY)
    image_format = "png" if rng.random() < WIDE_PNG_PROBABILITY else "jpeg"
    background = _sample_wide_background(rng)
    if object_colours is not None:
        for _draw in range(MAX_BACKGROUND_DRAWS):
            if any(name in object_colours for name in contrasting_colours(background)):
                break
            background = _sample_wide_background(rng)
        else:
            raise RuntimeError(f"image {image_id}: no background for object colours {object_colours} "
                               f"in {MAX_BACKGROUND_DRAWS} draws")
    clutter = []
    if rng.random() < WIDE_CLUTTER_PROBABILITY and min(width, height) >= 120:
        clutter = _sample_clutter(rng, width, height, background)
    short = min(width, height)
    min_box_side = max(WIDE_MIN_BOX_SIDE_PX, WIDE_MIN_BOX_SIDE_FRACTION * short)
    allowed = contrasting_colours(background)
    if object_colours is not None:
        allowed = [name for name in allowed if name in object_colours]
    shapes = WIDE_SHAPES if colour_spread is None else replace(WIDE_SHAPES, rgb_jitter=colour_spread)
    colour_ok = None if colour_spread is None else partial(_colour_keeps_its_word, background=background)

    wanted = 1 if rng.random() < WIDE_SINGLE_PROBABILITY else int(rng.integers(2, max(2, max_objects) + 1))
    wanted = min(wanted, max_objects)
    objects: list[SceneObject] = []
    placed: list[_Placed] = []
    tries = 0
    # Every wide scene gets at least one object: tries go on (up to 30 more) while it has none.
    while allowed and (tries < wanted or (not objects and tries < wanted + 30)):
        tries += 1
        if objects and rng.random() < 0.35:
            template = objects[int(rng.integers(len(objects)))]
            category = template.category
            colour = template.colour if rng.random() < 0.5 else str(rng.choice(allowed))
        else:
            category = str(rng.choice(palette.CATEGORIES))
            colour = str(rng.choice(allowed))
        pattern = str(rng.choice(palette.PATTERNS)) if rng.random() < PATTERN_PROBABILITY else None
        size_classes = ["large", "small"] if rng.random() < WIDE_LARGE_PROBABILITY else ["small", "large"]
        accepted = None
        for size_class in size_classes:
            for _attempt in range(25):
                draw = _sample_wide_object(rng, width, height, category, colour, size_class, pattern,
                                           shapes, colour_ok)
                if draw is None:
                    break
                patch = rasterize(category, draw.cx, draw.cy, draw.size, draw.aspect,
                                  draw.inner_ratio, draw.rotation, antialias=antialias)
                box = patch.tight_box()
                # A long thin rectangle may be thinner than min_box_side, not thinner than half.
                least = 0.5 * min_box_side if category == "box" else min_box_side
                if (min(box[2] - box[0], box[3] - box[1]) < least
                        or max(box[2] - box[0], box[3] - box[1]) < min_box_side):
                    continue
                # Rotated long rectangles can grow their box into the ambiguous band.
                area = (box[2] - box[0]) * (box[3] - box[1]) / float(width * height)
                if WIDE_SIZE_GAP[0] < area < WIDE_SIZE_GAP[1]:
                    continue
                updates = _occlusion_updates(placed, patch)
                if updates is not None and not _blends_into(objects, updates, draw.rgb):
                    accepted = (draw, patch, box, updates)
                    break
            if accepted:
                break
        if accepted is None:
            continue
        draw, patch, box, updates = accepted
        _record_occlusion(objects, placed, updates)
        area_fraction = (box[2] - box[0]) * (box[3] - box[1]) / float(width * height)
        size_label = "large" if area_fraction >= palette.LARGE_AREA_FRACTION else "small"
        objects.append(SceneObject(category, colour, size_label, pattern, box, draw))
        placed.append(_Placed(box, patch))
    return Scene(image_id, width, height, background, clutter, objects, style="wide",
                 antialias=antialias, image_format=image_format)
