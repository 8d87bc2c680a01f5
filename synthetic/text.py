"""Texts about scenes: VG region phrases, COCO captions, VQA questions, CC and web alt text.

Everything is templated from the scene's ground truth, so every statement is true
of its image (spatial relations come from the boxes, "covering" from the actual
mask overlaps recorded at sampling time), except where noise is planted on purpose
(VQA annotator answers, web junk).

VG phrases are the one place where grammar is part of the ground truth: a phrase
contains a verb exactly when it was generated from a verb template, and every
verb template uses a word from :data:`VERBS`. Noun-phrase templates avoid all verbs,
participles and copulas ("is", "hidden", "drawn"), so a verb-removal builder can be
scored exactly against ``truth.json``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from vlp.synthetic import palette
from vlp.synthetic.scene import Scene, SceneObject

#: Verbs planted in VG region phrases (all -ing forms, the VG style: "man riding horse").
VERBS = frozenset({"touching", "covering", "overlapping", "sitting", "floating", "lying",
                   "resting", "standing", "leaning", "hanging"})
VERB_PHRASE_PROBABILITY = 0.25

# The number words VQA's answer normalisation knows (zero..ten).
COUNT_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five",
               6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}


def count_word(n: int) -> str:
    """``n`` as a word up to ten, in digits beyond (a scene may hold more objects)."""
    return COUNT_WORDS.get(int(n), str(int(n)))


_PLURALS = {"box": "boxes", "cross": "crosses", "rhombus": "rhombuses"}
#: Caption synonyms (VG phrases always use the VG display name).
_CAPTION_NAMES = {
    "circle": ["circle", "circle", "disc", "round shape"],
    "triangle": ["triangle"],
    "star": ["star", "star", "five-pointed star"],
    "box": ["box"],  # replaced by square/rectangle by aspect, see _caption_name
    "heart": ["heart", "heart", "heart shape"],
    "cross": ["cross", "cross", "plus sign"],
    "ring": ["ring", "ring", "hoop", "donut shape"],
    "diamond": ["diamond", "diamond", "rhombus"],
}


def tokens(text: str) -> list[str]:
    """Lower-case word tokens (letters, digits, apostrophes)."""
    return re.findall(r"[a-z0-9']+", text.lower())


def has_verb(phrase: str) -> bool:
    """Whether a phrase contains one of the planted verbs."""
    return any(token in VERBS for token in tokens(phrase))


def plural(noun: str) -> str:
    last = noun.split(" ")[-1]
    head = noun[: len(noun) - len(last)]
    return head + _PLURALS.get(last, last + "s")


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def join_list(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _caption_name(obj: SceneObject, rng: np.random.Generator) -> str:
    if obj.category == "box":
        aspect = obj.width / max(1, obj.height)
        return "square" if 0.85 <= aspect <= 1.18 else _pick(rng, ["rectangle", "rectangle", "box"])
    return _pick(rng, _CAPTION_NAMES[obj.category])


def position_phrase(scene: Scene, obj: SceneObject) -> str:
    """Where an object is in the image, by thirds: "on the left", "in the top right corner"..."""
    cx, cy = obj.centre
    horizontal = "left" if cx < scene.width / 3 else "right" if cx > 2 * scene.width / 3 else ""
    vertical = "top" if cy < scene.height / 3 else "bottom" if cy > 2 * scene.height / 3 else ""
    if horizontal and vertical:
        return f"in the {vertical} {horizontal} corner"
    if horizontal:
        return f"on the {horizontal}"
    if vertical:
        return f"at the {vertical}"
    return "in the middle"


def relation(scene: Scene, i: int, j: int) -> str:
    """Spatial relation of object i to object j.

    "covering" / "covered": their shapes overlap and i is drawn over j (or under);
    "touching": boxes intersect without the shapes overlapping; otherwise the dominant
    direction between the box centres: "above", "below", "left", "right".
    """
    a, b = scene.objects[i], scene.objects[j]
    if i in b.occluders:
        return "covering"
    if j in a.occluders:
        return "covered"
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    if ax1 < bx2 and bx1 < ax2 and ay1 < by2 and by1 < ay2:
        return "touching"
    (acx, acy), (bcx, bcy) = a.centre, b.centre
    dx, dy = acx - bcx, acy - bcy
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "left" if dx < 0 else "right"


def is_near(scene: Scene, i: int, j: int) -> bool:
    """Boxes closer than a quarter of the image's short side."""
    a, b = scene.objects[i].box, scene.objects[j].box
    gap_x = max(0, max(a[0], b[0]) - min(a[2], b[2]))
    gap_y = max(0, max(a[1], b[1]) - min(a[3], b[3]))
    return max(gap_x, gap_y) < 0.25 * min(scene.width, scene.height)


def union_box(boxes) -> tuple[int, int, int, int]:
    boxes = list(boxes)
    return (min(b[0] for b in boxes), min(b[1] for b in boxes),
            max(b[2] for b in boxes), max(b[3] for b in boxes))


# --------------------------------------------------------------------------- VG regions


@dataclass
class Region:
    """A VG region description: phrase, box (x1, y1, x2, y2, exclusive ends), its objects."""

    region_id: int
    phrase: str
    box: tuple[int, int, int, int]
    object_indices: list[int]
    verb: str | None


def _noun(obj: SceneObject, rng, *, colour: float = 0.6, size: float = 0.2) -> str:
    words = []
    if rng.random() < size:
        words.append(obj.size)
    if rng.random() < colour:
        words.append(obj.colour)
    words.append(obj.category)
    return " ".join(words)


def _single_phrase(scene: Scene, index: int, rng, verb: bool) -> str:
    obj = scene.objects[index]
    where = position_phrase(scene, obj)
    bg = scene.background.name
    if verb:
        options = [
            f"{with_article(obj.colour + ' ' + obj.category)} floating {where}",
            f"{obj.colour} {obj.category} sitting {where}",
            f"{with_article(obj.size + ' ' + obj.category)} lying on the {bg} background",
            f"{obj.category} resting {where}",
            f"the {obj.colour} {obj.category} standing {where}",
        ]
        return _pick(rng, options)
    options = [
        f"{obj.size} {obj.colour} {obj.category}",
        with_article(f"{obj.colour} {obj.category}"),
        f"{obj.colour} {obj.category} {where}",
        f"the {obj.category} {where}",
        f"{obj.colour} {obj.category} on {bg} background",
        f"{obj.size} {obj.category}",
    ]
    if obj.pattern == "striped":
        options += [f"striped {obj.colour} {obj.category}", f"{obj.colour} {obj.category} with stripes"]
    elif obj.pattern == "spotted":
        options += [f"spotted {obj.category}", f"{obj.colour} {obj.category} with dots"]
    return _pick(rng, options)


def _pair_phrase(scene: Scene, i: int, j: int, rng, verb: bool) -> str:
    rel = relation(scene, i, j)
    a = _noun(scene.objects[i], rng)
    b = _noun(scene.objects[j], rng, colour=0.4, size=0.0)
    near = is_near(scene, i, j)
    if verb:
        options = {
            "covering": [f"the {a} is covering {with_article(b)}", f"{with_article(a)} covering the {b}",
                         f"{a} overlapping the {b}"],
            "covered": [f"{with_article(a)} lying under the {b}",
                        f"the {a} resting beneath {with_article(b)}"],
            "touching": [f"{with_article(a)} touching the {b}", f"{a} leaning on the {b}"],
            "above": [f"{a} sitting above the {b}", f"{with_article(a)} floating above the {b}",
                      f"{a} hanging over the {b}"],
            "below": [f"{with_article(a)} lying below the {b}", f"the {a} resting under the {b}"],
            "left": [f"{with_article(a)} standing to the left of the {b}"],
            "right": [f"{a} sitting to the right of the {b}"],
        }[rel]
        if near and rel not in ("covering", "covered"):
            options.append(f"{with_article(a)} sitting next to the {b}")
        return _pick(rng, options)
    options = {
        "covering": [f"{with_article(a)} in front of the {b}", f"{a} over {with_article(b)}"],
        "covered": [f"{a} behind the {b}", f"{with_article(a)} under the {b}"],
        "touching": [f"{with_article(a)} against the {b}", f"{a} beside {with_article(b)}"],
        "above": [f"{a} above the {b}", f"{with_article(a)} above {with_article(b)}"],
        "below": [f"{a} below the {b}", f"{with_article(a)} under {with_article(b)}"],
        "left": [f"{with_article(a)} to the left of {with_article(b)}", f"{a} left of the {b}"],
        "right": [f"{a} to the right of the {b}", f"{with_article(a)} right of {with_article(b)}"],
    }[rel]
    if near and rel not in ("covering", "covered"):
        options += [f"{with_article(a)} next to {with_article(b)}", f"{a} near the {b}"]
    return _pick(rng, options)


def _groups(scene: Scene, by_colour: bool) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for index, obj in enumerate(scene.objects):
        key = (obj.colour, obj.category) if by_colour else (obj.category,)
        groups.setdefault(key, []).append(index)
    return groups


def region_descriptions(scene: Scene, rng: np.random.Generator, first_region_id: int
                        ) -> list[Region]:
    """VG-style region descriptions; about a quarter contain a planted verb."""
    objects = scene.objects
    count = min(2 + 2 * len(objects), 14)
    multi = [(key, idx) for by_colour in (True, False)
             for key, idx in _groups(scene, by_colour).items() if len(idx) >= 2]
    regions: list[Region] = []
    seen: set[str] = set()
    for _ in range(count):
        for _retry in range(6):
            verb = bool(rng.random() < VERB_PHRASE_PROBABILITY)
            roll = rng.random()
            if len(objects) >= 2 and roll < 0.4:
                i, j = (int(v) for v in rng.choice(len(objects), 2, replace=False))
                phrase = _pair_phrase(scene, i, j, rng, verb)
                members = [i, j]
            elif multi and roll < 0.55:
                key, members = multi[int(rng.integers(len(multi)))]
                noun = plural(" ".join(key))
                phrase = f"{count_word(len(members))} {noun}"
                if verb:
                    phrase += f" {_pick(rng, ['floating', 'sitting', 'lying'])} on the " \
                              f"{scene.background.name} background"
            else:
                i = int(rng.integers(len(objects)))
                phrase = _single_phrase(scene, i, rng, verb)
                members = [i]
            if phrase not in seen:
                break
        seen.add(phrase)
        box = union_box(objects[m].box for m in members)
        if len(members) == 1:  # VG regions are drawn loosely around their object
            pad = rng.integers(0, 5, 4)
            box = (max(0, box[0] - int(pad[0])), max(0, box[1] - int(pad[1])),
                   min(scene.width, box[2] + int(pad[2])), min(scene.height, box[3] + int(pad[3])))
        found = [t for t in tokens(phrase) if t in VERBS]
        if bool(found) != verb:
            raise AssertionError(f"template bug: {phrase!r} verb={verb}")
        regions.append(Region(first_region_id + len(regions), phrase, box, list(members),
                              found[0] if found else None))
    return regions


# --------------------------------------------------------------------------- captions


def _group_phrase(count: int, words: list[str], noun: str) -> str:
    text = " ".join(words + [noun if count == 1 else plural(noun)])
    return with_article(text) if count == 1 else f"{count_word(count)} {text}"


def _describe_groups(scene: Scene, indices: list[int], rng, *, sizes: bool) -> list[str]:
    groups: dict[tuple, list[int]] = {}
    for index in indices:
        obj = scene.objects[index]
        key = ((obj.size,) if sizes else ()) + (obj.colour, obj.category)
        groups.setdefault(key, []).append(index)
    parts = []
    for key, members in groups.items():
        noun = _caption_name(scene.objects[members[0]], rng)
        parts.append(_group_phrase(len(members), list(key[:-1]), noun))
    return parts


def _background_word(scene: Scene, rng) -> str:
    name = scene.background.name
    return name.replace("grey", "gray") if rng.random() < 0.4 else name


def _finish(sentence: str, rng) -> str:
    """Capitalise and end with a period, with COCO-like sloppiness now and then."""
    sentence = sentence.strip()
    roll = rng.random()
    if roll < 0.12:
        return sentence  # all lower case, no period
    sentence = sentence[0].upper() + sentence[1:]
    return sentence if roll < 0.2 else sentence + "."


def captions(scene: Scene, rng: np.random.Generator, count: int = 5) -> list[str]:
    """``count`` distinct COCO-style captions of a scene."""
    objects = scene.objects
    n = len(objects)
    everything = list(range(n))
    largest = max(everything, key=lambda k: objects[k].width * objects[k].height)

    def focus():
        main = objects[largest]
        head = with_article(f"{main.size} {main.colour} {_caption_name(main, rng)}")
        rest = [k for k in everything if k != largest]
        if not rest:
            return f"{head} on a {_background_word(scene, rng)} background"
        linker = _pick(rng, ["next to", "with", "near", "beside"])
        others = _describe_groups(scene, rest, rng, sizes=True)
        listed = join_list(others) if len(others) <= 2 else ", ".join(others[:2]) + " and other shapes"
        return f"{head} {linker} {listed}"

    def summary():
        if n == 1:
            amount = "a single shape"
        elif n <= 3:
            amount = _pick(rng, ["a few shapes", f"{count_word(n)} shapes", "some simple shapes"])
        else:
            amount = _pick(rng, ["several shapes", "many shapes", f"{count_word(n)} shapes",
                                 "a bunch of colorful shapes"])
        return f"{amount} on a {_background_word(scene, rng)} background"

    def inventory():
        parts = _describe_groups(scene, everything, rng, sizes=False)
        if len(parts) > 3:
            return join_list(parts[:3]) + " among other shapes"
        return _pick(rng, ["", "an image of ", "a picture of ", "a drawing of "]) + join_list(parts)

    def counting():
        by_category = Counter(o.category for o in objects)
        category, k = by_category.most_common(1)[0]
        example = next(o for o in objects if o.category == category)
        noun = _caption_name(example, rng)
        if n == 1:
            return f"there is only one shape, {with_article(noun)}"
        noun_text = noun if k == 1 else plural(noun)
        return f"there are {count_word(n)} shapes in this picture, including {count_word(k)} {noun_text}"

    def spatial():
        if n < 2:
            return None
        i, j = (int(v) for v in rng.choice(n, 2, replace=False))
        words = {"covering": "overlapping", "covered": "partly behind", "touching": "touching",
                 "above": "above", "below": "below", "left": "to the left of",
                 "right": "to the right of"}[relation(scene, i, j)]
        a, b = objects[i], objects[j]
        return (f"{with_article(a.colour + ' ' + _caption_name(a, rng))} {words} "
                f"{with_article(b.colour + ' ' + _caption_name(b, rng))}")

    def colours():
        names = list(dict.fromkeys(o.colour for o in objects))
        if len(names) == 1:
            return f"everything in this picture is {names[0]} except the background"
        return _pick(rng, [f"{join_list(names)} shapes on a {_background_word(scene, rng)} background",
                           f"shapes in {join_list(names)}"])

    def background():
        kind = scene.background.kind
        surface = {"solid": "plain", "gradient": "gradient", "noise": "textured"}[kind]
        parts = _describe_groups(scene, everything, rng, sizes=False)
        listed = join_list(parts) if len(parts) <= 3 else ", ".join(parts[:3]) + " and more"
        return f"a {surface} {_pick(rng, ['background', 'surface'])} with {listed}"

    def pattern():
        marked = [o for o in objects if o.pattern]
        if not marked:
            return None
        obj = marked[int(rng.integers(len(marked)))]
        extra = " among other shapes" if n > 1 else ""
        return f"{with_article(obj.pattern + ' ' + obj.colour + ' ' + _caption_name(obj, rng))}{extra}"

    templates = [focus, summary, inventory, counting, spatial, colours, background, pattern]
    result: list[str] = []
    seen: set[str] = set()
    for _round in range(6):
        for k in rng.permutation(len(templates)):
            text = templates[int(k)]()
            if text is None or text.lower() in seen:
                continue
            seen.add(text.lower())
            result.append(_finish(text, rng))
            if len(result) == count:
                return result
    # Tiny scenes can run out of distinct templates; fall back to generic phrasings.
    for text in _GENERIC_CAPTIONS:
        if len(result) == count:
            break
        if text not in seen:
            seen.add(text)
            result.append(_finish(text, rng))
    return result


_GENERIC_CAPTIONS = ("a computer generated image of shapes", "a simple graphic with geometric shapes",
                     "an illustration made of basic shapes", "geometric shapes on a flat background",
                     "a clean digital drawing of shapes")


# --------------------------------------------------------------------------- VQA


@dataclass
class Question:
    question: str
    question_type: str
    answer_type: str  # "yes/no" | "number" | "other"
    answer: str  # canonical (normalised) answer
    answers: list[dict]  # 10 x {"answer", "answer_confidence", "answer_id"}


def _answer_variants(answer: str, answer_type: str) -> list[str]:
    forms = [answer, answer.capitalize(), answer + "."]
    if answer_type == "number" and int(answer) in COUNT_WORDS:
        forms.append(COUNT_WORDS[int(answer)])
    return forms


def _annotator_answers(rng, answer: str, answer_type: str, wrong_pool: list[str]) -> list[dict]:
    """Ten annotator answers: mostly the truth in varied surface forms, a few wrong."""
    n_wrong = int(rng.choice([0, 0, 0, 1, 1, 2, 3])) if wrong_pool else 0
    forms = _answer_variants(answer, answer_type)
    answers = []
    for k in range(10):
        if k < n_wrong:
            text = _pick(rng, wrong_pool)
            confidence = _pick(rng, ["yes", "maybe", "maybe", "no"])
        else:
            roll = rng.random()
            text = forms[0] if roll < 0.7 else forms[1 + int(rng.integers(len(forms) - 1))]
            confidence = "yes" if rng.random() < 0.85 else "maybe"
        answers.append((text, confidence))
    order = rng.permutation(10)
    return [{"answer": answers[int(o)][0], "answer_confidence": answers[int(o)][1],
             "answer_id": position + 1} for position, o in enumerate(order)]


def normalize_answer(text: str) -> str:
    """The light normalisation VQA evaluation applies (case, punctuation, number words)."""
    text = text.strip().lower().rstrip(".!?").strip()
    words = {word: str(number) for number, word in COUNT_WORDS.items()}
    return words.get(text, text)


def questions(scene: Scene, rng: np.random.Generator, count: int = 4) -> list[Question]:
    """``count`` distinct VQA questions with ground-truth answers and annotator noise."""
    objects = scene.objects
    present = sorted({o.category for o in objects}, key=palette.CATEGORIES.index)
    colours_of = {c: {o.colour for o in objects if o.category == c} for c in present}
    shapes_of: dict[str, set] = {}
    for o in objects:
        shapes_of.setdefault(o.colour, set()).add(o.category)

    def colour_question():
        options = [c for c in present if len(colours_of[c]) == 1]
        if not options:
            return None
        category = _pick(rng, options)
        colour = next(iter(colours_of[category]))
        wrong = [c for c in palette.COLOURS if c != colour]
        return ("What color is the {}?".format(category), "what color is the", "other",
                colour, wrong)

    def count_question():
        if rng.random() < 0.2:
            category = _pick(rng, list(palette.CATEGORIES))
        else:
            category = _pick(rng, present)
        n = sum(o.category == category for o in objects)
        wrong = [str(v) for v in (n - 1, n + 1) if v >= 0]
        return (f"How many {plural(category)} are there?", "how many", "number", str(n), wrong)

    def exists_question():
        if rng.random() < 0.5:
            category, answer = _pick(rng, present), "yes"
        else:
            absent = [c for c in palette.CATEGORIES if c not in present]
            if not absent:
                return None
            category, answer = _pick(rng, absent), "no"
        return (f"Is there {with_article(category)}?", "is there a", "yes/no", answer,
                ["no" if answer == "yes" else "yes"])

    def shape_question():
        options = [c for c, shapes in shapes_of.items() if len(shapes) == 1]
        if not options:
            return None
        colour = _pick(rng, options)
        category = next(iter(shapes_of[colour]))
        text = _pick(rng, [f"What shape is {colour}?", f"What shape is the {colour} object?"])
        wrong = [c for c in palette.CATEGORIES if c != category]
        return (text, "what shape is", "other", category, wrong)

    makers = [colour_question, count_question, exists_question, shape_question]
    result: list[Question] = []
    seen: set[str] = set()
    order = rng.permutation(len(makers))
    for attempt in range(12 * count):
        if attempt and attempt % len(makers) == 0:
            order = rng.permutation(len(makers))  # every kind gets a turn, in a fresh order
        made = makers[int(order[attempt % len(makers)])]()
        if made is None or made[0] in seen:
            continue
        text, qtype, atype, answer, wrong = made
        seen.add(text)
        result.append(Question(text, qtype, atype, answer,
                               _annotator_answers(rng, answer, atype, wrong)))
        if len(result) == count:
            break
    return result


# --------------------------------------------------------------------------- CC / web


def cc_alt_text(scene: Scene, rng: np.random.Generator) -> str:
    """Conceptual-Captions-style alt text: generic, hypernymised, lower case, no period."""
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    name = _caption_name(obj, rng)
    colours = list(dict.fromkeys(o.colour for o in scene.objects))
    options = [
        "colorful geometric shapes on a plain background",
        f"an abstract pattern with {with_article(name)}",
        f"{obj.colour} {name} symbol isolated on a {scene.background.name} backdrop",
        f"vector illustration of {count_word(len(scene.objects))} geometric figures"
        if len(scene.objects) > 1 else f"vector illustration of {with_article(name)}",
        f"minimalist composition with {with_article(name)} and other elements",
        f"abstract background with {plural(name)}",
        f"cartoon {name} for kids",
        f"simple flat icons in {join_list(colours[:3])}",
        "geometric figures for a presentation slide",
        f"{name} shape as a design element",
    ]
    return _pick(rng, options)


def describe_scene_short(scene: Scene, rng: np.random.Generator) -> str:
    """A short English alt text: "red circle and two blue stars on grey background"."""
    parts = _describe_groups(scene, list(range(len(scene.objects))), rng, sizes=False)
    parts = [p.removeprefix("a ").removeprefix("an ") for p in parts[:3]]
    text = join_list(parts)
    if rng.random() < 0.6:
        text += f" on {scene.background.name} background"
    return text


_FOREIGN = {
    "de": {
        "shapes": {"circle": ("Kreis", "m"), "triangle": ("Dreieck", "n"), "star": ("Stern", "m"),
                   "box": ("Quadrat", "n"), "heart": ("Herz", "n"), "cross": ("Kreuz", "n"),
                   "ring": ("Ring", "m"), "diamond": ("Raute", "f")},
        "colours": {"red": "Rot", "blue": "Blau", "green": "Grün", "yellow": "Gelb",
                    "orange": "Orange", "purple": "Lila", "white": "Weiß", "black": "Schwarz"},
        "title": ["Formen-Galerie", "Geometrische Formen zum Ausdrucken", "Bilder für den Unterricht"],
        "text": ["Auf dieser Seite finden Sie weitere Bilder mit einfachen Formen.",
                 "Kinder lernen hier spielerisch Farben und Formen kennen."],
    },
    "fr": {
        "shapes": {"circle": ("cercle", "m"), "triangle": ("triangle", "m"), "star": ("étoile", "f"),
                   "box": ("carré", "m"), "heart": ("cœur", "m"), "cross": ("croix", "f"),
                   "ring": ("anneau", "m"), "diamond": ("losange", "m")},
        "colours": {"red": ("rouge", "rouge"), "blue": ("bleu", "bleue"), "green": ("vert", "verte"),
                    "yellow": ("jaune", "jaune"), "orange": ("orange", "orange"),
                    "purple": ("violet", "violette"), "white": ("blanc", "blanche"),
                    "black": ("noir", "noire")},
        "title": ["Galerie de formes", "Formes géométriques à imprimer", "Images pour la classe"],
        "text": ["Sur cette page, vous trouverez d'autres images de formes simples.",
                 "Les enfants apprennent les couleurs et les formes en s'amusant."],
    },
    "es": {
        "shapes": {"circle": ("círculo", "m"), "triangle": ("triángulo", "m"), "star": ("estrella", "f"),
                   "box": ("cuadrado", "m"), "heart": ("corazón", "m"), "cross": ("cruz", "f"),
                   "ring": ("anillo", "m"), "diamond": ("rombo", "m")},
        "colours": {"red": ("rojo", "roja"), "blue": ("azul", "azul"), "green": ("verde", "verde"),
                    "yellow": ("amarillo", "amarilla"), "orange": ("naranja", "naranja"),
                    "purple": ("morado", "morada"), "white": ("blanco", "blanca"),
                    "black": ("negro", "negra")},
        "title": ["Galería de formas", "Formas geométricas para imprimir", "Imágenes para la clase"],
        "text": ["En esta página encontrará más imágenes de formas simples.",
                 "Los niños aprenden los colores y las formas jugando."],
    },
}
FOREIGN_LANGUAGES = tuple(_FOREIGN)


def foreign_texts(scene: Scene, rng: np.random.Generator, lang: str) -> tuple[str, str, str]:
    """Alt text, title and surrounding text in German, French or Spanish."""
    table = _FOREIGN[lang]
    distinct = {(o.colour, o.category): o for o in reversed(scene.objects)}
    chosen = list(reversed(distinct.values()))[:2]  # first two distinct colour+shape pairs
    parts = []
    for obj in chosen:
        noun, gender = table["shapes"][obj.category]
        if lang == "de":
            parts.append(f"{'einer' if gender == 'f' else 'einem'} {noun} in {table['colours'][obj.colour]}")
        else:
            colour = table["colours"][obj.colour][1 if gender == "f" else 0]
            art = ("une" if gender == "f" else "un") if lang == "fr" else ("una" if gender == "f" else "un")
            parts.append(f"{art} {noun} {colour}")
    if lang == "de":
        alt = "Bild mit " + " und ".join(parts) + " vor neutralem Hintergrund"
    elif lang == "fr":
        alt = (" et ".join(parts) + " sur un fond neutre").capitalize()
    else:
        alt = (" y ".join(parts) + " sobre un fondo neutro").capitalize()
    return alt, _pick(rng, table["title"]), _pick(rng, table["text"])


JUNK_ALTS = ("IMG_2041.JPG", "click here", "", "image", "DSC00123.jpg", "logo", "thumbnail",
             "photo", "banner_final_v2.png", "untitled")
ENGLISH_TITLES = ("Simple shapes gallery", "Geometric shapes | Free clipart",
                  "Kids learning shapes worksheet", "Colour and shape flashcards")
ENGLISH_TEXTS = ("Learn the basic shapes with this colorful picture.",
                 "Here is another picture from our collection of simple shapes.",
                 "Download this drawing for your classroom or presentation.")
BOILERPLATE = ("Cookie policy · Terms of use · Contact us", "Share on social media",
               "Copyright 2019. All rights reserved.", "Next page »")
