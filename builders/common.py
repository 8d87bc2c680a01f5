"""What every builder shares: the output store, malformed-row logging, image-id templates,
the optional check against a feature store, and the one-paragraph summary.

Malformed input rows are never fatal by default: each becomes a line of
``OUT/errors.jsonl`` (``{"file", "line" or "where", "field", "reason"}``; ``field`` when one
field is to blame) and a count in the manifest's ``stats``. With ``strict=True`` the first
one raises :class:`SchemaError` naming ``file:line`` and the reason. A file that cannot be
used as a whole (not JSON, not UTF-8 JSON, the wrong structure) is a :class:`SchemaError`.

A build writes into ``OUT.partial`` and renames it to ``OUT`` when it succeeds (see
:class:`vlp.schemas.pairs.PairStoreWriter`): a failed build leaves nothing behind.
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
from vlp.schemas.pairs import PAIR_SHARD_SIZE, PairStore, PairStoreWriter, join_report


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
        if "image_id_template" in self.stats:
            parts.append(f"Image ids by {self.stats['image_id_template']}" + (
                "." if "images_found_by_template" in self.stats else
                " (--image-id-template auto without --features: pass --features to pick the naming that "
                "finds the images)."))
        if self.stats.get("images_without_split"):
            parts.append(f"{self.stats['images_without_split']} image(s) not in {self.stats.get('splits_from')} got "
                         f"split {self.stats.get('split_of_images_without_split', '')!r} (--split).")
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

    def add(self, file, line, reason: str, field: Optional[str] = None) -> None:
        """``line``: a 1-based line number, or a location string for JSON documents ("annotations[3]");
        ``field``: the field to blame, when there is one."""
        where = f"{file}:{line}"
        if self.strict:
            raise SchemaError(f"{where}: {field + ': ' if field else ''}{reason}")
        self.count += 1
        entry = {"file": str(file), "reason": reason}
        entry["line" if isinstance(line, int) else "where"] = line
        if field is not None:
            entry["field"] = field
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
                 shard_size: int = PAIR_SHARD_SIZE, total: int = 0, desc: Optional[str] = None,
                 unit: str = "pair", progress: str = "auto"):
        self.out = Path(out)
        self.kind = kind
        self.features = features
        self._start = time.perf_counter()
        self.writer = PairStoreWriter(self.out, kind, shard_size=shard_size,
                                      mode="overwrite" if overwrite else "create",
                                      optional=optional, sources=[str(s) for s in sources])
        self.bad = MalformedRows(self.writer.path, strict)
        self.stats: dict = {}
        self._progress_mode = progress
        self.progress = Progress(total, desc or kind, unit=unit, mode=progress)
        self.result: Optional[BuildResult] = None

    @property
    def path(self) -> Path:
        """The folder being written (``OUT.partial`` until the build succeeds): extra files go here."""
        return self.writer.path

    def set_total(self, total: int) -> None:
        """The progress total, once it is known."""
        self.progress.set_total(total)

    def new_progress(self, total: int, desc: str, unit: str) -> None:
        """Close the current progress display and start another (a builder's next pass)."""
        self.progress.close()
        self.progress = Progress(total, desc, unit=unit, mode=self._progress_mode)

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
        self.bad.close()
        if exc_type is not None:
            self.writer.abort()
            return False
        try:
            self.stats["malformed"] = self.bad.count
            missing = None
            self.writer.stats = self.stats
            self.writer.close(publish=False)
            if self.features is not None:
                report = check_features(self.writer.path, self.features)
                self.stats["pairs_missing_images"] = report.pairs_missing_images
                self.stats["image_ids_missing"] = len(report.missing_image_ids)
                missing = report.summary()
                self.writer.stats = {**self.stats, "missing_image_ids_sample": report.missing_image_ids[:20]}
                self.writer.rewrite_manifest()
            self.writer.publish()
        except BaseException:
            self.writer.abort()
            raise
        errors_file = self.out / ERRORS_NAME if self.bad.count else None
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
        """The image_id; SchemaError when a value does not fit the template (``{id:012d}`` of a text)."""
        try:
            image_id = self.template.format(**values)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items() if len(repr(v)) < 60)
            raise SchemaError(f"image id template {self.template!r} does not fit ({shown}): {exc}") from None
        if not image_id:
            raise SchemaError(f"image id template {self.template!r} gives an empty image id")
        return image_id


def stem(name: str) -> str:
    """File name without directory and extension ("train2014/COCO_x.jpg" -> "COCO_x")."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def type_name(value) -> str:
    """How a JSON value's type is called in messages."""
    return {dict: "object", list: "list", str: "text", bool: "true/false", type(None): "null",
            int: "integer", float: "number"}.get(type(value), type(value).__name__)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_id(value) -> bool:
    """An id field: an integer (not true/false) or a non-empty text."""
    return is_int(value) or (isinstance(value, str) and bool(value.strip()))


def bad_field(value, expected: str) -> str:
    """The reason for a wrongly typed field: "expected an integer id, got list"."""
    return f"expected {expected}, got {type_name(value)}" + (f" {value!r}" if isinstance(value, (str, int, float))
                                                              and len(repr(value)) <= 40 else "")


def _load_json(data: bytes, path, what: str):
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); expected {what}") from None
    except UnicodeDecodeError as exc:
        raise SchemaError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected {what}") from None
    except RecursionError:
        raise SchemaError(f"{path}: JSON nested too deeply to read; expected {what}") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise SchemaError(f"{path}: not usable JSON ({exc}); expected {what}") from None


def read_json(path, what: str):
    """A whole JSON document; FileNotFoundError / SchemaError name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({what})")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SchemaError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return _load_json(data, path, what)


def iter_lines(path, what: str, bad: Optional[MalformedRows] = None) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without the newline) of a UTF-8 text file, streamed.

    A line that is not UTF-8 goes to ``bad`` (file:line, the byte) and is skipped; without
    ``bad`` it is a SchemaError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({what})")
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                reason = f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
                if bad is None:
                    raise SchemaError(f"{path}:{number}: {reason}") from None
                bad.add(path, number, reason)
                continue
            if number == 1 and line.startswith("\ufeff"):
                line = line[1:]  # a UTF-8 byte-order mark
            yield number, line.rstrip("\r\n")


def count_lines(path) -> int:
    """Lines of a text file (a last line without newline counts), by a fast binary pass."""
    count, last = 0, b"\n"
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def iter_jsonl(path, what: str, bad: MalformedRows) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSON-lines file; bad lines go to ``bad``; blank lines are skipped."""
    for number, line in iter_lines(path, what, bad):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.add(path, number, f"not valid JSON ({exc.msg})")
            continue
        except (RecursionError, ValueError) as exc:
            bad.add(path, number, f"not usable JSON ({type(exc).__name__})")
            continue
        if not isinstance(row, dict):
            bad.add(path, number, f"expected a JSON object, got {type_name(row)}")
            continue
        yield number, row


def require_list(doc, key: str, path, what: str) -> list:
    if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
        raise SchemaError(f"{path}: no '{key}' list; expected {what}")
    return doc[key]


# --------------------------------------------------------------------------- splits from elsewhere


def load_splits(source) -> tuple[dict, str]:
    """image_id -> split from ``source``: a pair store folder (each image's split there),
    a json file (``{image_id: split}``, or ``{split: [image_id, ...]}`` like the synthetic
    world's ``splits.json``) or a text file of ``image_id split`` lines.

    Returns (mapping, a description for the stats). An image with two different splits
    in a pair store keeps the first and the conflict is a SchemaError naming it.
    """
    source = Path(source)
    if source.is_dir():
        store = PairStore(source)
        splits: dict = {}
        for image_id, split in zip(store.column("image_id"), store.column("split")):
            if not split:
                continue
            known = splits.setdefault(image_id, split)
            if known != split:
                raise SchemaError(f"{source}: image {image_id!r} is in two splits ({known!r} and {split!r}); "
                                  "--splits-from needs one split per image")
        return splits, f"pair store {source}"
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file or folder (--splits-from)")
    if source.suffix.lower() == ".json":
        doc = read_json(source, "splits: {image_id: split} or {split: [image_id, ...]}")
        if isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values()):
            splits = {}
            for split, ids in doc.items():
                for image_id in ids:
                    if not is_id(image_id):
                        raise SchemaError(f"{source}: [{split!r}]: {bad_field(image_id, 'an image id')}")
                    splits[str(image_id)] = split
            return splits, f"split file {source}"
        if isinstance(doc, dict) and all(isinstance(v, str) for v in doc.values()):
            return dict(doc), f"split file {source}"
        raise SchemaError(f"{source}: expected {{image_id: split}} or {{split: [image_id, ...]}}")
    splits = {}
    for number, line in iter_lines(source, "split file (image_id split lines)"):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) != 2:
            raise SchemaError(f"{source}:{number}: expected 'image_id split', found {len(parts)} field(s)")
        splits[parts[0]] = parts[1]
    return splits, f"split file {source}"


class SplitOf:
    """Each image's split: from ``splits_from`` (another pair store or a split file, see
    :func:`vlp.builders.common.load_splits`) when given, else ``default`` for every image.
    Images the source does not know get ``default`` and are counted (``images_without_split``)."""

    def __init__(self, splits_from=None, default: str = ""):
        self.default = default
        self.splits, self.source = load_splits(splits_from) if splits_from is not None else (None, None)
        self.missing = 0

    def __call__(self, image_id: str) -> str:
        if self.splits is None:
            return self.default
        split = self.splits.get(image_id)
        if split is None:
            self.missing += 1
            return self.default
        return split

    def stats(self) -> dict:
        if self.splits is None:
            return {}
        return {"splits_from": self.source, "images_without_split": self.missing,
                "split_of_images_without_split": self.default}
