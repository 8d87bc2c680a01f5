"""Downstream-task data of the synthetic world, in the official file layouts.

Every answer, label and genre is computed from a scene's ground truth (``Scene``), so a
finetuned model can be scored exactly and every task runs offline:

=====================================================  ========================================
``gqa/{train,val,testdev}_balanced_questions.json``    GQA: existence, colour, count and
                                                       left/right questions with ``types``
``vizwiz/{train,val,test}.json``                       VizWiz: one question per image, 10
                                                       annotators; the object asked about is
                                                       absent -> "unanswerable"
``nlvr2/{train,dev,test1}.json`` + ``nlvr2/images/``   NLVR2 statements over two scenes; the
                                                       images ``<split>-<set>-<pair>-img0/1.jpg``
                                                       are copies of the scene images
``snli_ve/snli_ve_{train,dev,test}.jsonl``             SNLI-VE: a caption as premise text, one
                                                       entailed, one neutral, one contradicted
                                                       hypothesis per image
``mmimdb/dataset/<id>.json`` + ``<id>.jpeg``,          MM-IMDB: genres that are functions of the
``mmimdb/split.json``                                  poster (scene) and of the plot words
=====================================================  ========================================

World splits map to each data set's split names (:data:`SPLIT_NAMES`). Image ids: GQA
``imageId``, VizWiz ``<id>.jpg``, SNLI-VE ``Flickr30K_ID`` and the MM-IMDB movie id are
the scene id, so the importers' default templates name the images as ``vlp-extract``
over ``images/`` does; the NLVR2 image stems map to scene ids in ``truth.json``
(``nlvr2_images``).

:func:`baselines` of each task (majority class and text only, on the test split) go to
``truth.json`` under ``tasks``.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import numpy as np

from vlp.schemas.answers import normalize_answer
from vlp.synthetic import palette
from vlp.synthetic.text import COUNT_WORDS, captions, count_word, plural, with_article

#: world split -> each data set's split name (its file names)
SPLIT_NAMES = {
    "gqa": {"train": "train", "val": "val", "test": "testdev"},
    "vizwiz": {"train": "train", "val": "val", "test": "test"},
    "nlvr2": {"train": "train", "val": "dev", "test": "test1"},
    "snli_ve": {"train": "train", "val": "dev", "test": "test"},
    "mmimdb": {"train": "train", "val": "dev", "test": "test"},
}
GQA_QUESTIONS_PER_IMAGE = 5
NLVR2_PAIRS_PER_IMAGE = 1  # each image is the left one of this many pairs
NLVR2_STATEMENTS_PER_PAIR = 4  # half of them true
GENRES = ("Action", "Comedy", "Drama", "Family", "Horror", "Romance", "Sci-Fi")
#: The rules of each genre (README): image = scene only, text = plot only, both = both needed.
GENRE_RULES = {
    "Action": "image: at least 5 objects",
    "Comedy": "text: a comedy sentence in the plot",
    "Drama": "text: a drama sentence in the plot, or no other genre applies",
    "Family": "image: a yellow object and no black object",
    "Horror": "image: a black object",
    "Romance": "both: a heart in the poster and a love sentence in the plot",
    "Sci-Fi": "both: a ring or a diamond in the poster and a space sentence in the plot",
}
URL_ROOT = "https://synthetic.invalid"


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _count(scene, category=None, colour=None) -> int:
    return sum((category is None or o.category == category) and (colour is None or o.colour == colour)
               for o in scene.objects)


def _combos(scene) -> list[tuple[str, str]]:
    """(colour, category) of the scene's objects, each once, in object order."""
    return list(dict.fromkeys((o.colour, o.category) for o in scene.objects))


def _absent_combos(scene) -> list[tuple[str, str]]:
    present = set(_combos(scene))
    return [(c, k) for k in palette.CATEGORIES for c in palette.COLOURS if (c, k) not in present]


def _number_phrase(n: int, noun: str) -> str:
    return f"{count_word(n)} {noun if n == 1 else plural(noun)}"


# --------------------------------------------------------------------------- GQA


def gqa_questions(scene, rng, count: int = GQA_QUESTIONS_PER_IMAGE) -> list[dict]:
    """Up to ``count`` distinct GQA-style questions answerable from the scene."""
    present = sorted({o.category for o in scene.objects}, key=palette.CATEGORIES.index)

    def exist():
        if rng.random() < 0.5:
            colour, category = _pick(rng, _combos(scene))
            answer = "yes"
            full = f"Yes, there is {with_article(colour + ' ' + category)}."
        else:
            colour, category = _pick(rng, _absent_combos(scene))
            answer = "no"
            full = f"No, there are no {colour} {plural(category)}."
        return (f"Is there {with_article(colour + ' ' + category)} in the image?", answer, full,
                {"structural": "verify", "semantic": "obj", "detailed": "existAttr"})

    def colour():
        options = [k for k in present if len({o.colour for o in scene.objects if o.category == k}) == 1]
        if not options:
            return None
        category = _pick(rng, options)
        answer = next(o.colour for o in scene.objects if o.category == category)
        return (f"What color is the {category}?", answer, f"The {category} is {answer}.",
                {"structural": "query", "semantic": "attr", "detailed": "color"})

    def count_():
        if rng.random() < 0.5:
            colour, category = _pick(rng, _combos(scene))
            noun = f"{colour} {category}"
        else:
            colour, category = None, _pick(rng, present)
            noun = category
        n = _count(scene, category, colour)
        return (f"How many {plural(noun)} are there?", str(n), f"There are {n} {plural(noun)}." if n != 1
                else f"There is 1 {noun}.", {"structural": "query", "semantic": "obj", "detailed": "count"})

    def relation():
        unique = [(c, k) for c, k in _combos(scene) if _count(scene, k, c) == 1]
        if len(unique) < 2:
            return None
        a, b = (unique[int(i)] for i in rng.choice(len(unique), 2, replace=False))
        oa = next(o for o in scene.objects if (o.colour, o.category) == a)
        ob = next(o for o in scene.objects if (o.colour, o.category) == b)
        dx = oa.centre[0] - ob.centre[0]
        if abs(dx) < 0.1 * scene.width:
            return None
        side = "left" if dx < 0 else "right"
        return (f"Is the {a[0]} {a[1]} to the left or to the right of the {b[0]} {b[1]}?", side,
                f"The {a[0]} {a[1]} is to the {side} of the {b[0]} {b[1]}.",
                {"structural": "choose", "semantic": "rel", "detailed": "positionChoose"})

    makers = [exist, colour, count_, relation]
    out, seen = [], set()
    for attempt in range(12 * count):
        made = makers[attempt % len(makers)]() if attempt < len(makers) else _pick(rng, makers)()
        if made is None or made[0] in seen:
            continue
        seen.add(made[0])
        question, answer, full, types = made
        out.append({"question": question, "answer": answer, "fullAnswer": full, "types": types})
        if len(out) == count:
            break
    return out


# --------------------------------------------------------------------------- VizWiz

UNANSWERABLE_PROBABILITY = 0.25


def vizwiz_question(scene, rng) -> dict:
    """One VizWiz-style question with 10 annotator answers; unanswerable when the object asked
    about is not in the image."""
    present = sorted({o.category for o in scene.objects}, key=palette.CATEGORIES.index)
    absent = [k for k in palette.CATEGORIES if k not in present]
    if absent and rng.random() < UNANSWERABLE_PROBABILITY:
        category = _pick(rng, absent)
        question = _pick(rng, [f"What color is this {category}?", f"How many {plural(category)} are there?"])
        n_other = int(rng.choice([0, 0, 1, 2, 3]))
        given = [_pick(rng, ["unsuitable", "i don't know", _pick(rng, list(palette.COLOURS))])
                 for _ in range(n_other)] + ["unanswerable"] * (10 - n_other)
        order = rng.permutation(10)
        return {"question": question, "answer": "unanswerable", "answer_type": "unanswerable", "answerable": 0,
                "answers": [{"answer": given[int(k)], "answer_confidence": _pick(rng, ["yes", "yes", "maybe", "no"])}
                            for k in order]}
    kind = _pick(rng, ["colour", "count", "yesno"])
    single = [k for k in present if len({o.colour for o in scene.objects if o.category == k}) == 1]
    if kind == "colour" and single:
        category = _pick(rng, single)
        question, answer_type = f"What color is this {category}?", "other"
        answer = next(o.colour for o in scene.objects if o.category == category)
        wrong = [c for c in palette.COLOURS if c != answer]
    elif kind in ("colour", "count"):
        category = _pick(rng, present)
        question, answer_type = f"How many {plural(category)} are there?", "number"
        n = _count(scene, category)
        answer, wrong = str(n), [str(v) for v in (n - 1, n + 1) if v >= 1]
    else:
        category = _pick(rng, list(palette.CATEGORIES))
        question, answer_type = f"Is there {with_article(category)} in this picture?", "yes/no"
        answer = "yes" if category in present else "no"
        wrong = ["no" if answer == "yes" else "yes"]
    n_wrong = int(rng.choice([0, 0, 0, 1, 1, 2, 3]))
    forms = [answer, answer.capitalize(), answer + "."]
    if answer_type == "number" and int(answer) in COUNT_WORDS:
        forms.append(COUNT_WORDS[int(answer)])
    given = [_pick(rng, wrong) for _ in range(n_wrong)]
    given += [forms[0] if rng.random() < 0.7 else _pick(rng, forms[1:]) for _ in range(10 - n_wrong)]
    order = rng.permutation(10)
    return {"question": question, "answer": answer, "answer_type": answer_type, "answerable": 1,
            "answers": [{"answer": given[int(k)],
                         "answer_confidence": "yes" if rng.random() < 0.85 else "maybe"} for k in order]}


# --------------------------------------------------------------------------- NLVR2


def nlvr2_statement(left, right, rng, want: bool) -> tuple[str, bool]:
    """A statement about the pair (left, right scenes) whose truth is ``want`` when one is found
    (else the last one made); returns (sentence, truth)."""
    scenes = {"left": left, "right": right}

    def exactly():
        side = _pick(rng, ["left", "right"])
        scene = scenes[side]
        colour, category = _pick(rng, _combos(scene)) if rng.random() < 0.7 else (
            _pick(rng, list(palette.COLOURS)), _pick(rng, list(palette.CATEGORIES)))
        actual = _count(scene, category, colour)
        n = actual if (want and actual >= 1) else int(rng.integers(1, 4))
        return (f"The {side} image has exactly {_number_phrase(n, colour + ' ' + category)}.", actual == n)

    def both():
        category = _pick(rng, list(palette.CATEGORIES))
        truth = _count(left, category) > 0 and _count(right, category) > 0
        return (f"Both images contain {with_article(category)}.", truth)

    def more():
        category = _pick(rng, list(palette.CATEGORIES))
        a, b = ("right", "left") if rng.random() < 0.5 else ("left", "right")
        truth = _count(scenes[a], category) > _count(scenes[b], category)
        return (f"There are more {plural(category)} in the {a} image than in the {b} image.", truth)

    def one():
        colour = _pick(rng, list(palette.COLOURS))
        truth = _count(left, colour=colour) > 0 or _count(right, colour=colour) > 0
        return (f"At least one image contains a {colour} shape.", truth)

    made = None
    for _ in range(6):  # a kind of statement first, then its parameters: fewer hints in the text alone
        maker = _pick(rng, [exactly, exactly, both, more, one])
        for _ in range(10):
            made = maker()
            if made[1] == want:
                return made
    return made


def _singular(word: str) -> str:
    names = {**{plural(c): c for c in palette.CATEGORIES}, **{c: c for c in palette.CATEGORIES}}
    return names[word]


def nlvr2_truth(sentence: str, left, right) -> bool:
    """Whether a statement made by :func:`nlvr2_statement` is true of (left, right)."""
    scenes = {"left": left, "right": right}
    words = {w: n for n, w in COUNT_WORDS.items()}
    m = re.fullmatch(r"The (left|right) image has exactly (\w+) (\w+) (\w+)\.", sentence)
    if m:
        return _count(scenes[m[1]], _singular(m[4]), m[3]) == words[m[2]]
    m = re.fullmatch(r"Both images contain an? (\w+)\.", sentence)
    if m:
        return _count(left, m[1]) > 0 and _count(right, m[1]) > 0
    m = re.fullmatch(r"There are more (\w+) in the (left|right) image than in the (left|right) image\.", sentence)
    if m:
        return _count(scenes[m[2]], _singular(m[1])) > _count(scenes[m[3]], _singular(m[1]))
    m = re.fullmatch(r"At least one image contains a (\w+) shape\.", sentence)
    if m:
        return _count(left, colour=m[1]) > 0 or _count(right, colour=m[1]) > 0
    raise ValueError(f"not an NLVR2 statement of the synthetic world: {sentence!r}")


# --------------------------------------------------------------------------- SNLI-VE

_NEUTRAL = ("The {x} is made of wood.", "The {x} was drawn by a child.", "The {x} is the artist's favourite shape.",
            "The {x} is heavy.", "Someone is holding the {x} just outside the picture.")


def snli_ve_hypotheses(scene, rng) -> list[tuple[str, str]]:
    """[(hypothesis, gold_label)] one per label: entailed / contradicted by the scene, or neutral
    (about something the image cannot tell)."""
    def count_statement(category, n):
        return (f"There is exactly one {category}." if n == 1
                else f"There are exactly {count_word(n)} {plural(category)}.")

    out = []
    if rng.random() < 0.5:
        colour, category = _pick(rng, _combos(scene))
        out.append((f"There is {with_article(colour + ' ' + category)}.", "entailment"))
    else:
        category = _pick(rng, sorted({o.category for o in scene.objects}))
        out.append((count_statement(category, _count(scene, category)), "entailment"))
    if rng.random() < 0.5:
        colour, category = _pick(rng, _absent_combos(scene))
        out.append((f"There is {with_article(colour + ' ' + category)}.", "contradiction"))
    else:
        category = _pick(rng, sorted({o.category for o in scene.objects}))
        n = _count(scene, category)
        wrong = n + 1 if n == 1 or rng.random() < 0.5 else n - 1
        out.append((count_statement(category, wrong), "contradiction"))
    colour, category = _pick(rng, _combos(scene))
    out.append((_pick(rng, _NEUTRAL).format(x=f"{colour} {category}"), "neutral"))
    return [out[int(k)] for k in rng.permutation(3)]


def snli_ve_truth(hypothesis: str, scene) -> str:
    """The gold label of a hypothesis made by :func:`snli_ve_hypotheses` about ``scene``."""
    words = {w: n for n, w in COUNT_WORDS.items()}
    m = re.fullmatch(r"There is an? (\w+) (\w+)\.", hypothesis)
    if m:
        return "entailment" if _count(scene, m[2], m[1]) else "contradiction"
    m = re.fullmatch(r"There is exactly one (\w+)\.", hypothesis)
    if m:
        return "entailment" if _count(scene, m[1]) == 1 else "contradiction"
    m = re.fullmatch(r"There are exactly (\w+) (\w+)\.", hypothesis)
    if m:
        number = words[m[1]] if m[1] in words else int(m[1])  # count_word: digits beyond ten
        return "entailment" if _count(scene, _singular(m[2])) == number else "contradiction"
    if any(re.fullmatch(re.escape(t).replace(r"\{x\}", r"\w+ \w+"), hypothesis) for t in _NEUTRAL):
        return "neutral"
    raise ValueError(f"not a SNLI-VE hypothesis of the synthetic world: {hypothesis!r}")


# --------------------------------------------------------------------------- MM-IMDB

_NAMES = ("Anna", "Marco", "Lena", "Tom", "Priya", "Jonas", "Mei", "Omar", "Sofia", "Ravi")
_JOBS = ("baker", "teacher", "sailor", "lawyer", "painter", "farmer", "nurse", "pilot", "mechanic", "writer")
_PLACES = ("a small harbour town", "the city", "a mountain village", "an island", "the suburbs", "the desert")
_EVENTS = ("starts a new job", "moves house", "inherits an old shop", "goes on a long trip", "meets a stranger",
           "enters a competition")
#: the plot sentences that decide the text genres; each plot gets each kind with its probability
CUES = {
    "comedy": (0.35, ("A string of hilarious mix-ups follows.", "Pranks and jokes fill every day.",
                      "Nothing goes to plan, in the funniest way.")),
    "drama": (0.35, ("A painful family secret comes to light.", "Grief tests every friendship.",
                     "An illness changes everything.")),
    "love": (0.4, ("Along the way, {name} falls in love.", "An old flame returns and hearts are won.")),
    "space": (0.35, ("A signal from a distant planet changes everything.", "A robot arrives from the future.")),
}
_TITLE_A = ("The Last", "Blue", "Quiet", "Broken", "Golden", "Midnight", "Lost", "Second")
_TITLE_B = ("Summer", "Harbour", "Promise", "Road", "Letter", "Garden", "Signal", "Season")


def movie(scene, rng) -> dict:
    """An MM-IMDB-style movie of a scene (the poster): title, plot, year and its genres."""
    name = _pick(rng, _NAMES)
    sentences = [f"{name}, a {_pick(rng, _JOBS)} from {_pick(rng, _PLACES)}, {_pick(rng, _EVENTS)}."]
    cues = set()
    for cue, (probability, options) in CUES.items():
        if rng.random() < probability:
            cues.add(cue)
            sentences.append(_pick(rng, options).format(name=name))
    order = [0] + [1 + int(k) for k in rng.permutation(len(sentences) - 1)]
    plot = " ".join(sentences[k] for k in order)
    return {"title": f"{_pick(rng, _TITLE_A)} {_pick(rng, _TITLE_B)}", "plot": [plot],
            "year": int(rng.integers(1950, 2021)), "genres": genres_of(scene, cues)}


def genres_of(scene, cues) -> list[str]:
    """The genres (in :data:`GENRES` order) of a poster scene and the plot's cue kinds."""
    colours = {o.colour for o in scene.objects}
    categories = {o.category for o in scene.objects}
    genres = set()
    if len(scene.objects) >= 5:
        genres.add("Action")
    if "comedy" in cues:
        genres.add("Comedy")
    if "yellow" in colours and "black" not in colours:
        genres.add("Family")
    if "black" in colours:
        genres.add("Horror")
    if "heart" in categories and "love" in cues:
        genres.add("Romance")
    if categories & {"ring", "diamond"} and "space" in cues:
        genres.add("Sci-Fi")
    if "drama" in cues or not genres:
        genres.add("Drama")
    return [g for g in GENRES if g in genres]


def plot_cues(plot: str) -> set:
    """The cue kinds of a plot made by :func:`movie` (for tests)."""
    return {cue for cue, (_, options) in CUES.items()
            if any(re.search(re.escape(o).replace(r"\{name\}", r"\w+"), plot) for o in options)}


# --------------------------------------------------------------------------- baselines


def _most_common(values):
    """The most frequent value; ties broken by the value's text (deterministic)."""
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], str(v)))


def vqa_accuracy(prediction: str, human_answers) -> float:
    """Official VQA accuracy of one answer: the mean over the 10 leave-one-out sets of
    min(1, matches / 3), answers normalized as vqaEval.py."""
    humans = [normalize_answer(a) for a in human_answers]
    prediction = normalize_answer(prediction)
    if not humans:
        return 0.0
    scores = [min(1.0, sum(h == prediction for k, h in enumerate(humans) if k != i) / 3.0)
              for i in range(len(humans))]
    return float(np.mean(scores))


def multilabel_f1(true, predicted, labels) -> dict:
    """Micro and macro F1 as scikit-learn's f1_score (a label never true nor predicted scores 0)."""
    tp = Counter()
    fp = Counter()
    fn = Counter()
    for t, p in zip(true, predicted):
        t, p = set(t), set(p)
        for label in labels:
            tp[label] += label in t and label in p
            fp[label] += label not in t and label in p
            fn[label] += label in t and label not in p
    def f1(a, b, c):
        return 2 * a / (2 * a + b + c) if (2 * a + b + c) else 0.0
    micro = f1(sum(tp.values()), sum(fp.values()), sum(fn.values()))
    macro = float(np.mean([f1(tp[k], fp[k], fn[k]) for k in labels])) if labels else 0.0
    return {"micro_f1": round(micro, 4), "macro_f1": round(macro, 4), "n": len(true)}


def accuracy_baselines(train: list[tuple[str, str]], test: list[tuple[str, str]], score=None) -> dict:
    """Majority and text-only baselines of (text, answer) items. ``score(prediction, item_index)``
    (default exact match) scores one test prediction."""
    score = score or (lambda prediction, k: float(prediction == test[k][1]))
    majority = _most_common([a for _, a in train]) if train else ""
    by_text = defaultdict(list)
    for t, a in train:
        by_text[t].append(a)
    text_only = [_most_common(by_text[t]) if t in by_text else majority for t, _ in test]
    n = len(test)
    mean = (lambda xs: round(float(np.mean(xs)), 4) if xs else 0.0)
    return {"majority": {"prediction": majority, "accuracy": mean([score(majority, k) for k in range(n)]), "n": n},
            "text_only": {"accuracy": mean([score(p, k) for k, p in enumerate(text_only)]), "n": n,
                          "rule": "the most frequent train answer of the same text, else the majority"}}


def _words(text: str) -> set:
    return set(re.findall(r"[a-z']+", text.lower()))


def multilabel_baselines(train: list[tuple[str, list]], test: list[tuple[str, list]]) -> dict:
    """Majority label set, and a text-only Bernoulli naive Bayes per genre on the plot's words."""
    majority = list(_most_common([tuple(g) for _, g in train])) if train else []
    vocabulary = sorted(set().union(*(_words(t) for t, _ in train))) if train else []
    index = {w: i for i, w in enumerate(vocabulary)}

    def features(text):
        x = np.zeros(len(vocabulary))
        for w in _words(text):
            if w in index:
                x[index[w]] = 1
        return x

    x_train = np.array([features(t) for t, _ in train]).reshape(len(train), len(vocabulary))
    x_test = np.array([features(t) for t, _ in test]).reshape(len(test), len(vocabulary))
    predicted = [[] for _ in test]
    for genre in GENRES:
        y = np.array([genre in g for _, g in train])
        log_odds = np.zeros(len(test))
        for value, sign in ((True, 1.0), (False, -1.0)):
            rows = x_train[y == value]
            prior = (len(rows) + 1) / (len(train) + 2)
            p = (rows.sum(axis=0) + 1) / (len(rows) + 2)
            log_odds += sign * (np.log(prior) + x_test @ np.log(p) + (1 - x_test) @ np.log(1 - p))
        for k in np.flatnonzero(log_odds > 0):
            predicted[int(k)].append(genre)
    truth = [g for _, g in test]
    return {"majority": {"prediction": majority, **multilabel_f1(truth, [majority] * len(test), list(GENRES))},
            "text_only": {**multilabel_f1(truth, predicted, list(GENRES)),
                          "rule": "per genre, Bernoulli naive Bayes on the plot's words (train split)"}}


# --------------------------------------------------------------------------- writing


def write_tasks(writer, scenes, jpegs, split_of: dict, seed: int, stream) -> dict:
    """Write every task's files through ``writer`` (world._Writer); returns the truth.json
    entries: {"tasks": {task: {files, counts, metric, baselines}}, "nlvr2_images": {stem: id}}.

    ``stream(key, name)`` gives the random stream of an image id (key 0: world-wide) for a task.
    """
    by_split = defaultdict(list)
    for s in scenes:
        by_split[split_of[s.image_id]].append(s)
    order = ("train", "val", "test")
    tasks = {}

    # GQA
    names = SPLIT_NAMES["gqa"]
    items = defaultdict(list)
    for split in order:
        doc = {}
        for s in by_split[split]:
            for k, q in enumerate(gqa_questions(s, stream(s.image_id, "gqa"))):
                qid = str(s.image_id * 1000 + k)
                doc[qid] = {"imageId": str(s.image_id), "question": q["question"], "answer": q["answer"],
                            "fullAnswer": q["fullAnswer"], "types": q["types"], "isBalanced": True,
                            "groups": {"global": None, "local": q["types"]["detailed"]},
                            "entailed": [], "equivalent": [qid], "semantic": [], "annotations": {
                                "question": {}, "answer": {}, "fullAnswer": {}}}
                items[split].append((q["question"], q["answer"]))
        writer.json(f"gqa/{names[split]}_balanced_questions.json", doc)
    tasks["gqa"] = {"counts": {names[s]: len(items[s]) for s in order}, "metric": "accuracy", "test_split": "testdev",
                    "baselines": accuracy_baselines(items["train"], items["test"])}

    # VizWiz
    names = SPLIT_NAMES["vizwiz"]
    items, humans = defaultdict(list), []
    for split in order:
        rows = []
        for s in by_split[split]:
            q = vizwiz_question(s, stream(s.image_id, "vizwiz"))
            rows.append({"image": f"{s.image_id}.jpg", "question": q["question"], "answers": q["answers"],
                         "answer_type": q["answer_type"], "answerable": q["answerable"]})
            consensus = _most_common([normalize_answer(a["answer"]) for a in q["answers"]])
            items[split].append((q["question"], consensus))
            if split == "test":
                humans.append([a["answer"] for a in q["answers"]])
        writer.json(f"vizwiz/{names[split]}.json", rows)
    tasks["vizwiz"] = {
        "counts": {names[s]: len(items[s]) for s in order}, "metric": "vqa_accuracy",
        "unanswerable": {names[s]: sum(a == "unanswerable" for _, a in items[s]) for s in order},
        "baselines": accuracy_baselines(items["train"], items["test"],
                                        score=lambda p, k: vqa_accuracy(p, humans[k]))}

    # NLVR2
    names = SPLIT_NAMES["nlvr2"]
    items, aliases = defaultdict(list), {}
    for split in order:
        members = by_split[split]
        rows = []
        for s in members:
            rng = stream(s.image_id, "nlvr2")
            for pair in range(NLVR2_PAIRS_PER_IMAGE):
                others = [o for o in members if o.image_id != s.image_id] or [s]
                right = _pick(rng, others)
                base = f"{names[split]}-{s.image_id}-{pair}"
                for side, scene in (("img0", s), ("img1", right)):
                    writer.bytes(f"nlvr2/images/{base}-{side}.jpg", jpegs[scene.image_id])
                    aliases[f"{base}-{side}"] = scene.image_id
                wants = [bool(w) for w in rng.permutation([1, 0] * (NLVR2_STATEMENTS_PER_PAIR // 2))]
                for k, want in enumerate(wants):
                    sentence, truth = nlvr2_statement(s, right, rng, want)
                    row = {"identifier": f"{base}-{k}", "sentence": sentence, "label": str(truth),
                           "left_url": f"{URL_ROOT}/nlvr2/{base}-img0.jpg",
                           "right_url": f"{URL_ROOT}/nlvr2/{base}-img1.jpg",
                           "writer": "synthetic", "synset": "shape", "query": "shapes 0",
                           "extra_validations": {}}
                    if split == "train":
                        row["directory"] = s.image_id % 100
                    rows.append(row)
                    items[split].append((sentence, str(truth)))
        writer.jsonl(f"nlvr2/{names[split]}.json", rows)
    tasks["nlvr2"] = {"counts": {names[s]: len(items[s]) for s in order}, "metric": "accuracy", "test_split": "test1",
                      "true": {names[s]: sum(a == "True" for _, a in items[s]) for s in order},
                      "baselines": accuracy_baselines(items["train"], items["test"])}

    # SNLI-VE
    names = SPLIT_NAMES["snli_ve"]
    items = defaultdict(list)
    for split in order:
        rows = []
        for s in by_split[split]:
            rng = stream(s.image_id, "snli_ve")
            premise = captions(s, rng, 1)[0]
            for hypothesis, label in snli_ve_hypotheses(s, rng):
                rows.append({"Flickr30K_ID": str(s.image_id), "sentence1": premise, "sentence2": hypothesis,
                             "gold_label": label, "annotator_labels": [label],
                             "pairID": f"{s.image_id}.jpg#0r1{label[0]}", "captionID": f"{s.image_id}.jpg#0"})
                items[split].append((hypothesis, label))
        writer.jsonl(f"snli_ve/snli_ve_{names[split]}.jsonl", rows)
    tasks["snli_ve"] = {"counts": {names[s]: len(items[s]) for s in order}, "metric": "accuracy",
                        "baselines": accuracy_baselines(items["train"], items["test"])}

    # MM-IMDB
    names = SPLIT_NAMES["mmimdb"]
    items, split_file = defaultdict(list), {}
    for split in order:
        ids = []
        for s in by_split[split]:
            m = movie(s, stream(s.image_id, "mmimdb"))
            movie_id = str(s.image_id)
            writer.json(f"mmimdb/dataset/{movie_id}.json", {**m, "cover url": f"{URL_ROOT}/mmimdb/{movie_id}.jpeg"})
            writer.bytes(f"mmimdb/dataset/{movie_id}.jpeg", jpegs[s.image_id])
            ids.append(movie_id)
            items[split].append((m["plot"][0], m["genres"]))
        split_file[names[split]] = ids
    writer.json("mmimdb/split.json", split_file)
    genre_counts = Counter(g for s in order for _, gs in items[s] for g in gs)
    tasks["mmimdb"] = {"counts": {names[s]: len(items[s]) for s in order}, "metric": "micro_f1, macro_f1",
                       "genres": {g: genre_counts[g] for g in GENRES}, "genre_rules": GENRE_RULES,
                       "baselines": multilabel_baselines(items["train"], items["test"])}
    return {"tasks": tasks, "nlvr2_images": aliases}
