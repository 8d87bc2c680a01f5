"""Stages 2 and 6 of the web filter: the naturalness classifier and the semantic scorer.

Both are scikit-learn logistic regressions on standardized features, stored as JSON
(feature names, scaler mean and scale, coefficients, intercept) and evaluated with numpy
at load: nothing is unpickled. ``default_model.json`` ships with the package; it was
trained on the synthetic world by ``vlp-build train-web-scorer --world`` (its
``trained_with`` entry says how).

Naturalness features (:func:`naturalness_features`), from the feature record of the image
and the pixel statistics of stage 1: the share of regions with a text/graphic-like label
(:data:`GRAPHIC_LABELS`), that share weighted by confidence, mean and max object
confidence, the normalized entropy of the labels, log #regions, colour count, flat-area
share, edge density. ``P(unnatural) >= threshold`` rejects.

Semantic features (:func:`semantic_features`), from the cleaned text and the record:
text-only (log #words, share of words that are VG labels), image-only (log #regions,
mean confidence, graphic share) and cross-modal: how many of the text's label words
(object names incl. synonyms and singular forms, as W ∩ L of :mod:`vlp.schemas.labels`)
the image's labels match and miss, the share of the image's labels the text names, and
colour agreement (colour words of the text found / not found among the regions'
attributes).
"""

from __future__ import annotations

import functools
import json
import math
from importlib import resources
from pathlib import Path
import numpy as np

GRAPHIC_LABELS = frozenset({"sign", "letters", "letter", "logo", "screen", "drawing", "words", "text", "poster",
                            "banner", "writing", "menu", "computer", "monitor", "symbol", "design", "graphic",
                            "cartoon", "number", "numbers", "screen", "paper", "picture", "display", "laptop",
                            "word", "sticker", "label", "advertisement", "ad", "chart"})
COLOUR_WORDS = frozenset({"red", "blue", "green", "yellow", "orange", "purple", "white", "black", "brown", "pink",
                          "gray", "grey", "silver", "gold", "tan", "beige", "maroon", "navy", "teal", "violet"})
NATURALNESS_FEATURES = ("graphic_share", "graphic_conf", "mean_conf", "max_conf", "label_entropy", "log_regions",
                        "colour_count", "flat_share", "edge_density")
SEMANTIC_FEATURES = ("log_words", "label_word_share", "log_regions", "mean_conf", "graphic_share",
                     "matched", "missed", "matched_share", "no_label_words", "image_labels_named", "colours_found",
                     "colours_missed")
DEFAULT_MODEL = "default_model.json"


class LogisticModel:
    """A fitted logistic regression as plain numbers: p = sigmoid(w · (x - mean) / scale + b)."""

    def __init__(self, features, mean, scale, coef, intercept: float, threshold: float = 0.5, meta=None):
        self.features = tuple(features)
        self.mean = np.asarray(mean, np.float64)
        self.scale = np.asarray(scale, np.float64)
        self.coef = np.asarray(coef, np.float64)
        self.intercept = float(intercept)
        self.threshold = float(threshold)
        self.meta = dict(meta or {})
        n = len(self.features)
        if not (self.mean.shape == self.scale.shape == self.coef.shape == (n,)):
            raise ValueError(f"model parameters do not match its {n} features")
        if not np.all(np.isfinite(self.coef)) or not np.all(self.scale > 0):
            raise ValueError("model parameters must be finite with positive scales")

    def predict(self, rows: np.ndarray) -> np.ndarray:
        z = ((np.atleast_2d(rows) - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))

    def to_dict(self) -> dict:
        return {"features": list(self.features), "mean": self.mean.round(8).tolist(),
                "scale": self.scale.round(8).tolist(), "coef": self.coef.round(8).tolist(),
                "intercept": round(self.intercept, 8), "threshold": self.threshold, **self.meta}

    @classmethod
    def from_dict(cls, doc: dict, expected: tuple) -> "LogisticModel":
        if not isinstance(doc, dict):
            raise ValueError("a model must be a JSON object")
        if tuple(doc.get("features", ())) != tuple(expected):
            raise ValueError(f"model features {doc.get('features')} are not {list(expected)}")
        meta = {k: v for k, v in doc.items() if k not in ("features", "mean", "scale", "coef", "intercept", "threshold")}
        return cls(doc["features"], doc["mean"], doc["scale"], doc["coef"], doc["intercept"],
                   doc.get("threshold", 0.5), meta)

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, features, *, threshold: float = 0.5, c: float = 1.0,
            meta=None) -> "LogisticModel":
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        if len(set(np.asarray(y).tolist())) < 2:
            raise ValueError("training needs both classes")
        scaler = StandardScaler().fit(x)
        scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
        clf = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit((x - scaler.mean_) / scale, y)
        return cls(features, scaler.mean_, scale, clf.coef_[0], clf.intercept_[0], threshold,
                   {**(meta or {}), "train_rows": int(len(y)), "train_positives": int(np.sum(y))})


class WebScorer:
    """The two models of a model file (``naturalness``, ``semantic``)."""

    def __init__(self, naturalness: LogisticModel, semantic: LogisticModel, meta=None, source: str = ""):
        self.naturalness, self.semantic = naturalness, semantic
        self.meta = dict(meta or {})
        self.source = source

    def to_dict(self) -> dict:
        return {"format": "vlp-web-scorer", "version": 1, **self.meta,
                "naturalness": self.naturalness.to_dict(), "semantic": self.semantic.to_dict()}

    def save(self, path) -> Path:
        from vlp.core.durable import atomic_write_json

        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, doc, source: str = "") -> "WebScorer":
        if not isinstance(doc, dict) or doc.get("format") != "vlp-web-scorer":
            raise ValueError("not a vlp web-scorer model file (format must be 'vlp-web-scorer')")
        try:
            meta = {k: v for k, v in doc.items() if k not in ("format", "version", "naturalness", "semantic")}
            return cls(LogisticModel.from_dict(doc["naturalness"], NATURALNESS_FEATURES),
                       LogisticModel.from_dict(doc["semantic"], SEMANTIC_FEATURES), meta, source)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"model file lacks or mangles {exc}") from None

    @classmethod
    def load(cls, path=None) -> "WebScorer":
        """A model file, or the shipped default (``path`` None)."""
        if path is None:
            text = resources.files("vlp.builders.web_filter").joinpath(DEFAULT_MODEL).read_text("utf-8")
            return cls.from_dict(json.loads(text), "default")
        path = Path(path)
        try:
            doc = json.loads(path.read_text("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a JSON model file ({exc})") from None
        try:
            return cls.from_dict(doc, str(path))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------- features


@functools.lru_cache(maxsize=None)
def _all_labels() -> dict:
    from vlp.schemas import vocab
    from vlp.schemas.labels import image_labels

    return image_labels(range(len(vocab.objects())))


def _record_labels(record) -> tuple[list[str], np.ndarray]:
    from vlp.schemas import vocab

    objects = vocab.objects()
    names = [objects.name(int(i)) for i in np.asarray(record.objects_id).tolist()]
    return names, np.asarray(record.objects_conf, np.float64)


def _graphic(names: list[str]) -> np.ndarray:
    return np.array([any(w in GRAPHIC_LABELS for w in n.lower().split()) for n in names], bool)


def naturalness_features(record, pixels: dict) -> np.ndarray:
    names, conf = _record_labels(record)
    n = len(names)
    graphic = _graphic(names)
    if n:
        counts = np.array(list({name: names.count(name) for name in names}.values()), np.float64)
        p = counts / counts.sum()
        entropy = float(-(p * np.log(p)).sum() / math.log(n)) if n > 1 else 0.0
    else:
        entropy = 0.0
    return np.array([
        float(graphic.mean()) if n else 0.0,
        float((conf * graphic).sum() / max(conf.sum(), 1e-6)) if n else 0.0,
        float(conf.mean()) if n else 0.0,
        float(conf.max()) if n else 0.0,
        entropy,
        math.log1p(n),
        float(pixels.get("colour_count", 0.0)),
        float(pixels.get("flat_share", 0.0)),
        float(pixels.get("edge_density", 0.0)),
    ])


def _colour_names(record) -> set:
    from vlp.schemas import vocab

    attributes = vocab.attributes()
    names = {attributes.name(int(i)) for i in np.asarray(record.attrs_id).tolist()} & COLOUR_WORDS
    return names | {"grey", "gray"} if names & {"grey", "gray"} else names


@functools.lru_cache(maxsize=None)
def _label_words() -> tuple[dict, frozenset]:
    """word tuple -> display names it may denote (vocab synonyms + label_words.json), generic words."""
    doc = json.loads(resources.files("vlp.builders.web_filter").joinpath("label_words.json").read_text("utf-8"))
    table: dict = {}
    for words, name in _all_labels().items():
        table.setdefault(words, set()).add(name)
    for word, names in doc["synonyms"].items():
        table.setdefault(tuple(word.split()), set()).update(names)
    return {k: frozenset(v) for k, v in table.items()}, frozenset(doc["generic"])


def text_labels(text: str) -> list[frozenset]:
    """Per label mention in the text (longest match first, plural forms singularized), the
    display names it may denote; generic words are left out."""
    from vlp.schemas.labels import singular_forms

    from vlp.builders.web_filter.texts import words_of

    table, generic = _label_words()
    words = words_of(text)
    found, i = [], 0
    while i < len(words):
        hit = None
        for n in (3, 2, 1):
            if i + n > len(words):
                continue
            head = tuple(words[i:i + n - 1])
            for form in singular_forms(words[i + n - 1]):
                if head + (form,) in table:
                    hit = (n, head + (form,))
                    break
            if hit:
                break
        if hit is None:
            i += 1
            continue
        n, key = hit
        if not (n == 1 and (key[0] in generic or words[i] in generic or key[0] in COLOUR_WORDS)):
            found.append(table[key])
        i += n
    return found


def semantic_features(text: str, record) -> np.ndarray:
    from vlp.builders.web_filter.texts import words_of

    words = words_of(text)
    names, conf = _record_labels(record)
    n = len(names)
    own = set(names)
    mentions = text_labels(text)
    matched = [m for m in mentions if m & own]
    named = set().union(*matched) & own if matched else set()
    colours = {w for w in words if w in COLOUR_WORDS}
    image_colours = _colour_names(record)
    found = colours & image_colours
    return np.array([
        math.log1p(len(words)),
        len(mentions) / max(len(words), 1),
        math.log1p(n),
        float(conf.mean()) if n else 0.0,
        float(_graphic(names).mean()) if n else 0.0,
        float(len(matched)),
        float(len(mentions) - len(matched)),
        len(matched) / max(len(mentions), 1),
        1.0 if not mentions else 0.0,
        len(named) / max(len(own), 1),
        float(len(found)),
        float(len(colours - found)),
    ])


# --------------------------------------------------------------------------- training


JUNK_TEXTS = ("click here", "image", "untitled", "home page", "download now for free", "read more about this",
              "all rights reserved", "best price online shop", "photo 1 of 12", "share this with your friends",
              "see more pictures", "thumbnail image", "our team at the office", "view the full article")


def train_semantic(pairs, features, *, extra_positive=(), extra_negative=(), seed: int = 0,
                   max_pairs: int = 20000) -> tuple[LogisticModel, dict]:
    """Positives: the caption store's pairs whose image is in the feature store;
    negatives: the same texts on another (shuffled) image, and junk alt texts on every image.
    ``extra_*``: more (text, record) rows (e.g. a labelled crawl's good and mismatched rows)."""
    from vlp.schemas.pairs import PairStore

    store = PairStore(pairs) if not hasattr(pairs, "column") else pairs
    texts, ids = store.column("text"), store.column("image_id")
    keep = [(t, i) for t, i in zip(texts, ids) if i in features and t]
    rng = np.random.default_rng(seed)
    if len(keep) > max_pairs:
        keep = [keep[int(k)] for k in sorted(rng.choice(len(keep), max_pairs, replace=False))]
    if len(keep) < 4:
        raise ValueError("need at least 4 caption pairs whose image is in the feature store")
    records = {i: features.get(i) for i in {i for _, i in keep}}
    image_list = sorted(records)
    x, y = [], []
    for text, image_id in keep:
        x.append(semantic_features(text, records[image_id]))
        y.append(1)
        other = image_list[int(rng.integers(len(image_list)))]
        if other != image_id:
            x.append(semantic_features(text, records[other]))
            y.append(0)
    for k, image_id in enumerate(image_list):
        x.append(semantic_features(JUNK_TEXTS[k % len(JUNK_TEXTS)], records[image_id]))
        y.append(0)
    for text, record in extra_positive:
        x.append(semantic_features(text, record))
        y.append(1)
    for text, record in extra_negative:
        x.append(semantic_features(text, record))
        y.append(0)
    x, y = np.array(x), np.array(y)
    model = LogisticModel.fit(x, y, SEMANTIC_FEATURES, meta={"positives": "caption store pairs",
                                                             "negatives": "shuffled pairs, junk alt texts"})
    return model, {"rows": int(len(y)), "positives": int(y.sum())}


def train_naturalness(rows) -> tuple[LogisticModel, dict]:
    """``rows``: (record, pixel stats, is_unnatural)."""
    x = np.array([naturalness_features(record, pixels) for record, pixels, _ in rows])
    y = np.array([int(bool(label)) for _, _, label in rows])
    model = LogisticModel.fit(x, y, NATURALNESS_FEATURES, meta={"positive_class": "unnatural"})
    return model, {"rows": int(len(y)), "unnatural": int(y.sum())}


def threshold_keeping(model: LogisticModel, x: np.ndarray, share: float) -> float:
    """The highest threshold (2 decimals) that keeps at least ``share`` of rows ``x`` (their
    score >= threshold)."""
    scores = np.sort(model.predict(x))
    k = int(math.floor((1.0 - share) * len(scores)))
    return float(math.floor(scores[min(k, len(scores) - 1)] * 100) / 100)

