"""``vlp export``: feature stores (and pair stores) in the formats other V&L trainers read.

Feature formats (:data:`FORMATS`), one module each:

* ``lxmert-tsv`` (:mod:`.tsv`) - LXMERT's 10-column TSV, a fixed 36 boxes per image;
* ``butd-tsv`` (:mod:`.tsv`) - bottom-up-attention's 6-column TSV, integer image ids;
* ``volta-lmdb`` (:mod:`.volta`) - the pickled-dict LMDB of VOLTA / ViLBERT multi-task;
* ``uniter-imgdb`` (:mod:`.uniter`) - UNITER's msgpack LMDB + ``nbb_*.json``;
* ``mmf-npy`` (:mod:`.mmf`) - MMF's ``<id>.npy`` + ``<id>_info.npy``.

:func:`export` streams the store through one of them with the shared bookkeeping of
:mod:`.common` (atomic result, ``errors.jsonl``, sidecar ``vlp-export.json``, progress).
Pair stores go out through :func:`vlp.exporters.pairs.export_pairs`.
"""

from __future__ import annotations

from vlp.exporters.common import ExportError, ExportStats, RecordIssue, run_export
from vlp.exporters.mmf import MmfNpy
from vlp.exporters.tsv import ButdTsv, LxmertTsv
from vlp.exporters.uniter import UniterImgDb
from vlp.exporters.volta import VoltaLmdb

FORMATS = {cls.name: cls for cls in (LxmertTsv, ButdTsv, VoltaLmdb, UniterImgDb, MmfNpy)}
#: per-format defaults of the export options (None: not used / no limit)
DEFAULTS = {
    "lxmert-tsv": {"num_boxes": "auto"},  # 36, or the detector's min_boxes when below 36
    "butd-tsv": {"id_format": "int"},
    "volta-lmdb": {"id_format": "keep"},
    "uniter-imgdb": {"id_format": "keep", "conf_th": 0.2, "max_boxes": 100, "min_boxes": 10,
                     "key_suffix": ".npz", "compress": False},
    "mmf-npy": {"id_format": "keep"},
}
#: which options each format reads (others are a usage error)
ACCEPTS = {
    "lxmert-tsv": {"num_boxes", "max_boxes"},
    "butd-tsv": {"num_boxes", "max_boxes", "min_boxes", "id_format"},
    "volta-lmdb": {"num_boxes", "max_boxes", "min_boxes", "id_format"},
    "uniter-imgdb": {"conf_th", "max_boxes", "min_boxes", "id_format", "key_suffix", "compress"},
    "mmf-npy": {"num_boxes", "max_boxes", "min_boxes", "id_format"},
}

__all__ = ["FORMATS", "DEFAULTS", "ACCEPTS", "ExportError", "ExportStats", "RecordIssue", "export",
           "resolve_options"]


def resolve_options(fmt: str, **given) -> dict:
    """The format's defaults updated with the options given (None = not given).

    ExportError for an unknown format, an option the format does not read, or a bad value.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    given = {k: v for k, v in given.items() if v is not None}
    extra = set(given) - ACCEPTS[fmt]
    if extra:
        names = ", ".join("--" + name.replace("_", "-") for name in sorted(extra))
        raise ExportError(f"{fmt} does not take {names}")
    options = dict(DEFAULTS[fmt])
    if fmt == "lxmert-tsv" and "max_boxes" in given and "num_boxes" not in given:
        options.pop("num_boxes")  # a cap instead of the fixed count
    options.update(given)
    for name in ("num_boxes", "max_boxes", "min_boxes"):
        value = options.get(name)
        if value is not None and value != "auto" and (not isinstance(value, int) or value < 1):
            raise ExportError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if options.get("num_boxes") is not None and options.get("max_boxes") is not None:
        raise ExportError("give --num-boxes (exactly N) or --max-boxes (at most N), not both")
    if options.get("min_boxes") and options.get("max_boxes") and options["min_boxes"] > options["max_boxes"]:
        raise ExportError("--min-boxes is larger than --max-boxes")
    if "conf_th" in options and not 0 <= float(options["conf_th"]) < 1:
        raise ExportError(f"--conf-th must lie in [0, 1), got {options['conf_th']!r}")
    return options


def export(store_dir, out, fmt: str, *, overwrite: bool = False, on_error: str = "skip",
           progress: str = "auto", **options) -> ExportStats:
    """Export the feature store at ``store_dir`` to ``out`` in format ``fmt``.

    ``options``: num_boxes, max_boxes, min_boxes, id_format, conf_th, key_suffix, compress (see
    :data:`ACCEPTS` for which format reads which; None means the format's default).
    """
    resolved = resolve_options(fmt, **options)
    return run_export(FORMATS[fmt], store_dir, out, options=resolved, overwrite=overwrite,
                      on_error=on_error, progress=progress)

