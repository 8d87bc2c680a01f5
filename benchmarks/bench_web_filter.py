"""vlp-build web-filter on a held-out synthetic crawl: per-category precision/recall, the stage
that rejected each junk category, the share of good pairs kept, and rows/s per core with and
without the feature-based stages.

    .venv/bin/python benchmarks/bench_web_filter.py [--scenes 300] [--ray]
    .venv/bin/python benchmarks/bench_web_filter.py --memory [--memory-scenes 100]
    .venv/bin/python benchmarks/bench_web_filter.py --memory-rows 25000

The crawl is the synthetic world's held-out crawl (seed 0, the random streams of
``web/heldout``, other scenes than the ``web/`` crawl the default models were trained on),
here with ``--scenes`` scenes; features are its oracle feature store. Timings: the
in-process engine (one core) on a second run, so imports and model loading are not counted;
``--ray`` also times the Ray Data engine on a local Ray with 2 CPUs (start-up included).
``--memory``: the driver's peak RSS (``getrusage`` high-water mark) with the Ray engine on
held-out crawls of N and 4N scenes (no features), each run in a fresh process; also the
in-process engine (whose aggregation holds every survivor) for contrast. ``--memory-rows N``:
the aggregation alone over N and 4N made-up survivor rows (2% exact and 3% near copies,
texts shared by about 3 rows, keep-fraction 0.9), Ray shuffles against the in-memory reference.
Prints figures only, asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def _crawl(root: Path, scenes: int) -> Path:
    from vlp.synthetic import world
    from vlp.synthetic.web import write_crawl

    def write(relative: str, data: bytes) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    write_crawl(write, "heldout", 0, scenes, world._WEB + 1000)
    return root / "heldout"


def _run(crawl, out, **kw):
    from vlp.builders.web_filter import web_filter

    started = time.perf_counter()
    result = web_filter(crawl, out, overwrite=True, progress="off", **kw)
    return result, time.perf_counter() - started


def _evaluate(crawl: Path, out: Path) -> dict:
    from vlp.schemas.pairs import PairStore
    from vlp.synthetic.web import EXPECTED_STAGE, read_truth

    truth = read_truth(crawl)
    kept = {p["pair_id"][4:] for p in PairStore(out)}
    stage_of = {}
    for line in (out / "rejected.jsonl").read_text().splitlines():
        r = json.loads(line)
        stage_of[r["key"]] = r["stage"]
    copies: dict = {}
    for k, t in truth.items():
        if t["category"] == "duplicate":
            copies.setdefault(t["original"], []).append(k)
    report = {}
    for category in sorted({t["category"] for t in truth.values()}):
        keys = [k for k, t in truth.items() if t["category"] == category]
        if category == "good":
            # an image counts as kept when its pair or a copy's pair survives (one pair per image)
            lost = [k for k in keys if k not in kept and not any(c in kept for c in copies.get(k, []))]
            report[category] = {"rows": len(keys), "kept": len(keys) - len(lost),
                                "kept_share": 1 - len(lost) / len(keys),
                                "lost_at": dict(Counter(stage_of.get(k) for k in lost))}
            continue
        stage = EXPECTED_STAGE[category]
        if category == "duplicate":
            # right when the copy or its original is dropped at aggregation (one pair per image)
            right = sum(1 for k in keys if stage_of.get(k) == "aggregation" or stage_of.get(truth[k]["original"]) ==
                        "aggregation")
        else:
            right = sum(1 for k in keys if stage_of.get(k) == stage)
        anywhere = sum(1 for k in keys if k not in kept)
        at_stage = [k for k, s in stage_of.items() if s == stage]
        named = {c for c, s in EXPECTED_STAGE.items() if s == stage}

        def correct(k):
            c = truth[k]["category"]
            return c in named or (c == "good" and stage == "aggregation" and any(x in kept for x in copies.get(k, [])))
        precision = sum(1 for k in at_stage if correct(k)) / len(at_stage) if at_stage else float("nan")
        report[category] = {"rows": len(keys), "stage": stage, "recall_at_stage": right / len(keys),
                            "rejected_anywhere": anywhere / len(keys), "stage_precision": precision,
                            "stages_seen": dict(Counter(stage_of.get(k, "kept") for k in keys))}
    return report


def _misplaced(crawl: Path, out: Path):
    from vlp.synthetic.web import EXPECTED_STAGE, read_truth

    truth = read_truth(crawl)
    for line in (out / "rejected.jsonl").read_text().splitlines():
        r = json.loads(line)
        category = truth[r["key"]]["category"]
        if EXPECTED_STAGE.get(category) != r["stage"] and not (category == "good" and r["stage"] == "aggregation"):
            yield f"{category}: {r.get('text', '')[:40]!r}", f"{r['stage']}/{r['reason']}"


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


class _AnonSampler:
    """Peak of this process's anonymous (private heap) memory, sampled every 50 ms from
    /proc/self/smaps_rollup. RSS also counts the pages of Ray's shared-memory object store
    that the driver has mapped and read (they belong to the object store, are shared and
    are freed with the objects); the anonymous memory is the driver's own."""

    def __init__(self):
        import threading

        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        try:
            for line in open("/proc/self/smaps_rollup"):
                if line.startswith("Anonymous:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.now())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now())


def _memory_child(crawl: str, out: str, engine: str) -> None:
    """One filter run in this fresh process; prints its peak RSS before and after (JSON)."""
    from vlp.builders.web_filter import web_filter

    if engine == "ray":
        importlib.import_module("ray")  # counted in the baseline, as the local engine's imports are
    before = _peak_kib()
    anon_before = _AnonSampler.now()
    sampler = _AnonSampler()
    started = time.perf_counter()
    result = web_filter(crawl, out, engine=engine, num_cpus=2, shard_rows=100, progress="off")
    print(json.dumps({"engine": engine, "rows": result.stats["rows"], "pairs": result.num_pairs,
                      "seconds": time.perf_counter() - started, "peak_before_kib": before,
                      "peak_after_kib": _peak_kib(), "anon_before_kib": anon_before, "anon_peak_kib": sampler.stop()}))


def _narrow_survivors(folder: Path, rows: int, seed: int = 0, per_file: int = 5000) -> list:
    """Survivor files of ``rows`` made-up narrow rows: 2% exact copies, 3% near copies (2 bits
    flipped), a text shared by 1-30 rows, 4-decimal scores."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlp.builders.web_filter.run import SURVIVOR_SCHEMA, order_of

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for index, start in enumerate(range(0, rows, per_file)):
        n = min(per_file, rows - start)
        phash = rng.integers(0, 2 ** 63, size=n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
        sha = [f"{x:016x}" for x in rng.integers(0, 2 ** 62, size=n)]
        for i in np.flatnonzero(rng.random(n) < 0.05):
            j = int(rng.integers(0, n))
            phash[i] = phash[j]
            if rng.random() < 0.4:
                sha[i] = sha[j]
            else:
                for bit in rng.integers(0, 64, size=2):
                    phash[i] ^= np.uint64(1) << np.uint64(bit)
        text_ids = rng.integers(0, max(1, rows // 3), size=n)
        table = pa.Table.from_pylist([
            {"order": order_of(index, i), "_i": i, "key": f"k{start + i}", "shard": f"0/r#{index}",
             "url": f"https://x.invalid/{start + i}", "text": f"text number {t}", "text_source": "alt",
             "image_id": f"k{start + i}", "sha256": sha[i], "phash": f"{int(phash[i]):016x}",
             "score": round(float(rng.random()), 4), "width": 640, "height": 480, "p_unnatural": None,
             "norm": f"text number {t}", "thumb": None} for i, t in enumerate(text_ids)], schema=SURVIVOR_SCHEMA)
        path = folder / f"{index:06d}.survivors.parquet"
        pq.write_table(table, path)
        files.append(path)
    return files


def _aggregation_child(folder: str, engine: str) -> None:
    """Only the aggregation, over the survivor files in ``folder``, in this fresh process."""
    from vlp.builders.web_filter import FilterConfig, run

    files = sorted(Path(folder).glob("*.survivors.parquet"))
    if engine == "ray":
        importlib.import_module("ray")
    before = _peak_kib()
    anon_before = _AnonSampler.now()
    sampler = _AnonSampler()
    started = time.perf_counter()
    config = FilterConfig(keep_fraction=0.9)
    runner = run._RayEngine(config, None, 2, 64, "sort") if engine == "ray" else run._LocalEngine(config, 64)
    kept = rejected = 0
    try:
        for kind, _row in runner.verdicts(files):
            kept += kind == "kept"
            rejected += kind != "kept"
    finally:
        runner.close()
    print(json.dumps({"engine": engine, "rows": kept + rejected, "pairs": kept, "seconds": time.perf_counter() - started,
                      "peak_before_kib": before, "peak_after_kib": _peak_kib(), "anon_before_kib": anon_before,
                      "anon_peak_kib": sampler.stop()}))


def _child_figures(*args: str) -> dict:
    """Run this script again with ``args`` in a fresh process (its own peak RSS); its last
    stdout line is a json object of figures."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_aggregation(rows: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-web-filter-agg-") as tmp:
        tmp = Path(tmp)
        for factor in (1, 4):
            _narrow_survivors(tmp / f"x{factor}", rows * factor, seed=factor)
        figures = {}
        for engine in ("ray", "local"):
            for factor in (1, 4):
                figures[engine, factor] = fig = _child_figures("--aggregation-child", str(tmp / f"x{factor}"), engine)
                print(f"aggregation only, {engine:5} {factor}x: {fig['rows']} survivors -> {fig['pairs']} kept in "
                      f"{fig['seconds']:.1f} s; driver peak RSS {fig['peak_after_kib'] / 1024:.0f} MiB "
                      f"(run +{(fig['peak_after_kib'] - fig['peak_before_kib']) / 1024:.1f} MiB); "
                      f"peak anonymous {fig['anon_peak_kib'] / 1024:.0f} MiB "
                      f"(run +{(fig['anon_peak_kib'] - fig['anon_before_kib']) / 1024:.1f} MiB)")
        for engine in ("ray", "local"):
            one, four = figures[engine, 1], figures[engine, 4]
            print(f"aggregation only, {engine}: peak RSS 4x / 1x = {four['peak_after_kib'] / one['peak_after_kib']:.3f}; "
                  f"peak anonymous 4x / 1x = {four['anon_peak_kib'] / one['anon_peak_kib']:.3f}")


def _memory(scenes: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-web-filter-mem-") as tmp:
        tmp = Path(tmp)
        crawls = {}
        for factor in (1, 4):
            t0 = time.perf_counter()
            crawls[factor] = _crawl(tmp / f"x{factor}", scenes * factor)
            rows = len((crawls[factor] / "records.jsonl").read_text().splitlines())
            print(f"{factor}x: {scenes * factor} scenes, {rows} rows (made in {time.perf_counter() - t0:.1f} s)")
        figures = {}
        for engine in ("ray", "local"):
            for factor in (1, 4):
                figures[engine, factor] = fig = _child_figures("--memory-child", str(crawls[factor]),
                                                               str(tmp / f"out-{engine}-{factor}"), engine)
                print(f"{engine:5} {factor}x: {fig['rows']} rows -> {fig['pairs']} pairs in {fig['seconds']:.1f} s; "
                      f"driver peak RSS {fig['peak_after_kib'] / 1024:.0f} MiB "
                      f"(after imports {fig['peak_before_kib'] / 1024:.0f} MiB, "
                      f"run +{(fig['peak_after_kib'] - fig['peak_before_kib']) / 1024:.1f} MiB); "
                      f"peak anonymous {fig['anon_peak_kib'] / 1024:.0f} MiB "
                      f"(run +{(fig['anon_peak_kib'] - fig['anon_before_kib']) / 1024:.1f} MiB)")
        for engine in ("ray", "local"):
            one, four = figures[engine, 1], figures[engine, 4]
            print(f"{engine}: peak RSS 4x / 1x = {four['peak_after_kib'] / one['peak_after_kib']:.3f}; "
                  f"peak anonymous 4x / 1x = {four['anon_peak_kib'] / one['anon_peak_kib']:.3f}; "
                  f"growth of the run 1x {(one['peak_after_kib'] - one['peak_before_kib']) / 1024:.1f} MiB, "
                  f"4x {(four['peak_after_kib'] - four['peak_before_kib']) / 1024:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--ray", action="store_true")
    parser.add_argument("--memory", action="store_true", help="driver peak RSS at 1x and 4x input (Ray engine)")
    parser.add_argument("--memory-scenes", type=int, default=100, help="scenes of the 1x crawl of --memory")
    parser.add_argument("--memory-rows", type=int, default=0,
                        help="the aggregation alone on this many made-up survivors and 4x as many (driver peak RSS)")
    parser.add_argument("--memory-child", nargs=3, metavar=("CRAWL", "OUT", "ENGINE"), help=argparse.SUPPRESS)
    parser.add_argument("--aggregation-child", nargs=2, metavar=("FOLDER", "ENGINE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(*args.memory_child)
        return
    if args.aggregation_child:
        _aggregation_child(*args.aggregation_child)
        return
    if args.memory_rows:
        _memory_aggregation(args.memory_rows)
    if args.memory:
        _memory(args.memory_scenes)
    if args.memory or args.memory_rows:
        return
    from vlp.builders.web_filter import FilterConfig
    from vlp.synthetic.web import web_feature_store

    with tempfile.TemporaryDirectory(prefix="bench-web-filter-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        crawl = _crawl(tmp, args.scenes)
        features = web_feature_store(crawl, tmp / "features")
        rows = len((crawl / "records.jsonl").read_text().splitlines())
        print(f"held-out crawl: {rows} rows from {args.scenes} scenes (made in {time.perf_counter() - t0:.1f} s)")
        with_features = FilterConfig(features=str(features))
        _run(crawl, tmp / "warm", config=with_features, engine="local")  # imports, spaCy, models
        result, seconds = _run(crawl, tmp / "out", config=with_features, engine="local")
        _, seconds_plain = _run(crawl, tmp / "plain", engine="local")
        print(f"in-process, 1 core: with feature stages {rows / seconds:.1f} rows/s ({seconds:.1f} s), "
              f"without {rows / seconds_plain:.1f} rows/s ({seconds_plain:.1f} s); "
              f"ratio {seconds / seconds_plain:.2f}")
        if args.ray:
            _, ray_seconds = _run(crawl, tmp / "ray", config=with_features, engine="ray", num_cpus=2, shard_rows=250)
            print(f"Ray Data, local Ray with 2 CPUs (start-up included): {rows / ray_seconds:.1f} rows/s "
                  f"({ray_seconds:.1f} s)")
        print("funnel:", ", ".join(f"{f['stage']} -{f['rejected']}" for f in result.stats["funnel"]),
              f"-> {result.num_pairs} pairs")
        report = _evaluate(crawl, tmp / "out")
        print(f"{'category':12} {'rows':>5} {'stage':12} {'recall@stage':>12} {'rejected':>9} {'precision':>9}")
        for category, entry in report.items():
            if category == "good":
                continue
            print(f"{category:12} {entry['rows']:5d} {entry['stage']:12} {entry['recall_at_stage']:12.3f} "
                  f"{entry['rejected_anywhere']:9.3f} {entry['stage_precision']:9.3f}  {entry['stages_seen']}")
        good = report["good"]
        print(f"good pairs kept: {good['kept']}/{good['rows']} = {good['kept_share']:.3f} (lost at {good['lost_at']})")
        wrong = Counter((truth_category, stage) for truth_category, stage in _misplaced(crawl, tmp / "out"))
        print("rows rejected at a stage that names another category:", dict(wrong))
        plain = _evaluate(crawl, tmp / "plain")
        print("without --features: good kept {:.3f}; mismatch rejected {:.3f}; unnatural rejected {:.3f}".format(
            plain["good"]["kept_share"], plain["mismatch"]["rejected_anywhere"],
            plain["unnatural"]["rejected_anywhere"]))


if __name__ == "__main__":
    main()
