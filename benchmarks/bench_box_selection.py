"""The BUTD box selection (an NMS per object class, 1600 classes) and what it costs per image.

Side by side in one run, on the same inputs, for each way of running the per-class NMS
(``nms_method``: "loop" = one torchvision NMS per class, as generate_tsv does; "sweep" =
all classes at once, rank by rank, the CPU default; "matrix" = the fixed-point iteration,
the CUDA default):

* the selection alone, on the class scores the shipped demo detector gives on wide-world
  images (every reading's proposals pooled; its file keeps 8 classes and scores the other
  1592 exactly 0, which skip the NMS), and on 300 RoIs x 1600 classes of softmax scores (the
  VG presets' proposal count; random logits, a few peaked rows);
* the shipped demo detector end to end (``detect`` per image, preset demo), so the share of
  the selection in an image's time is visible.

Every method's result is checked against the loop's before it is timed. One process, torch
threads as given. No assertions; this prints figures and ratios.

    python benchmarks/bench_box_selection.py
    python benchmarks/bench_box_selection.py --images 20 --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

METHODS = ("loop", "sweep", "matrix")


def demo_scores(images):
    """(rois, object scores) the demo detector hands to the selection, one pair per image."""
    import vlp.detectors.inference as inference
    from vlp.detectors import load_detector

    captured = []
    select = inference.butd_select

    def capture(rois, scores, **kwargs):
        captured.append((rois.clone(), scores.clone(), kwargs["nms_threshold"]))
        return select(rois, scores, **kwargs)

    inference.butd_select = capture
    try:
        load_detector(preset="demo", device="cpu").detect(images)
    finally:
        inference.butd_select = select
    return captured


def synthetic_scores(count: int, num_rois: int = 300, num_classes: int = 1600, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    cases = []
    for _ in range(count):
        xy = torch.rand(num_rois, 2, generator=g) * 800
        wh = torch.rand(num_rois, 2, generator=g) * 300 + 4
        logits = torch.randn(num_rois, num_classes, generator=g)
        peaked = torch.randint(0, num_rois, (num_rois // 5,), generator=g)
        logits[peaked, torch.randint(0, num_classes, (peaked.numel(),), generator=g)] += 12.0
        cases.append((torch.cat([xy, xy + wh], dim=1), torch.softmax(logits, dim=1), 0.3))
    return cases


def time_selection(cases, method: str) -> float:
    from vlp.detectors.postprocess import max_conf_after_nms

    start = time.perf_counter()
    for rois, scores, threshold in cases:
        max_conf_after_nms(rois, scores, threshold, method)
    return (time.perf_counter() - start) / len(cases)


def check_equal(cases) -> None:
    import torch

    from vlp.detectors.postprocess import per_class_nms_keep

    for rois, scores, threshold in cases:
        loop = per_class_nms_keep(rois, scores, threshold, "loop")
        for method in METHODS[1:]:
            if not torch.equal(per_class_nms_keep(rois, scores, threshold, method), loop):
                raise SystemExit(f"{method} differs from the loop on a {tuple(scores.shape)} case")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=12, help="wide-world images (default 12)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)

    import cv2
    import torch

    from vlp.detectors import load_detector
    from vlp.synthetic import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), args.images, seed=7, split_fractions=(0.0, 0.0, 1.0), web=False)
        images = [cv2.imread(str(p)) for p in sorted((Path(tmp) / "images").iterdir())]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(images)} wide-world images (seed 7)")

    sets = {"demo detector scores": demo_scores(images), "300 RoIs x 1600 classes": synthetic_scores(4)}
    print("\nselection alone (max_conf of the BUTD rule), ms per image:")
    for name, cases in sets.items():
        check_equal(cases)
        times = {method: time_selection(cases, method) for method in METHODS}
        shape = "x".join(str(v) for v in cases[0][1].shape)
        figures = ", ".join(f"{m} {1e3 * t:.1f}" for m, t in times.items())
        print(f"  {name} (first {shape}): {figures}; loop / sweep {times['loop'] / times['sweep']:.1f}x")

    print("\nshipped demo detector, detect() per image, s:")
    per_image = {}
    for method in ("loop", "sweep"):
        detector = load_detector(preset="demo", device="cpu", nms_method=method)
        detector.detect(images[:1])  # warm-up
        start = time.perf_counter()
        records = [detector.detect([image])[0] for image in images]
        per_image[method] = (time.perf_counter() - start) / len(images), records
    same = all(a.equals(b) for a, b in zip(per_image["loop"][1], per_image["sweep"][1]))
    print(f"  loop {per_image['loop'][0]:.3f}, sweep {per_image['sweep'][0]:.3f}; "
          f"{per_image['loop'][0] / per_image['sweep'][0]:.2f}x; records identical: {same}")


if __name__ == "__main__":
    main()
