"""VQA answer normalization, answer vocabulary and soft scores.

Normalization follows the official VQA evaluation (vqaEval.py): newlines/tabs to spaces;
punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` removed when it touches a space
or the answer has a digit-comma-digit, otherwise replaced by a space; periods not
between digits removed; lower case; number words zero..ten (and "none") to digits;
articles a/an/the dropped; apostrophe-less contractions restored ("dont" -> "don't").

Answer vocabulary (the bottom-up-attention / UNITER recipe): count each normalized
``multiple_choice_answer`` once per question over the chosen splits and keep those seen
at least ``min_count`` (9) times. Soft score of an answer given by ``c`` of the 10
annotators: ``min(1, c / 3)`` (VQA accuracy), or ``min(1, 0.3 c)`` with scheme "butd".
"""

from __future__ import annotations

import re
from collections import Counter

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Contractions as annotators type them without the apostrophe(s) -> the written form.
_FORMS = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll let's ma'am mightn't
mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've
shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll
someone's something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've
they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd
where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've
y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()


def _contraction_table() -> dict:
    table = {}
    for form in _FORMS:
        parts = form.split("'")
        table["".join(parts)] = form
        if form.count("'") == 2:  # "couldn'tve" and "couldnt've": one apostrophe missing
            first, second = form.index("'"), form.rindex("'")
            table[form[:second] + form[second + 1:]] = form
            table[form[:first] + form[first + 1:]] = form
    table.pop("its", None)  # "its" is a word, not a missing "it's"
    table.pop("id", None)
    table.pop("ill", None)
    table.pop("wed", None)
    table.pop("well", None)
    table.pop("hell", None)
    table.pop("shell", None)
    table.pop("were", None)
    return table


CONTRACTIONS = _contraction_table()


def normalize_answer(answer: str) -> str:
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    comma = _COMMA.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = []
    for word in out.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def soft_score(count: int, scheme: str = "vqa") -> float:
    if scheme == "vqa":
        return min(1.0, count / 3.0)
    if scheme == "butd":
        return min(1.0, 0.3 * count)
    raise ValueError(f"score scheme must be vqa or butd, got {scheme!r}")


def answer_vocabulary(multiple_choice_answers, min_count: int = 9) -> list[str]:
    """Normalized answers given as the consensus answer of at least ``min_count`` questions,
    most frequent first (ties alphabetical)."""
    counts = Counter(normalize_answer(a) for a in multiple_choice_answers)
    kept = [(a, c) for a, c in counts.items() if c >= min_count and a]
    return [a for a, _ in sorted(kept, key=lambda x: (-x[1], x[0]))]


def scored_answers(answers: list[str], vocabulary, scheme: str = "vqa") -> tuple[list[str], list[float]]:
    """(answers, scores) of one question: its annotators' normalized answers that are in
    ``vocabulary`` (None = all), best first."""
    counts = Counter(normalize_answer(a) for a in answers)
    items = [(a, soft_score(c, scheme)) for a, c in counts.items()
             if a and (vocabulary is None or a in vocabulary)]
    items.sort(key=lambda x: (-x[1], x[0]))
    return [a for a, _ in items], [s for _, s in items]
