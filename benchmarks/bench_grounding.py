"""RefCOCO+ and VCR finetuning on the synthetic world against chance / text-only baselines.

A world of ``--images`` images (seed 1), imported from its official-format files
(``import-refcoco``, ``import-vcr``), regions from:

* ``oracle``: the world's ground-truth regions with oracle features
  (:func:`vlp.synthetic.oracle.truth_feature_store`, 32-d);
* ``demo``: the shipped demo detector through ``vlp-extract``: ground-truth boxes with
  ``--boxes gt_boxes.jsonl`` (RefCOCO+ "gt", VCR) and its own detections (RefCOCO+ "det").

A 2-layer model (hidden 64, ``vocab: demo``) from random init is finetuned for ``--steps``
steps (batch 32) per seed; the best validation step is scored on RefCOCO+ testA / testB
and VCR val (the world's VCR test split has no labels in its file). Baselines come from the
world's ``truth.json``. Prints one line per run and a table of seed means.

    python benchmarks/bench_grounding.py --images 200 --seeds 0 1 2 --steps 600
    python benchmarks/bench_grounding.py --regions demo --tasks refcoco --seeds 0
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _world(root: Path, images: int) -> Path:
    from vlp.synthetic import generate

    world = root / "world"
    if not (world / "world.json").is_file():
        # classic: the world RESULTS.md's figures were measured on
        generate(world, images, seed=1, overwrite=True, style="classic")
    return world


def _extract(images: Path, out: Path, boxes=None) -> Path:
    if not (out / "manifest.json").is_file():
        command = [sys.executable, "-c", "from vlp.cli import extract_main; extract_main()", str(images), "-o", str(out),
                   "--preset", "demo", "--format", "arrow", "--progress", "off", "--num-cpus", "2"]
        subprocess.run(command + (["--boxes", str(boxes)] if boxes else []), check=True)
    return out


def _stores(root: Path, world: Path, regions: str) -> dict:
    from vlp.builders.imports import import_refcoco, import_vcr
    from vlp.synthetic.oracle import truth_feature_store

    ref, vcr = root / "refcoco-pairs", root / f"vcr-pairs-{regions}"
    if not ref.exists():
        import_refcoco(world / "refcoco+" / "refs(unc).p", world / "refcoco+" / "instances.json", ref, progress="off")
    if not vcr.exists():  # oracle records are named by scene id; vlp-extract over vcr1images by path
        import_vcr(sorted((world / "vcr").glob("*.jsonl")), vcr, progress="off",
                   image_id_template="{stem}" if regions == "oracle" else "{path}")
    if regions == "oracle":
        features = root / "oracle"
        if not features.exists():
            truth_feature_store(world, features, feature_dim=32)
        return {"refcoco": (ref, {"gt": features}), "vcr": (vcr, {"gt": features})}
    gt = _extract(world / "images", root / "demo-gt", ref / "gt_boxes.jsonl")
    det = _extract(world / "images", root / "demo-det")
    vcr_gt = _extract(world / "vcr" / "vcr1images", root / "demo-vcr-gt", vcr / "gt_boxes.jsonl")
    return {"refcoco": (ref, {"gt": gt, "det": det}), "vcr": (vcr, {"gt": vcr_gt})}


def _run(task: str, pairs: Path, features: Path, out: Path, seed: int, steps: int, options: dict) -> dict:
    from vlp.schemas import FeatureStore
    from vlp.trainer.config import FinetuneConfig
    from vlp.trainer.finetune import evaluate_run, finetune

    dim = FeatureStore(features).feature_dim
    config = {"seed": seed, "model": {"vocab": "demo", "bert": {"hidden": 64, "layers": 2, "heads": 4},
                                      "visual": {"feature_dim": dim}},
              "data": {"features": str(features), "max_text_len": 40, "max_regions": 36},
              "task": {"name": task, "pairs": str(pairs), "val_split": "val", **options},
              "train": {"steps": steps, "batch_size": 32, "lr": 1.0e-3, "warmup_ratio": 0.1,
                        "eval_every": max(1, steps // 6), "log_every": 0, "seed": seed}}
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = finetune(FinetuneConfig.from_dict(config), out)
    result = {"seconds": time.perf_counter() - start, "best_step": summary["best"]["step"],
              "val": summary["best"]["metrics"]}
    if task == "refcoco":
        for split in ("testA", "testB"):
            result[split] = evaluate_run(out, pairs, features, split=[split])["metrics"]
    else:  # the best step's val predictions, to combine a q_a and a qa_r run into Q->AR
        evaluate_run(out, pairs, features, split=["val"], predictions=out / "val-predictions.jsonl")
        result["predictions"] = str(out / "val-predictions.jsonl")
    return result


def _combined_q_ar(pairs: Path, q_a: str, qa_r: str) -> dict:
    """VCR metrics of a Q->A run's and a QA->R run's val predictions together."""
    from vlp.schemas.pairs import PairStore
    from vlp.trainer.metrics import vcr_scores

    def read(path):
        return {json.loads(line)["pair_id"].split("#")[0]: json.loads(line)["prediction"]["choice"]
                for line in Path(path).read_text().splitlines()}

    rows = [p for p in PairStore(pairs) if p["split"] == "val"]
    return vcr_scores(read(q_a), read(qa_r), {p["pair_id"]: p["answer_label"] for p in rows},
                      {p["pair_id"]: p["rationale_label"] for p in rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--tasks", nargs="+", default=["refcoco", "vcr"], choices=["refcoco", "vcr"])
    parser.add_argument("--losses", nargs="+", default=["ce", "bce"], choices=["ce", "bce"], help="RefCOCO+ losses")
    parser.add_argument("--regions", default="oracle", choices=["oracle", "demo"])
    parser.add_argument("--vcr-settings", nargs="+", default=["q_a", "qa_r", "joint"],
                        choices=["q_a", "qa_r", "joint"], help="q_a + qa_r also give their combined Q->AR")
    parser.add_argument("--root", default="/tmp/bench-grounding")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    root = Path(args.root) / str(args.images)
    world = _world(root, args.images)
    truth = json.loads((world / "truth.json").read_text())["tasks"]
    stores = _stores(root, world, args.regions)
    rows = []
    for task in args.tasks:
        pairs, features = stores[task]
        variants = ([{"loss": loss} for loss in args.losses] if task == "refcoco" else
                    [{"setting": setting} for setting in args.vcr_settings])
        for regions, store in features.items():
            for options in variants:
                for seed in args.seeds:
                    variant = options.get("loss") or options.get("setting")
                    name = f"{task} {regions} {variant} seed {seed}"
                    result = _run(task, pairs, store, root / "runs" / name.replace(" ", "-"), seed, args.steps, options)
                    print(name, json.dumps(result), flush=True)
                    rows.append((task, regions, variant, seed, result))
        if task == "vcr" and {"q_a", "qa_r"} <= set(args.vcr_settings):
            for regions in features:
                for seed in args.seeds:
                    found = {v: r for t, g, v, s, r in rows if t == "vcr" and g == regions and s == seed}
                    combined = _combined_q_ar(pairs, found["q_a"]["predictions"], found["qa_r"]["predictions"])
                    print(f"vcr {regions} q_a+qa_r seed {seed}", json.dumps(combined), flush=True)
                    rows.append(("vcr", regions, "q_a+qa_r", seed, {"val": combined, "seconds": 0.0}))

    print(f"\nworld {args.images} images (seed 1), regions {args.regions}, {args.steps} steps, seeds {args.seeds}")
    print("RefCOCO+ baselines:", json.dumps(truth["refcoco+"]["baselines"]))
    print("VCR baselines:", json.dumps(truth["vcr"]["baselines"]))
    keys = {"refcoco": [("val", "accuracy"), ("testA", "accuracy"), ("testB", "accuracy"), ("testA", "upper_bound"),
                        ("testB", "upper_bound")],
            "vcr": [("val", "q_a"), ("val", "qa_r"), ("val", "q_ar")]}
    groups: dict = {}
    for task, regions, loss, seed, result in rows:
        groups.setdefault((task, regions, loss), []).append(result)
    for (task, regions, loss), results in groups.items():
        cells = []
        for split, metric in keys[task]:
            values = [r[split][metric] for r in results if split in r and r[split].get(metric) is not None]
            if values:
                spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
                cells.append(f"{split} {metric} {statistics.mean(values):.3f}{spread}")
        seconds = statistics.mean(r["seconds"] for r in results)
        print(f"{task} {regions} {loss}: " + ", ".join(cells) + f" ({seconds:.0f} s per run)")


if __name__ == "__main__":
    main()
