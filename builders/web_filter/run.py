"""The web-filter runner: shards through stages 1-6 on Ray Data, then the aggregation.

Work folder ``OUT.work/`` (beside the store): ``config.json`` (options and inputs),
per finished input shard ``NNNNNN.survivors.jsonl`` and ``NNNNNN.rejected.jsonl``
(each written atomically) and ``done.jsonl`` (a shard is finished once listed there,
after both files). A rerun with the same inputs and options skips finished shards, so a
run killed with kill -9 resumes where it stopped without duplicates; other options start
the work afresh. When every shard is done, :func:`aggregate` runs over all survivors
(narrow rows: key, text, hashes, score) and the store is written; the work folder is then
removed.

Engines: ``ray`` (default): each shard is a Ray Data dataset, one ``map_batches`` per
stage (fused by Ray Data), on a local Ray started with ``num_cpus`` (shut down at the end)
or on the cluster at ``address``. ``local``: the same stage functions in this process
(tests, tiny inputs).
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from vlp.builders.common import Build, BuildResult
from vlp.builders.web_filter import texts
from vlp.builders.web_filter.inputs import DEFAULT_SHARD_ROWS, Shard, plan_shards, read_shard
from vlp.builders.web_filter.stages import FEATURE_STAGES, STAGES, FilterConfig, run_all, run_stage, split_results
from vlp.core.durable import JsonLines, atomic_write_json, atomic_write_text, read_json_lines
from vlp.schemas.errors import StoreError
from vlp.schemas.pairs import PAIR_SHARD_SIZE

log = logging.getLogger(__name__)

FUNNEL_STAGES = ("input",) + STAGES + ("aggregation",)
WORK_SUFFIX = ".work"
REJECTED_NAME = "rejected.jsonl"
FUNNEL_PAGE = "funnel.html"
FUNNEL_CHART = "funnel.png"
DEFAULT_BATCH_SIZE = 64


# --------------------------------------------------------------------------- aggregation


class _Groups:
    """Union-find over row numbers."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def image_groups(rows: list, phash_distance: int = 4) -> list[int]:
    """Per row, its image group: rows with the same sha256, or pHashes at most
    ``phash_distance`` bits apart (candidates from ``phash_distance + 1`` bands of the
    64 bits: two hashes that close agree on at least one band), are one image."""
    groups = _Groups(len(rows))
    first: dict = {}
    for i, row in enumerate(rows):
        j = first.setdefault(("sha", row["sha256"]), i)
        if j != i:
            groups.union(i, j)
    if phash_distance >= 0:
        bits = [int(row["phash"], 16) for row in rows]
        bands = phash_distance + 1
        width = -(-64 // bands)
        for b in range(bands):
            buckets: dict = {}
            mask = (1 << width) - 1
            for i, value in enumerate(bits):
                buckets.setdefault((value >> (b * width)) & mask, []).append(i)
            for members in buckets.values():
                for a in range(len(members)):
                    for c in range(a + 1, len(members)):
                        i, j = members[a], members[c]
                        if groups.find(i) != groups.find(j) and bin(bits[i] ^ bits[j]).count("1") <= phash_distance:
                            groups.union(i, j)
    return [groups.find(i) for i in range(len(rows))]


def aggregate(rows: list, *, max_images_per_text: int = 10, phash_distance: int = 4,
              keep_fraction: Optional[float] = None) -> tuple[list, list]:
    """Stage 7 over every survivor (in input order): (kept rows, rejections).

    1. ``keep_fraction``: only the best-scored share survives the semantic stage;
    2. a key seen before is a duplicate row (stage input);
    3. a normalized text on more than ``max_images_per_text`` distinct images (image
       groups, :func:`image_groups`) is dropped everywhere (COYO's K = 10);
    4. per image group the best-scored pair is kept (ties: the first in input order),
       which also makes (image hash, text) unique.
    """
    rejected: list = []

    def reject(row, stage, reason, values):
        entry = {"key": row["key"], "shard": row["shard"], "stage": stage, "reason": reason, "values": values}
        for k in ("url", "text", "thumb"):
            if row.get(k):
                entry[k] = row[k]
        rejected.append(entry)

    live = list(rows)
    if keep_fraction is not None and live:
        scores = np.array([r["score"] for r in live], np.float64)
        threshold = float(np.quantile(scores, 1.0 - keep_fraction, method="higher")) if keep_fraction < 1 else -1.0
        kept = []
        for r in live:
            if r["score"] < threshold:
                reject(r, "semantic", "below_keep_fraction", {"score": r["score"], "threshold": round(threshold, 4)})
            else:
                kept.append(r)
        live = kept
    seen, unique = set(), []
    for r in live:
        if r["key"] in seen:
            reject(r, "input", "duplicate_key", {})
        else:
            seen.add(r["key"])
            unique.append(r)
    live = unique
    group = image_groups(live, phash_distance)
    images_per_text: dict = {}
    for r, g in zip(live, group):
        images_per_text.setdefault(r["norm"], set()).add(g)
    kept, kept_group = [], []
    for r, g in zip(live, group):
        n = len(images_per_text[r["norm"]])
        if n > max_images_per_text:
            reject(r, "aggregation", "shared_text", {"images": n, "max_images_per_text": max_images_per_text})
        else:
            kept.append(r)
            kept_group.append(g)
    best: dict = {}
    for i, (r, g) in enumerate(zip(kept, kept_group)):
        if g not in best or r["score"] > kept[best[g]]["score"]:
            best[g] = i
    out = []
    for i, (r, g) in enumerate(zip(kept, kept_group)):
        if best[g] == i:
            out.append(r)
        else:
            winner = kept[best[g]]
            reject(r, "aggregation", "duplicate_image", {"kept": winner["key"], "same_file": winner["sha256"] == r["sha256"],
                                                         "score": r["score"], "kept_score": winner["score"]})
    return out, rejected


# --------------------------------------------------------------------------- funnel


def funnel_counts(rows_total: int, rejections: list, skipped: dict) -> list[dict]:
    """Per stage: rows in, rejected (by reason), out; skipped stages say why."""
    by_stage: dict = {s: {} for s in FUNNEL_STAGES}
    for r in rejections:
        reasons = by_stage.setdefault(r["stage"], {})
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    funnel, remaining = [], rows_total
    for stage in FUNNEL_STAGES:
        reasons = dict(sorted(by_stage.get(stage, {}).items()))
        rejected = sum(reasons.values())
        entry = {"stage": stage, "in": remaining, "rejected": rejected, "out": remaining - rejected, "reasons": reasons}
        if stage in skipped:
            entry["skipped"] = skipped[stage]
        funnel.append(entry)
        remaining -= rejected
    return funnel


# --------------------------------------------------------------------------- runner


def _encode(row: dict) -> str:
    row = dict(row)
    if "image_bytes" in row:
        row["image_bytes"] = base64.b64encode(row["image_bytes"]).decode("ascii")
        row["_b64"] = True
    return json.dumps(row)


def _decode(text: str) -> dict:
    row = json.loads(text)
    if row.pop("_b64", False):
        row["image_bytes"] = base64.b64decode(row["image_bytes"])
    return row


def _ray_batch(stage: str, config_json: str, batch: dict) -> dict:
    config = FilterConfig.from_json(config_json)
    rows = [_decode(p) for p in batch["payload"]]
    rows = run_stage(stage, rows, config)
    return {"payload": np.array([_encode(r) for r in rows], dtype=object)}


class _RayEngine:
    def __init__(self, config: FilterConfig, address: Optional[str], num_cpus: Optional[int], batch_size: int):
        import ray

        self.config_json = config.to_json()
        self.batch_size = batch_size
        self.started = False
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=num_cpus, **kwargs)
            self.started = True
        import ray.data

        logging.getLogger("ray.data").setLevel(logging.ERROR)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False

    def process(self, rows: list) -> list:
        import ray.data

        if not rows:
            return []
        ds = ray.data.from_items([{"payload": _encode(r)} for r in rows])
        for stage in STAGES:
            ds = ds.map_batches(functools.partial(_ray_batch, stage, self.config_json), batch_format="numpy",
                                batch_size=self.batch_size)
        return [_decode(r["payload"]) for r in ds.take_all()]

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()


class _LocalEngine:
    def __init__(self, config: FilterConfig):
        self.config = config

    def process(self, rows: list) -> list:
        return run_all(rows, self.config)

    def close(self) -> None:
        pass


def _work_config(sources, config: FilterConfig, shard_rows: int) -> dict:
    return {"sources": [str(Path(s).resolve()) for s in sources], "config": json.loads(config.to_json()),
            "shard_rows": shard_rows}


def _open_work(work: Path, wanted: dict) -> set:
    """The finished shards of an earlier run with the same inputs and options (else none)."""
    config_path = work / "config.json"
    if work.is_dir():
        try:
            same = json.loads(config_path.read_text("utf-8")) == wanted
        except (OSError, ValueError):
            same = False
        if same:
            return {entry["shard"] for entry in read_json_lines(work / "done.jsonl") if "shard" in entry}
        log.warning("%s holds a run with other inputs or options; starting afresh", work)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    atomic_write_json(work / "config.json", wanted)
    return set()


def _lines(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def web_filter(sources, out, *, config: FilterConfig = FilterConfig(), engine: str = "ray",
               address: Optional[str] = None, num_cpus: Optional[int] = None, shard_rows: int = DEFAULT_SHARD_ROWS,
               batch_size: int = DEFAULT_BATCH_SIZE, overwrite: bool = False, shard_size: int = PAIR_SHARD_SIZE,
               progress: str = "auto", keep_work: bool = False,
               should_stop: Optional[Callable[[], bool]] = None) -> BuildResult:
    """Filter web image-text rows from ``sources`` into a ``web`` pair store at ``out``."""
    started = time.perf_counter()
    out = Path(out)
    sources = [Path(s) for s in (sources if isinstance(sources, (list, tuple)) else [sources])]
    if (out / "manifest.json").exists() and not overwrite:
        raise StoreError(f"{out}: a pair store is already there (pass --overwrite to replace it)")
    if engine not in ("ray", "local"):
        raise ValueError(f"engine must be ray or local, got {engine!r}")
    if config.keep_fraction is not None and not 0 < config.keep_fraction <= 1:
        raise ValueError("--keep-fraction must be in (0, 1]")
    if config.features:
        from vlp.builders.web_filter.scorer import WebScorer

        WebScorer.load(config.model)  # a bad model file is an error before any work
    shards = plan_shards(sources, shard_rows)
    work = Path(str(out) + WORK_SUFFIX)
    done = _open_work(work, _work_config(sources, config, shard_rows))
    from vlp.core.progress import Progress

    total = sum(s.rows for s in shards)
    bar = Progress(total, "web-filter", unit="row", mode=progress)
    bar.update(sum(s.rows for s in shards if s.name in done))
    runner = _RayEngine(config, address, num_cpus, batch_size) if engine == "ray" else _LocalEngine(config)
    stopped = False
    try:
        with JsonLines(work / "done.jsonl") as done_log:
            for index, shard in enumerate(shards):
                if shard.name in done:
                    continue
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                _run_shard(runner, shard, index, work, done_log)
                bar.update(shard.rows)
    finally:
        runner.close()
        bar.close()
    if stopped:
        raise KeyboardInterrupt(f"stopped: finished shards are kept in {work}; rerun the same command to go on")
    return _finish(sources, out, shards, work, config, overwrite, shard_size, progress, keep_work, started)


def _run_shard(runner, shard: Shard, index: int, work: Path, done_log: JsonLines) -> None:
    rows = []
    for i, row in enumerate(read_shard(shard)):
        row["_i"] = i
        rows.append(row)
    bad = [r for r in rows if r.get("_reject")]
    results = runner.process([r for r in rows if not r.get("_reject")]) + bad
    survivors, rejected = split_results(results)
    atomic_write_text(work / f"{index:06d}.survivors.jsonl", _lines(survivors))
    atomic_write_text(work / f"{index:06d}.rejected.jsonl", _lines(rejected))
    done_log.append({"shard": shard.name, "index": index, "rows": len(rows), "kept": len(survivors)})
    done_log.sync()


def _read_lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line]


def _finish(sources, out: Path, shards, work: Path, config: FilterConfig, overwrite: bool, shard_size: int,
            progress: str, keep_work: bool, started: float) -> BuildResult:
    from vlp.builders.web_filter.funnel import write_funnel_page

    survivors, rejections, rows_total = [], [], 0
    for index, _shard in enumerate(shards):
        survivors += _read_lines(work / f"{index:06d}.survivors.jsonl")
        shard_rejected = _read_lines(work / f"{index:06d}.rejected.jsonl")
        rejections += shard_rejected
    rows_total = len(survivors) + len(rejections)
    kept, agg_rejected = aggregate(survivors, max_images_per_text=config.max_images_per_text,
                                   phash_distance=config.phash_distance, keep_fraction=config.keep_fraction)
    rejections += agg_rejected
    skipped = {} if config.features else {s: "no --features: stage skipped" for s in FEATURE_STAGES}
    funnel = funnel_counts(rows_total, rejections, skipped)
    with Build(out, "web", overwrite=overwrite, sources=sources, shard_size=shard_size, progress="off",
               desc="web-filter") as build:
        for row in kept:
            build.add({"pair_id": f"web/{row['key']}", "image_id": row["image_id"], "text": row["text"],
                       "source": "web", "split": "train", "url": row["url"], "score": float(row["score"])})
        build.stats.update({"rows": rows_total, "kept": len(kept), "rejected": len(rejections),
                            "input_shards": len(shards), "funnel": funnel,
                            "options": json.loads(config.to_json())})
        atomic_write_text(build.path / REJECTED_NAME, _lines(
            {k: v for k, v in r.items() if k not in ("thumb", "_i")} for r in rejections))
        write_funnel_page(build.path / FUNNEL_PAGE, build.path / FUNNEL_CHART, funnel, kept, rejections,
                          title=f"vlp-build web-filter: {', '.join(str(s) for s in sources)}")
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    result = build.result
    result.seconds = time.perf_counter() - started
    return result


__all__ = ["web_filter", "aggregate", "image_groups", "funnel_counts", "FilterConfig", "texts"]
