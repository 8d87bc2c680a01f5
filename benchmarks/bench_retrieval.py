"""Image-text retrieval on the synthetic world: cross-encoder scoring throughput (pairs/s) and
finetuned against zero-shot.

``throughput``: :func:`vlp.trainer.retrieval.score_matrix` over every caption x image of the
world's test split (oracle features), by batch size, one process and ``--workers`` Ray workers,
and with a ``--shortlist``; pairs/s and the share of pairs a shortlist scores.

``compare`` (``--compare``): a short ``vlp-train pretrain`` run (MLM + MOC + ITM on the Karpathy train
captions) scored zero-shot by its ITM head on the test split, then retrieval finetuning from it
(``--loss``, ``--steps``) for each seed, best step chosen on val, R@K on test; the chance level
(R@K = K / images for IR) printed alongside. Prints figures; asserts nothing.

    python benchmarks/bench_retrieval.py                           # throughput, CPU
    python benchmarks/bench_retrieval.py --compare --seeds 0,1,2      # the README / RESULTS figures (~15 min here)
    # GPU (the device is picked automatically; a bigger model and split make the figure meaningful):
    python benchmarks/bench_retrieval.py --images 2000 --hidden 768 --layers 12 --heads 12 \
        --feature-dim 2048 --batch-sizes 256,1024 --workers 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def build(root: Path, args) -> dict:
    from vlp.builders import imports
    from vlp.synthetic import generate
    from vlp.synthetic.oracle import truth_feature_store

    # classic: the world RESULTS.md's figures were measured on
    generate(root / "world", args.images, seed=args.world_seed, overwrite=True, style="classic")
    truth_feature_store(root / "world", root / "features", feature_dim=args.feature_dim)
    imports.import_coco([], root / "pairs", karpathy=root / "world" / "annotations" / "dataset_coco.json",
                        features=root / "features", progress="off")
    return {"features": root / "features", "pairs": root / "pairs"}


def model_section(args) -> dict:
    return {"vocab": "demo", "bert": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads},
            "visual": {"feature_dim": args.feature_dim}}


def finetune_config(paths: dict, args, seed: int, steps: int) -> dict:
    return {"seed": seed, "model": model_section(args),
            "data": {"features": str(paths["features"]), "max_text_len": 40, "max_regions": 36},
            "task": {"name": "retrieval", "pairs": str(paths["pairs"]), "loss": args.loss,
                     "negatives": args.negatives, "candidates": args.candidates},
            "train": {"steps": steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_ratio": 0.1,
                      "eval_every": max(1, steps // 4), "checkpoint_every": 0, "log_every": 0}}


def throughput(paths: dict, args) -> None:
    import torch

    from vlp.schemas import FeatureStore
    from vlp.schemas.pairs import PairStore
    from vlp.trainer.config import FinetuneConfig
    from vlp.trainer.finetune import build_model, make_task, task_dataset
    from vlp.trainer.retrieval import (first_stage_similarity, image_label_tokens, retrieval_sides,
                                       score_matrix)
    from vlp.trainer.schedule import build_tokenizer

    config = FinetuneConfig.from_dict(finetune_config(paths, args, 0, 1))
    tokenizer = build_tokenizer(config)
    task = make_task(config, ["matched"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(config, task, tokenizer).to(device)
    dataset = task_dataset(config, task, PairStore(paths["pairs"]), FeatureStore(paths["features"]), tokenizer,
                           ["test"])
    texts, images, text_image, image_ids, _ = retrieval_sides(dataset, pad_id=model.ctx.pad_id)
    n = len(text_image) * len(image_ids)
    print(f"scoring {len(text_image)} captions x {len(image_ids)} images = {n} pairs on {device} "
          f"(hidden {args.hidden}, {args.layers} layers, {args.feature_dim}-d features)")
    results = {}
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        _, info = score_matrix(model, texts, images, batch_size=batch_size)
        results[f"batch {batch_size}"] = info["pairs_per_s"]
        print(f"  1 process, batch {batch_size:5d}: {info['pairs_per_s']:8.0f} pairs/s ({info['seconds']:.1f} s)")
    best = max(int(b) for b in args.batch_sizes.split(","))
    if args.workers > 1:
        _, info = score_matrix(model, texts, images, batch_size=best, num_workers=args.workers)
        print(f"  {args.workers} Ray workers, batch {best}: {info['pairs_per_s']:8.0f} pairs/s "
              f"({info['seconds']:.1f} s incl. Ray start; ratio to 1 process "
              f"{info['pairs_per_s'] / results[f'batch {best}']:.2f})")
    labels = image_label_tokens(dataset, image_ids, tokenizer)
    similarity = first_stage_similarity(model, texts, images, labels)
    _, info = score_matrix(model, texts, images, batch_size=best, shortlist=args.shortlist, similarity=similarity)
    print(f"  shortlist {args.shortlist}: {info['pairs_scored']} of {n} pairs cross-scored "
          f"({info['pairs_scored'] / n:.2f}), {info['seconds']:.1f} s")


def compare(paths: dict, root: Path, args) -> None:
    from vlp.trainer.config import FinetuneConfig
    from vlp.trainer.finetune import evaluate_run, finetune
    from vlp.trainer.retrieval_zero_shot import zero_shot_evaluate
    from vlp.trainer.schedule import run_stages

    import yaml

    pre = root / "pretrain"
    config = {"seed": 0, "model": model_section(args),
              "data": {"features": str(paths["features"]), "max_text_len": 40, "max_regions": 36},
              "stages": [{"name": "pretrain", "pairs": str(paths["pairs"]), "split": ["train"],
                          "tasks": {"MLM": 1.0, "MOC": 1.0, "ITM": 1.0}, "steps": args.pretrain_steps,
                          "batch_size": args.batch_size, "lr": args.pretrain_lr, "warmup_ratio": 0.1,
                          "checkpoint_every": 0, "log_every": 0}]}
    started = time.perf_counter()
    run_stages(config, pre)
    (pre / "config.yaml").write_text(yaml.safe_dump(config))
    print(f"pretraining (MLM + MOC + ITM, {args.pretrain_steps} steps): {time.perf_counter() - started:.0f} s")
    zero = zero_shot_evaluate(pre, paths["pairs"], paths["features"], split=["test"])
    keys = ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "r_mean")
    n_images = zero["n_images"]
    chance = {"ir_r1": 1 / n_images, "ir_r5": min(1, 5 / n_images), "ir_r10": min(1, 10 / n_images)}
    print(f"test split: {zero['n_texts']} captions x {n_images} images; chance IR R@1/5/10 "
          + " / ".join(f"{chance[k]:.3f}" for k in ("ir_r1", "ir_r5", "ir_r10")))
    print("zero-shot (ITM head)   " + "  ".join(f"{k} {zero[k]:.3f}" for k in keys))
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = root / f"finetune-{seed}"
        started = time.perf_counter()
        summary = finetune(FinetuneConfig.from_dict(finetune_config(paths, args, seed, args.steps)), out, init=pre)
        entry = evaluate_run(out, paths["pairs"], paths["features"], split=["test"])
        m = entry["metrics"]
        rows.append(m)
        print(f"finetuned seed {seed} ({args.loss}, {args.steps} steps, best val step {summary['best']['step']}, "
              f"{time.perf_counter() - started:.0f} s)  " + "  ".join(f"{k} {m[k]:.3f}" for k in keys))
    mean = {k: statistics.mean(r[k] for r in rows) for k in keys}
    print("finetuned mean         " + "  ".join(f"{k} {mean[k]:.3f}" for k in keys))
    print(f"finetuned - zero-shot r_mean: {mean['r_mean'] - zero['r_mean']:+.3f}; "
          f"seeds above zero-shot: {sum(r['r_mean'] > zero['r_mean'] for r in rows)} of {len(rows)}")
    print(json.dumps({"zero_shot": zero, "finetuned": rows}), file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--world-seed", type=int, default=1)
    parser.add_argument("--feature-dim", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch-sizes", default="16,64,256")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shortlist", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument("--compare", action="store_true", help="finetuned against zero-shot (minutes)")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--pretrain-lr", type=float, default=5.0e-4)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--lr", type=float, default=5.0e-4)
    parser.add_argument("--loss", default="ce")
    parser.add_argument("--negatives", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build(root, args)
        if args.compare:
            compare(paths, root, args)
        else:
            throughput(paths, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
