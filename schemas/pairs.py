"""Pair stores: what ``vlp-build`` writes and the trainer reads.

A pair is one image (two for NLVR2) with one text and kind-specific columns. A pair store
is a directory of Arrow IPC shards holding pairs of ONE kind::

    manifest.json        format "vlp-pairs", schema_version, kind, columns, num_pairs,
                         sources, builder stats, shards [{name, records, bytes, sha256}]
    pairs-00000.arrow    finished shards (memory-mapped by readers: zero-copy columns)
    pairs-00001.arrow.partial   a shard being written; never read

A store is built in ``DIR.partial`` beside its final folder and renamed into place once
complete, so a failed build leaves nothing at ``DIR``.

Columns: the common ones (``pair_id``, ``image_id``, ``text``, ``kind``, ``source``,
``split``), those of the kind (:data:`KIND_COLUMNS`) and, for any kind, the optional
``topics`` column (W ∩ L, see :mod:`vlp.schemas.labels`). ``pair_id`` is unique within a
store. Pairs are addressed by row number (0 .. len-1) in shard order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa

from vlp import __version__
from vlp.schemas.errors import SchemaError, StoreError
from vlp.core.durable import atomic_path, atomic_write_json, fsync_dir
from vlp.schemas.manifest import MANIFEST_NAME, now_iso, read_manifest
from vlp.schemas.shards import PARTIAL_SUFFIX, ShardInfo, sha256_file

log = logging.getLogger(__name__)

PAIRS_FORMAT = "vlp-pairs"
PAIRS_SCHEMA_VERSION = 1
SUFFIX = ".arrow"
#: pairs per shard unless told otherwise
PAIR_SHARD_SIZE = 100_000

_STR, _I32, _F32 = pa.string(), pa.int32(), pa.float32()

COMMON_COLUMNS = {"pair_id": _STR, "image_id": _STR, "text": _STR, "kind": _STR, "source": _STR, "split": _STR}

#: Columns each kind adds to the common ones.
KIND_COLUMNS = {
    # url: where a web caption's image came from (CC, SBU, img2dataset); empty for COCO-style data.
    "caption": {"url": _STR},
    # LAMP: one word per label token; word_regions[i] = the region (row in the feature record) of words[i].
    "objects_labels": {"words": pa.list_(_STR), "word_regions": pa.list_(_I32)},
    # MSP token stage / IFRS: one category label per region, in region order.
    "labels_in_order": {"labels": pa.list_(_STR), "label_ids": pa.list_(_I32)},
    # MSP phrase stage: verb-free VG region phrases of one image joined with commas.
    "vg_phrases": {"num_phrases": _I32, "num_dropped": _I32},
    "web": {"url": _STR, "score": _F32},
    "generated": {"score": _F32, "generator": _STR},
    # VQA v2 / GQA: answers with soft scores (VQA: min(1, count / 3) per normalized answer).
    "question": {"question_id": _STR, "answers": pa.list_(_STR), "answer_scores": pa.list_(_F32),
                 "answer_type": _STR, "question_type": _STR},
    # NLVR2: a statement about two images; label 1 = true.
    "nlvr2": {"image_id_2": _STR, "label": _I32},
    # SNLI-VE: hypothesis text about the image premise; label entailment / neutral / contradiction.
    "entailment": {"label": _STR},
    # ITM_HS: for each query image, the most similar other images (text is empty).
    "hard_negatives": {"negatives": pa.list_(_STR), "negative_scores": pa.list_(_F32)},
    # MM-IMDB: multi-label classification of an image + text (the plot); labels = the genres.
    "multilabel": {"labels": pa.list_(_STR)},
    # RefCOCO / RefCOCO+ / RefCOCOg: one referring expression (text) of one annotated object;
    # target_box = its box x1, y1, x2, y2 in original-image pixels, image_w/image_h the image's size.
    "refexp": {"ref_id": _STR, "ann_id": _STR, "target_box": pa.list_(_F32), "category": _STR,
               "image_w": _I32, "image_h": _I32},
    # VCR: a question (text = plain question), its four answers and four rationales as word lists in
    # which each object reference became its label words linked to the region (-1: no region), as
    # objects_labels' words/word_regions; labels = the right choice (0..3), -1 when unknown (test).
    "vcr": {"annot_id": _STR, "question_words": pa.list_(_STR), "question_regions": pa.list_(_I32),
            "answer_words": pa.list_(pa.list_(_STR)), "answer_regions": pa.list_(pa.list_(_I32)),
            "rationale_words": pa.list_(pa.list_(_STR)), "rationale_regions": pa.list_(pa.list_(_I32)),
            "answer_label": _I32, "rationale_label": _I32, "objects": pa.list_(_STR)},
}
#: Columns any kind may add. human_answers (question pairs of VQA v2 / VizWiz): the annotators'
#: raw answers exactly as in the file (10 each), for the official VQA accuracy.
OPTIONAL_COLUMNS = {"topics": pa.list_(_STR), "human_answers": pa.list_(_STR)}
ENTAILMENT_LABELS = ("entailment", "neutral", "contradiction")


def pair_schema(kind: str, optional: Iterable[str] = ()) -> pa.Schema:
    if kind not in KIND_COLUMNS:
        raise SchemaError(f"unknown pair kind {kind!r}; known: {', '.join(sorted(KIND_COLUMNS))}")
    fields = [pa.field(name, dtype, nullable=False) for name, dtype in COMMON_COLUMNS.items()]
    fields += [pa.field(name, dtype, nullable=True) for name, dtype in KIND_COLUMNS[kind].items()]
    for name in optional:
        if name not in OPTIONAL_COLUMNS:
            raise SchemaError(f"unknown optional pair column {name!r}; known: {', '.join(OPTIONAL_COLUMNS)}")
        fields.append(pa.field(name, OPTIONAL_COLUMNS[name], nullable=True))
    return pa.schema(fields)


def validate_pair(pair: dict, kind: str, optional: tuple = ()) -> dict:
    """Check one pair dict against the kind's columns; returns it with defaults filled.

    Raises SchemaError naming the pair and the field.
    """
    where = f"pair {pair.get('pair_id')!r}"
    out = {}
    for name in COMMON_COLUMNS:
        value = pair.get(name, "" if name in ("text", "split", "source") else None)
        if name == "kind":
            value = pair.get("kind", kind)
            if value != kind:
                raise SchemaError(f"{where}: kind {value!r} in a store of kind {kind!r}")
        if not isinstance(value, str):
            raise SchemaError(f"{where}: {name} must be a string, got {type(value).__name__}")
        if name in ("pair_id", "image_id") and not value:
            raise SchemaError(f"{where}: {name} is empty")
        out[name] = value
    columns = {**KIND_COLUMNS[kind], **{k: OPTIONAL_COLUMNS[k] for k in optional}}
    unknown = set(pair) - set(COMMON_COLUMNS) - set(columns)
    if unknown:
        raise SchemaError(f"{where}: unknown column(s) {', '.join(sorted(unknown))} for kind {kind!r}")
    for name, dtype in columns.items():
        value = pair.get(name)
        if value is not None:
            if pa.types.is_list(dtype):
                if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
                    raise SchemaError(f"{where}: {name} must be a list")
                value = list(value.tolist() if isinstance(value, np.ndarray) else value)
            elif dtype == _STR and not isinstance(value, str):
                raise SchemaError(f"{where}: {name} must be a string")
            elif dtype in (_I32, _F32) and not isinstance(value, (int, float, np.integer, np.floating)):
                raise SchemaError(f"{where}: {name} must be a number")
        out[name] = value
    if kind == "objects_labels" and out.get("words") is not None:
        if len(out["words"]) != len(out.get("word_regions") or []):
            raise SchemaError(f"{where}: words and word_regions differ in length")
    if kind == "labels_in_order" and out.get("labels") is not None:
        if len(out["labels"]) != len(out.get("label_ids") or []):
            raise SchemaError(f"{where}: labels and label_ids differ in length")
    if kind == "question" and out.get("answers") is not None:
        if len(out["answers"]) != len(out.get("answer_scores") or []):
            raise SchemaError(f"{where}: answers and answer_scores differ in length")
    if kind == "hard_negatives" and out.get("negatives") is not None:
        if len(out["negatives"]) != len(out.get("negative_scores") or []):
            raise SchemaError(f"{where}: negatives and negative_scores differ in length")
    if kind == "refexp" and (out.get("target_box") is None or len(out["target_box"]) != 4):
        raise SchemaError(f"{where}: target_box must be four numbers x1, y1, x2, y2")
    if kind == "vcr":
        _check_vcr(out, where)
    if kind == "entailment" and out.get("label") not in ENTAILMENT_LABELS:
        raise SchemaError(f"{where}: label must be one of {', '.join(ENTAILMENT_LABELS)}, got {out.get('label')!r}")
    if kind == "nlvr2" and not out.get("image_id_2"):
        raise SchemaError(f"{where}: image_id_2 is empty")
    return out


VCR_CHOICES = 4


def _check_vcr(out: dict, where: str) -> None:
    """VCR pairs: the question's words and regions align; four answers and four rationales,
    each a word list with an aligned region list; labels 0..3 or -1 (unknown)."""
    if len(out.get("question_words") or []) != len(out.get("question_regions") or []):
        raise SchemaError(f"{where}: question_words and question_regions differ in length")
    for name in ("answer", "rationale"):
        words, regions = out.get(f"{name}_words"), out.get(f"{name}_regions")
        if words is None or regions is None or len(words) != VCR_CHOICES or len(regions) != VCR_CHOICES:
            raise SchemaError(f"{where}: {name}_words and {name}_regions must each hold {VCR_CHOICES} lists")
        for k, (w, r) in enumerate(zip(words, regions)):
            if isinstance(w, (str, bytes)) or isinstance(r, (str, bytes)) or len(list(w)) != len(list(r)):
                raise SchemaError(f"{where}: {name} {k}: words and regions differ in length")
        out[f"{name}_words"] = [[str(x) for x in w] for w in words]
        out[f"{name}_regions"] = [[int(x) for x in r] for r in regions]
        label = out.get(f"{name}_label")
        if label is None:
            out[f"{name}_label"] = -1
        elif not -1 <= int(label) < VCR_CHOICES:
            raise SchemaError(f"{where}: {name}_label must be 0..{VCR_CHOICES - 1} (or -1: unknown), got {label!r}")

class PairStoreWriter:
    """Writes pairs of one kind into shards of ``shard_size`` pairs and keeps the manifest current.

    The store is built in a sibling folder ``ROOT.partial`` and renamed to ``ROOT`` only
    when it is complete, so a failed or killed build never leaves a half store at ``ROOT``
    (a later build removes a stale ``ROOT.partial``). ``mode``: "create" refuses a
    complete pair store already at ``ROOT`` (an incomplete one, left by an older vlp, is
    replaced); "overwrite" replaces a pair store. A folder holding anything else is never
    replaced. Use as a context manager: a clean exit publishes the store; an exception
    removes the partial one. :meth:`close` with ``publish=False`` finishes the store but
    leaves it at :attr:`path` for a last look (``publish()`` then moves it into place).
    """

    def __init__(self, root, kind: str, *, shard_size: int = PAIR_SHARD_SIZE, mode: str = "create",
                 optional: Iterable[str] = (), sources: Optional[list] = None, batch_rows: int = 4096):
        if mode not in ("create", "overwrite"):
            raise ValueError(f"mode must be create or overwrite, got {mode!r}")
        if shard_size < 1:
            raise ValueError("shard_size must be at least 1")
        self.root, self.kind = Path(root), kind
        self.optional = tuple(optional)
        self.schema = pair_schema(kind, self.optional)
        self.shard_size, self.batch_rows = shard_size, batch_rows
        self.sources = list(sources or [])
        self.stats: dict = {}
        _check_target(self.root, mode)
        #: Where the store is written until it is published.
        self.path = partial_folder(self.root)
        if self.path.exists():
            shutil.rmtree(self.path)  # left by a killed build
        self.path.mkdir(parents=True)
        self.shards: list[ShardInfo] = []
        self.num_pairs = 0
        self._ids: set = set()
        self._rows: list[dict] = []
        self._shard_rows = 0
        self._writer = None
        self._sink = None
        self._partial: Optional[Path] = None
        self._closed = False
        self._published = False
        self._write_manifest(complete=False)

    def add(self, pair: dict) -> None:
        """Validate and append one pair; raises SchemaError/StoreError (writing nothing) on bad input."""
        row = validate_pair(pair, self.kind, self.optional)
        if row["pair_id"] in self._ids:
            raise StoreError(f"{self.root}: pair_id {row['pair_id']!r} is already in the store")
        self._ids.add(row["pair_id"])
        self._rows.append(row)
        if len(self._rows) >= self.batch_rows:
            self._flush()
        if self._shard_rows + len(self._rows) >= self.shard_size:
            self._flush()
            self._finish_shard()

    def add_many(self, pairs: Iterable[dict]) -> None:
        for pair in pairs:
            self.add(pair)

    def _flush(self) -> None:
        if not self._rows:
            return
        if self._writer is None:
            name = f"pairs-{len(self.shards):05d}{SUFFIX}"
            self._partial = self.path / (name + PARTIAL_SUFFIX)
            self._sink = pa.OSFile(str(self._partial), "wb")
            self._writer = pa.ipc.new_file(self._sink, self.schema)
        columns = {name: [row.get(name) for row in self._rows] for name in self.schema.names}
        self._writer.write_batch(pa.RecordBatch.from_pydict(columns, schema=self.schema))
        self._shard_rows += len(self._rows)
        self._rows = []

    def _finish_shard(self) -> None:
        self._flush()
        if self._writer is None:
            return
        self._writer.close()
        self._sink.close()
        final = self._partial.with_name(self._partial.name[: -len(PARTIAL_SUFFIX)])
        with atomic_path(final) as tmp:
            os.rename(self._partial, tmp)
        self.shards.append(ShardInfo(final.name, self._shard_rows, final.stat().st_size, sha256_file(final)))
        self.num_pairs += self._shard_rows
        self._writer = self._sink = self._partial = None
        self._shard_rows = 0
        self._write_manifest(complete=False)

    def _write_manifest(self, complete: bool) -> None:
        atomic_write_json(self.path / MANIFEST_NAME, {
            "format": PAIRS_FORMAT, "schema_version": PAIRS_SCHEMA_VERSION, "kind": self.kind,
            "complete": complete, "columns": {f.name: str(f.type) for f in self.schema},
            "num_pairs": self.num_pairs, "sources": self.sources, "stats": self.stats,
            "vlp_version": __version__, "updated": now_iso(),
            "shards": [s.manifest_entry() for s in self.shards]})

    def close(self, complete: bool = True, publish: bool = True) -> None:
        """Finish the last shard and write the manifest; ``publish``: move the store to ROOT."""
        if not self._closed:
            self._finish_shard()
            self._write_manifest(complete=complete)
            self._closed = True
        if publish:
            self.publish()

    def rewrite_manifest(self) -> None:
        """Write the manifest again (with changed ``stats``) before :meth:`publish`."""
        if self._published:
            raise StoreError(f"{self.root}: already published")
        self._write_manifest(complete=True)

    def publish(self) -> None:
        """Move the finished store from ``ROOT.partial`` to ``ROOT`` (replacing what
        :func:`_check_target` allowed at ROOT)."""
        if self._published:
            return
        if not self._closed:
            raise StoreError(f"{self.root}: close the writer before publishing")
        old = None
        if self.root.exists():
            old = self.root.with_name(self.root.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.rename(self.root, old)
        os.rename(self.path, self.root)
        fsync_dir(self.root.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.path = self.root
        self._published = True

    def abort(self) -> None:
        """Give up: nothing is left of this build (ROOT is untouched)."""
        if self._published:
            return
        self._rows = []
        if self._writer is not None:
            try:
                self._writer.close()
                self._sink.close()
            except (OSError, pa.ArrowException):
                pass
            self._writer = None
        self._closed = True
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def partial_folder(root) -> Path:
    """The folder a pair store at ``root`` is built in: ``ROOT.partial`` beside it."""
    root = Path(root)
    if not root.name:  # "." or "dir/.."
        root = root.resolve()
    return root.with_name(root.name + PARTIAL_SUFFIX)


#: Files a pair-store folder may hold besides shards (a folder with only these is replaceable).
_STORE_FILES = (MANIFEST_NAME, "errors.jsonl", "answer_vocab.json")


def _check_target(root: Path, mode: str) -> None:
    """Refuse to replace what must not be replaced at ``root``."""
    if not root.exists():
        return
    if not root.is_dir():
        raise StoreError(f"{root}: exists and is not a folder; choose another --out")
    manifest_path = root / MANIFEST_NAME
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_bytes())
        except (ValueError, OSError):
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("format") != PAIRS_FORMAT:
            raise StoreError(f"{root}: holds something other than a pair store ({manifest_path} is not a "
                             f"{PAIRS_FORMAT} manifest); choose another --out")
        if manifest.get("complete") and mode == "create":
            raise StoreError(f"{root}: already holds a pair store; use --overwrite to replace it")
        return  # an incomplete pair store (a build that did not finish) or overwrite
    others = [p.name for p in root.iterdir()
              if p.name not in _STORE_FILES and not p.name.startswith("pairs-")]
    if others:
        raise StoreError(f"{root}: not empty and not a pair store (holds {', '.join(sorted(others)[:3])}"
                         f"{' ...' if len(others) > 3 else ''}); choose another --out")


class PairStore:
    """Read access to a pair store: ``len``, ``store[i]`` (a dict), iteration, columns.

    Shards are memory-mapped lazily in each process; the object pickles as its path, so
    it can go to DataLoader workers.
    """

    def __init__(self, root):
        self.root = Path(root)
        self.manifest = read_manifest(self.root, PAIRS_FORMAT, (PAIRS_SCHEMA_VERSION,))
        self.kind = self.manifest["kind"]
        if self.kind not in KIND_COLUMNS:
            raise StoreError(f"{self.root / MANIFEST_NAME}: unknown pair kind {self.kind!r}")
        if not self.manifest.get("complete"):
            log.warning("%s: the pair store is incomplete (its build did not finish)", self.root)
        counts = [int(s["records"]) for s in self.manifest["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._tables: dict[int, pa.Table] = {}

    def __getstate__(self):
        return {"root": str(self.root)}

    def __setstate__(self, state):
        self.__init__(state["root"])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def columns(self) -> list[str]:
        return list(self.manifest["columns"])

    def _table(self, shard_no: int) -> pa.Table:
        table = self._tables.get(shard_no)
        if table is None:
            entry = self.manifest["shards"][shard_no]
            path = self.root / entry["name"]
            try:
                source = pa.memory_map(str(path), "r")
                table = pa.ipc.open_file(source).read_all()
            except (OSError, pa.ArrowInvalid) as exc:
                raise StoreError(f"{path}: cannot read pair shard ({exc})") from None
            if table.num_rows != int(entry["records"]):
                raise StoreError(f"{path}: {table.num_rows} rows, the manifest says {entry['records']}")
            self._tables[shard_no] = table
        return table

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} out of range (store holds {len(self)})")
        shard_no = int(np.searchsorted(self._starts, index, side="right") - 1)
        table = self._table(shard_no)
        row = index - int(self._starts[shard_no])
        return {name: table.column(name)[row].as_py() for name in table.column_names}

    def shard_tables(self) -> Iterator[pa.Table]:
        for shard_no in range(len(self.manifest["shards"])):
            yield self._table(shard_no)

    def column(self, name: str) -> list:
        """One column of every pair, as Python values (small columns: ids, texts)."""
        values: list = []
        for table in self.shard_tables():
            values.extend(table.column(name).to_pylist())
        return values

    def __iter__(self) -> Iterator[dict]:
        for table in self.shard_tables():
            yield from table.to_pylist()

    def image_ids(self) -> set:
        ids = set(self.column("image_id"))
        if self.kind == "nlvr2":
            ids |= set(self.column("image_id_2"))
        return ids

    def __repr__(self) -> str:
        return f"PairStore({str(self.root)!r}, {len(self)} pairs, kind {self.kind})"


@dataclasses.dataclass
class JoinReport:
    """How a pair store meets a feature store: which pairs have no features for their image."""

    pairs: int
    pairs_missing_images: int
    missing_image_ids: list  # sorted, distinct

    def summary(self) -> str:
        if not self.pairs_missing_images:
            return f"all {self.pairs} pairs have features"
        shown = ", ".join(self.missing_image_ids[:5]) + (" ..." if len(self.missing_image_ids) > 5 else "")
        return (f"{self.pairs_missing_images} of {self.pairs} pairs have no features "
                f"({len(self.missing_image_ids)} image ids missing from the feature store: {shown})")


def join_report(pairs: PairStore, features) -> JoinReport:
    """Check every pair's image(s) against ``features`` (a FeatureStore or a set of ids)."""
    ids = pairs.column("image_id")
    second = pairs.column("image_id_2") if pairs.kind == "nlvr2" else [None] * len(ids)
    missing: set = set()
    bad_pairs = 0
    for first, other in zip(ids, second):
        lacking = [i for i in (first, other) if i is not None and i not in features]
        if lacking:
            bad_pairs += 1
            missing.update(lacking)
    return JoinReport(len(ids), bad_pairs, sorted(missing))


def joined(pairs: PairStore, features, *, on_missing: str = "skip") -> Iterator[tuple[dict, list]]:
    """Yield ``(pair, [FeatureRecord, ...])`` (one record, two for nlvr2).

    on_missing: "skip" (log a count at the end) or "error" (StoreError naming the pair).
    """
    if on_missing not in ("skip", "error"):
        raise ValueError("on_missing must be skip or error")
    skipped = 0
    for pair in pairs:
        wanted = [pair["image_id"]] + ([pair["image_id_2"]] if pairs.kind == "nlvr2" else [])
        if any(i not in features for i in wanted):
            if on_missing == "error":
                raise StoreError(f"pair {pair['pair_id']!r}: image {wanted} has no features in {features}")
            skipped += 1
            continue
        yield pair, [features.get(i) for i in wanted]
    if skipped:
        log.warning("%s: %d pair(s) skipped: their image has no features", pairs.root, skipped)


@dataclasses.dataclass
class PairVerifyReport:
    """What :func:`verify_pairs` found; ``ok`` when no error (warnings do not count)."""

    root: str
    pairs_checked: int = 0
    errors: list = dataclasses.field(default_factory=list)
    warnings: list = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        head = f"{self.root}: {self.pairs_checked} pairs checked, {len(self.errors)} error(s)"
        return "\n".join([head] + [f"error: {e}" for e in self.errors] + [f"warning: {w}" for w in self.warnings])


def verify_pairs(root) -> PairVerifyReport:
    """Check a pair store against its manifest: every shard's sha256 and size, row counts,
    the schema of each shard, ``num_pairs`` and that ``pair_id`` is unique in the store.

    Never raises for a damaged store: every problem becomes a line in ``errors``.
    """
    root = Path(root)
    report = PairVerifyReport(str(root))
    try:
        manifest = read_manifest(root, PAIRS_FORMAT, (PAIRS_SCHEMA_VERSION,))
    except StoreError as exc:
        report.errors.append(str(exc))
        return report
    kind = manifest.get("kind")
    if kind not in KIND_COLUMNS:
        report.errors.append(f"{root / MANIFEST_NAME}: unknown pair kind {kind!r}")
        return report
    if not manifest.get("complete"):
        report.warnings.append(f"{root}: the store is incomplete (its build did not finish)")
    listed = {s["name"] for s in manifest["shards"]}
    for stray in sorted(p.name for p in root.glob(f"pairs-*{SUFFIX}*") if p.name not in listed):
        report.warnings.append(f"{root / stray}: not listed in the manifest (ignored by readers)")
    seen: set = set()
    duplicates = 0
    total = 0
    for entry in manifest["shards"]:
        path = root / entry["name"]
        if not path.is_file():
            report.errors.append(f"{path}: listed in the manifest but missing")
            continue
        if path.stat().st_size != int(entry.get("bytes", -1)):
            report.errors.append(f"{path}: {path.stat().st_size} bytes, the manifest says {entry.get('bytes')}")
        digest = sha256_file(path)
        if digest != entry.get("sha256"):
            report.errors.append(f"{path}: sha256 {digest[:12]}... differs from the manifest's "
                                 f"{str(entry.get('sha256'))[:12]}...")
            continue
        try:
            table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        except (OSError, pa.ArrowInvalid) as exc:
            report.errors.append(f"{path}: cannot read ({exc})")
            continue
        if table.num_rows != int(entry["records"]):
            report.errors.append(f"{path}: {table.num_rows} rows, the manifest says {entry['records']}")
        missing = [name for name in list(COMMON_COLUMNS) + list(KIND_COLUMNS[kind]) if name not in table.column_names]
        if missing:
            report.errors.append(f"{path}: column(s) {', '.join(missing)} missing for kind {kind!r}")
            continue
        for pair_id in table.column("pair_id").to_pylist():
            if pair_id in seen:
                duplicates += 1
                if duplicates <= 5:
                    report.errors.append(f"{path}: pair_id {pair_id!r} occurs more than once")
            seen.add(pair_id)
        total += table.num_rows
    if duplicates > 5:
        report.errors.append(f"{root}: {duplicates} duplicate pair_ids in all")
    if total != int(manifest.get("num_pairs", -1)) and not report.errors:
        report.errors.append(f"{root / MANIFEST_NAME}: num_pairs {manifest.get('num_pairs')} but the shards "
                             f"hold {total} pairs")
    report.pairs_checked = total
    return report


# --------------------------------------------------------------------------- vlp inspect on a pair store

_WORD = None


def text_words(text: str) -> list[str]:
    """Words as a BERT-style basic tokenizer sees them: lower case, punctuation split off."""
    import re

    global _WORD
    if _WORD is None:
        _WORD = re.compile(r"[^\W_]+|[^\w\s]")
    return _WORD.findall(text.lower())


def read_vocab_words(path) -> set:
    """Whole-word entries of a BERT-style ``vocab.txt`` (one token per line; ``##`` pieces and
    ``[SPECIAL]`` tokens left out)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SchemaError(f"{path}: not a readable UTF-8 vocab.txt ({exc})") from None
    words = {line.strip() for line in lines if line.strip() and not line.startswith("##")
             and not (line.startswith("[") and line.rstrip().endswith("]"))}
    if not words:
        raise SchemaError(f"{path}: no words (expected a BERT-style vocab.txt, one token per line)")
    return words


def describe_pairs(root, *, vocab=None, rows: int = 3, top: int = 10, image_id: Optional[str] = None) -> dict:
    """What ``vlp inspect`` reports on a pair store: kind, counts per split, text length in
    words (mean, percentiles), vocabulary coverage (share of words in ``vocab``, a BERT-style
    vocab.txt, when given; else distinct words and the most frequent), a few rows (those
    of ``image_id`` when given) and :func:`verify_pairs`."""
    from collections import Counter

    store = PairStore(root)
    check = verify_pairs(root)
    splits, lengths, words = Counter(), [], Counter()
    if check.ok:  # a damaged store gets its errors listed, not figures read from broken shards
        splits = Counter(store.column("split"))
        for text in store.column("text"):
            lengths.append(len(text.split()))
            words.update(text_words(text))
    total_words = sum(words.values())
    length = {"mean": 0.0, "p50": 0, "p90": 0, "p99": 0, "max": 0}
    if lengths:
        values = np.array(lengths)
        length = {"mean": round(float(values.mean()), 2),
                  **{f"p{q}": int(np.percentile(values, q, method="nearest")) for q in (50, 90, 99)},
                  "max": int(values.max()), "empty": int((values == 0).sum())}
    vocabulary = {"words": total_words, "distinct_words": len(words),
                  "top_words": [[w, c] for w, c in words.most_common(top)]}
    if vocab is not None:
        known = read_vocab_words(vocab)
        missing = Counter({w: c for w, c in words.items() if w not in known})
        vocabulary.update({
            "vocab": str(vocab), "vocab_words": len(known),
            "word_coverage": round(1 - sum(missing.values()) / total_words, 4) if total_words else None,
            "distinct_word_coverage": round(1 - len(missing) / len(words), 4) if words else None,
            "top_words_not_in_vocab": [[w, c] for w, c in missing.most_common(top)]})
    if not check.ok:
        shown = []
    elif image_id is not None:
        shown = [p for p in store if p["image_id"] == image_id or p.get("image_id_2") == image_id][:max(rows, top)]
    else:
        shown = [store[i] for i in range(min(rows, len(store)))]
    return {"store": str(root), "format": PAIRS_FORMAT, "kind": store.kind,
            "complete": bool(store.manifest.get("complete")), "num_pairs": len(store),
            "shards": len(store.manifest["shards"]),
            "bytes": sum(int(s.get("bytes", 0)) for s in store.manifest["shards"]),
            "sources": store.manifest.get("sources", []), "stats": store.manifest.get("stats", {}),
            "splits": {name: splits[name] for name in sorted(splits)}, "text_words": length,
            "vocabulary": vocabulary, "rows": shown, "image_id": image_id,
            "ok": check.ok, "errors": check.errors, "warnings": check.warnings}


def describe_pairs_lines(report: dict) -> list[str]:
    """:func:`describe_pairs` for people."""
    def cut(value, width=70):
        text = value if isinstance(value, str) else repr(value)
        return text if len(text) <= width else text[: width - 3] + "..."

    splits = ", ".join(f"{name or '(none)'} {count}" for name, count in report["splits"].items()) or "-"
    length = report["text_words"]
    vocab = report["vocabulary"]
    lines = [f"store        {report['store']}",
             f"format       {report['format']}, kind {report['kind']}, "
             f"{'complete' if report['complete'] else 'INCOMPLETE'}",
             f"pairs        {report['num_pairs']} in {report['shards']} shard(s), "
             f"{report['bytes'] / 1e6:.1f} MB on disk",
             f"splits       {splits}",
             f"text words   mean {length['mean']}, median {length['p50']}, p90 {length['p90']}, "
             f"p99 {length['p99']}, max {length['max']}" + (f", {length['empty']} empty" if length.get("empty")
                                                            else "")]
    if "vocab" in vocab:
        share = lambda value: "-" if value is None else f"{100 * value:.1f}%"
        lines.append(f"vocabulary   {vocab['distinct_words']} distinct words; in {vocab['vocab']}: "
                     f"{share(vocab['word_coverage'])} of words, {share(vocab['distinct_word_coverage'])} "
                     "of distinct words")
        if vocab["top_words_not_in_vocab"]:
            lines.append("not in vocab " + ", ".join(f"{w} {c}" for w, c in vocab["top_words_not_in_vocab"]))
    else:
        lines.append(f"vocabulary   {vocab['distinct_words']} distinct words of {vocab['words']} "
                     "(--vocab vocab.txt for coverage)")
    if vocab["top_words"]:
        lines.append("top words    " + ", ".join(f"{w} {c}" for w, c in vocab["top_words"]))
    title = f"pairs of {report['image_id']}" if report["image_id"] is not None else "first pairs"
    lines.append(f"{title}:" if report["rows"] else f"{title}: none")
    for pair in report["rows"]:
        extra = {k: v for k, v in pair.items()
                 if k not in ("pair_id", "image_id", "text", "kind", "split", "source") and v is not None}
        lines.append(f"  {pair['pair_id']}  image {pair['image_id']}  split {pair['split'] or '(none)'}")
        if pair["text"]:
            lines.append(f"    text: {cut(pair['text'])}")
        for key, value in extra.items():
            lines.append(f"    {key}: {cut(value)}")
    lines += [f"error: {e}" for e in report["errors"]] + [f"warning: {w}" for w in report["warnings"]]
    lines.append(f"checked      {report['num_pairs']} pair(s): " + ("OK" if report["ok"] else
                                                                   f"{len(report['errors'])} error(s)"))
    return lines
