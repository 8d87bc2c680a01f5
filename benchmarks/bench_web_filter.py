"""vlp-build web-filter on a held-out synthetic crawl: per-category precision/recall, the stage
that rejected each junk category, the share of good pairs kept, and rows/s per core with and
without the feature-based stages.

    .venv/bin/python benchmarks/bench_web_filter.py [--scenes 300] [--ray]

The crawl is the synthetic world's held-out crawl (seed 0, the random streams of
``web/heldout``, other scenes than the ``web/`` crawl the default models were trained on),
here with ``--scenes`` scenes; features are its oracle feature store. Timings: the
in-process engine (one core) on a second run, so imports and model loading are not counted;
``--ray`` also times the Ray Data engine on a local Ray with 2 CPUs (start-up included).
Prints figures only, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--ray", action="store_true")
    args = parser.parse_args()
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
