"""``volta-lmdb``: the LMDB that VOLTA's and ViLBERT multi-task's ``ImageFeaturesH5Reader`` open.

Both readers (e-bug/volta volta/datasets/_image_features_reader.py, facebookresearch/
vilbert-multi-task vilbert/datasets/_image_features_reader.py) open the path with
``lmdb.open(path, readonly=True, lock=False, ...)`` (a directory holding ``data.mdb``),
read ``pickle.loads(txn.get(b"keys"))`` - the list of every image key as bytes - and look an
image up as ``str(image_id).encode()``. Each value is a pickled dict:

* VOLTA reads ``img_h`` / ``img_w``, ``features`` (base64 float32, reshaped to
  ``(-1, v_feature_size)``) and ``boxes`` (base64 float32, ``(-1, 4)``, pixels);
* ViLBERT multi-task reads ``image_id`` (an int when the id is a number, as its
  annotation files have them; the key stays ``str(image_id)``), ``image_h`` / ``image_w``, ``num_boxes`` and the
  same ``features`` (reshaped to ``(num_boxes, 2048)``) and ``boxes``.

Values carry both spellings, plus ``objects_id`` / ``objects_conf`` / ``attrs_id`` /
``attrs_conf`` (base64 int64 / float32, the LXMERT dtypes) when the store has labels, so
``vlp import pickled-lmdb`` brings them back. The pickles hold only dicts, str, bytes and
ints (protocol 3): nothing numpy-version specific.
"""

from __future__ import annotations

import pickle

import lmdb

from vlp.exporters.common import ExportFormat, IdMap, RecordIssue, select_regions
from vlp.exporters.tsv import b64

PROTOCOL = 3
_COMMIT_EVERY = 1000
_COMMIT_BYTES = 32 << 20
#: LMDB's map size is an address-space reservation, not disk: data.mdb grows with the data
MAP_SIZE = 1 << 40


def open_output_lmdb(path) -> lmdb.Environment:
    """A new LMDB directory to write (no per-write fsync; the caller syncs once at the end)."""
    return lmdb.open(str(path), map_size=MAP_SIZE, subdir=True, meminit=False, sync=False,
                     map_async=True)


def add_committing(writer, key: bytes, value: bytes) -> None:
    """Put into ``writer.txn``; commit every 1000 records or 32 MB, whichever comes first.

    LMDB holds a write transaction's dirty pages in memory until the commit, so the bytes
    bound keeps memory flat (1000 records of 36 x 2048 float32 would be 400 MB)."""
    writer.txn.put(key, value)
    writer._pending += 1
    writer._pending_bytes = getattr(writer, "_pending_bytes", 0) + len(key) + len(value)
    if writer._pending >= _COMMIT_EVERY or writer._pending_bytes >= _COMMIT_BYTES:
        writer._pending_bytes = 0
        writer.txn.commit()
        writer.txn = writer.env.begin(write=True)
        writer._pending = 0


class VoltaLmdb(ExportFormat):
    name = "volta-lmdb"
    reader = ("e-bug/volta ImageFeaturesH5Reader and facebookresearch/vilbert-multi-task "
              "ImageFeaturesH5Reader (LMDB)")
    conventions = {
        "keys": "str(image_id).encode(); the key b'keys' holds the pickled list of all keys",
        "value": "pickled dict (protocol 3): image_id, img_h, img_w, image_h, image_w, num_boxes, "
                 "boxes, features (+ objects_id, objects_conf, attrs_id, attrs_conf when present)",
        "dtypes": {"boxes": "<f4 base64", "features": "<f4 base64", "objects_id": "<i8 base64",
                   "attrs_id": "<i8 base64", "objects_conf": "<f4 base64", "attrs_conf": "<f4 base64"},
        "boxes": "x1 y1 x2 y2 in pixels, clipped to the image",
        "regions": "store order (the detector's: most confident first)",
        "feature_size": "the readers reshape features to 2048 per box (VOLTA: v_feature_size)",
    }

    def __init__(self, work, store, options):
        super().__init__(work, store, options)
        self.ids = IdMap(options.get("id_format") or "keep")
        self.keys: list[bytes] = []
        self.env = open_output_lmdb(self.work)
        self.txn = self.env.begin(write=True)
        self._pending = 0

    def write(self, record) -> None:
        image_id = self.ids(record.image_id)
        key = str(image_id).encode("utf-8")
        if key == b"keys":
            raise RecordIssue("image_id 'keys' collides with the readers' key list entry")
        regions = select_regions(record, num_boxes=self.options.get("num_boxes"),
                                 max_boxes=self.options.get("max_boxes"),
                                 min_boxes=self.options.get("min_boxes"))
        self.clipped += regions.clipped
        value_id = int(image_id) if isinstance(image_id, str) and image_id.isascii() and image_id.isdigit() else image_id
        item = {"image_id": value_id, "img_h": record.image_h, "img_w": record.image_w,
                "image_h": record.image_h, "image_w": record.image_w, "num_boxes": regions.count,
                "boxes": b64(regions.boxes, "<f4"), "features": b64(regions.features32(), "<f4")}
        if regions.objects_id is not None:
            item.update(objects_id=b64(regions.objects_id, "<i8"), objects_conf=b64(regions.objects_conf, "<f4"),
                        attrs_id=b64(regions.attrs_id, "<i8"), attrs_conf=b64(regions.attrs_conf, "<f4"))
        self._add(key, pickle.dumps(item, protocol=PROTOCOL))
        self.keys.append(key)

    def _add(self, key: bytes, value: bytes) -> None:
        add_committing(self, key, value)

    def finish(self) -> dict:
        self.txn.put(b"keys", pickle.dumps(self.keys, protocol=PROTOCOL))
        self.txn.commit()
        self.env.sync(True)
        self.env.close()
        return {"keys": len(self.keys)}

    def abort(self) -> None:
        try:
            self.txn.abort()
        finally:
            self.env.close()
