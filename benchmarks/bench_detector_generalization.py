"""How the demo detector generalises beyond the renderer it was trained on (issue 19).

Evaluates one or two weight files of the ``demo`` preset (the shipped file by default;
``--old-weights`` for a side-by-side comparison, e.g. a copy of the previous file kept
outside the repository) on five held-out sets, none used in training or checkpoint choice:

* wide world seed 7 and seed 123 (``vlp.synthetic.generate``'s default style);
* classic world seed 7 (the world the previous weights were trained on; the old figures
  of RESULTS.md were measured on its 120 images);
* the independent renderer's world (``vlp.synthetic.independent.generate_independent``,
  seed 0): other drawing code, shapes built differently, other shades, backgrounds and
  encoders;
* single shapes on plain white / light backgrounds (``generate_single_shapes``, seed 0):
  the top box must be the shape (IoU >= 0.5, right category).

Prints mAP@0.5, attribute accuracy (colour, on true positives), precision / recall at the
preset's score threshold, seconds per image (detection and scoring; with ``--old-weights``
also the time ratio, both runs in this one process, one after the other), the top-box rates
of the single-shape set, AP per category, attribute accuracy per colour, the error anatomy
(objects located / named / named first, by relative size;
``vlp.detectors.evaluate.error_anatomy``), the AP lost to each kind of false positive
(duplicate, localisation, confusion, background) and to objects no box finds
(``false_positive_anatomy``), and for the wide sets the objects named first by what the
world's truth knows of them (occlusion, pattern, image size, background kind). No
assertions. ``--json`` writes every figure.

    python benchmarks/bench_detector_generalization.py --old-weights /tmp/old-demo-detector.pt
    python benchmarks/bench_detector_generalization.py --images 40 --threads 1   # quick
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def make_sets(root: Path, images: int, classic_images: int) -> dict[str, Path]:
    from vlp.synthetic import GENERATOR_VERSION, generate
    from vlp.synthetic.independent import generate_independent, generate_single_shapes

    sets = {}
    for name, seed, count, style in (("wide seed 7", 7, images, "wide"), ("wide seed 123", 123, images, "wide"),
                                     ("classic seed 7", 7, classic_images, "classic")):
        path = root / name.replace(" ", "-")
        done = path / "world.json"
        made = json.loads(done.read_text()) if done.is_file() else {}
        if (made.get("num_images"), made.get("generator_version")) != (count, GENERATOR_VERSION):
            generate(path, count, seed=seed, split_fractions=(0.0, 0.0, 1.0), style=style, overwrite=True)
        sets[name] = path
    for name, folder, make in (("independent renderer", "independent", generate_independent),
                               ("single shapes", "single", generate_single_shapes)):
        path = root / folder
        done = path / "truth.json"
        if not (done.is_file() and len(json.loads(done.read_text())["images"]) == images):
            make(path, images, seed=0)
        sets[name] = path
    return sets


def scene_groups(world: Path, ground_truth) -> dict[str, list[list[str]]]:
    """Labels per GT object from a generated world's truth (``load_scenes``), for
    ``error_anatomy(object_groups=...)``: how much of its box is hidden, its pattern, its
    image's short side and its background's kind."""
    from vlp.synthetic.world import load_scenes

    scenes = load_scenes(world)
    groups: dict[str, list[list[str]]] = {"occluded": [], "pattern": [], "image short side": [], "background": []}
    for gt in ground_truth:
        scene = scenes[int(gt.image_id)]
        short = min(scene.width, scene.height)
        groups["occluded"].append(["0" if o.occluded_box_fraction == 0 else
                                   "<0.3" if o.occluded_box_fraction < 0.3 else ">=0.3" for o in scene.objects])
        groups["pattern"].append([o.pattern or "none" for o in scene.objects])
        groups["image short side"].append(
            ["<128" if short < 128 else "128-383" if short < 384 else ">=384"] * len(scene.objects))
        groups["background"].append([scene.background.kind] * len(scene.objects))
    return groups


def evaluate(weights, sets: dict[str, Path], threads: int, settings: dict) -> dict:
    import torch

    from vlp.detectors import load_detector
    from vlp.detectors.evaluate import (detect_vg, error_anatomy, evaluate_predictions, false_positive_anatomy,
                                        top_box_accuracy)

    torch.set_num_threads(threads)
    detector = load_detector(weights, preset="demo", device="cpu", **settings)
    out = {"weights": str(weights) if weights else "shipped", "sha256": detector.weights_sha256}
    threshold = detector.detector_config.score_threshold
    for name, path in sets.items():
        start = time.perf_counter()
        records, gt = detect_vg(detector, path)
        result = evaluate_predictions(records, gt, score_threshold=threshold)
        result["seconds"] = time.perf_counter() - start
        groups = scene_groups(path, gt) if name.startswith("wide") else None
        result["anatomy"] = error_anatomy(records, gt, object_groups=groups)
        result["false_positives"] = false_positive_anatomy(records, gt)
        if name == "single shapes":
            result["top_box"] = top_box_accuracy(records, gt)
        out[name] = result
    return out


def _row(name: str, r: dict) -> str:
    top = r.get("top_box")
    extra = (f" | top box = shape {top['rate']:.3f}, + colour {top['colour_rate']:.3f}"
             if top else "")
    return (f"  {name:22s} {r['num_images']:4d} img  mAP {r['mAP']:.3f}  attr {r['attribute_accuracy']:.3f} "
            f"({r['attribute_matches']})  P/R {r['precision']:.3f}/{r['recall']:.3f}  "
            f"{r['seconds'] / max(r['num_images'], 1):.2f} s/img{extra}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=None, help="demo weights to evaluate (default: the shipped file)")
    parser.add_argument("--old-weights", default=None, help="a second file, shown side by side")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="a detector setting for --weights, e.g. bottleneck_channels=24 (repeatable)")
    parser.add_argument("--old-set", action="append", metavar="KEY=VALUE",
                        help="the same for --old-weights (a file of another width)")
    parser.add_argument("--images", type=int, default=150, help="images per set (default 150)")
    parser.add_argument("--classic-images", type=int, default=120, help="images of the classic set (120)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=None, help="folder for the sets, reused when they are there "
                                                     "(default: a temporary one)")
    parser.add_argument("--json", default=None, help="write all figures to this file")
    args = parser.parse_args(argv)
    from vlp.detectors.config import parse_setting_pairs

    try:
        new_settings, old_settings = parse_setting_pairs(args.set), parse_setting_pairs(args.old_set)
    except ValueError as exc:
        parser.error(str(exc))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work or tmp)
        start = time.perf_counter()
        sets = make_sets(root, args.images, args.classic_images)
        print(f"sets generated in {time.perf_counter() - start:.1f} s under {root}")
        runs = {"new": evaluate(args.weights, sets, args.threads, new_settings)}
        if args.old_weights:
            runs["old"] = evaluate(args.old_weights, sets, args.threads, old_settings)
    for key, run in runs.items():
        print(f"\n{key} weights {run['weights']} (sha256 {run['sha256'][:16]}...)")
        for name in sets:
            print(_row(name, run[name]))
    for name in ("wide seed 7", "independent renderer"):
        print(f"\n{name}: AP per category / attribute accuracy per colour")
        for key, run in runs.items():
            r = run[name]
            print(f"  {key}: AP " + ", ".join(f"{c} {v:.3f}" for c, v in sorted(r["ap"].items())))
            print(f"  {key}: colour " + ", ".join(f"{c} {v['value']:.2f} ({v['count']})"
                                                for c, v in r["attribute_accuracy_by_colour"].items()))
            print(f"  {key}: recall by colour " + ", ".join(f"{c} {v['value']:.2f}"
                                                          for c, v in r["recall_by_colour"].items()))
    print("\nerror anatomy, every GT object at any score: located (a box of any class at IoU >= 0.5) / "
          "class found (one of them of its class) / class first (the top-scoring one of its class); "
          "by size = sqrt(box area) / the image's short side")
    for key, run in runs.items():
        for name in sets:
            a = run[name]["anatomy"]
            sizes = ", ".join(f"{label} ({v['objects']}) {v['located']:.2f}/{v['class_found']:.2f}/"
                              f"{v['class_first']:.2f}" for label, v in a["by_size"].items())
            print(f"  {key} {name:22s} {a['objects']:4d} objects {a['located']:.2f}/{a['class_found']:.2f}/"
                  f"{a['class_first']:.2f}; by size {sizes}")
    print("\nfalse positives (vlp.detectors.evaluate.false_positive_anatomy): mAP, the recall ceiling (the mAP "
          "were every false positive removed), the mAP with one kind of false positive removed")
    for key, run in runs.items():
        for name in sets:
            f = run[name]["false_positives"]
            print(f"  {key} {name:22s} mAP {f['mAP']:.3f}  ceiling {f['recall_ceiling']:.3f}  without: "
                  + ", ".join(f"{kind} {value:.3f}" for kind, value in f["ap_without"].items()))
    print("\nwide sets: objects named first (the anatomy's class first), by what the world's truth knows of them")
    for key, run in runs.items():
        for name in sets:
            for table, rows in run[name]["anatomy"].get("by_group", {}).items():
                print(f"  {key} {name:14s} {table:17s} " + ", ".join(
                    f"{label} {v['class_first']:.2f} ({v['objects']})" for label, v in rows.items()))
    if "old" in runs:
        print("\nratios new / old: mAP, time (detection and scoring, the two runs one after the other)")
        for name in sets:
            old, new = runs["old"][name], runs["new"][name]
            print(f"  {name:22s} mAP {new['mAP'] / old['mAP'] if old['mAP'] else float('inf'):.2f}  "
                  f"time {new['seconds'] / old['seconds']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1, default=str), "utf-8")


if __name__ == "__main__":
    main()
