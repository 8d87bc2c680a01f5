"""Import the region features researchers already have into a vlp feature store.

Two sources:

- BUTD / LXMERT TSV files (streamed line by line, so files of tens of GB never sit in
  memory). The 10-column LXMERT layout is
  ``img_id img_h img_w objects_id objects_conf attrs_id attrs_conf num_boxes boxes features``
  (ids base64 int64, everything else base64 float32); the 6-column BUTD layout
  (generate_tsv.py) is ``image_id image_w image_h num_boxes boxes features``.
  Note the two disagree on the order of width and height.
- Pickled-dict LMDB environments in the VOLTA / ViLBERT / MMF layout (values are
  pickled dicts whose arrays are base64 strings or numpy arrays). Pickles can run
  code, so this needs ``trust_pickle=True``; even then values are read with the
  restricted unpickler, which only rebuilds arrays, dicts, lists, strings, numbers.
- MMF's per-image folders (``<id>.npy`` features + ``<id>_info.npy`` dict), the same way
  (``import_mmf_npy``: the info dicts are pickles).

A bad row becomes an ``ImportIssue`` naming ``file:line`` (or the LMDB key) and the
reason. With ``on_error="stop"`` the first one aborts the import (finished shards are
kept, the store is marked incomplete); with ``"skip"`` each is written to
``errors.jsonl`` in the output directory and the import goes on.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from vlp.core.errors_log import ERRORS_NAME, ErrorLog
from vlp.schemas import FeatureRecord, FeatureStoreWriter, SchemaError, StoreError
from vlp.schemas.record import NUM_CLS_PROB
from vlp.schemas.store import FEATURE_SHARD_SIZE

log = logging.getLogger(__name__)

LXMERT_COLUMNS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id",
                  "attrs_conf", "num_boxes", "boxes", "features")
BUTD_COLUMNS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
TSV_LAYOUTS = {"lxmert": LXMERT_COLUMNS, "butd": BUTD_COLUMNS}
# dtype of each base64 array column in the field's exporters
SOURCE_DTYPES = {
    "boxes": np.float32, "features": np.float32, "objects_id": np.int64,
    "objects_conf": np.float32, "attrs_id": np.int64, "attrs_conf": np.float32,
    "cls_prob": np.float32,
}
# Names used for the same field by the public layouts, first one is ours.
FIELD_ALIASES = {
    "image_id": ("image_id", "img_id"),
    "image_w": ("image_w", "img_w", "image_width"),
    "image_h": ("image_h", "img_h", "image_height"),
}


class ImportIssue(Exception):
    """One unusable source row; ``where`` is ``file:line`` or ``file[key]``."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


@dataclasses.dataclass
class ImportStats:
    records: int = 0
    skipped: int = 0
    errors_file: Optional[Path] = None

    def summary(self) -> str:
        text = f"imported {self.records} record(s)"
        if self.skipped:
            text += f"; skipped {self.skipped} bad row(s), listed in {self.errors_file}"
        return text


def decode_array(value, name: str, count: int, feature_dim: Optional[int] = None) -> np.ndarray:
    """A field value (base64 text/bytes or array) as a numpy array of ``count`` rows."""
    if isinstance(value, np.ndarray):
        array = value
    else:
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise ValueError(f"column {name} is not valid base64") from None
        dtype = np.dtype(SOURCE_DTYPES[name])
        if len(raw) % dtype.itemsize:
            raise ValueError(f"column {name} has {len(raw)} bytes, not a multiple of "
                             f"{dtype.itemsize} ({dtype})")
        array = np.frombuffer(raw, dtype=dtype)
    if name in ("boxes", "features", "cls_prob"):
        if array.size % max(count, 1) or (count == 0 and array.size):
            raise ValueError(f"column {name} holds {array.size} values, not a multiple of "
                             f"num_boxes={count}")
        width = array.size // count if count else 0
        if name == "boxes" and width != 4:
            raise ValueError(f"column boxes has {width} values per box, expected 4")
        if name == "features" and feature_dim is not None and width != feature_dim:
            raise ValueError(f"column features is {width}-d per box, expected {feature_dim}")
        return array.reshape(count, width)
    if array.size != count:
        raise ValueError(f"column {name} holds {array.size} values, expected num_boxes={count}")
    return array.reshape(count)


def record_from_fields(fields: dict, where: str, feature_dim: Optional[int]) -> FeatureRecord:
    """Build and validate a record from a dict in any public layout; ImportIssue on failure."""
    try:
        ident = {}
        for ours, aliases in FIELD_ALIASES.items():
            found = next((fields[a] for a in aliases if a in fields), None)
            if found is None:
                raise ValueError(f"missing {' / '.join(aliases)}")
            ident[ours] = found
        image_id = ident["image_id"]
        image_id = image_id.decode("utf-8") if isinstance(image_id, bytes) else str(image_id)
        num_boxes = int(fields["num_boxes"]) if "num_boxes" in fields else None
        if num_boxes is None:
            raise ValueError("missing num_boxes")
        arrays = {name: decode_array(fields[name], name, num_boxes, feature_dim)
                  for name in SOURCE_DTYPES if name in fields}
        if "features" not in arrays or "boxes" not in arrays:
            raise ValueError("missing boxes or features")
        record = FeatureRecord.from_arrays(image_id, int(ident["image_w"]), int(ident["image_h"]), **arrays)
        return record.validate(feature_dim if feature_dim is not None else record.feature_dim)
    except (ValueError, KeyError, SchemaError, UnicodeDecodeError) as exc:
        raise ImportIssue(where, str(exc)) from None


def read_tsv_rows(path: Path, layout: str = "auto",
                  on_bytes: Optional[Callable[[int], None]] = None) -> Iterator[tuple[str, dict]]:
    """Yield ``(file:line, {column: value})`` for each row, or ``(file:line, ImportIssue)``.

    Values stay as bytes; nothing but the current line is held in memory. With
    ``layout="auto"`` the first row with 10 or 6 columns decides the layout of the file.
    """
    columns = None if layout == "auto" else TSV_LAYOUTS[layout]
    with open(path, "rb") as handle:
        for line_no, line in enumerate(handle, 1):
            if on_bytes:
                on_bytes(len(line))
            where = f"{path}:{line_no}"
            line = line.rstrip(b"\r\n")
            if not line:
                continue
            cells = line.split(b"\t")
            if columns is None:
                columns = {10: LXMERT_COLUMNS, 6: BUTD_COLUMNS}.get(len(cells))
                if columns is None:
                    yield where, ImportIssue(where, f"{len(cells)} tab-separated columns; expected "
                                             "10 (LXMERT layout) or 6 (BUTD layout)")
                    continue
            if len(cells) != len(columns):
                yield where, ImportIssue(where, f"{len(cells)} columns, expected {len(columns)} "
                                         f"({' '.join(columns)})")
                continue
            yield where, dict(zip(columns, cells))


class _ImportRun:
    """Shared bookkeeping of one import: writer, error policy, errors.jsonl."""

    def __init__(self, out: Path, on_error: str, writer_kwargs: dict):
        if on_error not in ("stop", "skip"):
            raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
        self.out = Path(out)
        self.on_error = on_error
        self.writer_kwargs = writer_kwargs
        self.writer: Optional[FeatureStoreWriter] = None
        self.stats = ImportStats()
        self._errors = ErrorLog(self.out / ERRORS_NAME)

    def add(self, where: str, fields_or_issue, feature_dim: Optional[int]) -> None:
        try:
            if isinstance(fields_or_issue, ImportIssue):
                raise fields_or_issue
            record = record_from_fields(fields_or_issue, where, feature_dim)
            if self.writer is None:
                self.writer = FeatureStoreWriter(self.out, feature_dim=record.feature_dim,
                                                 **self.writer_kwargs)
            try:
                self.writer.add(record)
            except (SchemaError, StoreError) as exc:
                raise ImportIssue(where, str(exc)) from None
            self.stats.records += 1
        except ImportIssue as issue:
            if self.on_error == "stop":
                raise
            self._report(issue)

    def _report(self, issue: ImportIssue) -> None:
        self._errors.add({"where": issue.where, "reason": issue.reason})
        self.stats.errors_file = self._errors.path
        self.stats.skipped += 1
        log.warning("skipped %s", issue)

    def finish(self, failed: bool) -> ImportStats:
        self._errors.close()
        if self.writer is not None:
            if failed:
                self.writer.abort()
            else:
                self.writer.close()
        elif not failed:
            raise StoreError("no record could be imported; nothing was written")
        return self.stats


def _run(out, on_error, writer_kwargs, rows: Iterable[tuple[str, object]], feature_dim) -> ImportStats:
    run = _ImportRun(out, on_error, writer_kwargs)
    try:
        for where, fields in rows:
            run.add(where, fields, feature_dim)
    except BaseException:
        run.finish(failed=True)
        raise
    return run.finish(failed=False)


def import_tsv(paths: Iterable, out, *, layout: str = "auto", storage: str = "lmdb",
               shard_size: int = FEATURE_SHARD_SIZE, feature_dim: Optional[int] = None, mode: str = "create",
               on_error: str = "stop", progress: bool = True) -> ImportStats:
    """Stream BUTD/LXMERT TSV files into a feature store at ``out``."""
    from tqdm import tqdm

    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such TSV file")
    total = sum(p.stat().st_size for p in paths)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="import tsv", disable=not progress)

    def rows():
        for path in paths:
            yield from read_tsv_rows(path, layout, on_bytes=bar.update)

    try:
        return _run(out, on_error, dict(storage=storage, shard_size=shard_size, mode=mode,
                                        extra={"source": {"kind": "tsv", "files": [str(p) for p in paths]}}),
                    rows(), feature_dim)
    finally:
        bar.close()


def import_pickled_lmdb(source, out, *, trust_pickle: bool = False, storage: str = "lmdb",
                        shard_size: int = FEATURE_SHARD_SIZE, feature_dim: Optional[int] = None,
                        mode: str = "create", on_error: str = "stop", progress: bool = True) -> ImportStats:
    """Convert a VOLTA/ViLBERT-style pickled LMDB into a pickle-free feature store."""
    import lmdb
    from tqdm import tqdm

    from vlp.schemas.safe_pickle import safe_loads

    if not trust_pickle:
        raise StoreError(f"{source}: values of this LMDB are pickles, which can run code when "
                         "loaded; pass trust_pickle=True (--trust-pickle) only for files you trust")
    log.warning("%s: reading pickled values (restricted unpickler: arrays, dicts, lists, "
                "strings and numbers only)", source)
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such LMDB environment")
    env = lmdb.open(str(source), subdir=source.is_dir(), readonly=True, lock=False,
                    readahead=False, meminit=False)

    def rows():
        with env.begin() as txn:
            bar = tqdm(total=txn.stat()["entries"], unit="rec", desc="import lmdb", disable=not progress)
            for key, value in txn.cursor():
                bar.update(1)
                if key == b"keys":  # the layout's pickled list of all keys
                    continue
                where = f"{source}[{key.decode('utf-8', 'replace')}]"
                try:
                    item = safe_loads(value, source=where)
                except Exception as exc:  # any unpickling failure is this row's problem
                    yield where, ImportIssue(where, f"cannot unpickle ({exc})")
                    continue
                if not isinstance(item, dict):
                    yield where, ImportIssue(where, f"value is a {type(item).__name__}, expected a dict")
                    continue
                item = dict(item)
                if not any(a in item for a in FIELD_ALIASES["image_id"]):
                    item["image_id"] = key
                yield where, item
            bar.close()

    try:
        return _run(out, on_error, dict(storage=storage, shard_size=shard_size, mode=mode,
                                        extra={"source": {"kind": "pickled-lmdb", "path": str(source)}}),
                    rows(), feature_dim)
    finally:
        env.close()


def write_tsv(records: Iterable[FeatureRecord], path, layout: str = "lxmert") -> None:
    """Write records in a public TSV layout (the inverse of ``import_tsv``; used by tests and the demo)."""
    columns = TSV_LAYOUTS[layout]

    def b64(array, dtype):
        return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes())

    with open(path, "wb") as handle:
        for r in records:
            values = {"img_id": r.image_id.encode(), "image_id": r.image_id.encode(),
                      "img_h": b"%d" % r.image_h, "img_w": b"%d" % r.image_w,
                      "image_h": b"%d" % r.image_h, "image_w": b"%d" % r.image_w,
                      "num_boxes": b"%d" % r.num_boxes}
            for name, dtype in SOURCE_DTYPES.items():
                if name in columns:
                    values[name] = b64(getattr(r, name), dtype)
            handle.write(b"\t".join(values[c] for c in columns) + b"\n")


def _load_npy(path: Path, *, allow_pickle: bool):
    """One ``.npy`` file: plain arrays through numpy (no pickle), object arrays (MMF's info
    dicts) through the restricted unpickler only. ValueError on anything malformed."""
    from vlp.schemas.safe_pickle import safe_load

    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"npy format version {version} is not supported")
        except (ValueError, OSError, SyntaxError, TypeError) as exc:
            raise ValueError(f"not a .npy file ({exc})") from None
        if not dtype.hasobject:
            handle.seek(0)
            try:
                return np.load(handle, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise ValueError(f"cannot read the array ({exc})") from None
        if not allow_pickle:
            raise ValueError("holds pickled objects")
        try:
            value = safe_load(handle, source=str(path))
        except Exception as exc:  # any unpickling failure is this file's problem
            raise ValueError(f"cannot unpickle ({exc})") from None
    if isinstance(value, np.ndarray) and value.shape == () and value.dtype.hasobject:
        value = value.item()
    return value


def _numeric_array(value) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind in "fiu"


def read_mmf_rows(source: Path) -> Iterator[tuple[str, object]]:
    """``(where, fields)`` for each ``<id>_info.npy`` + ``<id>.npy`` pair under ``source``
    (MMF's layout, see :mod:`vlp.exporters.mmf`); ``(where, ImportIssue)`` for a bad one."""
    for info_path in sorted(source.rglob("*_info.npy")):
        rel = info_path.relative_to(source).as_posix()
        image_id = rel[: -len("_info.npy")]
        where = str(info_path)
        features_path = info_path.with_name(info_path.name[: -len("_info.npy")] + ".npy")
        try:
            if not features_path.is_file():
                raise ValueError(f"no features file {features_path.name} beside it")
            info = _load_npy(info_path, allow_pickle=True)
            if not isinstance(info, dict):
                raise ValueError(f"holds a {type(info).__name__}, expected a dict")
            features = _load_npy(features_path, allow_pickle=False)
            if not _numeric_array(features) or features.ndim != 2:
                raise ValueError(f"{features_path.name}: features must be a 2-d array of numbers")
            fields = {"image_id": image_id, "num_boxes": features.shape[0], "features": features}
            for ours, theirs in (("image_w", "image_width"), ("image_h", "image_height"), ("boxes", "bbox")):
                if theirs not in info:
                    raise ValueError(f"the info dict has no {theirs!r}")
                fields[ours] = info[theirs]
            for name in ("image_width", "image_height"):
                if isinstance(info[name], bool) or not isinstance(info[name], (int, np.integer)):
                    raise ValueError(f"{name} must be an integer, got {info[name]!r:.40}")
            if not _numeric_array(fields["boxes"]):
                raise ValueError("bbox is not an array of numbers")
            probs = info.get("cls_prob")
            if _numeric_array(probs) and probs.ndim == 2 and probs.shape[1] == NUM_CLS_PROB - 1:
                # MMF drops the background column; softmax rows sum to 1, so it is what is left
                probs = probs.astype(np.float32)
                background = np.clip(1.0 - probs.sum(axis=1, keepdims=True), 0.0, 1.0)
                fields["cls_prob"] = np.concatenate([probs, background], axis=1)
            elif probs is not None:
                raise ValueError(f"cls_prob must be [num_boxes, {NUM_CLS_PROB - 1}]")
        except ValueError as exc:
            yield where, ImportIssue(where, str(exc))
            continue
        yield where, fields


def import_mmf_npy(source, out, *, trust_pickle: bool = False, storage: str = "lmdb",
                   shard_size: int = FEATURE_SHARD_SIZE, feature_dim: Optional[int] = None,
                   mode: str = "create", on_error: str = "stop", progress: bool = True) -> ImportStats:
    """Import MMF per-image features (``<id>.npy`` + ``<id>_info.npy``, what ``vlp export
    --to mmf-npy`` writes) into a feature store: boxes, features, image size and the class
    probabilities (the background column, which MMF drops, restored as 1 - the rest). MMF
    keeps no confidences or attributes, so the records carry no labels. The info files are
    pickles: ``trust_pickle=True`` is required, and they go through the restricted unpickler."""
    from tqdm import tqdm

    if not trust_pickle:
        raise StoreError(f"{source}: MMF's _info.npy files are pickles, which can run code when "
                         "loaded; pass trust_pickle=True (--trust-pickle) only for files you trust")
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such folder of MMF features")
    total = sum(1 for _ in source.rglob("*_info.npy"))
    bar = tqdm(total=total, unit="rec", desc="import mmf", disable=not progress)

    def rows():
        for row in read_mmf_rows(source):
            bar.update(1)
            yield row

    try:
        return _run(out, on_error, dict(storage=storage, shard_size=shard_size, mode=mode,
                                        extra={"source": {"kind": "mmf-npy", "path": str(source)}}),
                    rows(), feature_dim)
    finally:
        bar.close()
