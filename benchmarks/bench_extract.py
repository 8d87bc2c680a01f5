"""vlp-extract throughput and memory.

1. Throughput: the pipeline (Ray decode tasks + one detector actor + shard writing) versus
   the detector alone (``Detector.detect`` in this process, batch 1, images decoded
   beforehand, same thread count) on the same images. Reported as images/s and the
   ratio pipeline / detector; the pipeline figure is steady state (from its first to its
   last finished chunk, so Ray start-up and model loading are left out) and end to end.
2. Memory: peak PSS (RSS with shared pages split among the processes sharing them) of
   the driver and of all Ray processes together, sampled every 0.2 s, for runs over N
   and 10 N images, each in a fresh process; it must stay flat: in-flight work is
   bounded, and the image list is the only thing that grows with N.

3. Contention (``--contention``): the same comparison while a busy loop (another user's
   job) holds one core, side by side: the detector alone, the pipeline as ``run_extract``
   starts it (Ray workers at the driver's niceness), and the pipeline with Ray's default
   worker niceness, 15 (as before vlp set it). A short run: a few dozen small images.

CPU default: the demo preset on synthetic-world images (240-640 px, read at 512 and 800 px
short sides). GPU: ``--preset butd-10-100 --random-weights --device cuda`` (R101, random
weights: timing does not depend on the values) with ``--batch-size 8``.

    python benchmarks/bench_extract.py                            # CPU, demo, 200 + 1k/10k images
    python benchmarks/bench_extract.py --skip-memory --images 400
    python benchmarks/bench_extract.py --contention --images 24 --min-size 320   # about 2 minutes on 2 cores
    python benchmarks/bench_extract.py --preset butd-10-100 --random-weights --device cuda --batch-size 8
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def world_images(cache: Path, count: int) -> Path:
    """A folder of ``count`` synthetic-world JPEGs (seed 0), generated once into ``cache``."""
    from vlp.synthetic import generate

    root = cache / f"world-{count}"
    if not (root / "image_data.json").is_file():
        # classic: the world RESULTS.md's figures were measured on
        generate(root, count, seed=0, split_fractions=(1.0, 0.0, 0.0), overwrite=True, style="classic")
    return root / "images"


def replicated(pool: Path, count: int, dest: Path) -> Path:
    """``count`` files hard-linked from the pool's images (distinct names, shared bytes)."""
    sources = sorted(pool.glob("*.jpg"))
    if dest.exists():
        shutil.rmtree(dest)
    for i in range(count):
        folder = dest / f"{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        os.link(sources[i % len(sources)], folder / f"{i:07d}.jpg")
    return dest


def _pss_of(pid: int) -> int:
    """Proportional set size: shared pages (Ray's object store) split among their users,
    so the sum over processes is the memory really used."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _ray_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"ray::") or b"/ray/" in cmdline[:300]:
                pids.append(int(proc.name))
    return pids


class MemorySampler:
    """Peak PSS of this process and of all Ray processes together, sampled every ``every`` s."""

    def __init__(self, every: float = 0.2):
        self.every, self.driver_peak, self.ray_peak = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        own = os.getpid()
        while not self._stop.is_set():
            self.driver_peak = max(self.driver_peak, _pss_of(own))
            self.ray_peak = max(self.ray_peak, sum(_pss_of(pid) for pid in _ray_pids() if pid != own))
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_pipeline(images: Path, out: Path, settings) -> tuple[dict, list]:
    """run_extract, plus (time, images done) after every finished chunk."""
    from vlp.pipeline.extract import run_extract

    marks = []
    stats = run_extract(images, out, settings, on_progress=lambda counts: marks.append(
        (time.perf_counter(), counts.get("processed", 0))))
    return stats, marks


def detector_alone(images: Path, args, count: int) -> float:
    import torch

    from vlp.detectors import load_detector
    from vlp.core.decode import decode_file

    torch.set_num_threads(args.threads)
    detector = load_detector(preset=args.preset, device=args.device, dtype=args.dtype,
                             allow_random=args.random_weights, batch_size=args.batch_size, **_size_overrides(args))
    decoded = [decode_file(p) for p in sorted(images.glob("*.jpg"))[:count]]
    detector.detect(decoded[:2])  # warm-up
    start = time.perf_counter()
    size = args.batch_size or 1
    for i in range(0, len(decoded), size):
        detector.detect(decoded[i:i + size])
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(decoded) / (time.perf_counter() - start)


def _size_overrides(args) -> dict:
    if not args.min_size:
        return {}
    return {"min_size": args.min_size, "max_size": args.min_size * 3 // 2, "extra_min_sizes": []}


def pipeline_rate(images: Path, out: Path, settings) -> tuple[float, float, dict]:
    """(steady-state images/s, end-to-end images/s, stats) of one run_extract."""
    start = time.perf_counter()
    stats, marks = run_pipeline(images, out, settings)
    wall = time.perf_counter() - start
    if len(marks) < 3:
        raise SystemExit("too few chunks for a steady-state figure: use more --images or a smaller --chunk-size")
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (n1 - n0) / (t1 - t0), stats["stored"] / wall, stats


def busy_loop(cpu: int) -> subprocess.Popen:
    """Another user's job: a pure-Python busy loop pinned to one core, at niceness 0."""
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def contention(args, pool: Path, cache: Path) -> None:
    from vlp.pipeline.extract import ExtractSettings

    subset = replicated(pool, args.images, cache / "contention")
    base = dict(preset=args.preset, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                allow_random_weights=args.random_weights, threads_per_worker=args.threads, overwrite=True,
                chunk_size=args.chunk_size, progress="off", shard_size=1000, overrides=_size_overrides(args))
    loop = busy_loop(0)
    try:
        time.sleep(1.0)
        # The detector alone is timed just before and just after each pipeline run (the mean is the
        # reference), so a change in the machine's other load hits both sides of a ratio alike.
        for niceness, label in ((None, "vlp: the driver's"), (15, "Ray's default")):
            before = detector_alone(subset / "000", args, args.images)
            steady, end_to_end, stats = pipeline_rate(subset, cache / "out-contention",
                                                      ExtractSettings(worker_niceness=niceness, **base))
            after = detector_alone(subset / "000", args, args.images)
            alone = (before + after) / 2
            print(f"workers at niceness {stats['workers']['niceness']:>2} ({label}): detector alone {before:.2f} / "
                  f"{after:.2f} images/s (before / after), pipeline {steady:.2f} steady ({end_to_end:.2f} end to "
                  f"end); ratio pipeline / detector {steady / alone:.3f}", flush=True)
    finally:
        loop.kill()
        loop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="images for the throughput comparison")
    parser.add_argument("--memory-counts", default="1000,10000", help="image counts for the memory runs")
    parser.add_argument("--memory-min-size", type=int, default=128,
                        help="detector input short side in the memory runs (small, with 20 RoIs per image: "
                             "they measure memory, not detection)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--min-size", type=int, default=None,
                        help="detector input short side for both sides of the comparison (max 1.5x), "
                             "one reading")
    parser.add_argument("--contention", action="store_true",
                        help="only the comparison under a busy loop on one core (chunks of 4 images)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "vlp-bench-extract"))
    parser.add_argument("--memory-run", type=int, help=argparse.SUPPRESS)  # internal: one memory run
    args = parser.parse_args()
    if args.memory_run:
        memory_run(args)
        return

    from vlp.pipeline.extract import ExtractSettings

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    pool = world_images(cache, max(args.images, 200))
    print(f"machine: {os.cpu_count()} CPUs; preset {args.preset}, device {args.device}, dtype {args.dtype}, "
          f"batch {args.batch_size or 'default'}, threads {args.threads}, "
          f"input short side {args.min_size or 'preset default'}")
    if args.contention:
        if args.chunk_size == 16:
            args.chunk_size = 4
        contention(args, pool, cache)
        return

    alone = detector_alone(pool, args, args.images)
    print(f"detector alone        {alone:8.2f} images/s  ({args.images} images, decoded beforehand)")

    # run_extract starts (and stops) its own Ray instance, as vlp-extract does.
    base = dict(preset=args.preset, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                allow_random_weights=args.random_weights, threads_per_worker=args.threads,
                chunk_size=args.chunk_size, progress="off", shard_size=1000, overrides=_size_overrides(args))
    subset = replicated(pool, args.images, cache / "throughput")
    steady, end_to_end, stats = pipeline_rate(subset, cache / "out-throughput", ExtractSettings(overwrite=True, **base))
    print(f"pipeline steady state {steady:8.2f} images/s")
    print(f"pipeline end to end   {end_to_end:8.2f} images/s  (incl. Ray start and model load)")
    print(f"ratio pipeline / detector alone: {steady / alone:.3f} (steady), {end_to_end / alone:.3f} (end to end)")
    stage = stats["stage_seconds"]
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in stage.items()))
    if not args.skip_memory:
        for count in [int(c) for c in args.memory_counts.split(",")]:
            # Each in a fresh process: its own driver and Ray instance.
            command = [sys.executable, __file__, "--memory-run", str(count), "--cache", str(cache),
                       "--memory-min-size", str(args.memory_min_size), "--preset", args.preset,
                       "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
                       "--chunk-size", str(args.chunk_size)]
            if args.random_weights:
                command.append("--random-weights")
            if args.batch_size:
                command += ["--batch-size", str(args.batch_size)]
            subprocess.run(command, check=True)


def memory_run(args) -> None:
    from vlp.pipeline.extract import ExtractSettings

    cache = Path(args.cache)
    count = args.memory_run
    pool = world_images(cache, max(args.images, 200))
    folder = replicated(pool, count, cache / f"memory-{count}")
    settings = ExtractSettings(preset=args.preset, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                               allow_random_weights=args.random_weights, threads_per_worker=args.threads,
                               chunk_size=args.chunk_size, progress="off", shard_size=2000, overwrite=True,
                               overrides={"min_size": args.memory_min_size, "max_size": args.memory_min_size * 2,
                                          "extra_min_sizes": [],
                                          # few RoIs: res5 per RoI dominates otherwise, whatever the image size
                                          "rpn_post_nms_topk": 20})
    with MemorySampler() as sampler:
        start = time.perf_counter()
        stats, _ = run_pipeline(folder, cache / f"out-memory-{count}", settings)
        wall = time.perf_counter() - start
    print(f"memory {count:6d} images: driver peak PSS {sampler.driver_peak / 2**20:6.0f} MiB, "
          f"Ray processes peak PSS (sum) {sampler.ray_peak / 2**20:6.0f} MiB; {stats['stored']} stored, "
          f"{stats['stored'] / wall:.1f} images/s (input short side {args.memory_min_size}, 20 RoIs)", flush=True)
    shutil.rmtree(folder)
    shutil.rmtree(cache / f"out-memory-{count}")


if __name__ == "__main__":
    main()
