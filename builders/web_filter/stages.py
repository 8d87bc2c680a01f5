"""The per-row stages 1-6 of the web filter, as functions of a batch of rows plus fitted state.

A row is a dict (see :mod:`.inputs`); a stage either leaves it alone (it passed, maybe with
new fields) or turns it into a rejection ``{"_reject": True, "key", "stage", "reason",
"values", ...}`` that later stages pass through. :data:`STAGES` is the order; each stage is
``run_stage(name, rows, config)`` so the runner can map it over Ray Data batches.
The fitted state (feature store, models, language model, tagger) is built once per process
from the :class:`FilterConfig` and cached.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np

from vlp.builders.web_filter import texts
from vlp.builders.web_filter.images import DEFAULT_MAX_ASPECT, DEFAULT_MIN_BYTES, DEFAULT_MIN_SIDE, ImageRules

STAGES = ("image", "naturalness", "text", "language", "text_rules", "semantic")
#: stages that need --features
FEATURE_STAGES = ("naturalness", "semantic")
THUMBS_PER_REASON = 6  # sample thumbnails kept per (stage, reason) and shard for the funnel page
THUMB_SIDE = 96


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """Every default a flag (see ``vlp-build web-filter --help``)."""

    features: Optional[str] = None
    model: Optional[str] = None
    image_id_template: str = "{key}"
    min_bytes: int = DEFAULT_MIN_BYTES
    min_side: int = DEFAULT_MIN_SIDE
    max_aspect: float = DEFAULT_MAX_ASPECT
    unnatural_threshold: Optional[float] = None  # None: the model file's threshold
    lang_floor: float = texts.DEFAULT_LANG_FLOOR
    min_chars: int = texts.DEFAULT_MIN_CHARS
    min_words: int = texts.DEFAULT_MIN_WORDS
    max_words: int = texts.DEFAULT_MAX_WORDS
    max_oov: float = texts.DEFAULT_MAX_OOV
    need_noun: bool = True
    min_score: Optional[float] = None  # None: the model file's threshold
    keep_fraction: Optional[float] = None
    max_images_per_text: int = 10
    phash_distance: int = 4

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FilterConfig":
        return cls(**json.loads(text))


class _State:
    def __init__(self, config: FilterConfig):
        self.config = config
        self.image_rules = ImageRules(config.min_bytes, config.min_side, config.max_aspect)
        self.features = None
        self.scorer = None
        if config.features:
            from vlp.builders.web_filter.scorer import WebScorer
            from vlp.schemas import FeatureStore

            self.features = FeatureStore(config.features, warn=False)
            self.scorer = WebScorer.load(config.model)
        self._language = None
        self.rules = texts.TextRules(min_chars=config.min_chars, min_words=config.min_words,
                                     max_words=config.max_words, max_oov=config.max_oov, need_noun=config.need_noun)

    @property
    def language(self):
        if self._language is None:
            self._language = texts.LanguageStage(self.config.lang_floor)
        return self._language

    @property
    def unnatural_threshold(self) -> float:
        c = self.config.unnatural_threshold
        return self.scorer.naturalness.threshold if c is None else c

    @property
    def min_score(self) -> float:
        c = self.config.min_score
        return self.scorer.semantic.threshold if c is None else c


_STATES: dict = {}


def state_of(config: FilterConfig) -> _State:
    key = config.to_json()
    if key not in _STATES:
        _STATES.clear()
        _STATES[key] = _State(config)
    return _STATES[key]


def image_id_of(row: dict, template: str) -> str:
    rel = row.get("image_rel") or row["key"]
    fields = {"key": row["key"], "stem": Path(rel).name, "path": rel}
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"--image-id-template {template!r}: {exc} (fields: key, stem, path)") from None


def _reject(row: dict, stage: str, reason: str, values: dict) -> dict:
    out = {"_reject": True, "key": row["key"], "stage": stage, "reason": reason, "values": values,
           "shard": row.get("shard", ""), "url": row.get("url", ""), "_i": row.get("_i", 0)}
    if "text" in row:
        out["text"] = row["text"]
    if "_thumb_src" in row:
        out["_thumb_src"] = row["_thumb_src"]
    return out


def _thumbnail(bgr) -> str:
    import cv2

    h, w = bgr.shape[:2]
    scale = THUMB_SIDE / max(h, w)
    small = cv2.resize(bgr, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return base64.b64encode(data.tobytes()).decode("ascii") if ok else ""


def _image_bytes(row: dict) -> Optional[bytes]:
    if "image_bytes" in row:
        return row["image_bytes"]
    path = row.get("image_file")
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except (OSError, ValueError):  # ValueError: a NUL byte in the path, which no file can have
        return None


def stage_image(rows: list, st: _State) -> list:
    from vlp.builders.web_filter.images import image_facts

    out = []
    for row in rows:
        if row.get("_reject"):
            out.append(row)
            continue
        data = _image_bytes(row)
        row.pop("image_bytes", None)
        if data is None:
            out.append(_reject(row, "image", "missing", {"file": row.get("image_file", "")}))
            continue
        reason, values, bgr = st.image_rules.check(data)
        if bgr is not None and reason == "":
            try:
                row["image_id"] = image_id_of(row, st.config.image_id_template)
            except ValueError as exc:
                out.append(_reject(row, "input", "image_id_template", {"why": str(exc)}))
                continue
            row.update(values)
            row.update(image_facts(data, bgr))
            row["_thumb_src"] = _thumbnail(bgr)
            out.append(row)
        else:
            if reason in ("too_small", "aspect", "file_too_small"):
                try:
                    from vlp.core.decode import decode_image

                    row["_thumb_src"] = _thumbnail(decode_image(data))
                except Exception:  # noqa: BLE001 - a thumbnail is optional
                    pass
            out.append(_reject(row, "image", reason, values))
    return out


def _record(row: dict, st: _State):
    try:
        return st.features.get(row["image_id"])
    except KeyError:
        return None


def stage_naturalness(rows: list, st: _State) -> list:
    if st.features is None:
        return rows
    from vlp.builders.web_filter.scorer import naturalness_features

    live = [i for i, r in enumerate(rows) if not r.get("_reject")]
    x, have = [], []
    for i in live:
        record = _record(rows[i], st)
        if record is None:
            rows[i] = _reject(rows[i], "naturalness", "no_features", {"image_id": rows[i]["image_id"]})
            continue
        x.append(naturalness_features(record, rows[i]))
        have.append(i)
    if have:
        p = st.scorer.naturalness.predict(np.array(x))
        for i, prob in zip(have, p):
            if prob >= st.unnatural_threshold:
                rows[i] = _reject(rows[i], "naturalness", "unnatural",
                                  {"p_unnatural": round(float(prob), 4), "colour_count": rows[i]["colour_count"],
                                   "flat_share": rows[i]["flat_share"], "edge_density": rows[i]["edge_density"]})
            else:
                rows[i]["p_unnatural"] = round(float(prob), 4)
    return rows


def stage_text(rows: list, st: _State) -> list:
    out = []
    for row in rows:
        if row.get("_reject"):
            out.append(row)
            continue
        best, values = texts.select_text(row)
        if best is None:
            out.append(_reject(row, "text", "no_usable_text", values))
            continue
        row["text"], row["text_source"], row["text_score"] = best["text"], best["source"], best["score"]
        out.append(row)
    return out


def stage_language(rows: list, st: _State) -> list:
    out = []
    for row in rows:
        if row.get("_reject"):
            out.append(row)
            continue
        ok, values = st.language(row["text"])
        out.append(row if ok else _reject(row, "language", "not_english", {**values, "hint": row.get("lang_hint")}))
    return out


def stage_text_rules(rows: list, st: _State) -> list:
    live = [i for i, r in enumerate(rows) if not r.get("_reject")]
    verdicts = st.rules.check([rows[i]["text"] for i in live])
    for i, verdict in zip(live, verdicts):
        if verdict is not None:
            rows[i] = _reject(rows[i], "text_rules", verdict[0], verdict[1])
    return rows


def stage_semantic(rows: list, st: _State) -> list:
    live = [i for i, r in enumerate(rows) if not r.get("_reject")]
    if st.features is None:
        for i in live:  # without features the score is the text selection's, scaled to 0..1
            rows[i]["score"] = round(rows[i]["text_score"] / 4.0, 4)
        return rows
    from vlp.builders.web_filter.scorer import semantic_features

    x = [semantic_features(rows[i]["text"], _record(rows[i], st)) for i in live]
    if x:
        p = st.scorer.semantic.predict(np.array(x))
        for i, prob in zip(live, p):
            rows[i]["score"] = round(float(prob), 4)
            if st.config.keep_fraction is None and prob < st.min_score:
                rows[i] = _reject(rows[i], "semantic", "low_score",
                                  {"score": round(float(prob), 4), "min_score": st.min_score})
    return rows


_FUNCTIONS = {"image": stage_image, "naturalness": stage_naturalness, "text": stage_text,
              "language": stage_language, "text_rules": stage_text_rules, "semantic": stage_semantic}


def run_stage(name: str, rows: list, config: FilterConfig) -> list:
    return _FUNCTIONS[name](rows, state_of(config))


def run_all(rows: list, config: FilterConfig) -> list:
    for name in STAGES:
        rows = run_stage(name, rows, config)
    return rows


SURVIVOR_FIELDS = ("_i", "key", "shard", "url", "text", "text_source", "image_id", "sha256", "phash", "score", "width",
                   "height", "p_unnatural", "_thumb_src")


def split_results(rows: list) -> tuple[list, list]:
    """(survivors, rejections) of processed rows, in input order, thumbnails only on the
    first :data:`THUMBS_PER_REASON` of each (stage, reason) / of the survivors."""
    rows = sorted(rows, key=lambda r: r.get("_i", 0))
    seen: dict = {}
    survivors, rejected = [], []
    for row in rows:
        bucket = (row["stage"], row["reason"]) if row.get("_reject") else ("kept", "")
        thumb = row.pop("_thumb_src", None)
        seen[bucket] = seen.get(bucket, 0) + 1
        if row.get("_reject"):
            entry = {k: row[k] for k in ("key", "shard", "stage", "reason", "values", "_i") if k in row}
            for k in ("url", "text"):
                if row.get(k):
                    entry[k] = row[k]
            if thumb and seen[bucket] <= THUMBS_PER_REASON:
                entry["thumb"] = thumb
            rejected.append(entry)
        else:
            entry = {k: row.get(k) for k in SURVIVOR_FIELDS if k != "_thumb_src"}
            entry["norm"] = texts.normalize(row["text"])
            if thumb and seen[bucket] <= THUMBS_PER_REASON:
                entry["thumb"] = thumb
            survivors.append(entry)
    return survivors, rejected
