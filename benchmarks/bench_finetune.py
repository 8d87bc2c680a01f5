"""Finetuning on the synthetic world: VQA from random init against VQA from a short
``vlp-train pretrain`` run at equal finetuning steps and seeds, next to the majority and
text-only baselines; optionally every other downstream task from random init.

The world (``vlp.synthetic.generate``) with its oracle region features
(``vlp.synthetic.oracle.truth_feature_store``); every pair store through its importer, as
``tests/test_finetune.py`` does. VQA's world files have train and val questions only; the
val questions are about the Karpathy ``val`` and ``test`` images, so this script splits
them by the image's Karpathy split into ``val`` (best checkpoint chosen there) and ``test``
(reported). Nothing is chosen on ``test``.

Pretraining (``vlp.trainer.schedule.run_stages``, the shape of ``trainer/configs/demo.yaml``):
one stage over the captions (``import-coco --karpathy``) and the objects-labels pairs
(``objects-labels --splits-from`` the captions), MLM + MOC (+ ITM on the captions), on the
Karpathy ``train`` images only (the VQA train images: no val/test image is seen), same model
size as the finetuned one. One pretraining run (seed 0) is shared by every finetuning seed.

Baselines (VQA computed here; the other tasks from the world's ``truth.json``): majority =
the most frequent top answer of the train split; text only = the most frequent train answer
of the same question text, else the majority. Prints figures and differences; asserts
nothing.

    python benchmarks/bench_finetune.py                         # 240 images, 3 seeds, VQA only
    python benchmarks/bench_finetune.py --all-tasks --task-seeds 2
    python benchmarks/bench_finetune.py --pretrain-steps 1200 --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

OTHER_TASKS = {  # task: (importer, files under the world, val split, test split, options)
    "gqa": ("import_gqa", "gqa/*.json", "val", "testdev", {}),
    "vizwiz": ("import_vizwiz", "vizwiz/*.json", "val", "test", {}),
    "snli_ve": ("import_snli_ve", "snli_ve/*.jsonl", "dev", "test", {}),
    "nlvr2": ("import_nlvr2", "nlvr2/*.json", "dev", "test1", {"setting": "pair"}),
    "mmimdb": ("import_mmimdb", None, "val", "test", {"head": "mmf"}),
}


def build_world(root: Path, images: int, feature_dim: int, world_seed: int,
                vqa_train_questions: int = 0, questions_per_image: int = 4, style: str = "classic") -> dict:
    from vlp.builders import imports
    from vlp.builders.labels import build_objects_labels
    from vlp.schemas.pairs import PairStore, PairStoreWriter
    from vlp.synthetic import generate
    from vlp.synthetic.oracle import truth_feature_store

    world, features = root / "world", root / "features"
    generate(world, images, seed=world_seed, questions_per_image=questions_per_image, style=style, overwrite=True)
    truth_feature_store(world, features, feature_dim=feature_dim, nlvr2_images=True)
    kw = dict(features=features, progress="off")
    annotations = world / "annotations"
    captions = imports.import_coco(sorted(annotations.glob("captions_*.json")), root / "pairs-captions",
                                   karpathy=annotations / "dataset_coco.json", **kw)
    labels = build_objects_labels(features, root / "pairs-labels", splits_from=captions.out, progress="off")
    # VQA: the val questions split by their image's Karpathy split (val / test)
    raw = root / "pairs-vqa-raw"
    imports.import_vqa(sorted((world / "vqa").glob("*.json")), raw, min_count=1, **kw)
    karpathy = {str(i["cocoid"]): i["split"]
                for i in json.loads((annotations / "dataset_coco.json").read_text("utf-8"))["images"]}
    vqa = root / "pairs-vqa"
    kept_train = 0
    with PairStoreWriter(vqa, "question", optional=["human_answers"]) as writer:
        for row in PairStore(raw):
            if row["split"] == "val":
                row["split"] = "test" if karpathy[row["image_id"]] == "test" else "val"
            elif vqa_train_questions:  # the task's training data is scarce, the pretraining data is not
                if kept_train >= vqa_train_questions:
                    continue
                kept_train += 1
            writer.add({k: v for k, v in row.items() if k != "kind"})
    (vqa / "answer_vocab.json").write_bytes((raw / "answer_vocab.json").read_bytes())
    return {"world": world, "features": features, "captions": captions.out, "labels": labels.out, "vqa": vqa,
            "counts": {"captions": captions.num_pairs, "labels": labels.num_pairs}}


def other_store(root: Path, paths: dict, task: str) -> Path:
    from vlp.builders import imports

    out = root / f"pairs-{task}"
    name, pattern, _, _, _ = OTHER_TASKS[task]
    kw = dict(features=paths["features"], progress="off")
    if task == "mmimdb":
        imports.import_mmimdb(paths["world"] / "mmimdb" / "dataset", out,
                              split_file=paths["world"] / "mmimdb" / "split.json", **kw)
    else:
        getattr(imports, name)(sorted(paths["world"].glob(pattern)), out, **kw)
    return out


def model_section(args) -> dict:
    return {"vocab": "demo", "bert": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                                      "initializer_range": args.init_range},
            "visual": {"feature_dim": args.feature_dim, "normalize_features": not args.raw_features}}


def pretrain(paths: dict, out: Path, args) -> dict:
    from vlp.trainer.schedule import run_stages

    tasks = {"MLM": 1.0, "MOC": 1.0}
    if not args.no_itm:
        tasks["ITM"] = 1.0
    config = {"seed": 0, "model": model_section(args),
              "data": {"features": str(paths["features"]), "max_text_len": 40, "max_regions": 36},
              "stages": [{"name": "pretrain",
                          "sources": [{"name": "captions", "pairs": str(paths["captions"]), "split": ["train"]},
                                      {"name": "labels", "pairs": str(paths["labels"]), "split": ["train"],
                                       "tasks": ["MLM", "MOC"]}],
                          "tasks": tasks, "steps": args.pretrain_steps, "batch_size": args.batch_size,
                          "lr": args.pretrain_lr, "warmup_ratio": 0.1, "checkpoint_every": 0, "log_every": 0}]}
    start = time.perf_counter()
    summaries = run_stages(config, out)
    return {"seconds": time.perf_counter() - start, "summary": summaries[-1]}


def _losses(summary: dict) -> str:
    """The pretraining summary's loss figures, whatever their keys."""
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in summary.items() if "loss" in k)


def finetune_one(paths: dict, store: Path, task: str, val_split: str, test_split: str, out: Path, args, *,
                 seed: int, steps: int, init=None, options=None) -> dict:
    from vlp.trainer.config import FinetuneConfig
    from vlp.trainer.finetune import evaluate_run, finetune

    config = {"seed": seed, "model": model_section(args),
              "data": {"features": str(paths["features"]), "max_text_len": 40, "max_regions": 36},
              "task": {"name": task, "pairs": str(store), "val_split": val_split, **(options or {})},
              "train": {"steps": steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_ratio": 0.1,
                        "eval_every": args.eval_every, "checkpoint_every": 0, "log_every": 0}}
    start = time.perf_counter()
    summary = finetune(FinetuneConfig.from_dict(config), out, init=init)
    test = evaluate_run(out, store, paths["features"], split=[test_split])["metrics"]
    val = evaluate_run(out, store, paths["features"], split=[val_split])["metrics"]
    return {"seconds": time.perf_counter() - start, "best_step": summary["best"]["step"], "val": val, "test": test}


def vqa_baselines(store: Path) -> dict:
    from vlp.schemas.pairs import PairStore
    from vlp.trainer.metrics import vqa_scores

    rows = list(PairStore(store))
    top = lambda r: r["answers"][max(range(len(r["answers"])), key=lambda k: r["answer_scores"][k])]
    train = [r for r in rows if r["split"] == "train" and r.get("answers")]
    majority = collections.Counter(top(r) for r in train).most_common(1)[0][0]
    by_text: dict = collections.defaultdict(collections.Counter)
    for r in train:
        by_text[r["text"].lower()][top(r)] += 1
    out = {}
    for split in ("val", "test"):
        held = [r for r in rows if r["split"] == split]
        text_only = {r["question_id"]: (by_text[r["text"].lower()].most_common(1)[0][0]
                                        if r["text"].lower() in by_text else majority) for r in held}
        out[split] = {"n": len(held),
                      "majority": vqa_scores({r["question_id"]: majority for r in held}, held)["accuracy"],
                      "text_only": vqa_scores(text_only, held)["accuracy"]}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=240, help="synthetic world size")
    parser.add_argument("--world-seed", type=int, default=1)
    parser.add_argument("--world-style", choices=["wide", "classic"], default="classic",
                        help="the world's scene distributions (classic: the world RESULTS.md's figures were "
                             "measured on)")
    parser.add_argument("--questions-per-image", type=int, default=4,
                        help="VQA questions the world asks per image (more: larger val / test sets)")
    parser.add_argument("--vqa-train-questions", type=int, default=0,
                        help="keep only the first N VQA train questions (0: all): scarce task data")
    parser.add_argument("--seeds", default="0,1,2", help="finetuning seeds for VQA (comma-separated)")
    parser.add_argument("--steps", type=int, default=600, help="VQA finetuning steps (both arms)")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--pretrain-lr", type=float, default=5.0e-4)
    parser.add_argument("--no-itm", action="store_true", help="pretrain with MLM + MOC only")
    parser.add_argument("--lr", type=float, default=5.0e-4, help="finetuning learning rate")
    parser.add_argument("--lrs", default="",
                        help="VQA finetuning learning rates to try (comma-separated; default: --lr alone): "
                             "each arm is reported at the rate with its best mean validation accuracy")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=100, help="validation every N steps (best kept)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--feature-dim", type=int, default=32)
    parser.add_argument("--init-range", type=float, default=0.1,
                        help="std of the initial weights (BERT: 0.02; 0.1 lets this small model use the regions)")
    parser.add_argument("--raw-features", action="store_true",
                        help="feed the features as stored (default: standardized, visual.normalize_features)")
    parser.add_argument("--arms", default="random,pretrained",
                        help="VQA arms to run (random, pretrained; comma-separated)")
    parser.add_argument("--all-tasks", action="store_true", help="also GQA, VizWiz, SNLI-VE, NLVR2, MM-IMDB")
    parser.add_argument("--task-seeds", default="0,1", help="seeds for the other tasks")
    parser.add_argument("--task-steps", type=int, default=300, help="finetuning steps for the other tasks")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared machine: 1)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").is_file() else None
    print(f"machine: {cpu or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {args.threads} thread(s)")
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, init std {args.init_range}, "
          f"vocab demo, oracle features {args.feature_dim}-d "
          f"{'as stored' if args.raw_features else 'standardized'}; batch {args.batch_size}, lr {args.lr}")
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        paths = build_world(root, args.images, args.feature_dim, args.world_seed, args.vqa_train_questions,
                            args.questions_per_image, args.world_style)
        print(f"world: {args.images} images (seed {args.world_seed}, {args.world_style}), stores built in "
              f"{time.perf_counter() - start:.1f} s; pretraining pairs: {paths['counts']}")

        arms = [a for a in args.arms.split(",") if a]
        pre = pretrain(paths, root / "pretrain", args) if "pretrained" in arms else None
        if pre:
            print(f"pretrain: {args.pretrain_steps} steps of "
              f"{'MLM + MOC' if args.no_itm else 'MLM + MOC + ITM'}, lr {args.pretrain_lr}, "
                  f"{pre['seconds']:.1f} s; {_losses(pre['summary'])}")

        base = vqa_baselines(paths["vqa"])
        lrs = [float(x) for x in args.lrs.split(",") if x] or [args.lr]
        grid: dict = {}  # (arm, lr) -> one result per seed
        for lr in lrs:
            run_args = argparse.Namespace(**{**vars(args), "lr": lr})
            for seed in seeds:
                for arm in arms:
                    init = root / "pretrain" if arm == "pretrained" else None
                    r = finetune_one(paths, paths["vqa"], "vqa", "val", "test", root / f"vqa-{arm}-{lr:g}-{seed}",
                                     run_args, seed=seed, steps=args.steps, init=init)
                    grid.setdefault((arm, lr), []).append(r)
                    print(f"  VQA lr {lr:g} seed {seed} {arm:<10}: val {r['val']['accuracy']:.3f}  "
                          f"test {r['test']['accuracy']:.3f}  (best step {r['best_step']}, {r['seconds']:.0f} s)",
                          flush=True)
        mean = lambda runs, split: statistics.mean(r[split]["accuracy"] for r in runs)
        if len(lrs) > 1:
            print(f"\nVQA, mean over seeds {seeds} per finetuning lr (val / test):")
            for arm in arms:
                print(f"  {arm + ' init':<22}" + "  ".join(
                    f"lr {lr:g}: {mean(grid[arm, lr], 'val'):.3f} / {mean(grid[arm, lr], 'test'):.3f}" for lr in lrs))
        # each arm at its own best learning rate on validation (nothing chosen on test)
        chosen = {arm: max(lrs, key=lambda lr: mean(grid[arm, lr], "val")) for arm in arms}
        results = {arm: grid[arm, chosen[arm]] for arm in arms}

        print(f"\nVQA, {args.steps} finetuning steps, seeds {seeds} "
              f"(val n={base['val']['n']}, test n={base['test']['n']}):")
        print(f"  {'':<22}{'lr':>8}{'val':>8}{'test':>8}   per seed (test)")
        means = {}
        for arm in arms:
            v = [r["val"]["accuracy"] for r in results[arm]]
            t = [r["test"]["accuracy"] for r in results[arm]]
            means[arm] = (statistics.mean(v), statistics.mean(t))
            sd = statistics.stdev(t) if len(t) > 1 else 0.0
            print(f"  {arm + ' init':<22}{chosen[arm]:8g}{means[arm][0]:8.3f}{means[arm][1]:8.3f}   "
                  f"{' '.join(f'{x:.3f}' for x in t)}  (sd {sd:.3f})")
        if len(arms) == 2:
            diffs = [p["test"]["accuracy"] - r["test"]["accuracy"]
                     for p, r in zip(results["pretrained"], results["random"])]
            print(f"  {'pretrained - random':<22}{'':>8}{means['pretrained'][0] - means['random'][0]:+8.3f}"
                  f"{means['pretrained'][1] - means['random'][1]:+8.3f}   "
                  f"{' '.join(f'{x:+.3f}' for x in diffs)}")
        for name in ("majority", "text_only"):
            print(f"  {name:<22}{'':>8}{base['val'][name]:8.3f}{base['test'][name]:8.3f}")

        if args.all_tasks:
            truth = json.loads((paths["world"] / "truth.json").read_text("utf-8"))["tasks"]
            task_seeds = [int(s) for s in args.task_seeds.split(",") if s]
            print(f"\nOther tasks from random init, {args.task_steps} steps, seeds {task_seeds} "
                  f"(test split; baselines from truth.json):")
            for task, (_, _, val_split, test_split, options) in OTHER_TASKS.items():
                store = other_store(root, paths, task)
                runs = [finetune_one(paths, store, task, val_split, test_split, root / f"{task}-{seed}", args,
                                     seed=seed, steps=args.task_steps, options=options) for seed in task_seeds]
                keys = ["micro_f1", "macro_f1"] if task == "mmimdb" else ["accuracy"]
                for key in keys:
                    vals = [r["test"].get(key) for r in runs]
                    b = truth.get(task, {}).get("baselines", {})
                    print(f"  {task:<8} {key:<9} test n={runs[0]['test'].get('n')}: "
                          f"{' '.join(f'{x:.3f}' for x in vals)} mean {statistics.mean(vals):.3f}; "
                          f"majority {b.get('majority', {}).get(key)}, text only {b.get('text_only', {}).get(key)}"
                          f" ({sum(r['seconds'] for r in runs):.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
