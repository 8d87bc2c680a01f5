"""The web-filter runner: input shards through stages 1-6, then the aggregation (stage 7).

Work folder ``OUT.work/`` (beside the store): ``config.json`` (options and inputs),
per finished input shard ``NNNNNN.survivors.parquet`` (narrow rows: :data:`SURVIVOR_SCHEMA`)
and ``NNNNNN.rejected.jsonl`` (each written atomically by :func:`process_shard`) and
``done.jsonl`` (a shard is finished once listed there, after both files). A rerun with the
same inputs and options skips finished shards, so a run killed with kill -9 resumes where it
stopped without duplicates; other options start the work afresh. When every shard is done,
the aggregation gives each survivor a verdict and :func:`_write_outputs` streams the store,
``rejected.jsonl`` and the funnel page; the work folder is then removed.

Engines: ``ray`` (default): the pending shards are a Ray Data dataset of shard descriptors,
one ``map_batches`` task per shard reads it, runs the stages over batches and writes its
files (the driver never holds image bytes); the aggregation runs as Ray Data shuffles
(:mod:`.shuffle`) over the survivor files; a local Ray started with ``num_cpus`` (shut down
at the end) or the cluster at ``address``. ``local``: the same stage functions in this
process and :func:`aggregate` over every survivor in memory (the reference; tests, tiny
inputs).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlp.builders.common import Build, BuildResult
from vlp.builders.web_filter import texts
from vlp.builders.web_filter.inputs import DEFAULT_SHARD_ROWS, Shard, plan_shards, read_shard
from vlp.builders.web_filter.stages import FEATURE_STAGES, STAGES, FilterConfig, run_all, split_results
from vlp.core.durable import JsonLines, atomic_path, atomic_write_json, atomic_write_text, read_json_lines
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


def funnel_counts(rows_total: int, rejections, skipped: dict) -> list[dict]:
    """Per stage: rows in, rejected (by reason), out; skipped stages say why.
    ``rejections``: rejection rows, or a count per (stage, reason)."""
    if not isinstance(rejections, dict):
        counted: dict = {}
        for r in rejections:
            counted[(r["stage"], r["reason"])] = counted.get((r["stage"], r["reason"]), 0) + 1
        rejections = counted
    by_stage: dict = {s: {} for s in FUNNEL_STAGES}
    for (stage, reason), n in rejections.items():
        reasons = by_stage.setdefault(stage, {})
        reasons[reason] = reasons.get(reason, 0) + n
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

SURVIVORS_SUFFIX = ".survivors.parquet"
REJECTED_SUFFIX = ".rejected.jsonl"
#: the per-shard survivor files (narrow rows; a thumbnail on the first few of a shard)
SURVIVOR_SCHEMA = pa.schema([
    ("order", pa.int64()), ("_i", pa.int64()), ("key", pa.string()), ("shard", pa.string()), ("url", pa.string()),
    ("text", pa.string()), ("text_source", pa.string()), ("image_id", pa.string()), ("sha256", pa.string()),
    ("phash", pa.string()), ("score", pa.float64()), ("width", pa.int64()), ("height", pa.int64()),
    ("p_unnatural", pa.float64()), ("norm", pa.string()), ("thumb", pa.string()),
])


def order_of(index: int, i: int) -> int:
    """A survivor's place in the input: its shard's index, then its row number in the shard."""
    return (index << 32) + i


def process_shard(shard: Shard, index: int, work: Path, process: Callable[[list], list],
                  batch_size: int = DEFAULT_BATCH_SIZE) -> dict:
    """Read one input shard, run ``process`` (stages 1-6) over batches of its rows, write its
    survivors (parquet) and rejections (jsonl) atomically; the summary for done.jsonl."""
    results, batch, count = [], [], 0
    for i, row in enumerate(read_shard(shard)):
        row["_i"] = i
        count += 1
        if row.get("_reject"):
            results.append(row)
            continue
        batch.append(row)
        if len(batch) >= batch_size:
            results += process(batch)  # image bytes are dropped by the image stage
            batch = []
    if batch:
        results += process(batch)
    survivors, rejected = split_results(results)
    for row in survivors:
        row["order"] = order_of(index, row["_i"])
    table = pa.Table.from_pylist(survivors, schema=SURVIVOR_SCHEMA)
    with atomic_path(work / f"{index:06d}{SURVIVORS_SUFFIX}") as tmp:
        pq.write_table(table, tmp)
    atomic_write_text(work / f"{index:06d}{REJECTED_SUFFIX}", _lines(rejected))
    return {"shard": shard.name, "index": index, "rows": count, "kept": len(survivors)}


def _ray_shards(config_json: str, work: str, batch_size: int, batch: dict) -> dict:
    """A Ray task: finish the shards described in ``batch`` (reading happens here, not in the driver)."""
    config = FilterConfig.from_json(config_json)
    done = []
    for text in batch["shard"]:
        described = json.loads(text)
        index = described.pop("index")
        summary = process_shard(Shard(**described), index, Path(work), lambda rows: run_all(rows, config), batch_size)
        done.append(json.dumps(summary))
    return {"done": np.array(done, dtype=object)}


def _read_survivors(batch: pa.Table) -> pa.Table:
    from vlp.builders.web_filter import shuffle

    return pa.concat_tables([shuffle.as_rows(pq.read_table(path, columns=list(shuffle.INPUT_COLUMNS)))
                             for path in batch["path"].to_pylist()])


#: Ray's limit for task results kept in the owner's memory instead of the object store
SMALL_OBJECT_BYTES = 1024


class _RayEngine:
    """Shards as Ray tasks (a dataset of shard descriptors, one ``map_batches`` call per
    shard), the aggregation as Ray Data shuffles (:mod:`.shuffle`)."""

    def __init__(self, config: FilterConfig, address: Optional[str], num_cpus: Optional[int], batch_size: int,
                 shuffle: str):
        import ray

        self.config = config
        self.config_json = config.to_json()
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.started = False
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
            if address:
                ray.init(address=address, **kwargs)
            else:
                # task results under 100 KB are otherwise kept in the memory of their owner, the
                # driver: the shuffles' many small pieces would make it grow with the input
                ray.init(num_cpus=num_cpus, _system_config={"max_direct_call_object_size": SMALL_OBJECT_BYTES},
                         **kwargs)
            self.started = True
        import ray.data

        logging.getLogger("ray.data").setLevel(logging.ERROR)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False

    def run_shards(self, pending: list, work: Path) -> Iterator[dict]:
        """Finish the ``(index, shard)`` pairs in Ray tasks; the summaries as they come in."""
        import ray.data

        if not pending:
            return
        items = [{"shard": json.dumps({**dataclasses.asdict(shard), "index": index})} for index, shard in pending]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(functools.partial(_ray_shards, self.config_json, str(work), self.batch_size),
                            batch_size=1, batch_format="numpy")
        for row in ds.iter_rows():
            yield json.loads(row["done"])

    def verdicts(self, files: list) -> Iterator[tuple]:
        import ray
        import ray.data

        from vlp.builders.web_filter import shuffle

        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        if not rows:
            return
        cpus = int(ray.cluster_resources().get("CPU", 1))
        partitions = shuffle.partitions_for(rows, cpus)
        backend = shuffle.RayBackend(partitions, buckets=shuffle.buckets_for(rows, partitions), shuffle=self.shuffle)
        # Ray tasks read the survivor files (read_parquet would go through fsspec, whose http
        # part does not import without aiohttp)
        ds = ray.data.from_items([{"path": str(f)} for f in files], override_num_blocks=len(files))
        ds = ds.map_batches(_read_survivors, batch_size=1, batch_format="pyarrow")
        ds = shuffle.aggregate_dataset(backend, ds, max_images_per_text=self.config.max_images_per_text,
                                       phash_distance=self.config.phash_distance,
                                       keep_fraction=self.config.keep_fraction)
        for row in shuffle.verdict_rows(backend, ds):
            if row["reason"] is None:
                yield "kept", row
            else:
                yield "rejected", shuffle.rejection_of(row)

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()


class _LocalEngine:
    """Everything in this process; the aggregation is :func:`aggregate` over every survivor
    in memory (the reference the Ray engine's shuffles are tested against)."""

    def __init__(self, config: FilterConfig, batch_size: int):
        self.config = config
        self.batch_size = batch_size

    def process(self, rows: list) -> list:
        return run_all(rows, self.config)

    def verdicts(self, files: list) -> Iterator[tuple]:
        survivors = []
        for f in files:
            survivors += pq.read_table(f).to_pylist()
        kept, rejected = aggregate(survivors, max_images_per_text=self.config.max_images_per_text,
                                   phash_distance=self.config.phash_distance, keep_fraction=self.config.keep_fraction)
        for row in kept:
            yield "kept", row
        for entry in rejected:
            yield "rejected", entry

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
               progress: str = "auto", keep_work: bool = False, shuffle: str = "sort",
               should_stop: Optional[Callable[[], bool]] = None) -> BuildResult:
    """Filter web image-text rows from ``sources`` into a ``web`` pair store at ``out``."""
    started = time.perf_counter()
    out = Path(out)
    sources = [Path(s) for s in (sources if isinstance(sources, (list, tuple)) else [sources])]
    if (out / "manifest.json").exists() and not overwrite:
        raise StoreError(f"{out}: a pair store is already there (pass --overwrite to replace it)")
    if engine not in ("ray", "local"):
        raise ValueError(f"engine must be ray or local, got {engine!r}")
    if shuffle not in ("sort", "hash"):
        raise ValueError(f"shuffle must be sort or hash, got {shuffle!r}")
    if config.keep_fraction is not None and not 0 < config.keep_fraction <= 1:
        raise ValueError("--keep-fraction must be in (0, 1]")
    if config.features:
        from vlp.builders.web_filter.scorer import WebScorer

        WebScorer.load(config.model)  # a bad model file is an error before any work
    shards = plan_shards(sources, shard_rows)
    work = Path(str(out) + WORK_SUFFIX).absolute()  # Ray workers write there
    done = _open_work(work, _work_config(sources, config, shard_rows))
    from vlp.core.progress import Progress

    total = sum(s.rows for s in shards)
    bar = Progress(total, "web-filter", unit="row", mode=progress)
    bar.update(sum(s.rows for s in shards if s.name in done))
    runner = (_RayEngine(config, address, num_cpus, batch_size, shuffle) if engine == "ray"
              else _LocalEngine(config, batch_size))
    stopped = False
    try:
        with JsonLines(work / "done.jsonl") as done_log:
            if engine == "ray":
                pending = [(index, shard) for index, shard in enumerate(shards) if shard.name not in done]
                if pending and should_stop is not None and should_stop():
                    stopped = True
                else:
                    for summary in runner.run_shards(pending, work):
                        done_log.append(summary)
                        done_log.sync()
                        bar.update(summary["rows"])
                        if should_stop is not None and should_stop():
                            stopped = True
                            break
            else:
                for index, shard in enumerate(shards):
                    if shard.name in done:
                        continue
                    if should_stop is not None and should_stop():
                        stopped = True
                        break
                    _run_shard(runner, shard, index, work, done_log)
                    bar.update(shard.rows)
        bar.close()
        if stopped:
            raise KeyboardInterrupt(f"stopped: finished shards are kept in {work}; rerun the same command to go on")
        files = [work / f"{index:06d}{SURVIVORS_SUFFIX}" for index in range(len(shards))]
        result = _write_outputs(sources, out, shards, work, config, overwrite, shard_size, runner.verdicts(files))
    finally:
        runner.close()
        bar.close()
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    result.seconds = time.perf_counter() - started
    return result


def _run_shard(runner: _LocalEngine, shard: Shard, index: int, work: Path, done_log: JsonLines) -> None:
    done_log.append(process_shard(shard, index, work, runner.process, runner.batch_size))
    done_log.sync()


def _write_outputs(sources, out: Path, shards, work: Path, config: FilterConfig, overwrite: bool, shard_size: int,
                   verdicts: Iterator[tuple]) -> BuildResult:
    """The store, rejected.jsonl and the funnel, streamed: the shards' rejection files line
    by line, then every survivor's verdict (``("kept", row)`` or ``("rejected", entry)``);
    what stays in memory is a count per (stage, reason) and a bounded sample of rows."""
    from vlp.builders.web_filter.funnel import Samples, write_funnel_page

    counts: dict = {}
    kept_samples, rejected_samples = Samples(), Samples()
    tally = {"rows": 0, "kept": 0, "rejected": 0}

    def rejected_line(entry: dict, handle) -> None:
        bucket = (entry["stage"], entry["reason"])
        counts[bucket] = counts.get(bucket, 0) + 1
        tally["rejected"] += 1
        rejected_samples.add(bucket, entry)
        handle.write(json.dumps({k: v for k, v in entry.items() if k not in ("thumb", "_i")}, ensure_ascii=False,
                                sort_keys=True) + "\n")

    with Build(out, "web", overwrite=overwrite, sources=sources, shard_size=shard_size, progress="off",
               desc="web-filter") as build:
        with atomic_path(build.path / REJECTED_NAME) as tmp, open(tmp, "w", encoding="utf-8") as handle:
            for index in range(len(shards)):
                with open(work / f"{index:06d}{REJECTED_SUFFIX}", encoding="utf-8") as shard_rejected:
                    for line in shard_rejected:
                        if line.strip():
                            tally["rows"] += 1
                            rejected_line(json.loads(line), handle)
            for kind, row in verdicts:
                tally["rows"] += 1
                if kind == "kept":
                    build.add({"pair_id": f"web/{row['key']}", "image_id": row["image_id"], "text": row["text"],
                               "source": "web", "split": "train", "url": row["url"], "score": float(row["score"])})
                    tally["kept"] += 1
                    kept_samples.add("kept", {k: row.get(k) for k in ("key", "text", "score", "thumb")})
                else:
                    rejected_line(row, handle)
        skipped = {} if config.features else {s: "no --features: stage skipped" for s in FEATURE_STAGES}
        funnel = funnel_counts(tally["rows"], counts, skipped)
        build.stats.update({"rows": tally["rows"], "kept": tally["kept"], "rejected": tally["rejected"],
                            "input_shards": len(shards), "funnel": funnel,
                            "options": json.loads(config.to_json())})
        write_funnel_page(build.path / FUNNEL_PAGE, build.path / FUNNEL_CHART, funnel, kept_samples,
                          rejected_samples, title=f"vlp-build web-filter: {', '.join(str(s) for s in sources)}")
    return build.result


__all__ = ["web_filter", "aggregate", "image_groups", "funnel_counts", "process_shard", "FilterConfig", "texts"]
