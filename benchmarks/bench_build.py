"""Benchmark of the vlp-build builders that do heavy work.

1. ``vg-phrases``: phrases/s of the whole builder (read json, verb test with spaCy's
   tagger, write the pair store) on VG-style region descriptions drawn from the
   synthetic world's templates (scenes sampled, not rendered), with 1 and 2 tagger
   worker processes. Target: >= 5,000 phrases/s on 2 cores.
2. ``hard-negatives``: top-M search over N random non-negative mean features of D dims
   (default 100,000 x 2048, M = 10), on the CPU: the certified bf16 path on all N and
   the fp32 path on ``--fp32-images`` (its time scales with N^2, so the full-size figure is
   extrapolated unless ``--fp32-images`` equals ``--images``). Target: < 2 min.

Prints figures; never asserts. Run from the repository root::

    python benchmarks/bench_build.py [--phrases 60000] [--images 100000] [--dim 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def vg_file(folder: Path, phrases: int, seed: int = 0) -> int:
    from vlp.synthetic import text
    from vlp.synthetic.scene import sample_scene

    images, count, image_id = [], 0, 0
    while count < phrases:
        image_id += 1
        scene = sample_scene(np.random.default_rng([seed, image_id, 0]), image_id)
        regions = text.region_descriptions(scene, np.random.default_rng([seed, image_id, 1]), image_id * 1000)
        images.append({"id": image_id, "regions": [{"region_id": r.region_id, "image_id": image_id,
                                                    "phrase": r.phrase} for r in regions]})
        count += len(regions)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "region_descriptions.json").write_text(json.dumps(images))
    return count


def bench_vg(args, tmp: Path) -> None:
    from vlp.builders.vg_phrases import build_vg_phrases

    count = vg_file(tmp / "vg", args.phrases)
    print(f"\n== vg-phrases: {count} phrases (synthetic VG templates)")
    for processes in (1, 2):
        started = time.perf_counter()
        result = build_vg_phrases(tmp / "vg", tmp / f"vg-out-{processes}", n_process=processes, overwrite=True,
                                  progress="off")
        seconds = time.perf_counter() - started
        stats = result.stats
        print(f"processes {processes}: {seconds:6.1f} s  {count / seconds:8.0f} phrases/s  "
              f"({stats['distinct_phrases']} distinct tagged, {stats['distinct_phrases'] / seconds:.0f}/s; "
              f"dropped {stats['verb_phrases_dropped']})")


def bench_hard_negatives(args) -> None:
    import torch

    from vlp.builders.hard_negatives import top_similar

    rng = np.random.default_rng(0)
    print(f"\n== hard-negatives: {args.images} x {args.dim} random non-negative means, top-{args.top_m}, "
          f"CPU, {torch.get_num_threads()} torch threads")
    vectors = np.maximum(rng.standard_normal((args.images, args.dim), dtype=np.float32), 0)
    started = time.perf_counter()
    _, _, info = top_similar(vectors, args.top_m, device="cpu", precision="bf16")
    seconds = time.perf_counter() - started
    print(f"bf16 certified: {seconds:7.1f} s for {args.images} images "
          f"({info['rows_recomputed_fp32']} rows recomputed in fp32)")
    n = min(args.fp32_images, args.images)
    started = time.perf_counter()
    top_similar(vectors[:n], args.top_m, device="cpu", precision="fp32")
    seconds = time.perf_counter() - started
    scaled = seconds * (args.images / n) ** 2
    note = "" if n == args.images else f" -> about {scaled:.0f} s for {args.images} (x (N/n)^2)"
    print(f"fp32 exact:     {seconds:7.1f} s for {n} images{note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phrases", type=int, default=60_000)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--fp32-images", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--top-m", type=int, default=10)
    parser.add_argument("--skip", choices=["vg", "hn"], action="append", default=[])
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        if "vg" not in args.skip:
            bench_vg(args, Path(tmp))
    if "hn" not in args.skip:
        bench_hard_negatives(args)


if __name__ == "__main__":
    main()
