"""``mmf-npy``: MMF's per-image feature files.

MMF's ``PaddedFasterRCNNFeatureReader`` (facebookresearch/mmf mmf/datasets/databases/readers/
feature_readers.py) loads ``<feature_path>.npy`` - a float32 [N, D] array - and, beside it,
``<feature_path>_info.npy`` - a dict saved as a 0-d object array, read with
``np.load(path, allow_pickle=True).item()``. The dict follows MMF's extraction script
(tools/scripts/features/extract_features_vmb.py): ``bbox`` float32 [N, 4] (x1 y1 x2 y2,
original-image pixels), ``num_boxes`` (int), ``objects`` int64 [N] (class ids 0..1599),
``cls_prob`` float32 [N, 1600] (the object classes WITHOUT the background column, as that
script slices ``scores[:, 1:]``), ``image_width`` / ``image_height`` (int). MMF pads or cuts
the features to its ``max_features`` (100 by default) itself.

The file of image ``a/b`` is ``OUT/a/b.npy`` (MMF's annotation ``feature_path`` names it
relative to the feature folder). The info pickle names ``numpy.core`` rather than numpy 2's
``numpy._core`` (:mod:`vlp.exporters.pickles`), so MMF's numpy 1.x environments load it.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import numpy as np

from vlp.exporters.common import ExportFormat, IdMap, RecordIssue, select_regions
from vlp.exporters.pickles import write_object_npy


def relative_file(name: str) -> PurePosixPath:
    """The id as a path under OUT; RecordIssue for ids that would leave it."""
    path = PurePosixPath(name)
    if not name or "\\" in name or "\x00" in name or path.is_absolute() or any(
            part in ("", ".", "..") for part in name.split("/")):
        raise RecordIssue(f"image_id {name!r} is not a relative file name (no '..', '.', '\\\\' "
                          "or empty parts); MMF files are named after it")
    if path.name.endswith("_info"):
        raise RecordIssue(f"image_id {name!r} ends in _info: its features would be read as another "
                          "image's info file")
    return path


class MmfNpy(ExportFormat):
    name = "mmf-npy"
    reader = "facebookresearch/mmf PaddedFasterRCNNFeatureReader (<id>.npy + <id>_info.npy)"
    conventions = {
        "features": "<id>.npy: float32 [N, D]",
        "info": "<id>_info.npy: dict bbox <f4 [N,4] pixels, num_boxes, objects <i8 [N], "
                "cls_prob <f4 [N,1600] (no background column), image_width, image_height",
        "regions": "store order (the detector's: most confident first)",
        "pickle": "protocol 3, numpy.core names (loads under numpy 1.x and 2.x)",
    }

    def __init__(self, work, store, options):
        super().__init__(work, store, options)
        self.ids = IdMap(options.get("id_format") or "keep")
        self.files = 0

    def write(self, record) -> None:
        rel = relative_file(str(self.ids(record.image_id)))
        regions = select_regions(record, num_boxes=self.options.get("num_boxes"),
                                 max_boxes=self.options.get("max_boxes"),
                                 min_boxes=self.options.get("min_boxes"))
        self.clipped += regions.clipped
        info = {"bbox": np.ascontiguousarray(regions.boxes, dtype="<f4"), "num_boxes": regions.count,
                "image_width": int(record.image_w), "image_height": int(record.image_h)}
        if regions.objects_id is not None:
            info["objects"] = regions.objects_id.astype("<i8")
        if regions.cls_prob is not None:
            info["cls_prob"] = regions.cls_prob[:, :-1].astype("<f4")
        target = self.work / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        features = target.with_name(target.name + ".npy")
        with open(features, "wb") as handle:
            np.lib.format.write_array(handle, regions.features32(), version=(1, 0))
        with open(target.with_name(target.name + "_info.npy"), "wb") as handle:
            write_object_npy(handle, info)
        self.files += 2

    def finish(self) -> dict:
        return {"files_written": self.files}
