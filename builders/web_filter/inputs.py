"""Inputs of the web filter, cut into shards that the runner finishes one at a time.

Accepted inputs (several may be given):

* a crawl folder (``records*.jsonl`` / ``*.jsonl`` / ``*.parquet`` at its top level, image
  paths relative to the folder; the synthetic world's ``web/`` is one), or such a records
  file on its own. Fields: ``key``, ``url``, ``image_path`` (or ``image``/``path``: a path;
  parquet may hold the bytes in a binary ``image`` / ``jpg`` column), ``alt``, ``title``,
  ``surrounding_text`` (or ``text``), optional ``lang_hint``;
* an img2dataset output folder: ``NNNNN/key.jpg`` + ``key.txt`` + ``key.json`` (its
  "files" format), or its ``NNNNN.tar`` webdataset shards. The caption is the alt text.

Shards: every ``shard_rows`` lines of a records file (byte offsets found in one scan),
each row group of a parquet file, each img2dataset folder or tar. A row that cannot be
read (a line that is not JSON or not UTF-8, a missing key) is yielded as a rejection of
stage ``input``; the run goes on.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

DEFAULT_SHARD_ROWS = 1000
_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")


@dataclass(frozen=True)
class Shard:
    """One unit of work: ``kind`` jsonl (path, start byte, end byte, first line number),
    parquet (path, row group), folder (img2dataset folder) or tar."""

    name: str
    kind: str
    path: str
    root: str
    start: int = 0
    end: int = 0
    first_line: int = 1
    rows: int = 0


def _records_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".jsonl", ".parquet")
                   and p.name != "truth.jsonl" and not p.name.startswith("."))
    return files


def plan_shards(sources, shard_rows: int = DEFAULT_SHARD_ROWS) -> list[Shard]:
    """The shards of every source, in a stable order."""
    shards: list[Shard] = []
    for number, source in enumerate(sources):
        source = Path(source).absolute()  # Ray workers on other machines or folders see absolute paths
        tag = f"{number}"
        if source.is_file():
            shards += _file_shards(source, source.parent, tag, shard_rows)
        elif source.is_dir():
            # img2dataset output (its NNNNN.parquet files are metadata, not records) or a crawl folder
            tars = sorted(source.glob("*.tar"))
            folders = sorted(p for p in source.iterdir() if p.is_dir() and any(p.glob("*.json")))
            files = _records_files(source) if not (tars or folders) else []
            if files:
                for path in files:
                    shards += _file_shards(path, source, f"{tag}/{path.name}", shard_rows)
                continue
            for tar in tars:
                shards.append(Shard(f"{tag}/{tar.name}", "tar", str(tar), str(source)))
            for folder in folders:
                count = sum(1 for _ in folder.glob("*.json"))
                shards.append(Shard(f"{tag}/{folder.name}", "folder", str(folder), str(source), rows=count))
            if not tars and not folders:
                raise FileNotFoundError(f"{source}: no records (*.jsonl, *.parquet), img2dataset folders or tar "
                                        "shards found")
        else:
            raise FileNotFoundError(f"{source}: no such file or folder")
    return shards


def _file_shards(path: Path, root: Path, tag: str, shard_rows: int) -> list[Shard]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as exc:  # pyarrow raises several kinds for a file that is not parquet
            raise ValueError(f"{path}: not a readable parquet file ({exc})") from None
        return [Shard(f"{tag}#{g}", "parquet", str(path), str(root), start=g, rows=meta.row_group(g).num_rows)
                for g in range(meta.num_row_groups)]
    shards, start, line, count, offset = [], 0, 1, 0, 0
    first = 1
    with open(path, "rb") as handle:
        for raw in handle:
            offset += len(raw)
            line += 1
            count += 1
            if count == shard_rows:
                shards.append(Shard(f"{tag}#{len(shards)}", "jsonl", str(path), str(root), start, offset, first, count))
                start, first, count = offset, line, 0
    if count or not shards:
        shards.append(Shard(f"{tag}#{len(shards)}", "jsonl", str(path), str(root), start, offset, first, count))
    return shards


def _bad(shard: Shard, where: str, reason: str, key: str = "") -> dict:
    return {"_reject": True, "key": key or where, "stage": "input", "reason": reason, "values": {"where": where},
            "shard": shard.name}


def _text(value):
    return value if isinstance(value, str) else None


def _record_row(record: dict, shard: Shard, where: str):
    if not isinstance(record, dict):
        return _bad(shard, where, "not_an_object")
    key = record.get("key")
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        key = str(key)
    if not isinstance(key, str) or not key:
        return _bad(shard, where, "no_key")
    row = {"key": key, "url": _text(record.get("url")) or "", "where": where, "shard": shard.name}
    for name in ("alt", "title", "lang_hint"):
        row[name] = _text(record.get(name))
    row["surrounding_text"] = _text(record.get("surrounding_text")) or _text(record.get("text"))
    data = next((record[c] for c in ("image", "jpg", "image_bytes") if isinstance(record.get(c), bytes)), None)
    if data is not None:
        row["image_bytes"] = data
    else:
        path = next((record[c] for c in ("image_path", "image", "path", "file")
                     if isinstance(record.get(c), str) and record[c].strip()), None)
        if path is None:
            return _bad(shard, where, "no_image_field", key)
        full = Path(path) if Path(path).is_absolute() else Path(shard.root) / path
        row["image_file"] = str(full)
        row["image_rel"] = Path(path).stem if Path(path).is_absolute() else os.path.splitext(path)[0]
    return row


def read_shard(shard: Shard) -> Iterator[dict]:
    """Rows of a shard (dicts; image as ``image_file`` or ``image_bytes``) and input rejections."""
    if shard.kind == "jsonl":
        with open(shard.path, "rb") as handle:
            handle.seek(shard.start)
            data = handle.read(shard.end - shard.start)
        for number, raw in enumerate(data.splitlines(), start=shard.first_line):
            where = f"{Path(shard.path).name}:{number}"
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield _bad(shard, where, "not_utf8")
                continue
            try:
                record = json.loads(text)
            except (json.JSONDecodeError, RecursionError):
                yield _bad(shard, where, "broken_json")
                continue
            yield _record_row(record, shard, where)
    elif shard.kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(shard.path).read_row_group(shard.start)
        for i, record in enumerate(table.to_pylist()):
            yield _record_row(record, shard, f"{Path(shard.path).name}#{shard.start}:{i}")
    elif shard.kind == "folder":
        folder = Path(shard.path)
        for meta_path in sorted(folder.glob("*.json")):
            yield _img2dataset_row(shard, meta_path.stem, lambda ext, p=meta_path: _read_or_none(p.with_suffix(ext)),
                                   f"{folder.name}/{meta_path.name}")
    else:
        members: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(shard.path) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    stem, _, ext = member.name.rpartition(".")
                    handle = tar.extractfile(member)
                    members.setdefault(stem, {})["." + ext.lower()] = handle.read() if handle else b""
        except (tarfile.TarError, OSError) as exc:
            yield _bad(shard, Path(shard.path).name, f"unreadable_tar: {exc}")
            return
        for stem in sorted(members):
            files = members[stem]
            if ".json" not in files:
                continue
            yield _img2dataset_row(shard, Path(stem).name, lambda ext, f=files: f.get(ext),
                                   f"{Path(shard.path).name}:{stem}")


def _read_or_none(path: Path):
    try:
        return path.read_bytes()
    except OSError:
        return None


def _img2dataset_row(shard: Shard, stem: str, read, where: str):
    raw = read(".json")
    try:
        meta = json.loads(raw.decode("utf-8")) if raw is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return _bad(shard, where, "broken_json")
    if not isinstance(meta, dict):
        return _bad(shard, where, "not_an_object")
    if meta.get("status", "success") != "success":
        return _bad(shard, where, "not_downloaded", str(meta.get("key") or stem))
    key = str(meta.get("key") or stem)
    caption = read(".txt")
    if caption is not None:
        try:
            alt = caption.decode("utf-8")
        except UnicodeDecodeError:
            return _bad(shard, where, "not_utf8", key)
    else:
        alt = _text(meta.get("caption"))
    data = next((d for d in (read(ext) for ext in _IMAGE_EXT) if d is not None), None)
    row = {"key": key, "url": _text(meta.get("url")) or "", "alt": alt, "title": None, "surrounding_text": None,
           "lang_hint": None, "where": where, "shard": shard.name,
           "image_rel": f"{Path(shard.path).stem}/{stem}"}
    if data is None:
        row["image_missing"] = True
    else:
        row["image_bytes"] = data
    return row


def count_rows(shards) -> int:
    return sum(s.rows for s in shards)

