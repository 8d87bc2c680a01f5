"""Feature stores: a directory of shards behind one API.

Directory layout::

    manifest.json        schema version, storage format, fields, vocab hashes,
                         detector description, shard list with sha256 (written last)
    index.lmdb           image_id -> (shard number, row), shared by all readers
    shard-00000.lmdb     (or .arrow) finished shards
    shard-00007.lmdb.partial   a shard being written (ignored by readers)

``FeatureStore`` opens shards lazily in each process, so a store object can be
handed to DataLoader workers or Ray tasks: it pickles as its path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import struct
import warnings
from pathlib import Path
from typing import Iterator, Optional

import lmdb

from vlp import __version__
from vlp.core.durable import atomic_write_json, publish
from vlp.schemas import vocab
from vlp.schemas.errors import SchemaError, StoreError
from vlp.schemas.manifest import MANIFEST_NAME, now_iso, read_manifest
from vlp.schemas.record import DEFAULT_FEATURE_DIM, SCHEMA_VERSION, FeatureRecord
from vlp.schemas.shards import (PARTIAL_SUFFIX, SUFFIXES, ArrowShardWriter, LmdbShardWriter,
                                ShardInfo, open_readonly_env, open_shard_reader, release_readonly_env)

log = logging.getLogger(__name__)

FEATURES_FORMAT = "vlp-features"
#: records per feature shard unless told otherwise (about 170 MB at 36 fp16 regions)
FEATURE_SHARD_SIZE = 10_000
INDEX_NAME = "index.lmdb"
_INDEX_META_KEY = b"\x00meta"  # image ids never contain NUL
_LOCATION = struct.Struct("<II")


def _index_meta(shard_names: list[str]) -> bytes:
    return json.dumps({"shards": shard_names}).encode("utf-8")


class FeatureStore:
    """Read access to a feature store directory of LMDB or Arrow shards.

    ``len``, ``keys()``, ``get(image_id)``, ``store[image_id]``, ``image_id in store``
    and iteration (records in storage order). Arrays are read-only.
    """

    def __init__(self, root, *, allow_incomplete: bool = True, warn: bool = True):
        self.root = Path(root)
        self.manifest = read_manifest(self.root, FEATURES_FORMAT, (SCHEMA_VERSION,))
        self.storage = self.manifest.get("storage")
        if self.storage not in SUFFIXES:
            raise StoreError(f"{self.root / MANIFEST_NAME}: unknown storage {self.storage!r}")
        if not self.manifest.get("complete") and not allow_incomplete:
            raise StoreError(f"{self.root}: the run that wrote this store has not finished")
        self.shard_names = [s["name"] for s in self.manifest["shards"]]
        for name in self.shard_names:
            if not (self.root / name).is_file():
                raise StoreError(f"{self.root / name}: listed in the manifest but missing")
        self.ignored = unlisted_files(self.root, self.shard_names, self.storage)
        if self.ignored and warn:
            message = (f"{self.root}: ignoring {len(self.ignored)} file(s) not in the manifest "
                       f"(unfinished or torn shards): {', '.join(self.ignored[:5])}")
            warnings.warn(message, stacklevel=2)
        self._pid = None

    # -- lazy per-process state ------------------------------------------------
    def _open(self) -> None:
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._readers: dict[int, object] = {}
        self._index_env = None
        self._index_txn = None
        self._memory_index: Optional[dict[str, tuple[int, int]]] = None
        index_path = self.root / INDEX_NAME
        if index_path.is_file():
            env = open_readonly_env(index_path)
            txn = env.begin()
            if txn.get(_INDEX_META_KEY) == _index_meta(self.shard_names):
                self._index_env, self._index_txn = env, txn
                return
            txn.abort()
            release_readonly_env(index_path)
        log.warning("%s: index.lmdb is missing or does not match the manifest; "
                    "building the image index in memory", self.root)
        self._memory_index = {}
        for shard_no in range(len(self.shard_names)):
            for row, key in enumerate(self._reader(shard_no).keys()):
                self._memory_index[key] = (shard_no, row)

    def _reader(self, shard_no: int):
        reader = self._readers.get(shard_no)
        if reader is None:
            path = self.root / self.shard_names[shard_no]
            reader = open_shard_reader(path, self.storage)
            self._readers[shard_no] = reader
        return reader

    def _locate(self, image_id: str) -> Optional[tuple[int, int]]:
        self._open()
        if self._memory_index is not None:
            return self._memory_index.get(image_id)
        value = self._index_txn.get(image_id.encode("utf-8"))
        return None if value is None else _LOCATION.unpack(value)

    def __getstate__(self):
        return {"root": str(self.root)}

    def __setstate__(self, state):
        # The process that pickled the store has already warned about ignored files.
        self.__init__(state["root"], warn=False)

    # -- public API ---------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        return int(self.manifest["feature_dim"])

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.manifest["fields"])

    def __len__(self) -> int:
        return int(self.manifest["num_records"])

    def __contains__(self, image_id: str) -> bool:
        return self._locate(image_id) is not None

    def get(self, image_id: str) -> FeatureRecord:
        location = self._locate(image_id)
        if location is None:
            raise KeyError(f"image_id {image_id!r} is not in the feature store {self.root}")
        shard_no, row = location
        reader = self._reader(shard_no)
        if self.storage == "lmdb":
            record = reader.get(image_id)
            if record is None:
                raise StoreError(f"{reader.path}: indexed image_id {image_id!r} is missing")
            return record
        return reader.record(row)

    __getitem__ = get

    def keys(self) -> Iterator[str]:
        self._open()
        for shard_no in range(len(self.shard_names)):
            yield from self._reader(shard_no).keys()

    def __iter__(self) -> Iterator[FeatureRecord]:
        self._open()
        for shard_no in range(len(self.shard_names)):
            yield from self._reader(shard_no)

    def close(self) -> None:
        if self._pid == os.getpid():
            for reader in self._readers.values():
                reader.close()
            if self._index_env is not None:
                self._index_txn.abort()
                release_readonly_env(self.root / INDEX_NAME)
        self._pid = None

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r}, {len(self)} records, {self.storage})"


def unlisted_files(root: Path, listed: list[str], storage: str) -> list[str]:
    """Shard-like files in ``root`` that the manifest does not list."""
    suffix = SUFFIXES[storage]
    listed_set = set(listed)
    return sorted(p.name for p in root.iterdir()
                  if (p.name.endswith(suffix) or p.name.endswith(PARTIAL_SUFFIX))
                  and p.name not in listed_set and p.name != INDEX_NAME)


class FeatureStoreWriter:
    """Writes records into shards of ``shard_size`` records and keeps the manifest current.

    ``mode``: "create" (the directory must not hold a store), "overwrite" (an existing
    store is deleted first) or "append" (continue a store: finished shards are kept,
    unfinished ones deleted; the storage, feature size and ``detector`` must match).
    """

    def __init__(self, root, *, storage: str = "lmdb", shard_size: int = FEATURE_SHARD_SIZE,
                 feature_dim: int = DEFAULT_FEATURE_DIM, detector: Optional[dict] = None,
                 mode: str = "create", extra: Optional[dict] = None):
        if storage not in SUFFIXES:
            raise StoreError(f"storage must be one of {sorted(SUFFIXES)}, got {storage!r}")
        if mode not in ("create", "overwrite", "append"):
            raise ValueError(f"mode must be create, overwrite or append, got {mode!r}")
        if shard_size < 1:
            raise ValueError("shard_size must be at least 1")
        self.root = Path(root)
        self.storage = storage
        self.shard_size = shard_size
        self.feature_dim = feature_dim
        self.detector = detector
        self.extra = extra or {}
        manifest_path = self.root / MANIFEST_NAME
        if manifest_path.exists() and mode == "overwrite":
            shutil.rmtree(self.root)
        elif manifest_path.exists() and mode == "create":
            raise StoreError(f"{self.root}: already holds a feature store; choose overwrite "
                             "to replace it or append to add to it")
        self.root.mkdir(parents=True, exist_ok=True)
        self.shards: list[ShardInfo] = []
        self.fields: Optional[tuple[str, ...]] = None
        self.num_records = 0
        if manifest_path.exists():
            self._resume_from_manifest()
        else:
            for stray in unlisted_files(self.root, [], storage):
                _remove(self.root / stray)
            _remove(self.root / INDEX_NAME)
        self._index = self._open_index()
        if self.shards:
            self._rebuild_index_if_stale()
        self._current = None
        self._next_shard_no = 1 + max((_shard_number(s.name) for s in self.shards), default=-1)
        self._closed = False

    def _resume_from_manifest(self) -> None:
        manifest = read_manifest(self.root, FEATURES_FORMAT, (SCHEMA_VERSION,))
        for key, mine in (("storage", self.storage), ("feature_dim", self.feature_dim),
                          ("detector", self.detector)):
            if manifest.get(key) != mine:
                raise StoreError(f"{self.root}: the existing store has {key}={manifest.get(key)!r}, "
                                 f"this run uses {mine!r}; write to another directory or overwrite")
        self.fields = tuple(manifest["fields"]) if manifest.get("fields") else None
        for entry in manifest["shards"]:
            self.shards.append(ShardInfo(entry["name"], entry["records"], entry["bytes"], entry["sha256"]))
        self.num_records = sum(s.records for s in self.shards)
        for stray in unlisted_files(self.root, [s.name for s in self.shards], self.storage):
            log.warning("%s: removing unfinished shard %s", self.root, stray)
            _remove(self.root / stray)

    def _rebuild_index_if_stale(self) -> None:
        names = [s.name for s in self.shards]
        with self._index.begin() as txn:
            if txn.get(_INDEX_META_KEY) == _index_meta(names):
                return
        log.warning("%s: rebuilding index.lmdb from the manifest's shards", self.root)
        self._index.close()
        _remove(self.root / INDEX_NAME)
        self._index = self._open_index()
        for shard_no, shard in enumerate(self.shards):
            path = self.root / shard.name
            reader = open_shard_reader(path, self.storage)
            shard.keys = list(reader.keys())
            reader.close()
            self._index_shard(shard_no, shard, names[:shard_no + 1])

    def _open_index(self) -> lmdb.Environment:
        path = self.root / INDEX_NAME
        try:
            return lmdb.open(str(path), subdir=False, map_size=1 << 26, lock=False, meminit=False)
        except lmdb.Error as exc:
            raise StoreError(f"{path}: cannot open for writing ({exc}); close any FeatureStore "
                             "reading this directory in this process first") from None

    def _index_shard(self, shard_no: int, shard: ShardInfo, names: list[str]) -> None:
        while True:
            try:
                with self._index.begin(write=True) as txn:
                    for row, key in enumerate(shard.keys):
                        if not txn.put(key.encode("utf-8"), _LOCATION.pack(shard_no, row), overwrite=False):
                            raise StoreError(f"{self.root}: image_id {key!r} of {shard.name} "
                                             "is already in the store")
                    txn.put(_INDEX_META_KEY, _index_meta(names))
                return
            except lmdb.MapFullError:
                self._index.set_mapsize(self._index.info()["map_size"] * 2)

    def __contains__(self, image_id: str) -> bool:
        if self._current is not None and image_id in self._current._seen:
            return True
        with self._index.begin() as txn:
            return txn.get(image_id.encode("utf-8")) is not None

    def add(self, record: FeatureRecord) -> None:
        """Validate and append one record; raises SchemaError/StoreError, writing nothing, on bad input."""
        if self._closed:
            raise StoreError(f"{self.root}: writer is closed")
        record.validate(self.feature_dim)
        fields = record.present_fields()
        if self.fields is None:
            self.fields = fields
        elif fields != self.fields:
            raise SchemaError(f"record {record.image_id!r} has fields {', '.join(fields)}; "
                              f"this store holds {', '.join(self.fields)}")
        if record.image_id in self:
            raise StoreError(f"{self.root}: image_id {record.image_id!r} is already in the store")
        if self._current is None:
            self._current = self._new_shard()
        self._current.add(record)
        if len(self._current) >= self.shard_size:
            self.finish_shard()

    def _next_shard_name(self) -> str:
        name = f"shard-{self._next_shard_no:05d}{SUFFIXES[self.storage]}"
        self._next_shard_no += 1
        return name

    def _new_shard(self):
        path = self.root / self._next_shard_name()
        if self.storage == "lmdb":
            return LmdbShardWriter(path)
        return ArrowShardWriter(path, self.fields, self.feature_dim)

    def finish_shard(self) -> None:
        """Close the open shard (if any) and commit it to the index and manifest."""
        if self._current is None:
            return
        info = self._current.close()
        self._current = None
        self.commit(info)

    def commit(self, info: ShardInfo) -> None:
        """Add a finished shard (e.g. written by a worker) to the index, then the manifest."""
        self.shards.append(info)
        self._index_shard(len(self.shards) - 1, info, [s.name for s in self.shards])
        self._index.sync(True)
        self.num_records += info.records
        self._write_manifest(complete=False)

    def adopt(self, path, info: ShardInfo) -> ShardInfo:
        """Commit a finished shard file written by another process (an extraction worker).

        The file (in this directory, under any name the manifest does not list) is renamed
        to the store's next shard name, then committed. A kill between the two leaves an
        unlisted shard, which the next append removes; its images are then redone.
        """
        path = Path(path)
        if path.parent.resolve() != self.root.resolve():
            raise StoreError(f"{path}: a shard to adopt must be in {self.root}")
        if self._current is not None:
            self.finish_shard()
        final = self.root / self._next_shard_name()
        publish(path, final)
        adopted = dataclasses.replace(info, name=final.name)
        self.commit(adopted)
        return adopted

    def _write_manifest(self, complete: bool) -> None:
        objects, attributes = vocab.objects(), vocab.attributes()
        manifest = {
            "format": FEATURES_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "storage": self.storage,
            "complete": complete,
            "feature_dim": self.feature_dim,
            "fields": list(self.fields or ()),
            "num_records": self.num_records,
            "vocab": {"objects": objects.describe(), "attributes": attributes.describe()},
            "detector": self.detector,
            "vlp_version": __version__,
            "updated": now_iso(),
            **self.extra,
            "shards": [s.manifest_entry() for s in self.shards],
        }
        atomic_write_json(self.root / MANIFEST_NAME, manifest)

    def close(self, complete: bool = True) -> None:
        """Finish the open shard and write the final manifest."""
        if self._closed:
            return
        self.finish_shard()
        self._write_manifest(complete=complete)
        self._index.close()
        self._closed = True

    def abort(self) -> None:
        """Drop the open shard; finished shards stay listed, the store stays incomplete."""
        if self._closed:
            return
        if self._current is not None:
            self._current.abort()
            self._current = None
        if self.shards or self.num_records:
            self._write_manifest(complete=False)
        self._index.close()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _shard_number(name: str) -> int:
    stem = name.split(".", 1)[0]
    try:
        return int(stem.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
