"""``uniter-imgdb``: UNITER's image database as its ``DetectFeatLmdb`` reads it.

UNITER (ChenRocks/UNITER data/data.py) opens ``IMG_DIR/feat_th{conf_th}_max{max_bb}_min{min_bb}``
(an LMDB directory) and reads ``IMG_DIR/nbb_th{conf_th}_max{max_bb}_min{min_bb}.json``
(image name -> number of boxes to use). Its defaults are conf_th 0.2, max_bb 100, min_bb 10
(also in its training configs), and its training scripts pass ``compressed_db`` False unless
``--compressed_db`` is given (the class's own default is True). In that uncompressed layout,
vlp's default, each value is
``msgpack.dumps(dict, use_bin_type=True)`` with arrays in msgpack-numpy's encoding, read back
with ``msgpack.loads(value, raw=False)`` after ``msgpack_numpy.patch()``:

* ``features`` float16 [nbb, D];
* ``norm_bb`` float16 [nbb, 6]: x1/W, y1/H, x2/W, y2/H, w/W, h/H (the reader appends the
  area as the 7th column);
* ``conf`` float16 [nbb]: the box's object confidence;
* ``soft_labels`` float16 [nbb, 1601]: class probabilities with the BACKGROUND FIRST (Caffe
  order; UNITER's MRC drops column 0), when the store has ``cls_prob``.

With ``compress`` (UNITER's ``--compressed_db``; the class's default) the folder is
``feat_th..._compressed`` and each value is the bytes of ``np.savez_compressed`` of the same
arrays, read with ``np.load(io.BytesIO(value), allow_pickle=True)`` (no pickles inside: plain
arrays, ``.npy`` format 1.0, which numpy 1.x reads).

As UNITER's own converter does, each image keeps its first ``nbb = min(max_bb, max(min_bb,
#(conf > conf_th)))`` boxes (store order: the detector's, most confident first) and the
arrays are cut to them; an image with fewer than
``min_bb`` boxes cannot satisfy the layout and is logged. The key of an image is its name
in UNITER's text databases: the vlp image_id plus ``key_suffix`` (default ``.npz``, the
suffix of the BUTD-docker files UNITER's keys come from). ``__keys__`` holds the JSON list
of all names, as UNITER's converter writes it.

msgpack-numpy is not needed to write: its array encoding is a documented map
``{b"nd": True, b"type": dtype.str, b"kind": b"", b"shape": shape, b"data": raw bytes}``.
"""

from __future__ import annotations

import io
import json

import msgpack
import numpy as np

from vlp.core.durable import atomic_write_json
from vlp.exporters.common import ExportFormat, IdMap, RecordIssue, select_regions
from vlp.exporters.volta import add_committing, open_output_lmdb

DEFAULT_CONF_TH, DEFAULT_MAX_BB, DEFAULT_MIN_BB = 0.2, 100, 10


def encode_array(array: np.ndarray) -> dict:
    """An array in msgpack-numpy's layout (what ``msgpack_numpy.encode`` produces)."""
    array = np.ascontiguousarray(array)
    return {b"nd": True, b"type": array.dtype.str, b"kind": b"", b"shape": list(array.shape),
            b"data": array.tobytes()}


def db_names(conf_th: float, max_bb: int, min_bb: int, compress: bool = False) -> tuple[str, str]:
    """(LMDB folder, nbb json) names for these settings, spelled as UNITER's f-strings spell them."""
    tail = f"th{conf_th}_max{max_bb}_min{min_bb}"
    return f"feat_{tail}" + ("_compressed" if compress else ""), f"nbb_{tail}.json"


def npz_bytes(arrays: dict) -> bytes:
    """What UNITER's converter stores with --compress: np.savez_compressed of the arrays."""
    with io.BytesIO() as writer:
        np.savez_compressed(writer, **arrays)
        return writer.getvalue()


def num_bb(conf: np.ndarray, conf_th: float, max_bb: int, min_bb: int) -> int:
    return int(min(max_bb, max(min_bb, int(np.count_nonzero(conf > conf_th)))))


class UniterImgDb(ExportFormat):
    name = "uniter-imgdb"
    reader = "ChenRocks/UNITER data/data.py DetectFeatLmdb as its training scripts open it (compress=False)"
    conventions = {
        "layout": "OUT/feat_th{conf_th}_max{max_bb}_min{min_bb}/ (LMDB) + OUT/nbb_th..._max..._min....json",
        "value": "msgpack (use_bin_type) dict of msgpack-numpy arrays: features <f2 [nbb,D], "
                 "norm_bb <f2 [nbb,6], conf <f2 [nbb], soft_labels <f2 [nbb,1601]",
        "norm_bb": "x1/W y1/H x2/W y2/H w/W h/H",
        "soft_labels": "background first (column 0)",
        "regions": "store order, the first nbb = min(max_bb, max(min_bb, #(conf > conf_th)))",
        "key": "image_id + key_suffix; __keys__ = JSON list of keys",
    }

    def __init__(self, work, store, options):
        super().__init__(work, store, options)
        self.conf_th = float(options.get("conf_th", DEFAULT_CONF_TH))
        self.max_bb = int(options.get("max_boxes") or DEFAULT_MAX_BB)
        self.min_bb = int(options.get("min_boxes") or DEFAULT_MIN_BB)
        self.suffix = options.get("key_suffix", ".npz")
        self.ids = IdMap(options.get("id_format") or "keep")
        self.compress = bool(options.get("compress"))
        self.db_name, self.nbb_name = db_names(self.conf_th, self.max_bb, self.min_bb, self.compress)
        self.name2nbb: dict[str, int] = {}
        self.env = open_output_lmdb(self.work / self.db_name)
        self.txn = self.env.begin(write=True)
        self._pending = 0

    def write(self, record) -> None:
        name = f"{self.ids(record.image_id)}{self.suffix}"
        if name == "__keys__":
            raise RecordIssue("the name __keys__ is UNITER's key list entry")
        regions = select_regions(record, min_boxes=self.min_bb, need_labels=True)
        nbb = num_bb(regions.objects_conf, self.conf_th, self.max_bb, self.min_bb)
        w, h = float(record.image_w), float(record.image_h)
        boxes = regions.boxes[:nbb].astype(np.float64)
        norm = np.stack([boxes[:, 0] / w, boxes[:, 1] / h, boxes[:, 2] / w, boxes[:, 3] / h,
                         (boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h], axis=1)
        self.clipped += regions.clipped
        arrays = {"features": np.asarray(regions.features[:nbb], dtype="<f2"), "norm_bb": norm.astype("<f2"),
                  "conf": regions.objects_conf[:nbb].astype("<f2")}
        if regions.cls_prob is not None:
            probs = regions.cls_prob[:nbb]
            arrays["soft_labels"] = np.concatenate([probs[:, -1:], probs[:, :-1]], axis=1).astype("<f2")
        if self.compress:
            value = npz_bytes(arrays)
        else:
            value = msgpack.packb({k: encode_array(v) for k, v in arrays.items()}, use_bin_type=True)
        add_committing(self, name.encode("utf-8"), value)
        self.name2nbb[name] = nbb

    def finish(self) -> dict:
        self.txn.put(b"__keys__", json.dumps(list(self.name2nbb)).encode("utf-8"))
        self.txn.commit()
        self.env.sync(True)
        self.env.close()
        atomic_write_json(self.work / self.nbb_name, self.name2nbb, indent=None)
        return {"lmdb": self.db_name, "nbb_file": self.nbb_name, "soft_labels": "cls_prob" in self.store.fields,
                "reader_options": {"conf_th": self.conf_th, "max_bb": self.max_bb, "min_bb": self.min_bb,
                                   "compress": self.compress}}

    def abort(self) -> None:
        try:
            self.txn.abort()
        finally:
            self.env.close()
