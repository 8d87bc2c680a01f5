"""Stages 3-5 of the web filter: text selection and cleaning, language, text rules.

Cleaning (:func:`clean_text`): ftfy (mojibake, HTML entities), URLs, e-mail addresses and
file names (``IMG_2041.JPG``, ``banner_final_v2.png``) removed, whitespace collapsed,
stray punctuation trimmed. A cleaned candidate is dropped when it is empty or boilerplate
(:func:`is_boilerplate`: the phrase list in ``boilerplate.txt``, or a menu made only of
such phrases joined by ``·``, ``|``, ``»`` ...).

Selection (:func:`select_text`): the candidates are the alt text, the title and each
sentence of the surrounding text; each surviving candidate is scored
``source prior (alt 1.0, surrounding 0.7, title 0.5) + 2 if it has 3-256 words +
concreteness`` (the share of its words that are Visual Genome object or attribute names:
descriptions name things; so any candidate of 3-256 words beats every other), and the
best one is kept (ties: alt, then surrounding, then
title; then the earlier sentence).

Language (:class:`LanguageStage`): py3langid (its model ships inside the wheel) over a
fixed set of 26 common languages, normalised probabilities; a text is English when
P(en) >= the floor, or when it has at most 6 words that are all common English words
(wordfreq Zipf >= 4: identifiers guess on three words, "two black stars" -> not English).

Text rules (:class:`TextRules`): more than 5 characters, 3-256 words, at least one noun
(the spaCy tagger the project ships, Penn tags NN*), the share of out-of-vocabulary words
(wordfreq's English list: Zipf frequency 0) at most a ceiling, and no word of the
profanity list (``profanity.txt``).
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Optional

LANGUAGES = ("en", "de", "fr", "es", "it", "pt", "nl", "ru", "zh", "ja", "ko", "ar", "pl", "tr", "sv", "da",
             "no", "fi", "cs", "hu", "ro", "id", "vi", "hi", "el", "uk")
SOURCE_PRIOR = {"alt": 1.0, "surrounding_text": 0.7, "title": 0.5}
DEFAULT_MIN_CHARS = 5
DEFAULT_MIN_WORDS, DEFAULT_MAX_WORDS = 3, 256
DEFAULT_MAX_OOV = 0.5
DEFAULT_LANG_FLOOR = 0.3
#: texts of at most this many words whose every word has an English Zipf frequency >= SHORT_TEXT_ZIPF
#: (wordfreq; "two black stars") are English whatever the identifier says
SHORT_TEXT_WORDS, SHORT_TEXT_ZIPF = 6, 4.0
NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})

_URL = re.compile(r"(?:https?://|ftp://|www\.)\S+", re.IGNORECASE)
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
_FILE = re.compile(r"\b[\w\-.]+\.(?:jpe?g|png|gif|webp|bmp|tiff?|svg|heic|pdf|html?|php|aspx?)\b", re.IGNORECASE)
_CAMERA = re.compile(r"\b(?:IMG|DSC|DSCN|DCIM|PXL|VID|Screenshot)[_\-]?\d[\w\-]*\b", re.IGNORECASE)
_SPACE = re.compile(r"\s+")
_MENU = re.compile(r"\s*[·|»«•>/]+\s*")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*", re.UNICODE)
_COPYRIGHT = re.compile(r"^(?:copyright|©|\(c\))\b|all rights reserved", re.IGNORECASE)


def _data_lines(name: str) -> frozenset:
    text = resources.files("vlp.builders.web_filter").joinpath(name).read_text("utf-8")
    return frozenset(line.strip().lower() for line in text.splitlines() if line.strip() and not line.startswith("#"))


@functools.lru_cache(maxsize=None)
def boilerplate_phrases() -> frozenset:
    return _data_lines("boilerplate.txt")


@functools.lru_cache(maxsize=None)
def profanity_words() -> frozenset:
    return _data_lines("profanity.txt")


@functools.lru_cache(maxsize=None)
def _vocab_words() -> frozenset:
    from vlp.schemas import vocab

    words = set()
    for voc in (vocab.objects(), vocab.attributes()):
        for synonyms in voc.synonyms:
            for name in synonyms:
                words.update(name.lower().split())
    return frozenset(words)


def words_of(text: str) -> list[str]:
    """Lower-case words (letters, inner ' and -)."""
    return _WORD.findall(text.lower())


def clean_text(text) -> str:
    """ftfy, then URLs / e-mails / file names out, whitespace collapsed, edges trimmed."""
    if not isinstance(text, str):
        return ""
    import ftfy

    text = ftfy.fix_text(text)
    for pattern in (_URL, _EMAIL, _FILE, _CAMERA):
        text = pattern.sub(" ", text)
    text = _SPACE.sub(" ", text).strip()
    return text.strip(" -_|·•,;:")


def normalize(text: str) -> str:
    """The text as the K rule compares texts: lower case, words only, single spaces."""
    return " ".join(words_of(text))


def is_boilerplate(text: str) -> bool:
    phrases = boilerplate_phrases()
    parts = [p for p in _MENU.split(text) if p.strip()]
    if not parts:
        return True
    for part in parts:
        norm = normalize(part)
        if norm and norm not in phrases and not _COPYRIGHT.search(part.strip()):
            return False
    return True


def candidates(row: dict) -> list[tuple[str, str]]:
    """(source, raw text) of a row: alt, title, each sentence of the surrounding text."""
    out = []
    for source in ("alt", "title"):
        value = row.get(source)
        if isinstance(value, str) and value.strip():
            out.append((source, value))
    around = row.get("surrounding_text")
    if isinstance(around, str) and around.strip():
        out += [("surrounding_text", s) for s in _SENTENCE.split(around.strip()) if s.strip()]
    return out


def score_candidate(source: str, text: str) -> float:
    words = words_of(text)
    if not words:
        return 0.0
    vocab_words = _vocab_words()
    concrete = sum(1 for w in words if w in vocab_words) / len(words)
    in_range = 2.0 if DEFAULT_MIN_WORDS <= len(words) <= DEFAULT_MAX_WORDS else 0.0
    return SOURCE_PRIOR.get(source, 0.5) + in_range + concrete


def select_text(row: dict) -> tuple[Optional[dict], dict]:
    """The best cleaned candidate ``{"text", "source", "score"}`` (None when none is usable)
    and the stage's values (candidates seen, dropped)."""
    best, seen, dropped = None, 0, []
    order = {"alt": 0, "surrounding_text": 1, "title": 2}
    for number, (source, raw) in enumerate(candidates(row)):
        seen += 1
        text = clean_text(raw)
        if not text or not words_of(text) or is_boilerplate(text):
            dropped.append(raw[:80])
            continue
        score = score_candidate(source, text)
        rank = (score, -order.get(source, 3), -number)
        if best is None or rank > best[0]:
            best = (rank, {"text": text, "source": source, "score": round(score, 4)})
    values = {"candidates": seen, "dropped": dropped[:5]}
    return (best[1] if best else None), values


class LanguageStage:
    """English or not: py3langid over :data:`LANGUAGES`, normalised probabilities."""

    def __init__(self, floor: float = DEFAULT_LANG_FLOOR):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self.floor = floor
        self.identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        self.identifier.set_languages(list(LANGUAGES))

    def __call__(self, text: str) -> tuple[bool, dict]:
        ranked = self.identifier.rank(text)
        p_en = next((float(p) for lang, p in ranked if lang == "en"), 0.0)
        top, p_top = ranked[0]
        values = {"lang": top, "p": round(float(p_top), 4), "p_en": round(p_en, 4)}
        if p_en >= self.floor:
            return True, values
        words = words_of(text)
        if words and len(words) <= SHORT_TEXT_WORDS:  # identifiers guess on a few words; a dictionary does not
            from wordfreq import zipf_frequency

            if all(zipf_frequency(w, "en") >= SHORT_TEXT_ZIPF for w in words):
                return True, {**values, "short_text_words_english": True}
        return False, values


_TAGGERS: dict = {}


def noun_tagger(model: str):
    """The spaCy pipeline of vg-phrases (tok2vec + tagger only), loaded once per process."""
    if model not in _TAGGERS:
        from vlp.builders.vg_phrases import _load_tagger

        _TAGGERS[model] = _load_tagger(model)
    return _TAGGERS[model]


class TextRules:
    """Stage 5 over a batch of texts: length, a noun, OOV share, profanity."""

    def __init__(self, *, min_chars: int = DEFAULT_MIN_CHARS, min_words: int = DEFAULT_MIN_WORDS,
                 max_words: int = DEFAULT_MAX_WORDS, max_oov: float = DEFAULT_MAX_OOV, need_noun: bool = True,
                 spacy_model: Optional[str] = None):
        from vlp.builders.vg_phrases import SPACY_MODEL

        self.min_chars, self.min_words, self.max_words = min_chars, min_words, max_words
        self.max_oov, self.need_noun = max_oov, need_noun
        self.spacy_model = spacy_model or SPACY_MODEL

    def check(self, texts: list[str]) -> list[Optional[tuple[str, dict]]]:
        """Per text: None (kept) or (reason, values)."""
        from wordfreq import zipf_frequency

        out: list = [None] * len(texts)
        need_tags = []
        for i, text in enumerate(texts):
            words = words_of(text)
            if len(text) <= self.min_chars:
                out[i] = ("too_short_chars", {"chars": len(text)})
            elif not self.min_words <= len(words) <= self.max_words:
                out[i] = ("word_count", {"words": len(words)})
            elif profanity_words() & set(words):
                out[i] = ("profanity", {"words": sorted(profanity_words() & set(words))})
            else:
                oov = sum(1 for w in words if zipf_frequency(w, "en") == 0) / len(words)
                if oov > self.max_oov:
                    out[i] = ("oov", {"oov_ratio": round(oov, 4)})
                elif self.need_noun:
                    need_tags.append(i)
        if need_tags:
            nlp = noun_tagger(self.spacy_model)
            for i, doc in zip(need_tags, nlp.pipe([texts[i] for i in need_tags], batch_size=256)):
                if not any(token.tag_ in NOUN_TAGS for token in doc):
                    out[i] = ("no_noun", {"tags": [token.tag_ for token in doc][:20]})
        return out
