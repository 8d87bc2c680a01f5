"""The closed vocabulary of the synthetic world, tied to the Visual Genome vocabularies.

Every category and attribute the world draws is a display name of the BUTD
``objects_vocab.txt`` / ``attributes_vocab.txt`` shipped in ``vlp.schemas``, so
labels produced here can be used directly as detector class ids. The check runs at
import time: if the vocabularies ever change, this module refuses to load instead
of silently emitting ids that point at other words.
"""

from __future__ import annotations

from vlp.schemas import vocab

#: The eight drawable VG object categories, in a fixed order (the world's own index).
CATEGORIES: tuple[str, ...] = (
    "circle", "triangle", "star", "box", "heart", "cross", "ring", "diamond",
)

#: Reference RGB of the eight VG colour attributes of the classic world (``style="classic"``).
#: Saturated or extreme in lightness on purpose: classic backgrounds are muted mid-greys
#: (see scene.py), so every object colour keeps contrast with every background, and the
#: colours stay far apart from each other (minimum pairwise distance ~95 in RGB).
CLASSIC_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "blue": (35, 75, 215),
    "green": (40, 160, 60),
    "yellow": (240, 215, 40),
    "orange": (245, 135, 25),
    "purple": (135, 55, 175),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}

#: Further VG colours of the wide world (``style="wide"``, the default). The closest pairs
#: of :data:`COLOURS` are pink / tan (73 RGB units), yellow / orange (81.5) and green /
#: teal (85), far more than the +-10 per-channel jitter of an object's colour, so a colour
#: name stays learnable; the wide sampler keeps every object apart from its background
#: instead (scene.MIN_CONTRAST).
EXTRA_COLOURS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "brown": (120, 72, 35),
    "pink": (245, 140, 190),
    "teal": (0, 128, 128),
    "tan": (210, 180, 140),
}

#: Every colour word the world can use (objects, captions, questions, VG phrases), in a
#: fixed order: the classic eight first.
COLOURS: dict[str, tuple[int, int, int]] = {**CLASSIC_COLOURS, **EXTRA_COLOURS}

#: Colour used for stripes/spots on each object colour: light marks on dark/saturated
#: objects, dark marks on light ones, so the pattern is visible but the main colour
#: still covers ~70-80% of the object.
PATTERN_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (245, 245, 245),
    "blue": (245, 245, 245),
    "green": (245, 245, 245),
    "purple": (245, 245, 245),
    "black": (245, 245, 245),
    "yellow": (25, 25, 25),
    "orange": (25, 25, 25),
    "white": (25, 25, 25),
    "gray": (245, 245, 245),
    "brown": (245, 245, 245),
    "teal": (245, 245, 245),
    "pink": (25, 25, 25),
    "tan": (25, 25, 25),
}


def nearest_colour(rgb) -> str:
    """The colour word of :data:`COLOURS` nearest to ``rgb`` (Euclidean in RGB)."""
    return min(COLOURS, key=lambda name: sum((int(a) - b) ** 2 for a, b in zip(rgb, COLOURS[name])))


SIZES: tuple[str, ...] = ("small", "large")
PATTERNS: tuple[str, ...] = ("striped", "spotted")

#: An object is "large" when its box covers at least this fraction of the image area,
#: otherwise "small". The sampler keeps sizes well away from the threshold
#: (small <= ~2.2%, large >= ~6%) so the label is not ambiguous to a learner.
LARGE_AREA_FRACTION = 0.04

#: WordNet synsets written into VG objects.json/attributes.json. Real VG maps most
#: nouns to their first sense, so we do the same.
SYNSETS: dict[str, str] = {name: f"{name}.n.01" for name in CATEGORIES}


def _check_and_index(kind: str, names, vocabulary) -> dict[str, int]:
    ids = {}
    for name in names:
        if name not in vocabulary:
            raise RuntimeError(f"synthetic world: {name!r} is not in the VG {kind} vocabulary")
        index = vocabulary.id(name)
        if vocabulary.name(index) != name:
            raise RuntimeError(
                f"synthetic world: {name!r} is only a synonym of {vocabulary.name(index)!r} "
                f"in the VG {kind} vocabulary; use display names")
        ids[name] = index
    return ids


CATEGORY_IDS: dict[str, int] = _check_and_index("objects", CATEGORIES, vocab.objects())
ATTRIBUTE_IDS: dict[str, int] = _check_and_index(
    "attributes", (*COLOURS, *SIZES, *PATTERNS), vocab.attributes())


def category_id(name: str) -> int:
    """VG objects-vocabulary id (0-based line number) of a world category."""
    return CATEGORY_IDS[name]


def attribute_id(name: str) -> int:
    """VG attributes-vocabulary id of a world attribute (colour, size or pattern)."""
    return ATTRIBUTE_IDS[name]
