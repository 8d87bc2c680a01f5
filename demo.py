"""``vlp demo``: the main job, end to end, on data the project makes itself.

What it runs today (the detector and the synthetic world come with later releases;
see README "Status"): it writes an LXMERT-layout TSV of ``num_images`` feature
records, imports it into an LMDB and an Arrow store, validates both with the checks of
``vlp inspect``, times random reads, and writes ``report.html`` / ``report.txt``.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

import numpy as np

from vlp.schemas import FeatureRecord, FeatureStore


def random_records(count: int, seed: int = 0, feature_dim: int = 2048):
    """Feature records with plausible structure (boxes inside the image, 10..100 per image)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        width, height = int(rng.integers(240, 1000)), int(rng.integers(240, 1000))
        n = int(rng.integers(10, 101))
        x1 = rng.uniform(0, width - 2, n)
        y1 = rng.uniform(0, height - 2, n)
        x2 = x1 + rng.uniform(1, width - x1)
        y2 = y1 + rng.uniform(1, height - y1)
        features = np.maximum(rng.standard_normal((n, feature_dim)), 0).astype(np.float32)
        yield FeatureRecord.from_arrays(
            f"demo/{i:06d}", width, height, boxes=np.stack([x1, y1, x2, y2], 1), features=features,
            objects_id=rng.integers(0, 1600, n), objects_conf=rng.uniform(0.2, 1, n),
            attrs_id=rng.integers(0, 400, n), attrs_conf=rng.uniform(0, 1, n))


def run_demo(out, num_images: int = 200) -> Path:
    from vlp.pipeline.import_features import import_tsv, write_tsv
    from vlp.schemas.verify import verify_store

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings, sections = {}, []
    start = time.perf_counter()
    tsv = out / "features.tsv"
    write_tsv(random_records(num_images), tsv, layout="lxmert")
    timings["write TSV"] = time.perf_counter() - start
    for storage in ("lmdb", "arrow"):
        store_dir = out / f"store-{storage}"
        start = time.perf_counter()
        import_tsv([tsv], store_dir, storage=storage, shard_size=max(1, num_images // 4),
                   mode="overwrite", progress=False)
        timings[f"import to {storage}"] = time.perf_counter() - start
        report = verify_store(store_dir)
        if not report.ok:
            raise RuntimeError(f"demo store {store_dir} failed validation: {report.errors}")
        store = FeatureStore(store_dir)
        ids = list(store.keys())
        order = np.random.default_rng(1).permutation(len(ids))
        start = time.perf_counter()
        for i in order:
            store.get(ids[i])
        elapsed = time.perf_counter() - start
        sections.append((storage, report.summary_lines(), len(ids) / elapsed))
        store.close()

    text = [f"vlp demo: {num_images} images", ""]
    for storage, lines, rate in sections:
        text += [f"[{storage}]", *lines, f"random reads {rate:,.0f} records/s", ""]
    text += ["timings"] + [f"  {name:<18} {sec:6.2f} s" for name, sec in timings.items()]
    (out / "report.txt").write_text("\n".join(text) + "\n")
    page = ["<!doctype html><meta charset='utf-8'><title>vlp demo report</title>",
            "<h1>vlp demo report</h1><pre>", html.escape("\n".join(text)), "</pre>"]
    report_path = out / "report.html"
    report_path.write_text("\n".join(page))
    print("\n".join(text))
    return report_path
