"""What every builder shares: the output store, malformed-row logging, image-id templates,
the optional check against a feature store, and the one-paragraph summary.

Malformed input rows are never fatal by default: each becomes a line of
``OUT/errors.jsonl`` (``{"file", "line" or "where", "reason"}``) and a count in the
manifest's ``stats``. With ``strict=True`` the first one raises :class:`SchemaError`
naming ``file:line`` and the reason.
"""

from __future__ import annotations

import dataclasses
import json
import string
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

from vlp.core.errors_log import ERRORS_NAME, ErrorLog
from vlp.core.progress import Progress
from vlp.schemas.errors import SchemaError, StoreError
from vlp.schemas.pairs import PairStore, PairStoreWriter, join_report


@dataclasses.dataclass
class BuildResult:
    """What a builder did: where it wrote, how many pairs, its stats and timing."""

    out: Path
    kind: str
    num_pairs: int
    stats: dict
    seconds: float
    errors_file: Optional[Path] = None
    missing_report: Optional[str] = None

    def summary(self) -> str:
        parts = [f"Wrote {self.num_pairs} {self.kind} pairs to {self.out} in {self.seconds:.1f} s."]
        details = [f"{k.replace('_', ' ')} {v}" for k, v in self.stats.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if details:
            parts.append("Stats: " + ", ".join(details) + ".")
        if self.errors_file is not None:
            parts.append(f"Malformed input rows are listed in {self.errors_file}.")
        if self.missing_report is not None:
            parts.append(f"Feature check: {self.missing_report}.")
        return " ".join(parts)


class MalformedRows:
    """Counts and logs input rows that cannot be used (``OUT/errors.jsonl``)."""

    def __init__(self, out: Path, strict: bool = False):
        self.log = ErrorLog(Path(out) / ERRORS_NAME)
        self.log.remove()  # a fresh build starts a fresh log
        self.strict = strict
        self.count = 0

    def add(self, file, line, reason: str) -> None:
        """``line``: a 1-based line number, or a location string for JSON documents ("annotations[3]")."""
        where = f"{file}:{line}"
        if self.strict:
            raise SchemaError(f"{where}: {reason}")
        self.count += 1
        entry = {"file": str(file), "reason": reason}
        entry["line" if isinstance(line, int) else "where"] = line
        self.log.add(entry)

    def close(self) -> Optional[Path]:
        self.log.close()
        return self.log.written


class Build:
    """Context for one builder run: the pair writer, malformed rows, progress and stats.

    ``with Build(out, kind, ...) as b: b.add(pair) ...; result = b.result`` — on a clean
    exit the stats go into the manifest, the store is marked complete and, when
    ``features`` was given, checked against that feature store (missing images are
    reported, never dropped).
    """

    def __init__(self, out, kind: str, *, overwrite: bool = False, sources: Iterable = (),
                 strict: bool = False, features=None, optional: Iterable[str] = (),
                 shard_size: int = 100_000, total: int = 0, desc: Optional[str] = None,
                 unit: str = "pair", progress: str = "auto"):
        self.out = Path(out)
        self.kind = kind
        self.features = features
        self._start = time.perf_counter()
        self.writer = PairStoreWriter(self.out, kind, shard_size=shard_size,
                                      mode="overwrite" if overwrite else "create",
                                      optional=optional, sources=[str(s) for s in sources])
        self.bad = MalformedRows(self.out, strict)
        self.stats: dict = {}
        self.progress = Progress(total, desc or kind, unit=unit, mode=progress)
        self.result: Optional[BuildResult] = None

    def add(self, pair: dict, where: Optional[tuple] = None) -> bool:
        """Write one pair. With ``where`` = (file, line): a pair the store refuses (a bad
        field, a pair_id seen before) becomes a malformed row instead of an error."""
        if where is None:
            self.writer.add(pair)
            return True
        try:
            self.writer.add(pair)
        except (SchemaError, StoreError) as exc:
            self.bad.add(where[0], where[1], str(exc))
            return False
        return True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.progress.close()
        errors_file = self.bad.close()
        if exc_type is not None:
            self.writer.stats = {**self.stats, "malformed": self.bad.count}
            self.writer.abort()
            return False
        self.stats["malformed"] = self.bad.count
        missing = None
        self.writer.stats = self.stats
        self.writer.close()
        if self.features is not None:
            report = check_features(self.out, self.features)
            self.stats["pairs_missing_images"] = report.pairs_missing_images
            self.stats["image_ids_missing"] = len(report.missing_image_ids)
            missing = report.summary()
            # Record the check in the manifest too (the store itself is complete already).
            self.writer.stats = {**self.stats, "missing_image_ids_sample": report.missing_image_ids[:20]}
            self.writer._write_manifest(complete=True)
        self.result = BuildResult(self.out, self.kind, self.writer.num_pairs, self.stats,
                                  time.perf_counter() - self._start, errors_file, missing)
        return False


def check_features(pairs_dir, features):
    """join_report of a written pair store against a feature store (a path, FeatureStore or id set)."""
    from vlp.schemas import FeatureStore

    if isinstance(features, (str, Path)):
        features = FeatureStore(features)
    return join_report(PairStore(pairs_dir), features)


class ImageIdTemplate:
    """``str.format`` template turning a dataset's image naming into a store image_id.

    Fields are named by each importer (``{stem}``, ``{id:012d}``, ...); an unknown field
    is a SchemaError naming the template and the fields that exist.
    """

    def __init__(self, template: str, fields: Iterable[str], option: str = "--image-id-template"):
        self.template = template
        self.fields = tuple(fields)
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        unknown = [n for n in names if n.split(".")[0].split("[")[0] not in self.fields]
        if unknown or not names:
            raise SchemaError(f"{option} {template!r}: unknown field(s) {', '.join(unknown) or '(none given)'}; "
                              f"this importer knows {', '.join('{' + f + '}' for f in self.fields)}")

    def __call__(self, **values) -> str:
        return self.template.format(**values)


def stem(name: str) -> str:
    """File name without directory and extension ("train2014/COCO_x.jpg" -> "COCO_x")."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def read_json(path, what: str):
    """A whole JSON document; FileNotFoundError / SchemaError name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({what})")
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); expected {what}") from None
    except UnicodeDecodeError as exc:
        raise SchemaError(f"{path}: not UTF-8 text ({exc.reason}); expected {what}") from None


def iter_lines(path, what: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without the newline) of a text file, streamed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({what})")
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            yield number, line


def iter_jsonl(path, what: str, bad: MalformedRows) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSON-lines file; bad lines go to ``bad``; blank lines are skipped."""
    for number, line in iter_lines(path, what):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.add(path, number, f"not valid JSON ({exc.msg})")
            continue
        if not isinstance(row, dict):
            bad.add(path, number, f"expected a JSON object, got {type(row).__name__}")
            continue
        yield number, row


def require_list(doc, key: str, path, what: str) -> list:
    if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
        raise SchemaError(f"{path}: no '{key}' list; expected {what}")
    return doc[key]
