"""CIDEr-D for many candidates at once (the SCST reward), equal to pycocoevalcap's ``Cider``.

pycocoevalcap's ``Cider`` (``cider_scorer.py``) is the CIDEr-D variant of Vedantam et
al.: for n = 1..4, each sentence is a vector of n-gram counts weighted by
``tf * (log(#documents) - log(max(1, df)))``; a candidate's similarity to one reference
is the *clipped* dot product ``sum min(c, r) * r`` over the candidate's n-grams, divided
by both (unclipped) norms, times the Gaussian length penalty ``exp(-delta**2 / (2 * 6**2))``;
the score is the mean over n and over the image's references, times 10. Two quirks are
kept exactly: the "length" in ``delta`` counts the sentence's *bigrams* (words - 1, zero
for one word), and an n-gram the references never contain gets df 1 (weight
``log #documents``). pycocoevalcap takes df and #documents from the references of the
set being scored; SCST (Rennie et al.) takes them from the training references instead:
:class:`DocumentFrequency` holds such a table and :class:`CiderD` scores against it.

Speed: every reference's weighted vectors and norms are computed once and cached by
image; a candidate costs one dictionary pass per reference.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Optional, Sequence

N = 4
SIGMA = 6.0

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def simple_tokens(text: str) -> list[str]:
    """Lower-cased words without punctuation (what the PTB tokenizer + pycocoevalcap's
    punctuation filter give for plain ASCII captions)."""
    return _WORD.findall(text.lower())


def ngrams(words: Sequence[str], n: int = N) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def _words(sentence) -> list[str]:
    return sentence.split() if isinstance(sentence, str) else list(sentence)


class DocumentFrequency:
    """n-gram document frequencies over a reference corpus: ``df[g]`` = the number of images
    with ``g`` in any of their references; ``num_documents`` = the number of images."""

    def __init__(self, counts: Optional[dict] = None, num_documents: int = 0):
        self.counts: dict = dict(counts or {})
        self.num_documents = int(num_documents)

    @classmethod
    def from_references(cls, references: Iterable[Sequence]) -> "DocumentFrequency":
        """``references``: one list of sentences per image (each sentence a string of
        space-separated tokens or a token list)."""
        counts: Counter = Counter()
        documents = 0
        for refs in references:
            documents += 1
            seen = set()
            for ref in refs:
                seen.update(ngrams(_words(ref)))
            counts.update(seen)
        return cls(counts, documents)

    @property
    def log_documents(self) -> float:
        return math.log(float(self.num_documents)) if self.num_documents > 0 else 0.0

    def to_dict(self) -> dict:
        return {"num_documents": self.num_documents,
                "counts": [[" ".join(g), c] for g, c in sorted(self.counts.items())]}

    @classmethod
    def from_dict(cls, data: dict) -> "DocumentFrequency":
        return cls({tuple(g.split(" ")): float(c) for g, c in data["counts"]}, int(data["num_documents"]))


class _Vector:
    """One sentence's tf-idf vectors per n, their norms and its (bigram) length."""

    __slots__ = ("vec", "norm", "length")

    def __init__(self, words: Sequence[str], df: DocumentFrequency):
        log_docs = df.log_documents
        counts = df.counts
        self.vec = [dict() for _ in range(N)]
        norms = [0.0] * N
        length = 0
        for gram, tf in ngrams(words).items():
            n = len(gram) - 1
            weight = float(tf) * (log_docs - math.log(max(1.0, counts.get(gram, 0.0))))
            self.vec[n][gram] = weight
            norms[n] += weight * weight
            if n == 1:
                length += tf
        self.norm = [math.sqrt(v) for v in norms]
        self.length = length


def _similarity(hyp: _Vector, ref: _Vector) -> float:
    """Sum over n of the clipped cosine times the length penalty."""
    delta = float(hyp.length - ref.length)
    penalty = math.exp(-(delta * delta) / (2 * SIGMA * SIGMA))
    total = 0.0
    for n in range(N):
        ref_vec = ref.vec[n]
        value = 0.0
        for gram, weight in hyp.vec[n].items():
            r = ref_vec.get(gram)
            if r is not None:
                value += min(weight, r) * r
        if hyp.norm[n] != 0 and ref.norm[n] != 0:
            value /= hyp.norm[n] * ref.norm[n]
        total += value * penalty
    return total


class CiderD:
    """CIDEr-D against a fixed document-frequency table (SCST's: the training references).

    ``references``: ``{image_id: [sentence, ...]}`` (sentences tokenized, as strings of
    space-separated tokens or token lists). :meth:`scores` takes candidates with their
    image ids, so many samples of one image share its cached reference vectors.
    """

    def __init__(self, references: dict, df: Optional[DocumentFrequency] = None):
        self.references = {k: [_words(r) for r in refs] for k, refs in references.items()}
        self.df = df if df is not None else DocumentFrequency.from_references(self.references.values())
        self._cache: dict = {}

    def _refs(self, image_id) -> list:
        cached = self._cache.get(image_id)
        if cached is None:
            refs = self.references.get(image_id)
            if not refs:
                raise KeyError(f"no references for image {image_id!r}")
            cached = self._cache[image_id] = [_Vector(r, self.df) for r in refs]
        return cached

    def score(self, candidate, image_id) -> float:
        return self.scores([candidate], [image_id])[0]

    def scores(self, candidates: Sequence, image_ids: Sequence) -> list[float]:
        out = []
        for candidate, image_id in zip(candidates, image_ids):
            refs = self._refs(image_id)
            hyp = _Vector(_words(candidate), self.df)
            out.append(10.0 * sum(_similarity(hyp, ref) for ref in refs) / (N * len(refs)))
        return out


def corpus_cider_d(candidates: dict, references: dict) -> tuple[float, dict]:
    """pycocoevalcap's corpus CIDEr-D (df from the references of the scored images):
    ``(mean, {image_id: score})``; candidates and references tokenized."""
    ids = list(candidates)
    scorer = CiderD({k: references[k] for k in ids})
    values = scorer.scores([candidates[k] for k in ids], ids)
    return (sum(values) / len(values) if values else 0.0), dict(zip(ids, values))
