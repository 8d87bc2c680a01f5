"""Detector throughput and memory: R101 butd-10-100 at 600x1000 inputs.

CPU (default): fp32 at batch 1 and batched, plus the straightforward path (frozen BN not
folded, NCHW, every RoI through res5, all 300 at once) for the speed-up ratio, and the
largest feature / box difference between the two on the same images.
CUDA (``--device cuda``): fp32 and bf16 at batch 1, 4, 8, 16, and the per-box cosine
similarity of bf16 vs fp32 features (same boxes, given-box mode).

Each configuration runs in its own process so that peak memory (peak RSS on CPU via
getrusage, torch.cuda.max_memory_allocated on GPU) belongs to that configuration; one
untimed warm-up batch precedes the timed images. Random weights unless ``--weights``:
timing does not depend on the values (the proposal count does: 300 unless the image is
tiny). No assertions; this prints figures.

    python benchmarks/bench_detector.py                      # CPU, 4 images
    python benchmarks/bench_detector.py --device cuda --num-images 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

from isolated import run_worker


def make_images(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    import cv2
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        image = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 6)
        for _ in range(12):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
            size = int(rng.integers(10, min(height, width) // 3))
            if rng.random() < 0.5:
                cv2.circle(image, (x, y), size, colour, -1)
            else:
                cv2.rectangle(image, (x, y), (x + 2 * size, y + size), colour, -1)
        images.append(image)
    return images


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def worker(spec: dict) -> dict:
    import torch

    from vlp.detectors import load_detector

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    kwargs = dict(device=spec["device"], dtype=spec["dtype"], batch_size=spec["batch"])
    if spec["reference"]:
        kwargs.update(fold_norms=False, channels_last=False, dedupe_rois=False, roi_chunk_size=None, nms_method="loop")
    det = load_detector(spec["weights"], allow_random=spec["weights"] is None, **kwargs)
    # The same timed images for every configuration; separate warm-up images.
    timed = make_images(spec["num_images"], spec["height"], spec["width"], seed=0)
    warm = make_images(spec["batch"], spec["height"], spec["width"], seed=1000)
    cuda = det.device.type == "cuda"
    det.detect(warm)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    records = det.detect(timed)
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    out = {"seconds": seconds, "cpu_seconds": cpu_seconds, "images": len(timed), "boxes": float(np.mean([r.num_boxes for r in records])),
           "peak_bytes": torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes(),
           "threads": torch.get_num_threads(), "device": str(det.device)}
    # RoIs whose pooled input repeats (res5 runs once for them): proposals of the first image.
    from vlp.detectors.inference import prepare_image
    cfg = det.detector_config
    with torch.inference_mode():
        p = prepare_image(timed[0], cfg)
        x = p.tensor[None].to(det.device).contiguous(
            memory_format=torch.channels_last if det.channels_last else torch.contiguous_format)
        with det._autocast():
            feats, _ = det.model.backbone(x)
            boxes, _ = det.model.proposal_generator(
                feats, [det.model.backbone.feature_size(*p.size)], [p.size], pre_nms_topk=cfg.rpn_pre_nms_topk,
                nms_threshold=cfg.rpn_nms_threshold, post_nms_topk=cfg.rpn_post_nms_topk,
                min_size=cfg.rpn_min_size)[0]
        rois = torch.cat([torch.zeros(len(boxes), 1, device=boxes.device), boxes], dim=1)
        keys = det.model.roi_heads.pooled_key(rois)
        out["proposals"] = int(len(boxes))
        out["distinct_pooled"] = int(torch.unique(keys, dim=0).shape[0])
    if spec.get("dump"):
        # The records of the timed images, and given-box features on the first record's boxes.
        source = np.load(spec["boxes_from"]) if spec.get("boxes_from") else None
        given = [det.features_for_boxes(im, source[f"boxes{i}"] if source is not None else r.boxes)
                 for i, (im, r) in enumerate(zip(timed, records))]
        np.savez(spec["dump"], **{f"boxes{i}": r.boxes for i, r in enumerate(records)},
                 **{f"features{i}": r.features for i, r in enumerate(records)},
                 **{f"given{i}": g.features for i, g in enumerate(given)})
    return out


def run_config(spec: dict) -> dict:
    return run_worker(os.path.abspath(__file__), spec, str(spec))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float32), b.astype(np.float32)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto (default: cpu)")
    parser.add_argument("--batch-sizes", default=None, help="comma list (default: cpu 1,2; cuda 1,4,8,16)")
    parser.add_argument("--dtypes", default=None, help="comma list (default: cpu float32; cuda float32,bfloat16)")
    parser.add_argument("--num-images", type=int, default=None, help="timed images per config (cpu 4, cuda 64)")
    parser.add_argument("--height", type=int, default=600)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--weights", default=None, help="checkpoint path (default: random weights)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-reference", action="store_true", help="skip the straightforward-path run (cpu)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        print(json.dumps(worker(json.loads(args._worker))))
        return
    cuda = args.device.startswith("cuda")
    batches = [int(b) for b in (args.batch_sizes or ("1,4,8,16" if cuda else "1,2")).split(",")]
    dtypes = (args.dtypes or ("float32,bfloat16" if cuda else "float32")).split(",")
    num_images = args.num_images or (64 if cuda else 4)
    base = dict(device=args.device, weights=args.weights, height=args.height, width=args.width,
                num_images=num_images, threads=args.threads, reference=False)
    tmp = tempfile.mkdtemp(prefix="bench_detector_")
    try:
        compare(args, base, batches, dtypes, num_images, cuda, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compare(args, base, batches, dtypes, num_images, cuda, tmp) -> None:
    rows = []
    first_dump = None  # boxes of the first configuration: every other one is compared on them
    for dtype in dtypes:
        for batch in batches:
            dump = os.path.join(tmp, f"{dtype}-{batch}.npz") if batch == batches[0] else None
            rows.append((f"{dtype}", batch, run_config(dict(base, dtype=dtype, batch=batch, dump=dump,
                                                            boxes_from=first_dump)), dump))
            first_dump = first_dump or dump
            print_row(*rows[-1][:3], first=len(rows) == 1, args=args)
    reference = None
    if not cuda and not args.no_reference:
        dump = os.path.join(tmp, "reference.npz")
        reference = run_config(dict(base, dtype="float32", batch=1, reference=True, dump=dump,
                                    boxes_from=first_dump))
        print_row("fp32 straightforward", 1, reference, first=False, args=args)
    print()
    fp32 = next((r for r in rows if r[0] == "float32" and r[1] == batches[0]), None)
    if reference is not None and fp32 is not None:
        speed = (reference["seconds"] / reference["images"]) / (fp32[2]["seconds"] / fp32[2]["images"])
        cpu_speed = reference["cpu_seconds"] / fp32[2]["cpu_seconds"] * fp32[2]["images"] / reference["images"]
        a, b = np.load(fp32[3]), np.load(os.path.join(tmp, "reference.npz"))
        same_boxes = all(a[f"boxes{i}"].shape == b[f"boxes{i}"].shape for i in range(num_images))
        box_diff = max(float(np.abs(a[f"boxes{i}"] - b[f"boxes{i}"]).max()) for i in range(num_images)) \
            if same_boxes else float("nan")
        feat_diff = max(float(np.abs(a[f"given{i}"].astype(np.float32) - b[f"given{i}"].astype(np.float32)).max())
                        for i in range(num_images))
        print(f"speed-up vs straightforward path: {speed:.2f}x wall, {cpu_speed:.2f}x cpu time; "
              f"same box counts: {same_boxes}; "
              f"max box diff {box_diff:.2e} px; max feature diff (fp16 records, same boxes) {feat_diff:.2e}")
    if fp32 is not None:
        print(f"proposals per image {fp32[2]['proposals']}, distinct pooled RoIs {fp32[2]['distinct_pooled']} "
              f"(res5 runs once per distinct one)")
    for name, batch, result, dump in rows:
        if name != "float32" and dump and fp32 is not None:
            a, b = np.load(fp32[3]), np.load(dump)
            # same boxes for both: the fp32 run's boxes, features computed in given-box mode
            cos = np.concatenate([cosine_rows(a[f"given{i}"], b[f"given{i}"]) for i in range(num_images)])
            print(f"{name} vs float32 per-box cosine: mean {cos.mean():.5f}, min {cos.min():.5f} "
                  f"({cos.size} boxes)")


def print_row(name, batch, result, *, first, args):
    if first:
        print(f"R101 butd-10-100, {args.height}x{args.width} inputs, device {result['device']} "
              f"({result['threads']} threads), {'random weights' if not args.weights else args.weights}")
        print(f"{'config':24s} {'batch':>5s} {'images':>6s} {'s/image':>8s} {'images/s':>9s} "
              f"{'cpu s/image':>11s} {'boxes':>6s} {'peak mem':>9s}")
    per = result["seconds"] / result["images"]
    cpu = result["cpu_seconds"] / result["images"]
    print(f"{name:24s} {batch:5d} {result['images']:6d} {per:8.3f} {1 / per:9.3f} {cpu:11.3f} "
          f"{result['boxes']:6.1f} {result['peak_bytes'] / 2 ** 30:7.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
