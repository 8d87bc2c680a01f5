"""The streaming writer every export format shares.

One :class:`Export` run reads a feature store record by record (flat memory), asks the
format to write each record, and keeps the bookkeeping in one place:

* regions are chosen the way the target's readers expect (:func:`select_regions`: the
  store's order, a fixed count or a cap, boxes clipped to the image);
* a record that cannot satisfy the target (too few boxes, an id the format cannot carry)
  raises :class:`RecordIssue`; it becomes a line of ``errors.jsonl`` and the export goes on
  (``on_error="skip"``) or stops (``"stop"``);
* progress with rate and ETA (:class:`vlp.core.progress.Progress`);
* the result is **atomic**: everything is written under ``<out>.partial`` beside the
  target and renamed into place at the end, with the sidecar ``vlp-export.json``
  (``complete: true``) written last. A killed export leaves no ``<out>`` (or the previous
  one, untouched) and a ``.partial`` that the next run deletes.

For a single-file target (a TSV) the file, its sidecar ``<out>.vlp-export.json`` and its
``<out>.errors.jsonl`` are built in the ``.partial`` folder; the sidecar and errors file
are moved first and the data file last, so the data file appears only once complete.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from vlp import __version__
from vlp.core.durable import atomic_write_json, fsync_dir
from vlp.core.errors_log import ERRORS_NAME, ErrorLog
from vlp.core.progress import Progress
from vlp.schemas import FeatureRecord, FeatureStore, StoreError
from vlp.schemas.manifest import now_iso

SIDECAR_NAME = "vlp-export.json"
PARTIAL_SUFFIX = ".partial"
ID_FORMATS = ("keep", "int", "trailing-int")
_TRAILING_DIGITS = re.compile(r"(\d+)\D*$")


class RecordIssue(Exception):
    """One record the target cannot hold; the export logs it and goes on (or stops)."""


class ExportError(StoreError):
    """The export as a whole cannot run (bad options, nothing exportable); a user error."""


def image_id_as(image_id: str, id_format: str):
    """The id a target format gets: the vlp id (``keep``), or an int (``int``: the id is a
    decimal number; ``trailing-int``: its last run of digits, so ``COCO_val2014_000000000042``
    and ``val/42.jpg`` give 42). RecordIssue when the id has no such number."""
    if id_format == "keep":
        return image_id
    if id_format == "int":
        if not image_id.isascii() or not image_id.isdigit():
            raise RecordIssue(f"image_id {image_id!r} is not an integer (--id-format int); "
                              "use --id-format trailing-int to take its last digits")
        return int(image_id)
    if id_format == "trailing-int":
        found = _TRAILING_DIGITS.search(image_id) if image_id.isascii() else None
        if found is None:
            raise RecordIssue(f"image_id {image_id!r} holds no digits (--id-format trailing-int)")
        return int(found.group(1))
    raise ExportError(f"--id-format must be one of {', '.join(ID_FORMATS)}, got {id_format!r}")


class IdMap:
    """Converts ids for a format and refuses a second record that maps to the same id."""

    def __init__(self, id_format: str):
        image_id_as("0", id_format)  # validates the format name
        self.id_format = id_format
        self._seen: dict = {}

    def __call__(self, image_id: str):
        target = image_id_as(image_id, self.id_format)
        first = self._seen.setdefault(target, image_id)
        if first != image_id:
            raise RecordIssue(f"image_id {image_id!r} becomes {target!r}, which record {first!r} "
                              "already has")
        return target


@dataclasses.dataclass
class Regions:
    """The regions of one record as a target gets them (chosen, ordered, clipped)."""

    boxes: np.ndarray  # float32 [n, 4], x1 y1 x2 y2 pixels, inside the image
    features: np.ndarray  # float16 [n, D] (the store's values)
    objects_id: Optional[np.ndarray] = None
    objects_conf: Optional[np.ndarray] = None
    attrs_id: Optional[np.ndarray] = None
    attrs_conf: Optional[np.ndarray] = None
    cls_prob: Optional[np.ndarray] = None  # float16 [n, 1601], vlp order: background last
    clipped: int = 0  # boxes moved by clipping

    @property
    def count(self) -> int:
        return int(self.boxes.shape[0])

    def features32(self) -> np.ndarray:
        """Features as little-endian float32 (exact: every float16 is a float32).

        numpy's ``astype``, not torch's conversion: torch's is faster on an idle machine
        (``FeatureRecord.features_float32``), but its intra-op threads make it ~50x slower
        than numpy on a busy one (24 ms against 0.5 ms for 36 x 2048 values, measured on the
        shared 2-core VM), and an export usually runs beside other work."""
        return self.features.astype("<f4")


def select_regions(record: FeatureRecord, *, num_boxes: Optional[int] = None,
                   max_boxes: Optional[int] = None, min_boxes: Optional[int] = None,
                   need_labels: bool = False, need_cls_prob: bool = False) -> Regions:
    """Choose a record's regions the way BUTD-style readers expect them.

    Regions keep the store's order - vlp-extract writes them in the detector's order, most
    confident first, as BUTD's generate_tsv.py does - so cutting keeps the first ones:
    ``num_boxes`` keeps exactly that many (RecordIssue when the record has fewer),
    ``max_boxes`` at most that many; ``min_boxes`` refuses records with fewer. Boxes are
    clipped to [0, W] x [0, H] (vlp allows a 1-pixel overshoot; readers such as LXMERT's
    assert boxes / size <= 1).
    """
    n = record.num_boxes
    if need_labels and record.objects_id is None:
        raise RecordIssue("the store has no object/attribute labels, which this format needs")
    if need_cls_prob and record.cls_prob is None:
        raise RecordIssue("the store has no cls_prob (class probabilities), which this format needs")
    least = num_boxes if num_boxes is not None else min_boxes
    if least is not None and n < least:
        raise RecordIssue(f"too few boxes: {n}, the target needs at least {least}")
    keep = num_boxes if num_boxes is not None else max_boxes
    order = slice(None, keep)  # a view: no copy
    boxes = np.array(record.boxes[order], dtype="<f4")
    limits = np.array([record.image_w, record.image_h, record.image_w, record.image_h], dtype="<f4")
    clipped_boxes = np.clip(boxes, 0, limits)
    clipped = int(np.count_nonzero(np.any(clipped_boxes != boxes, axis=1)))

    def pick(name):
        value = getattr(record, name)
        return None if value is None else value[order]

    return Regions(boxes=clipped_boxes, features=record.features[order],
                   objects_id=pick("objects_id"), objects_conf=pick("objects_conf"),
                   attrs_id=pick("attrs_id"), attrs_conf=pick("attrs_conf"),
                   cls_prob=pick("cls_prob"), clipped=clipped)


class ExportFormat:
    """One target format. Subclasses set the class attributes and implement ``write``.

    ``work`` is where to write: the data file itself (``single_file``) or an empty folder.
    ``options`` holds the export settings (see :data:`vlp.exporters.OPTION_DEFAULTS`).
    """

    name = ""
    single_file = False
    #: what the target's reader expects, for the sidecar and the README table
    reader = ""
    conventions: dict = {}

    def __init__(self, work: Path, store: FeatureStore, options: dict):

        self.work = Path(work)
        self.store = store
        self.options = options
        self.clipped = 0

    def write(self, record: FeatureRecord) -> None:
        raise NotImplementedError

    def finish(self) -> dict:
        """Close the output; returns extra sidecar entries."""
        return {}

    def abort(self) -> None:
        """Release open handles after a failure (the work folder is deleted by the caller)."""


@dataclasses.dataclass
class ExportStats:
    out: Path
    exported: int = 0
    skipped: int = 0
    clipped_boxes: int = 0
    errors_file: Optional[Path] = None
    sidecar: Optional[Path] = None
    unit: str = "record"

    def summary(self) -> str:
        text = f"exported {self.exported} {self.unit}(s)"
        if self.clipped_boxes:
            text += f"; {self.clipped_boxes} box(es) clipped to the image"
        if self.skipped:
            text += f"; skipped {self.skipped} {self.unit}(s), listed in {self.errors_file}"
        return text


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def store_summary(store: FeatureStore) -> dict:
    """What the sidecar says about the source store."""
    manifest = store.manifest
    detector = manifest.get("detector") or {}
    return {"path": str(store.root.resolve()), "num_records": len(store),
            "feature_dim": store.feature_dim, "fields": list(store.fields),
            "detector": detector, "detector_config_hash": detector.get("config_hash"),
            "vlp_version": manifest.get("vlp_version")}


def run_export(format_cls, store_dir, out, *, options: dict, overwrite: bool = False,
               on_error: str = "skip", progress: str = "auto") -> ExportStats:
    """Export the feature store at ``store_dir`` to ``out`` with ``format_cls`` (see module doc)."""
    if on_error not in ("stop", "skip"):
        raise ExportError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    out = Path(out)
    store = FeatureStore(store_dir, allow_incomplete=False)
    single = format_cls.single_file
    sidecar_final = out.with_name(out.name + "." + SIDECAR_NAME) if single else out / SIDECAR_NAME
    errors_final = out.with_name(out.name + "." + ERRORS_NAME) if single else out / ERRORS_NAME
    _restore_interrupted_swap(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists; pass --overwrite to replace it")
    if single and out.is_dir():
        raise ExportError(f"{out}: is a folder; {format_cls.name} writes one file")
    source, target = store.root.resolve(), out.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise ExportError(f"{out}: the source store {store.root} is or holds it; choose another place")
    if out.is_dir() and any(out.iterdir()) and not (out / SIDECAR_NAME).is_file():
        raise ExportError(f"{out}: a folder that holds no earlier vlp export ({SIDECAR_NAME}); "
                          "--overwrite replaces only those, choose another place")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    _remove(partial)  # what a killed run left
    partial.mkdir()
    work = partial / out.name if single else partial
    errors = ErrorLog(partial / (errors_final.name if single else ERRORS_NAME))
    stats = ExportStats(out=out)
    writer = None
    bar = None
    try:
        writer = format_cls(work, store, options)
        bar = Progress(len(store), f"export {format_cls.name}", unit="rec", mode=progress)
        for record in store:
            try:
                writer.write(record)
            except RecordIssue as issue:
                if on_error == "stop":
                    raise ExportError(f"record {record.image_id!r}: {issue}") from None
                errors.add({"image_id": record.image_id, "reason": str(issue)})
                stats.skipped += 1
            else:
                stats.exported += 1
            if stats.skipped:
                bar.update(1, skipped=stats.skipped)
            else:
                bar.update(1)
        if stats.exported == 0:
            raise ExportError(f"no record of {store.root} could be exported to {format_cls.name}"
                              + (f" (first reason: {errors.read()[0]['reason']})" if stats.skipped else ""))
        extra = writer.finish()
        finished, writer = writer, None  # closed: nothing left to abort
        stats.clipped_boxes = finished.clipped
        errors.close()
        sidecar = {
            "format": format_cls.name, "complete": True, "created": now_iso(),
            "vlp_version": __version__, "reader": format_cls.reader,
            "conventions": format_cls.conventions, "settings": options,
            "source": store_summary(store),
            "records": {"exported": stats.exported, "skipped": stats.skipped,
                        "clipped_boxes": stats.clipped_boxes},
            "errors_file": errors_final.name if stats.skipped else None,
            **extra,
        }
        atomic_write_json(partial / (sidecar_final.name if single else SIDECAR_NAME), sidecar)
        _publish(partial, out, single, sidecar_final, errors_final, stats.skipped > 0)
    except BaseException:
        if bar is not None:
            bar.close()
        errors.close()
        if writer is not None:
            writer.abort()
        store.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    bar.close()
    store.close()
    stats.sidecar = sidecar_final
    stats.errors_file = errors_final if stats.skipped else None
    return stats


def _old_name(out: Path) -> Path:
    return out.with_name(out.name + ".old")


def _restore_interrupted_swap(out: Path) -> None:
    """A run killed between moving an earlier export aside and moving the new one in
    leaves ``OUT.old`` and no ``OUT``: put the earlier export back."""
    old = _old_name(out)
    if old.is_dir() and not out.exists() and (old / SIDECAR_NAME).is_file():
        os.rename(old, out)


def _publish(partial: Path, out: Path, single: bool, sidecar: Path, errors: Path, has_errors: bool) -> None:
    """Move the finished result into place (see the module doc for the order)."""
    if single:
        for final in (sidecar, errors):
            _remove(final)
        if has_errors:
            os.replace(partial / errors.name, errors)
        os.replace(partial / sidecar.name, sidecar)
        os.replace(partial / out.name, out)  # atomic, also over an earlier file
        fsync_dir(out.parent)
        shutil.rmtree(partial, ignore_errors=True)
        return
    old = None
    if out.exists():
        old = _old_name(out)
        _remove(old)
        os.rename(out, old)
    os.rename(partial, out)
    fsync_dir(out.parent)
    if old is not None:
        _remove(old)
