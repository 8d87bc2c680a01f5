"""One shard of a feature store, in either storage format.

A shard is written under ``NAME.partial`` and renamed to ``NAME`` once complete and
synced to disk, so a shard file without the suffix is never torn. Whether a complete
shard belongs to the store is decided by the manifest (see ``store.py``).

- LMDB: a single-file environment (``subdir=False``); key = image_id UTF-8,
  value = ``codec.encode(record)``. Readers open it read-only, lock-free, without
  readahead, so many processes share the OS page cache.
- Arrow: an IPC file whose per-box columns are ``list<fixed_size_list<T, k>>``;
  it is memory-mapped and rows are sliced out of the mapped buffers without copying.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Iterator, Optional

import lmdb
import numpy as np
import pyarrow as pa

from vlp.core.durable import publish
from vlp.schemas import codec
from vlp.schemas.errors import SchemaError, StoreError
from vlp.schemas.record import (ARRAY_FIELDS, FIELD_DTYPES, IMAGE_FEATURE_DTYPE,
                                NUM_ATTR_PROB, NUM_CLS_PROB, FeatureRecord)

PARTIAL_SUFFIX = ".partial"
SUFFIXES = {"lmdb": ".lmdb", "arrow": ".arrow"}


@dataclasses.dataclass
class ShardInfo:
    """What the manifest records about a finished shard."""

    name: str
    records: int
    bytes: int
    sha256: str
    keys: list = dataclasses.field(default_factory=list, repr=False)  # in row order

    def manifest_entry(self) -> dict:
        return {"name": self.name, "records": self.records, "bytes": self.bytes, "sha256": self.sha256}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class _ShardWriterBase:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        if self.path.exists():
            raise StoreError(f"{self.path}: shard already exists")
        self.partial.unlink(missing_ok=True)
        self.keys: list[str] = []
        self._seen: set[str] = set()

    def __len__(self) -> int:
        return len(self.keys)

    def _register(self, record: FeatureRecord) -> None:
        if record.image_id in self._seen:
            raise StoreError(f"{self.path.name}: image_id {record.image_id!r} written twice")
        self._seen.add(record.image_id)
        self.keys.append(record.image_id)

    def _finish(self) -> ShardInfo:
        publish(self.partial, self.path)
        return ShardInfo(self.path.name, len(self.keys), self.path.stat().st_size,
                         sha256_file(self.path), list(self.keys))


class LmdbShardWriter(_ShardWriterBase):
    """Writes records into one LMDB file; the map grows instead of failing when full."""

    def __init__(self, path: Path, map_size: int = 1 << 28, txn_bytes: int = 64 << 20):
        super().__init__(path)
        self._env = lmdb.open(str(self.partial), subdir=False, map_size=map_size, lock=False,
                              sync=False, meminit=False, max_dbs=0)
        self._pending: list[tuple[bytes, bytes]] = []
        self._pending_bytes = 0
        self._txn_bytes = txn_bytes

    def add(self, record: FeatureRecord) -> None:
        self._register(record)
        value = codec.encode(record)
        self._pending.append((record.image_id.encode("utf-8"), value))
        self._pending_bytes += len(value)
        if self._pending_bytes >= self._txn_bytes:
            self._flush()

    def _flush(self) -> None:
        while self._pending:
            try:
                with self._env.begin(write=True) as txn:
                    for key, value in self._pending:
                        txn.put(key, value, overwrite=False)
            except lmdb.MapFullError:
                # The aborted transaction left nothing behind: grow and retry it whole.
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
                continue
            self._pending.clear()
            self._pending_bytes = 0

    def close(self) -> ShardInfo:
        self._flush()
        self._env.sync(True)
        self._env.close()
        return self._finish()

    def abort(self) -> None:
        self._env.close()
        self.partial.unlink(missing_ok=True)


# LMDB allows one environment per file and process: readers of the same file share it.
_SHARED_ENVS: dict[tuple[int, str], list] = {}  # (pid, realpath) -> [env, users]


def open_readonly_env(path: Path) -> lmdb.Environment:
    pid = os.getpid()
    for inherited in [k for k in _SHARED_ENVS if k[0] != pid]:
        # Handles inherited through fork (DataLoader workers) must not be used here, and
        # py-lmdb refuses to reopen their files until they are closed. Closing only
        # unmaps this process's copy; lock-free read-only handles hold no file locks.
        _SHARED_ENVS.pop(inherited)[0].close()
    key = (pid, os.path.realpath(path))
    entry = _SHARED_ENVS.get(key)
    if entry is None:
        try:
            env = lmdb.open(str(path), subdir=False, readonly=True, lock=False,
                            readahead=False, meminit=False, max_readers=2048)
        except lmdb.Error as exc:
            raise StoreError(f"{path}: cannot open LMDB file ({exc})") from None
        entry = _SHARED_ENVS[key] = [env, 0]
    entry[1] += 1
    return entry[0]


def release_readonly_env(path: Path) -> None:
    key = (os.getpid(), os.path.realpath(path))
    entry = _SHARED_ENVS.get(key)
    if entry is not None:
        entry[1] -= 1
        if entry[1] == 0:
            del _SHARED_ENVS[key]
            entry[0].close()


class LmdbShardReader:
    """Read-only view of a finished LMDB shard; one long-lived read transaction."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._env = open_readonly_env(self.path)
        self._txn = self._env.begin()

    def get_value(self, image_id: str) -> Optional[bytes]:
        return self._txn.get(image_id.encode("utf-8"))

    def get(self, image_id: str) -> Optional[FeatureRecord]:
        value = self.get_value(image_id)
        return None if value is None else codec.decode(value, f"{self.path.name}[{image_id}]")

    def keys(self) -> Iterator[str]:
        with self._txn.cursor() as cursor:
            for key in cursor.iternext(keys=True, values=False):
                yield bytes(key).decode("utf-8")

    def items_raw(self) -> Iterator[tuple[str, bytes]]:
        with self._txn.cursor() as cursor:
            for key, value in cursor:
                yield bytes(key).decode("utf-8"), value

    def __iter__(self) -> Iterator[FeatureRecord]:
        for key, value in self.items_raw():
            yield codec.decode(value, f"{self.path.name}[{key}]")

    def __len__(self) -> int:
        return self._env.stat()["entries"]

    def close(self) -> None:
        self._txn.abort()
        release_readonly_env(self.path)


def arrow_schema(fields: tuple[str, ...], feature_dim: int) -> pa.Schema:
    columns = [pa.field("image_id", pa.string(), nullable=False),
               pa.field("image_w", pa.int32(), nullable=False),
               pa.field("image_h", pa.int32(), nullable=False)]
    for name in fields:
        dtype = IMAGE_FEATURE_DTYPE if name == "image_feature" else FIELD_DTYPES[name]
        inner = pa.from_numpy_dtype(dtype)
        width = {"boxes": 4, "features": feature_dim, "cls_prob": NUM_CLS_PROB,
                 "attr_prob": NUM_ATTR_PROB}.get(name)
        if name == "image_feature":
            column = pa.list_(inner, feature_dim)
        elif width is None:
            column = pa.list_(inner)
        else:
            column = pa.list_(pa.list_(inner, width))
        columns.append(pa.field(name, column, nullable=False))
    return pa.schema(columns)


class ArrowShardWriter(_ShardWriterBase):
    """Writes records as bounded record batches of one Arrow IPC file."""

    def __init__(self, path: Path, fields: tuple[str, ...], feature_dim: int,
                 batch_rows: int = 512, batch_bytes: int = 32 << 20):
        super().__init__(path)
        self.fields = tuple(fields)
        self.feature_dim = feature_dim
        self.schema = arrow_schema(self.fields, feature_dim)
        self._sink = pa.OSFile(str(self.partial), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)
        self._batch: list[FeatureRecord] = []
        self._batch_bytes = 0
        self._limits = (batch_rows, batch_bytes)

    def add(self, record: FeatureRecord) -> None:
        if record.present_fields() != self.fields:
            raise SchemaError(f"record {record.image_id!r} has fields {record.present_fields()}, "
                              f"the shard holds {self.fields}")
        self._register(record)
        self._batch.append(record)
        self._batch_bytes += sum(a.nbytes for a in record.arrays().values())
        if len(self._batch) >= self._limits[0] or self._batch_bytes >= self._limits[1]:
            self._flush()

    def _flush(self) -> None:
        if not self._batch:
            return
        recs = self._batch
        columns = [pa.array([r.image_id for r in recs], pa.string()),
                   pa.array([r.image_w for r in recs], pa.int32()),
                   pa.array([r.image_h for r in recs], pa.int32())]
        offsets = np.zeros(len(recs) + 1, dtype=np.int32)
        np.cumsum([r.num_boxes for r in recs], out=offsets[1:])
        offsets_arr = pa.array(offsets)
        for name, field in zip(self.fields, self.schema.types[3:]):
            flat = np.concatenate([getattr(r, name).reshape(-1) for r in recs])
            values = pa.array(flat)
            if name == "image_feature":
                columns.append(pa.FixedSizeListArray.from_arrays(values, self.feature_dim))
                continue
            if pa.types.is_fixed_size_list(field.value_type):
                values = pa.FixedSizeListArray.from_arrays(values, field.value_type.list_size)
            columns.append(pa.ListArray.from_arrays(offsets_arr, values))
        self._writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=self.schema))
        self._batch = []
        self._batch_bytes = 0

    def close(self) -> ShardInfo:
        self._flush()
        self._writer.close()
        self._sink.close()
        return self._finish()

    def abort(self) -> None:
        self._writer.close()
        self._sink.close()
        self.partial.unlink(missing_ok=True)


class _BatchView:
    """numpy views over one memory-mapped record batch."""

    def __init__(self, batch: pa.RecordBatch, feature_dim: int):
        self.image_ids = batch.column("image_id").to_pylist()
        self.widths = batch.column("image_w").to_numpy()
        self.heights = batch.column("image_h").to_numpy()
        self.fields = []
        for name in batch.schema.names[3:]:
            column = batch.column(name)
            if name == "image_feature":
                flat = column.values.to_numpy(zero_copy_only=True)
                self.fields.append((name, None, flat.reshape(-1, feature_dim)))
                continue
            offsets = column.offsets.to_numpy()
            inner = column.values
            if pa.types.is_fixed_size_list(inner.type):
                flat = inner.values.to_numpy(zero_copy_only=True).reshape(-1, inner.type.list_size)
            else:
                flat = inner.to_numpy(zero_copy_only=True)
            self.fields.append((name, offsets, flat))

    def record(self, row: int) -> FeatureRecord:
        arrays = {}
        for name, offsets, flat in self.fields:
            arrays[name] = flat[row] if offsets is None else flat[offsets[row]:offsets[row + 1]]
        return FeatureRecord(self.image_ids[row], int(self.widths[row]), int(self.heights[row]), **arrays)


class ArrowShardReader:
    """Memory-mapped Arrow shard with row access in O(log batches)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._source = pa.memory_map(str(self.path), "r")
            self._reader = pa.ipc.open_file(self._source)
        except (pa.ArrowInvalid, OSError) as exc:
            raise StoreError(f"{self.path}: cannot open Arrow shard ({exc})") from None
        names = self._reader.schema.names
        if names[:3] != ["image_id", "image_w", "image_h"] or not set(names[3:]) <= set(ARRAY_FIELDS):
            raise StoreError(f"{self.path}: unexpected columns {names}")
        features_type = self._reader.schema.field("features").type
        self.feature_dim = features_type.value_type.list_size
        self._views: dict[int, _BatchView] = {}
        sizes = [self._reader.get_batch(i).num_rows for i in range(self._reader.num_record_batches)]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _view(self, batch_no: int) -> _BatchView:
        view = self._views.get(batch_no)
        if view is None:
            view = _BatchView(self._reader.get_batch(batch_no), self.feature_dim)
            self._views[batch_no] = view
        return view

    def record(self, row: int) -> FeatureRecord:
        batch_no = int(np.searchsorted(self._starts, row, side="right")) - 1
        return self._view(batch_no).record(row - int(self._starts[batch_no]))

    def keys(self) -> Iterator[str]:
        for batch_no in range(len(self._starts) - 1):
            yield from self._reader.get_batch(batch_no).column("image_id").to_pylist()

    def __iter__(self) -> Iterator[FeatureRecord]:
        for batch_no in range(len(self._starts) - 1):
            view = _BatchView(self._reader.get_batch(batch_no), self.feature_dim)
            for row in range(len(view.image_ids)):
                yield view.record(row)

    def close(self) -> None:
        self._views.clear()
        self._reader = None
        self._source.close()


def open_shard_reader(path: Path, storage: str):
    """A reader for a finished shard of the given storage format ("lmdb" or "arrow")."""
    return LmdbShardReader(path) if storage == "lmdb" else ArrowShardReader(path)
