"""Benchmark of ``vlp export``: records/s per format and output size per record against vlp's store.

Builds one feature store of ``--records`` BUTD-like records (``--boxes`` regions of 2048-d
float16 features, labels, and ``cls_prob`` [N, 1601] unless ``--no-cls-prob``), then exports
it to every format once (the whole run timed: reading the store, converting, writing,
fsync and the atomic rename) and prints, per format, records/s, bytes per record, and the
ratio of the export's size to the store's. Every format stores features as float32
except UNITER (float16, like vlp), so about 2x the store is expected for the others.
With ``--memory`` it also exports stores of N and 4N records in fresh processes and prints
each process's peak RSS, to show that memory stays flat as the store grows (streaming).
It prints figures and ratios and never asserts. Run from the repository root::

    python benchmarks/bench_export.py [--records 300] [--boxes 36] [--repeat 1] [--memory]
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import resource
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vlp.exporters import FORMATS, export
from vlp.schemas import FeatureRecord, FeatureStoreWriter
from vlp.schemas.record import NUM_CLS_PROB

FEATURE_DIM = 2048
OUTPUTS = {"lxmert-tsv": "feats.tsv", "butd-tsv": "feats-butd.tsv", "volta-lmdb": "volta.lmdb",
           "uniter-imgdb": "uniter", "mmf-npy": "mmf"}


def build_store(root: Path, records: int, boxes: int, cls_prob: bool, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    width, height = 640, 480
    with FeatureStoreWriter(root, feature_dim=FEATURE_DIM, detector={"name": "bench", "config_hash": "bench"}) as writer:
        for i in range(records):
            x1, y1 = rng.uniform(0, width - 20, boxes), rng.uniform(0, height - 20, boxes)
            arrays = dict(boxes=np.stack([x1, y1, x1 + rng.uniform(2, width - x1), y1 + rng.uniform(2, height - y1)], 1),
                          features=np.abs(rng.standard_normal((boxes, FEATURE_DIM), dtype=np.float32)),
                          objects_id=rng.integers(0, 1600, boxes), objects_conf=np.sort(rng.uniform(0.1, 1, boxes))[::-1],
                          attrs_id=rng.integers(0, 400, boxes), attrs_conf=rng.uniform(0, 1, boxes))
            if cls_prob:
                arrays["cls_prob"] = rng.dirichlet(np.ones(NUM_CLS_PROB) * 0.05, boxes).astype(np.float32)
            writer.add(FeatureRecord.from_arrays(str(100000 + i), width, height, **arrays))


def disk_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (LMDB data.mdb counted by its allocated size)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    total = 0
    for f in files:
        st = f.stat()
        total += min(st.st_size, st.st_blocks * 512) if f.name == "data.mdb" else st.st_size
    return total


def _export_peak_rss(queue, store, out, fmt, options) -> None:
    """In a fresh process: export, then report the peak RSS in MB (Linux ru_maxrss is in kB)."""
    importlib.import_module(f"vlp.exporters.{FORMATS[fmt].__module__.rsplit('.', 1)[1]}")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    export(store, out, fmt, overwrite=True, progress="off", **options)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((before / 1024, after / 1024))


def memory_table(work: Path, records: int, boxes: int) -> None:
    print()
    print(f"peak RSS of one export process (MB): stores of {records} and {4 * records} records, no cls_prob")
    stores = {}
    for n in (records, 4 * records):
        stores[n] = work / f"store-{n}"
        build_store(stores[n], n, boxes, cls_prob=False)
    context = multiprocessing.get_context("spawn")
    print(f"{'format':<14} {'after imports':>14} {f'{records} rec':>10} {f'{4 * records} rec':>10}")
    for fmt in FORMATS:
        peaks = []
        for n in (records, 4 * records):
            queue = context.Queue()
            options = {"num_boxes": boxes} if fmt == "lxmert-tsv" else {}
            child = context.Process(target=_export_peak_rss, args=(queue, stores[n], work / OUTPUTS[fmt], fmt, options))
            child.start()
            base, peak = queue.get()
            child.join()
            peaks.append(peak)
        print(f"{fmt:<14} {base:>14.0f} {peaks[0]:>10.0f} {peaks[1]:>10.0f}")
    for path in stores.values():
        shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--boxes", type=int, default=36)
    parser.add_argument("--repeat", type=int, default=1, help="runs per format (the best is shown)")
    parser.add_argument("--no-cls-prob", action="store_true")
    parser.add_argument("--memory", action="store_true", help="also peak RSS at N and 4N records")
    parser.add_argument("--tmp", default=None, help="work folder (default: a new temporary folder)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-export-", dir=args.tmp))
    try:
        print(f"machine: {platform.platform()}, python {sys.version.split()[0]}, {os.cpu_count()} cpus")
        print(f"store: {args.records} records x {args.boxes} boxes x {FEATURE_DIM}-d float16, labels"
              + ("" if args.no_cls_prob else f", cls_prob [{args.boxes}, {NUM_CLS_PROB}] float16"))
        t0 = time.perf_counter()
        build_store(work / "store", args.records, args.boxes, not args.no_cls_prob)
        store_bytes = disk_bytes(work / "store")
        print(f"built the store in {time.perf_counter() - t0:.1f} s: {store_bytes / args.records / 1e3:.1f} kB/record")
        print()
        print(f"{'format':<14} {'records/s':>10} {'MB/s out':>9} {'kB/record':>10} {'x store':>8}  notes")
        for fmt in FORMATS:
            best = None
            for _ in range(args.repeat):
                out = work / OUTPUTS[fmt]
                start = time.perf_counter()
                stats = export(work / "store", out, fmt, overwrite=True, progress="off",
                               **({"num_boxes": args.boxes} if fmt == "lxmert-tsv" else {}))
                elapsed = time.perf_counter() - start
                best = elapsed if best is None else min(best, elapsed)
            size = disk_bytes(out) + (disk_bytes(out.with_name(out.name + ".vlp-export.json"))
                                      if out.is_file() else 0)
            notes = {"lxmert-tsv": "base64 float32 + labels", "butd-tsv": "base64 float32",
                     "volta-lmdb": "pickled base64 float32 + labels",
                     "uniter-imgdb": "msgpack float16 + soft labels, cut to nbb",
                     "mmf-npy": "npy float32 + info (cls_prob float32)"}[fmt]
            print(f"{fmt:<14} {stats.exported / best:>10.1f} {size / best / 1e6:>9.1f} "
                  f"{size / stats.exported / 1e3:>10.1f} {size / store_bytes:>8.2f}  {notes}")
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink()
        if args.memory:
            shutil.rmtree(work / "store", ignore_errors=True)
            memory_table(work, args.records, args.boxes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
