"""The two TSV layouts of the bottom-up-attention tradition.

``lxmert-tsv`` - what LXMERT's ``load_obj_tsv`` (airsplay/lxmert src/utils.py) reads: no
header, 10 tab-separated columns ``img_id img_h img_w objects_id objects_conf attrs_id
attrs_conf num_boxes boxes features`` (height BEFORE width), each array base64 of its raw
little-endian bytes: ids int64, everything else float32. Its task loaders stack images
into batches of a fixed box count (36) and assert every box lies inside the image after
dividing by the size, so ``num_boxes`` (default 36) is required and boxes are clipped.

``butd-tsv`` - what bottom-up-attention's ``tools/generate_tsv.py`` writes and its readers
(bottom-up-attention-vqa's converter, the captioning repos) read: 6 columns ``image_id
image_w image_h num_boxes boxes features`` (width BEFORE height), boxes and features base64
float32, integer image ids (``int(item['image_id'])``). vlp ids become integers by
``id_format``; a record whose id cannot is logged, not written.

Lines are written with ``\\n`` endings and no quoting: ids holding a tab, a newline or a
quote character would break ``csv.DictReader``, so such records are refused.
"""

from __future__ import annotations

import base64
import os

import numpy as np

from vlp.exporters.common import ExportError, ExportFormat, IdMap, RecordIssue, select_regions

_FORBIDDEN_ID_CHARS = ("\t", "\n", "\r", '"')


def b64(array: np.ndarray, dtype: str) -> bytes:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes())


class _TsvFormat(ExportFormat):
    single_file = True

    def __init__(self, work, store, options):
        super().__init__(work, store, options)
        self._handle = open(self.work, "wb")

    def _line(self, cells) -> None:
        self._handle.write(b"\t".join(cells) + b"\n")

    def finish(self) -> dict:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        return {"files": [self.work.name]}

    def abort(self) -> None:
        self._handle.close()


def _check_text_id(image_id: str) -> bytes:
    if any(c in image_id for c in _FORBIDDEN_ID_CHARS):
        raise RecordIssue(f"image_id {image_id!r} holds a tab, newline or quote, which a TSV "
                          "cell read by csv.DictReader cannot carry")
    return image_id.encode("utf-8")


#: the count of LXMERT's released features (and of vlp's butd-36 preset)
LXMERT_BOXES = 36


def lxmert_box_count(detector) -> int:
    """The default fixed box count: 36, or fewer when the store's detector keeps fewer per
    image - its ``min_boxes``, the largest count every image of that detector reaches (the
    demo detector keeps 10-100, so 10). LXMERT's loaders need one count per file, not 36."""
    config = (detector or {}).get("config") or {}
    least = config.get("min_boxes")
    if isinstance(least, int) and 1 <= least < LXMERT_BOXES:
        return least
    return LXMERT_BOXES


class LxmertTsv(_TsvFormat):
    name = "lxmert-tsv"
    reader = "airsplay/lxmert src/utils.py load_obj_tsv and its task datasets"
    conventions = {
        "columns": ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id",
                    "attrs_conf", "num_boxes", "boxes", "features"],
        "dtypes": {"objects_id": "<i8", "attrs_id": "<i8", "others": "<f4"},
        "height_before_width": True,
        "boxes": "x1 y1 x2 y2 in pixels, clipped to the image",
        "regions": "store order (the detector's: most confident first), the first num_boxes",
    }

    def __init__(self, work, store, options):
        if options.get("num_boxes") == "auto":
            options["num_boxes"] = lxmert_box_count(store.manifest.get("detector"))
        super().__init__(work, store, options)

    def write(self, record) -> None:
        image_id = _check_text_id(record.image_id)
        regions = select_regions(record, num_boxes=self.options.get("num_boxes"),
                                 max_boxes=self.options.get("max_boxes"), need_labels=True)
        self.clipped += regions.clipped
        self._line([image_id, b"%d" % record.image_h, b"%d" % record.image_w,
                    b64(regions.objects_id, "<i8"), b64(regions.objects_conf, "<f4"),
                    b64(regions.attrs_id, "<i8"), b64(regions.attrs_conf, "<f4"),
                    b"%d" % regions.count, b64(regions.boxes, "<f4"), b64(regions.features32(), "<f4")])


class ButdTsv(_TsvFormat):
    name = "butd-tsv"
    reader = ("peteanderson80/bottom-up-attention tools/generate_tsv.py layout, as read by "
              "hengyuan-hu/bottom-up-attention-vqa tools/detection_features_converter.py")
    conventions = {
        "columns": ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"],
        "dtypes": {"boxes": "<f4", "features": "<f4"},
        "width_before_height": True,
        "image_id": "an integer (id_format)",
        "boxes": "x1 y1 x2 y2 in pixels, clipped to the image",
        "regions": "store order (the detector's: most confident first)",
    }

    def __init__(self, work, store, options):
        self.ids = IdMap(options.get("id_format") or "int")
        if self.ids.id_format == "keep":
            raise ExportError("butd-tsv needs integer image ids: use --id-format int or trailing-int")
        super().__init__(work, store, options)

    def write(self, record) -> None:
        image_id = self.ids(record.image_id)
        regions = select_regions(record, num_boxes=self.options.get("num_boxes"),
                                 max_boxes=self.options.get("max_boxes"),
                                 min_boxes=self.options.get("min_boxes"))
        self.clipped += regions.clipped
        self._line([b"%d" % image_id, b"%d" % record.image_w, b"%d" % record.image_h,
                    b"%d" % regions.count, b64(regions.boxes, "<f4"), b64(regions.features32(), "<f4")])
