"""CC-generated captions on the synthetic world: the captioner's held-out CIDEr-D after XE
and after XE + SCST, how much closer generated captions (CCG) are than the web alt texts
(CC) to the in-domain (COCO-style) truth captions of the same images, and generation
throughput in images/s.

The world (``vlp.synthetic.generate``, Karpathy-style splits) with region features from its
ground-truth boxes (``vlp.trainer.toydata.world_stores``: class- and colour-dependent
32-d features, no detector); COCO-style captions through ``import-coco --karpathy``. The
captioner (``vlp-train captioner``'s :func:`train_captioner`) trains on the ``train``
captions, is evaluated during training on ``val`` and reported on ``test`` (greedy
decoding, pycocoevalcap; PTB tokenizer and METEOR when java is present).

The world's CC alt texts (``cc/train.tsv``) describe the same images in web style, so the
test images have both a CC text and five COCO-style truth captions: CC vs CCG (nucleus
p 0.8, one caption, and greedy) are scored against those truths with the same metrics.
Nothing here is chosen on ``test``.

Throughput: ``generate_captions`` over every image of the store, in this process and on
Ray CPU actors. On a GPU machine run the same with ``--device cuda`` (one actor per GPU):

    python benchmarks/bench_captions.py                              # 500 images, tiny preset
    python benchmarks/bench_captions.py --preset default --xe-steps 3000 --scst-steps 600
    python benchmarks/bench_captions.py --skip-training --out DIR    # reuse DIR/run
    vlp-build generate-captions --model DIR/run --features DIR/stores/features --out ccg --device cuda

Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path


def build_world(out: Path, images: int, seed: int) -> None:
    from vlp.builders.imports import import_coco
    from vlp.synthetic import generate
    from vlp.trainer.toydata import world_stores

    if (out / "stores" / "coco" / "manifest.json").is_file():
        return
    # classic: the world RESULTS.md's figures were measured on
    generate(out / "world", images, seed=seed, split_fractions=(0.7, 0.1, 0.2), overwrite=True, style="classic")
    world_stores(out / "world", out / "stores", feature_dim=32)
    annotations = out / "world" / "annotations"
    import_coco(sorted(annotations.glob("captions_*.json")), out / "stores" / "coco",
                karpathy=annotations / "dataset_coco.json", progress="off", overwrite=True)


def captioner_config(out: Path, args) -> dict:
    return {"seed": 0,
            "model": {"preset": args.preset, "feature_dim": 32, "dropout": 0.0, "max_regions": 20,
                      "max_caption_len": 24},
            "data": {"pairs": str(out / "stores" / "coco"), "features": str(out / "stores" / "features")},
            "xe": {"steps": args.xe_steps, "batch_size": 32, "lr": args.xe_lr, "warmup_steps": 20,
                   "schedule": "linear", "log_every": 50},
            "scst": {"steps": args.scst_steps, "batch_size": 16, "lr": args.scst_lr, "samples": 5,
                     "schedule": "constant", "log_every": 10},
            "eval": {"max_images": 200}}


def cc_texts(world: Path) -> dict:
    """The world's CC alt text of each image id (rows whose url names an image)."""
    out = {}
    for line in (world / "cc" / "train.tsv").read_text("utf-8").splitlines():
        text, url = line.split("\t")
        name = url.rsplit("/", 1)[-1]
        if name.endswith(".jpg") and name[:-4].isdigit():
            out[name[:-4]] = text
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "default"])
    parser.add_argument("--xe-steps", type=int, default=600)
    parser.add_argument("--xe-lr", type=float, default=3e-3)
    parser.add_argument("--scst-steps", type=int, default=150)
    parser.add_argument("--scst-lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument("--ray-workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="work folder (kept; default: a temporary one)")
    parser.add_argument("--skip-training", action="store_true", help="reuse OUT/run")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from vlp.schemas import FeatureStore
    from vlp.schemas.pairs import PairStore
    from vlp.trainer.captioning.config import CaptionerConfig
    from vlp.trainer.captioning.generate import GenerateSettings, generate_captions
    from vlp.trainer.captioning.metrics import caption_metrics, metric_line
    from vlp.trainer.captioning.task import references_by_image
    from vlp.trainer.captioning.train import train_captioner

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-captions-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.node()} ({os.cpu_count()} CPUs visible), python {sys.version.split()[0]}, "
          f"torch {torch.__version__}, {args.threads} torch thread(s); java: {shutil.which('java') or 'absent'}")
    started = time.perf_counter()
    build_world(out, args.images, args.seed)
    print(f"world: {args.images} images (seed {args.seed}, splits 0.7/0.1/0.2) + stores in "
          f"{time.perf_counter() - started:.0f} s")
    run = out / "run"
    config = CaptionerConfig.from_dict(captioner_config(out, args))
    if not args.skip_training:
        started = time.perf_counter()
        train_captioner(config, run, device=args.device)
        print(f"captioner ({args.preset}; XE {args.xe_steps} steps, SCST {args.scst_steps} steps) trained and "
              f"evaluated in {time.perf_counter() - started:.0f} s")
    results = json.loads((run / "results.json").read_text())
    xe, scst = results["xe"], results.get("scst")
    print("\nheld-out test split, greedy decoding:")
    print(f"  XE only   : {metric_line(xe)}")
    if scst:
        print(f"  XE + SCST : {metric_line(scst)}")
        print(f"  SCST raises CIDEr-D by {scst['CIDEr-D'] - xe['CIDEr-D']:+.3f} "
              f"({scst['CIDEr-D'] / max(1e-9, xe['CIDEr-D']):.2f}x)")
    for stage in ("01-xe", "02-scst"):
        path = run / stage / "eval.jsonl"
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            print(f"  val CIDEr-D during {stage}: " + ", ".join(f"step {r['step']} {r['CIDEr-D']:.3f}" for r in rows))

    # CC vs CCG on the test images, against their COCO-style truth captions
    pairs = PairStore(out / "stores" / "coco")
    truth = references_by_image(pairs, ["test"])
    cc = cc_texts(out / "world")
    test_ids = sorted(i for i in truth if i in cc)
    rows = {}
    for name, settings in (("CCG nucleus p=0.8", GenerateSettings(num_workers=0)),
                           ("CCG greedy", GenerateSettings(num_workers=0, decoding="greedy"))):
        store = out / f"ccg-{settings.decoding}"
        if store.exists():
            shutil.rmtree(store)
        generate_captions(run, out / "stores" / "features", store, settings)
        generated = {p["image_id"]: p["text"] for p in PairStore(store)}
        rows[name] = {i: generated[i] for i in test_ids}
    print(f"\ncloseness to the in-domain truth: {len(test_ids)} test images, 5 COCO-style truth captions each")
    scored = {"CC (web alt text)": caption_metrics({i: cc[i] for i in test_ids}, truth)}
    for name, predictions in rows.items():
        scored[name] = caption_metrics(predictions, truth)
    for name, metrics in scored.items():
        print(f"  {name:20s}: {metric_line(metrics)}")
    base = scored["CC (web alt text)"]["CIDEr-D"]
    for name in rows:
        print(f"  {name} / CC CIDEr-D: {scored[name]['CIDEr-D'] / max(1e-9, base):.1f}x "
              f"({scored[name]['CIDEr-D']:.3f} vs {base:.3f})")
    example = test_ids[0]
    print(f"  e.g. image {example}: CC {cc[example]!r} | CCG {rows['CCG nucleus p=0.8'][example]!r} | "
          f"truth {truth[example][0]!r}")

    # throughput
    features = FeatureStore(out / "stores" / "features")
    print(f"\ngeneration throughput over {len(features)} images (nucleus p 0.8, 1 caption, batch 32):")
    for label, settings in (("this process", GenerateSettings(num_workers=0, device=args.device)),
                            (f"Ray, {args.ray_workers} CPU actors", GenerateSettings(
                                num_workers=args.ray_workers, num_cpus=args.ray_workers, chunk_size=64,
                                device=args.device))):
        store = out / "ccg-throughput"
        if store.exists():
            shutil.rmtree(store)
        started = time.perf_counter()
        stats = generate_captions(run, out / "stores" / "features", store, settings)
        wall = time.perf_counter() - started
        print(f"  {label:22s}: {stats['captioned_now'] / wall:6.1f} images/s ({wall:.1f} s wall, Ray start-up "
              "included)" if "Ray" in label else f"  {label:22s}: {stats['captioned_now'] / wall:6.1f} images/s "
              f"({wall:.1f} s wall)")
    print(f"\nwork folder: {out}")


if __name__ == "__main__":
    main()
