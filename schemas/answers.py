"""VQA answer normalization, answer vocabulary and soft scores.

Shared by the importers (:mod:`vlp.builders.imports`) and the metrics
(:mod:`vlp.trainer.metrics`), hence in ``schemas``.

:func:`normalize_answer` is identical to the official VQA evaluation's treatment of an
answer (``vqaEval.py`` of the VQA API, GT-Vision-Lab/VQA, PythonEvaluationTools),
quirks included; ``tests/test_build_vqa_answers.py`` checks it input by input:

1. newlines and tabs become spaces, then outer whitespace is stripped;
2. *processPunctuation*: for each mark of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``
   in that order: removed when the (unmodified) answer has the mark next to a space or
   holds a digit-comma-digit anywhere, else replaced by a space; then periods not
   followed by a digit are removed, at most 32 of them (the official code passes
   ``re.UNICODE`` where ``re.sub`` takes its count); apostrophes and colons stay;
3. *processDigitArticle*: lower case, split on whitespace, number words zero..ten and
   "none" become digits, the articles a/an/the are dropped, and each word found in the
   official contraction table is replaced (the table as published: "dont" -> "don't"
   but "lets" and "shes" stay, "somebody'd" -> "somebodyd", the capitalised keys "Im",
   "Ive", "Id've", "I'dve" never match a lower-cased word).

Answer vocabulary (the bottom-up-attention / UNITER recipe): count each normalized
``multiple_choice_answer`` once per question over the chosen splits and keep those seen
at least ``min_count`` (9) times. Soft score of an answer given by ``c`` of the 10
annotators: ``min(1, c / 3)`` (VQA accuracy), or ``min(1, 0.3 c)`` with scheme "butd".
"""

from __future__ import annotations

import re
from collections import Counter

# The official lists, in the official order (the order matters: each mark's test looks
# at the original answer, its replacement at the text so far).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
# "(?!<=\d)" is a lookahead for the text "<=digit", never true before a "."; so a period is
# removed unless a digit follows it ("2.5" keeps its period, "2. 5" and "end." lose theirs).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)  # 32: the official call passes re.UNICODE as the count
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# The official contraction table, entry for entry (keys and values exactly as published).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}


def process_punctuation(text: str) -> str:
    """The official processPunctuation."""
    out = text
    comma = _COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official processDigitArticle."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(answer: str) -> str:
    """An answer as the official evaluation compares it (see the module docstring)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


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
