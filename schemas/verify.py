"""Full validation of a feature store, as ``vlp inspect DIR`` runs it.

Checks: the manifest (format, schema version), every listed shard's size and sha256,
that every record decodes and passes the schema rules, record counts (per shard and
in total), the image index, and files the manifest does not list. Collects all
problems instead of stopping at the first, and gathers a summary for people.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from vlp.schemas import vocab
from vlp.schemas.errors import SchemaError, StoreError
from vlp.schemas.shards import open_shard_reader, sha256_file
from vlp.schemas.store import FeatureStore


@dataclasses.dataclass
class StoreReport:
    root: str
    manifest: dict
    errors: list = dataclasses.field(default_factory=list)
    warnings: list = dataclasses.field(default_factory=list)
    records_checked: int = 0
    boxes_per_image: list = dataclasses.field(default_factory=list)
    object_counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    attribute_counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    bytes_on_disk: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary_lines(self, top: int = 10) -> list[str]:
        m = self.manifest
        lines = [
            f"store        {self.root}",
            f"format       {m.get('storage')}, schema v{m.get('schema_version')}, "
            f"{'complete' if m.get('complete') else 'INCOMPLETE (writer did not finish)'}",
            f"records      {m.get('num_records')} in {len(m.get('shards', []))} shard(s), "
            f"{self.bytes_on_disk / 1e6:.1f} MB on disk",
            f"fields       {', '.join(m.get('fields', []))}; features {m.get('feature_dim')}-d float16",
        ]
        detector = m.get("detector")
        if detector:
            weights = str(detector.get("weights_sha256") or "random")[:12]
            lines.append(f"detector     preset {detector.get('preset', '?')}, config {detector.get('config_hash', '?')}, "
                         f"weights {weights}")
        if self.boxes_per_image:
            b = np.asarray(self.boxes_per_image)
            lines.append(f"boxes/image  min {b.min()}, mean {b.mean():.1f}, max {b.max()}")
        if self.object_counts:
            objects = vocab.objects()
            common = ", ".join(f"{objects.name(i)} {c}" for i, c in self.object_counts.most_common(top))
            lines.append(f"top objects  {common}")
        if self.attribute_counts:
            attributes = vocab.attributes()
            common = ", ".join(f"{attributes.name(i)} {c}" for i, c in self.attribute_counts.most_common(top))
            lines.append(f"top attrs    {common}")
        lines.append(f"checked      {self.records_checked} record(s): "
                     + ("OK" if self.ok else f"{len(self.errors)} problem(s)"))
        lines += [f"warning      {w}" for w in self.warnings]
        lines += [f"ERROR        {e}" for e in self.errors]
        return lines


def verify_store(root, *, on_record: Optional[Callable[[], None]] = None,
                 max_errors: int = 50) -> StoreReport:
    """Validate everything in a store; problems are collected in ``report.errors``."""
    import warnings

    root = Path(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = FeatureStore(root)
    report = StoreReport(str(root), store.manifest)
    if store.ignored:
        report.warnings.append(f"{len(store.ignored)} file(s) not in the manifest are ignored "
                               f"(unfinished or torn shards): {', '.join(store.ignored[:5])}")
    if not store.manifest.get("complete"):
        report.warnings.append("the writer has not finished this store (manifest complete=false)")

    def error(message: str) -> None:
        if len(report.errors) < max_errors:
            report.errors.append(message)
        elif len(report.errors) == max_errors:
            report.errors.append("... further problems not listed")

    feature_dim = store.feature_dim
    fields = store.fields
    total = 0
    for entry in store.manifest["shards"]:
        path = root / entry["name"]
        size = path.stat().st_size
        report.bytes_on_disk += size
        if size != entry.get("bytes"):
            error(f"{entry['name']}: {size} bytes on disk, manifest says {entry.get('bytes')}")
        digest = sha256_file(path)
        if digest != entry.get("sha256"):
            # A damaged LMDB page can crash the reader, so a shard that fails its
            # checksum is reported and not opened.
            error(f"{entry['name']}: sha256 {digest[:12]}... differs from the manifest's "
                  f"{str(entry.get('sha256'))[:12]}...: the file changed after it was written; "
                  "its records were not checked")
            total += entry.get("records", 0)
            continue
        try:
            reader = open_shard_reader(path, store.storage)
        except StoreError as exc:
            error(str(exc))
            continue
        count = 0
        try:
            for record in reader:
                count += 1
                try:
                    record.validate(feature_dim)
                    if record.present_fields() != fields:
                        raise SchemaError(f"record {record.image_id!r} has fields "
                                          f"{record.present_fields()}, manifest says {fields}")
                    if record.image_id not in store:
                        raise SchemaError(f"record {record.image_id!r} is missing from the index")
                except SchemaError as exc:
                    error(f"{entry['name']}: {exc}")
                    continue
                report.records_checked += 1
                report.boxes_per_image.append(record.num_boxes)
                if record.objects_id is not None:
                    report.object_counts.update(record.objects_id.tolist())
                    report.attribute_counts.update(record.attrs_id.tolist())
                if on_record:
                    on_record()
        except Exception as exc:  # a damaged file can break iteration itself
            error(f"{entry['name']}: unreadable after {count} record(s) ({exc})")
        finally:
            reader.close()
        if count != entry.get("records"):
            error(f"{entry['name']}: holds {count} record(s), manifest says {entry.get('records')}")
        total += count
    if total != store.manifest.get("num_records"):
        error(f"manifest num_records={store.manifest.get('num_records')}, shards hold {total}")
    store.close()
    return report


def describe_record(record, top: int = 10) -> list[str]:
    """Human-readable lines for one record (``vlp inspect DIR IMAGE_ID``)."""
    lines = [f"image_id     {record.image_id}",
             f"image        {record.image_w} x {record.image_h} px",
             f"num_boxes    {record.num_boxes}"]
    for name, array in record.arrays().items():
        lines.append(f"{name:<12} {array.dtype} {list(array.shape)}")
    if record.objects_id is not None:
        objects, attributes = vocab.objects(), vocab.attributes()
        order = np.argsort(-record.objects_conf, kind="stable")[:top]
        lines.append(f"top {len(order)} boxes (attr obj conf; x1 y1 x2 y2):")
        for i in order:
            label = (f"{attributes.name(int(record.attrs_id[i]))} {record.attrs_conf[i]:.2f} "
                     f"{objects.name(int(record.objects_id[i]))} {record.objects_conf[i]:.2f}")
            box = " ".join(f"{v:.1f}" for v in record.boxes[i])
            lines.append(f"  {i:>3}  {label:<40} {box}")
    return lines
