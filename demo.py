"""``vlp demo``: the main job, end to end, on the embedded default.

1. generates a synthetic world (``vlp.synthetic``, seed 123 — not the demo detector's
   training seed, so the scores below are on unseen images) and adds a few real photos
   that scikit-image ships;
2. runs the extraction pipeline of ``vlp-extract`` (Ray decode tasks and a detector
   actor) with the shipped demo detector over those images plus one truncated JPEG,
   into an LMDB feature store (the broken file ends up in ``errors.jsonl``);
3. validates the store as ``vlp inspect`` does, then builds pair stores from it and the
   world's annotation files as ``vlp-build`` does (objects-labels, COCO captions,
   verb-free VG phrases, hard negatives);
4. scores the detections against the world's ground truth (AP@0.5 per category,
   attribute accuracy);
5. pretrains a small V&L model on those stores (:func:`pretrain_demo`: the shipped
   ``trainer/configs/demo.yaml``, no BERT checkpoint needed) and scores zero-shot
   retrieval on the held-out split;
6. writes ``report.html`` (+ ``report.txt``, PNGs of detections, label and box-count
   histograms, the loss curves, timings) into the output folder.

``random_records`` (plausible feature records without a detector) serves tests and
benchmarks of the storage layer.
"""

from __future__ import annotations

import html
import json
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np

from vlp.schemas import FeatureRecord

DEMO_WORLD_SEED = 123
#: The demo's world is drawn in the classic style (grey backgrounds, eight colours), where the
#: shipped demo detector is at its best (mAP@0.5 0.91) and the README's demo figures were
#: measured; on the wide default world of ``vlp synth`` it reaches 0.66-0.69 (issue 19;
#: benchmarks/RESULTS.md), where the demo would show many more misses.
DEMO_WORLD_STYLE = "classic"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


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


def _photos(folder: Path, names=PHOTOS) -> dict[str, Path]:
    """Real photos shipped inside scikit-image, written as JPEG files."""
    import cv2
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        rgb = getattr(skimage.data, name)()
        path = folder / f"{name}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        paths[f"photos/{name}"] = path
    return paths


def _histogram_png(path: Path, labels: list[str], counts: list[int], title: str, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    ax.bar(range(len(counts)), counts, color="#3572a5")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _build_pairs(out: Path, world_dir: Path, store_dir: Path, progress: bool) -> list[str]:
    """The vlp-build stage: pair stores from the features and the world's annotation files."""
    from vlp.builders.hard_negatives import build_hard_negatives
    from vlp.builders.imports import import_coco, import_vqa
    from vlp.builders.labels import build_objects_labels
    from vlp.builders.vg_phrases import build_vg_phrases

    pairs = out / "pairs"
    mode = "auto" if progress else "off"
    annotations = world_dir / "annotations"
    # The captions' Karpathy split is the world's split: the pairs built from the features
    # alone take theirs from it, so pretraining never sees a held-out image.
    captions = import_coco(sorted(annotations.glob("captions_*.json")), pairs / "coco-captions",
                           karpathy=annotations / "dataset_coco.json", image_id_template="world/{stem}",
                           features=store_dir, overwrite=True, progress=mode)
    results = [
        build_objects_labels(store_dir, pairs / "objects-labels", splits_from=captions.out, overwrite=True,
                             progress=mode),
        captions,
        build_vg_phrases(world_dir, pairs / "vg-phrases", image_id_template="world/{image_id}",
                         features=store_dir, overwrite=True, progress=mode),
        build_hard_negatives(store_dir, pairs / "hard-negatives", top_m=5, splits_from=captions.out,
                             overwrite=True, progress=mode),
        # for `vlp-train finetune finetune-demo-vqa` (every answer given at least once is a class)
        import_vqa(sorted((world_dir / "vqa").glob("*.json")), pairs / "vqa", image_id_template="world/{image_id}",
                   min_count=1, features=store_dir, overwrite=True, progress=mode),
    ]
    lines = []
    for result in results:
        line = f"  {result.out.name:<16} {result.num_pairs:6d} {result.kind} pairs"
        if result.missing_report is not None:
            line += f"; {result.missing_report}"
        lines.append(line)
    return lines


def pretrain_demo(out, *, steps: Optional[int] = None, progress: bool = True, device: str = "auto") -> dict:
    """The demo's pretraining run: ``vlp-train pretrain`` with the shipped
    ``trainer/configs/demo.yaml`` (a 2-layer model, the shipped demo vocabulary, no BERT
    checkpoint) on the stores a demo wrote in ``out`` (features, pairs/coco-captions,
    pairs/objects-labels), into ``out/train``, started afresh. ``steps`` overrides the
    config's (tests). Returns the run's figures: ``seconds``, ``steps``, ``losses``
    (first / last loss per source), ``retrieval`` (the last evaluation's zero-shot recalls
    on the held-out split), ``loss_png``, ``summary`` (the text of vlp-train's summary)."""
    import torch

    from vlp.trainer.config import DEMO_ROOT, TrainConfig, read_yaml, rebase_paths
    from vlp.trainer.reporting import plot_loss_curves, read_jsonl, summarize
    from vlp.trainer.runs import prepare_run_folder, train
    from vlp.trainer.schedule import shipped_configs

    out = Path(out)
    path = shipped_configs()["demo"]
    raw = rebase_paths(read_yaml(path), DEMO_ROOT, out)
    if steps is not None:
        raw["stages"][0].update(steps=steps, checkpoint_every=0)
    config = TrainConfig.from_dict(raw, path)
    run_dir = out / "train"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    prepare_run_folder(run_dir, config, resume=False)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    train(config, run_dir, device=device, progress="auto" if progress else "off")
    seconds = time.perf_counter() - start
    stage_dir = config.stage_dir(run_dir, 0)
    history = read_jsonl(stage_dir / "history.jsonl")
    losses: dict = {}
    for entry in history:
        for name, values in (entry.get("sources") or {"all": {"loss": entry["loss"]}}).items():
            losses.setdefault(name, []).append(values["loss"])
    window = max(1, len(history) // 20)
    evals = read_jsonl(stage_dir / "eval.jsonl")
    return {"config": path, "run_dir": run_dir, "seconds": seconds, "steps": len(history), "device": device,
            "model": config.model, "losses": {name: (float(np.mean(v[:window])), float(np.mean(v[-window:])))
                                              for name, v in losses.items()},
            "retrieval": evals[-1] if evals else {}, "loss_png": plot_loss_curves(run_dir),
            "summary": summarize(run_dir)}


def _pretrain_lines(result: dict) -> list[str]:
    from vlp.trainer.data import load_tokenizer

    model = result["model"]
    vocabulary = len(load_tokenizer(model.vocab))
    lines = [f"pretraining   vlp-train pretrain {result['config'].name} ({model.bert.get('layers')} layers, hidden "
             f"{model.bert.get('hidden')}, {vocabulary}-token demo vocabulary, no BERT checkpoint): "
             f"{result['steps']} steps in {result['seconds']:.1f} s on {result['device']} -> {result['run_dir']}",
             "  loss (mean of the first / last 5% of steps): " + ", ".join(
                 f"{name} {a:.3f} -> {b:.3f}" for name, (a, b) in result["losses"].items())]
    recall = result["retrieval"]
    if "zs_ir_r1" in recall:
        n = int(recall["zs_retrieval_n"])
        lines.append(f"  zero-shot retrieval (ITM head) on the held-out test split, {n} images x {n} captions: "
                     f"image R@1/5/10 {recall['zs_ir_r1']:.2f}/{recall['zs_ir_r5']:.2f}/{recall['zs_ir_r10']:.2f}, "
                     f"text R@1/5/10 {recall['zs_tr_r1']:.2f}/{recall['zs_tr_r5']:.2f}/{recall['zs_tr_r10']:.2f} "
                     f"(chance {1 / n:.2f}/{min(1, 5 / n):.2f}/{min(1, 10 / n):.2f})")
    return lines


def run_demo(out, num_images: int = 200, *, photos: bool = True, progress: bool = True,
             draw_count: int = 6, train_steps: Optional[int] = None) -> Path:
    """Run the whole demo into ``out``; returns the path of report.html. ``train_steps``:
    the pretraining run's steps (None: demo.yaml's; 0: no pretraining)."""
    demo_started = time.perf_counter()
    import collections

    import cv2

    from vlp.detectors import draw, make_config
    from vlp.detectors.evaluate import evaluate_predictions
    from vlp.detectors.annotations import load_vg_annotations
    from vlp.core.errors_log import ERRORS_NAME, ErrorLog
    from vlp.pipeline.extract import ExtractSettings, run_extract
    from vlp.schemas import FeatureStore, vocab
    from vlp.schemas.verify import verify_store
    from vlp.synthetic import generate

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    world_dir = out / "world"
    generate(world_dir, num_images=num_images, seed=DEMO_WORLD_SEED, overwrite=True, style=DEMO_WORLD_STYLE)
    timings["generate world"] = time.perf_counter() - start
    # The input folder of the extraction: the world's images, the photos, and one file the
    # web would send (a truncated JPEG) to show what errors.jsonl is for.
    inputs_dir = out / "inputs"
    if inputs_dir.exists():
        shutil.rmtree(inputs_dir)
    inputs_dir.mkdir()
    (inputs_dir / "world").symlink_to(Path("..") / "world" / "images", target_is_directory=True)
    # The wide world stores an image as <id>.jpg or <id>.png; the record id has no extension.
    inputs = {f"world/{path.stem}": path for path in sorted((world_dir / "images").iterdir(),
                                                            key=lambda p: int(p.stem))}
    if photos:
        inputs.update(_photos(inputs_dir / "photos"))
        data = (inputs_dir / "photos" / f"{PHOTOS[0]}.jpg").read_bytes()
        (inputs_dir / "web").mkdir()
        (inputs_dir / "web" / "truncated.jpg").write_bytes(data[: len(data) // 3])

    store_dir = out / "features"
    settings = ExtractSettings(preset="demo", shard_size=100, overwrite=True,
                               progress="auto" if progress else "off")
    stats = run_extract(inputs_dir, store_dir, settings)
    timings.update({f"extract: {k}": v for k, v in stats["stage_seconds"].items()})
    timings["extract: wall"] = stats["wall_seconds"]
    store = FeatureStore(store_dir)
    records = {image_id: store.get(image_id) for image_id in inputs}
    store.close()
    config = make_config("demo")
    failures = ErrorLog(store_dir / ERRORS_NAME).read()

    start = time.perf_counter()
    report = verify_store(store_dir)
    timings["validate store"] = time.perf_counter() - start
    start = time.perf_counter()
    pair_lines = _build_pairs(out, world_dir, store_dir, progress)
    timings["build pair stores"] = time.perf_counter() - start
    if not report.ok:
        raise RuntimeError(f"the demo store {store_dir} failed validation: {report.errors}")

    pretrained = None
    if train_steps != 0:
        start = time.perf_counter()
        pretrained = pretrain_demo(out, steps=train_steps, progress=progress)
        timings["pretrain"] = time.perf_counter() - start

    ground_truth = load_vg_annotations(world_dir)
    scores = evaluate_predictions([records[f"world/{gt.image_id}"] for gt in ground_truth], ground_truth,
                                  score_threshold=config.score_threshold)

    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    objects, attributes = vocab.objects(), vocab.attributes()
    kept = collections.Counter()
    for record in records.values():
        keep = record.objects_conf >= config.score_threshold
        kept.update(f"{attributes.name(int(a))} {objects.name(int(o))}"
                    for o, a in zip(record.objects_id[keep], record.attrs_id[keep]))
    top = kept.most_common(15)
    _histogram_png(figures / "labels.png", [k for k, _ in top], [c for _, c in top],
                   f"most frequent labels (confidence >= {config.score_threshold})",
                   "attribute object")
    box_counts = collections.Counter(r.num_boxes for r in records.values())
    xs = sorted(box_counts)
    _histogram_png(figures / "boxes_per_image.png", [str(x) for x in xs], [box_counts[x] for x in xs],
                   "boxes per image", "boxes")
    shown = [f"world/{i}" for i in range(1, min(num_images, draw_count) + 1)]
    shown += [k for k in inputs if k.startswith("photos/")]
    drawn = []
    for image_id in shown:
        png = figures / f"detections-{image_id.replace('/', '-')}.png"
        png.write_bytes(draw(cv2.imread(str(inputs[image_id])), records[image_id], max_boxes=10))
        drawn.append((image_id, png))

    detector = stats["detector"]
    lines = [f"vlp demo: {len(inputs)} images ({num_images} synthetic, seed {DEMO_WORLD_SEED}; "
             f"{len(inputs) - num_images} scikit-image photos) + {len(failures)} broken file(s)",
             f"detector     {detector['preset']} preset, weights sha256 {str(detector['weights_sha256'])[:16]}..., "
             f"config {detector['config_hash']}",
             f"extraction   vlp-extract pipeline: {stats['workers']['count']} {stats['workers']['device']} worker(s), "
             f"{stats['images_per_second']:.1f} images/s end to end ({stats['wall_seconds']:.1f} s incl. "
             "Ray start-up and model load)",
             *[f"errors.jsonl {entry['path']}: {entry['reason']}" for entry in failures],
             "", *report.summary_lines(), "", "pair stores (vlp-build) in pairs/:", *pair_lines, "",
             f"detection quality on the synthetic images (IoU 0.5): mAP {scores['mAP']:.3f}, "
             f"attribute accuracy {scores['attribute_accuracy']:.3f} "
             f"({scores['attribute_matches']} matched boxes), precision {scores['precision']:.3f} / "
             f"recall {scores['recall']:.3f} at confidence >= {scores['score_threshold']}",
             "AP per category: " + ", ".join(f"{k} {v:.3f}" for k, v in scores["ap"].items()),
             *([""] + _pretrain_lines(pretrained) if pretrained else []),
             "", "timings"] + [f"  {name:<18} {sec:7.2f} s" for name, sec in timings.items()]
    lines.append(f"  {'whole demo':<18} {time.perf_counter() - demo_started:7.2f} s")
    (out / "report.txt").write_text("\n".join(lines) + "\n")
    (out / "scores.json").write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n")

    page = ["<!doctype html><meta charset='utf-8'><title>vlp demo report</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
            "img{max-width:520px;margin:4px;border:1px solid #ccc}pre{background:#f6f6f6;padding:1em}</style>",
            "<h1>vlp demo report</h1>", "<pre>", html.escape("\n".join(lines)), "</pre>",
            "<h2>Detections (top 10 boxes: attribute object confidence)</h2>"]
    for image_id, png in drawn:
        page.append(f"<figure style='display:inline-block'><img src='figures/{png.name}'>"
                    f"<figcaption>{html.escape(image_id)}</figcaption></figure>")
    page += ["<h2>Labels and boxes</h2>", "<img src='figures/labels.png'>",
             "<img src='figures/boxes_per_image.png'>",
             *([f"<h2>Pretraining: loss curves</h2><img src='{pretrained['loss_png'].relative_to(out).as_posix()}' "
                "style='max-width:1000px'>",
                f"<pre>{html.escape(pretrained['summary'])}</pre>"] if pretrained else []),
             f"<p>Feature store: <code>{html.escape(str(store_dir))}</code> — inspect it with "
             f"<code>vlp inspect {html.escape(str(store_dir))}</code>.</p>"]
    report_path = out / "report.html"
    report_path.write_text("\n".join(page) + "\n")
    print("\n".join(lines))
    return report_path
