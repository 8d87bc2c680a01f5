"""Benchmark of vlp feature stores (LMDB and Arrow shards) against a VOLTA-style pickled LMDB.

Measures, for each box count (default 36 and 100) and each storage format:

1. write throughput of ``FeatureStoreWriter`` (records pre-built, so only validation,
   encoding and I/O are timed, fsyncs included);
2. single-process random-access reads, ``store.get(id)`` over a shuffled id list, with a
   hot page cache (one untimed warm-up pass first), three ways: "raw" (the record as
   returned, one element touched), "np32" (+ ``record.features_float32()``, numpy out) and "t32"
   (+ ``torch.from_numpy(features).float()``, what a torch trainer does);
3. random-access reads through a torch DataLoader with ``--workers`` workers: records/s,
   records/s per core (total / min(workers, cpus)) and records per CPU-second actually used
   by the workers and the main process (robust when a shared VM gives fewer cores);
4. the same reads from the baseline: one LMDB environment in the layout VOLTA's
   ``convert_*_lmdb.py`` scripts produce from the LXMERT TSV (key = image id, value =
   pickled dict of the TSV row: decimal strings and base64 strings of the raw arrays,
   plus a ``b"keys"`` entry), read as VOLTA's ``ImageFeaturesH5Reader`` does
   (``pickle.loads`` + ``base64.b64decode`` + ``np.frombuffer(float32)``);
5. store size on disk against the float32 payload;

then, unless ``--no-profile``, where the time goes: the pieces of ``FeatureStore.get``
and of ``FeatureStoreWriter.add`` timed one by one, and a cProfile of the slowest path.
It prints figures and ratios and never asserts. Run from the repository root::

    python benchmarks/bench_stores.py [--records 4000] [--boxes 36,100] [--workers 4]
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import gc
import io
import multiprocessing
import os
import pickle
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lmdb
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from vlp.schemas import FeatureRecord, FeatureStore, FeatureStoreWriter
from vlp.schemas import codec

FEATURE_DIM = 2048
IMAGE_W, IMAGE_H = 640, 480
FORMATS = ("lmdb", "arrow", "pickled")
TARGET_SPEEDUP = 2.0
TARGET_PER_CORE = 20_000  # records/s per core, 36 boxes
TARGET_SIZE_RATIO = 0.55
MB = 1e6


# --------------------------------------------------------------------------- machine

def machine_info() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "cpus": os.cpu_count(), "usable_cpus": affinity, "cpu_model": model,
        "mem_gib": _mem_gib(), "python": platform.python_version(), "numpy": np.__version__,
        "lmdb": lmdb.__version__, "pyarrow": pa.__version__, "torch": torch.__version__,
        "platform": platform.platform(),
    }


def _mem_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f}"
    except OSError:
        pass
    return "?"


def _fs_of(path: Path) -> str:
    best, fstype = "", "?"
    try:
        real = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and real.startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    except OSError:
        pass
    return f"{fstype} ({best})"


# --------------------------------------------------------------------------- data

def make_records(n: int, boxes: int, seed: int) -> list[FeatureRecord]:
    """Random but schema-valid records: boxes inside a 640x480 image, ReLU-like features."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**9, size=n, replace=False)
    records = []
    for i in range(n):
        x1 = rng.uniform(0, IMAGE_W - 2, boxes)
        y1 = rng.uniform(0, IMAGE_H - 2, boxes)
        x2 = rng.uniform(x1 + 1, IMAGE_W)
        y2 = rng.uniform(y1 + 1, IMAGE_H)
        feats = rng.standard_normal((boxes, FEATURE_DIM), dtype=np.float32)
        np.maximum(feats, 0, out=feats)
        feats *= 2.0
        records.append(FeatureRecord.from_arrays(
            f"{int(ids[i]):012d}", IMAGE_W, IMAGE_H,
            boxes=np.stack([x1, y1, x2, y2], axis=1).astype(np.float32),
            features=feats,
            objects_id=rng.integers(0, 1600, boxes), objects_conf=rng.random(boxes, dtype=np.float32),
            attrs_id=rng.integers(0, 400, boxes), attrs_conf=rng.random(boxes, dtype=np.float32)))
    return records


def stored_payload_bytes(record: FeatureRecord) -> int:
    return sum(a.nbytes for a in record.arrays().values())


def fp32_payload_bytes(record: FeatureRecord) -> int:
    return sum(a.size * 4 for a in record.arrays().values())


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode("ascii")


def volta_item(record: FeatureRecord) -> dict:
    """A row of the LXMERT obj36 TSV as csv.DictReader yields it (all values str)."""
    return {
        "img_id": record.image_id, "img_h": str(record.image_h), "img_w": str(record.image_w),
        "objects_id": _b64(record.objects_id.astype(np.int64)),
        "objects_conf": _b64(record.objects_conf.astype(np.float32)),
        "attrs_id": _b64(record.attrs_id.astype(np.int64)),
        "attrs_conf": _b64(record.attrs_conf.astype(np.float32)),
        "num_boxes": str(record.num_boxes),
        "boxes": _b64(record.boxes.astype(np.float32)),
        "features": _b64(record.features.astype(np.float32)),
    }


def volta_raw_bytes(record: FeatureRecord) -> int:
    """Bytes of the decoded arrays in the baseline (int64 ids, float32 everything else)."""
    n = record.num_boxes
    return n * FEATURE_DIM * 4 + n * 4 * 4 + n * (8 + 4 + 8 + 4)


# --------------------------------------------------------------------------- baseline

def write_volta_lmdb(path: Path, items: list[dict]) -> None:
    """What VOLTA's convert_*_lmdb.py does: one write transaction, pickled TSV rows, b"keys"."""
    total = sum(len(it["features"]) + len(it["boxes"]) + 1024 for it in items)
    env = lmdb.open(str(path), map_size=max(1 << 30, 2 * total), writemap=True)
    id_list = []
    with env.begin(write=True) as txn:
        for item in items:
            img_id = str(item["img_id"]).encode()
            id_list.append(img_id)
            txn.put(img_id, pickle.dumps(item))
        txn.put("keys".encode(), pickle.dumps(id_list))
    env.sync(True)
    env.close()


class VoltaReader:
    """The read path of VOLTA's ImageFeaturesH5Reader, minus its O(N) ``keys.index`` lookup
    and with one long-lived read transaction (both favour the baseline). Opens lazily per
    process so it can live inside DataLoader workers."""

    def __init__(self, path: Path):
        self.path = str(path)
        self._pid = None

    def _open(self):
        if self._pid != os.getpid():
            # py-lmdb 3 refuses to open an environment "already open in this process"; in a
            # forked worker the parent's Environment counts until its last reference is gone.
            self._txn = self._env = None
            self._env = lmdb.open(self.path, max_readers=1, readonly=True, lock=False,
                                  readahead=False, meminit=False)
            self._txn = self._env.begin(write=False)
            self._pid = os.getpid()

    def keys(self) -> list[bytes]:
        self._open()
        return pickle.loads(self._txn.get(b"keys"))

    def get(self, image_id: str):
        self._open()
        item = pickle.loads(self._txn.get(image_id.encode()))
        image_h = int(item["img_h"])
        image_w = int(item["img_w"])
        features = np.frombuffer(base64.b64decode(item["features"]), dtype=np.float32).reshape(-1, FEATURE_DIM)
        boxes = np.frombuffer(base64.b64decode(item["boxes"]), dtype=np.float32).reshape(-1, 4)
        return image_w, image_h, boxes, features

    def close(self):
        if self._pid == os.getpid():
            self._txn.abort()
            self._env.close()
        self._pid = None


# --------------------------------------------------------------------------- readers

MODES = ("raw", "np32", "t32")
MODE_TITLES = {"raw": "raw get", "np32": "get + fp32 (record.features_float32())",
               "t32": "get + fp32 (torch .float())"}


def read_one(kind: str, source, image_id: str, mode: str):
    """One random read as a trainer does it; returns (num_boxes, checksum touching the data).

    raw:  the record as the store returns it (views where the store allows).
    np32: features as a float32 numpy array  (vlp: ``record.features_float32()``; numpy's own
          float16 ``astype`` is 20x slower and is timed separately in the breakdown).
    t32:  features as a float32 torch tensor (vlp: ``torch.from_numpy(features).float()``).
    The baseline's features are float32 already, so np32 is its raw get and t32 only wraps
    them with ``torch.from_numpy`` (zero copy): both favour the baseline.
    """
    if kind == "pickled":
        _, _, boxes, feats = source.get(image_id)
        if mode == "t32":
            feats = torch.from_numpy(feats)
    else:
        r = source.get(image_id)
        boxes, feats = r.boxes, r.features
        if mode == "np32":
            feats = r.features_float32()
        elif mode == "t32":
            feats = torch.from_numpy(feats).float()
    return feats.shape[0], float(feats[-1, -1]) + float(boxes[0, 0])


def make_getter(kind: str, source, mode: str):
    def get(image_id):
        return read_one(kind, source, image_id, mode)[1]
    return get


def time_pass(fn, ids) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one pass."""
    acc = 0.0
    c0 = time.process_time()
    t0 = time.perf_counter()
    for i in ids:
        acc += fn(i)
    dt = time.perf_counter() - t0
    if not np.isfinite(acc):
        print("  (checksum not finite)", file=sys.stderr)
    return dt, time.process_time() - c0


def time_reads(fn, ids, rng, repeats: int) -> tuple[float, float]:
    """(median wall seconds per pass over freshly shuffled ids, CPU/wall over all passes)."""
    walls, cpus = [], []
    for _ in range(repeats):
        order = list(ids)
        rng.shuffle(order)
        wall, cpu = time_pass(fn, order)
        walls.append(wall)
        cpus.append(cpu)
    return statistics.median(walls), sum(cpus) / sum(walls)


def _pid_cpu_seconds(pid: int) -> float:
    """CPU time of a process, all threads: /proc/PID/task/*/schedstat (ns), else stat (ticks)."""
    total_ns, ok = 0, False
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
                total_ns += int(handle.read().split()[0])
                ok = True
    except (OSError, ValueError, IndexError):
        ok = False
    if ok:
        return total_ns / 1e9
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def parallel_capacity(procs: int, seconds: float = 0.3) -> float:
    """How many cores' worth of pure-Python work ``procs`` concurrent processes get right now
    (1.0 = they share one core). The 2 vCPUs of a shared VM do not always give 2."""
    n = 200_000
    t0 = time.perf_counter()
    _burn(n)
    per_iter = (time.perf_counter() - t0) / n
    n = max(n, int(seconds / per_iter))
    t0 = time.perf_counter()
    _burn(n)
    single = time.perf_counter() - t0
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(procs) as pool:
        t0 = time.perf_counter()
        pool.map(_burn, [n] * procs)
        parallel = time.perf_counter() - t0
    return procs * single / parallel


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _burn(n: int) -> int:
    x = 0
    for i in range(n):
        x += i
    return x


class StoreDataset(Dataset):
    """A trainer's dataset: one record per index, features as float32."""

    def __init__(self, kind: str, source, ids: list[str], mode: str):
        self.kind, self.source, self.ids, self.mode = kind, source, ids, mode

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return read_one(self.kind, self.source, self.ids[index], self.mode)


def trivial_collate(batch):
    # Only counts cross the process boundary, so the figure measures the store, not IPC.
    return len(batch), sum(b[0] for b in batch)


def time_dataloader(kind, source, ids, mode: str, workers: int, batch_size: int,
                    epochs: int) -> tuple[float, float]:
    """(median wall seconds per epoch, CPU seconds per epoch of workers + main process), over
    ``epochs`` timed epochs after one warm-up epoch (persistent workers: worker start-up and
    store opening are not timed)."""
    ds = StoreDataset(kind, source, list(ids), mode)
    gen = torch.Generator()
    gen.manual_seed(0)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                        collate_fn=trivial_collate, persistent_workers=workers > 0,
                        prefetch_factor=4 if workers > 0 else None, generator=gen)
    seen = sum(n for n, _ in loader)  # warm-up epoch
    if seen != len(ids):
        print(f"  (DataLoader delivered {seen} of {len(ids)} records)", file=sys.stderr)
    pids = [w.pid for w in getattr(getattr(loader, "_iterator", None), "_workers", [])]

    def cpu_now():
        return time.process_time() + sum(_pid_cpu_seconds(pid) for pid in pids)

    times = []
    c0 = cpu_now()
    for _ in range(epochs):
        t0 = time.perf_counter()
        for _n, _b in loader:
            pass
        times.append(time.perf_counter() - t0)
    cpu = (cpu_now() - c0) / epochs if (pids or workers == 0) else float("nan")
    del loader
    gc.collect()
    return statistics.median(times), cpu


# --------------------------------------------------------------------------- sizes

def file_bytes(path: Path) -> int:
    """Bytes a file occupies: its length, or its allocated blocks if sparse (LMDB writemap)."""
    st = path.stat()
    return min(st.st_size, st.st_blocks * 512) if st.st_blocks else st.st_size


def dir_bytes(root: Path) -> int:
    return sum(file_bytes(p) for p in root.rglob("*") if p.is_file() and p.name != "lock.mdb")


# --------------------------------------------------------------------------- profile

def _us_per(fn, items) -> float:
    t0 = time.perf_counter()
    for x in items:
        fn(x)
    return (time.perf_counter() - t0) / len(items) * 1e6


def f16_to_f32_bits(h: np.ndarray) -> np.ndarray:
    """float16 -> float32 with vectorised integer ops (proposed replacement for numpy's astype,
    whose float16 cast is a scalar loop with a slow path for zeros). Bit-exact for finite
    values, which is all a store holds (validate rejects inf/NaN)."""
    u = h.view(np.int16).astype(np.int32)  # sign-extended: bit 31 is the sign
    bits = (u & 0x7FFF) << 13  # exponent and mantissa in float32 position, bias still 15
    out = bits.view(np.float32)
    out *= np.float32(2.0 ** 112)  # rebias 15 -> 127; also normalises float16 subnormals
    bits |= u & np.int32(-0x80000000)
    return out


def read_breakdown(store: FeatureStore, ids: list[str]) -> dict[str, float]:
    """Microseconds per record of each piece of FeatureStore.get (uses internals; best effort)."""
    out = {}
    try:
        locs = {i: store._locate(i) for i in ids}
        out["index lookup (_locate: index.lmdb get)"] = _us_per(store._locate, ids)
        if store.storage == "lmdb":
            values = {i: store._reader(locs[i][0]).get_value(i) for i in ids}
            out["shard txn.get (returns a bytes copy)"] = _us_per(
                lambda i: store._reader(locs[i][0]).get_value(i), ids)
            txns = {s: store._reader(s)._env.begin(buffers=True) for s in range(len(store.shard_names))}
            out["  same, txn buffers=True (zero-copy view)"] = _us_per(
                lambda i: txns[locs[i][0]].get(i.encode()), ids)
            for t in txns.values():
                t.abort()
            out["codec.decode"] = _us_per(lambda i: codec.decode(values[i]), ids)
            recs = {i: codec.decode(values[i]) for i in ids}
        else:
            out["ArrowShardReader.record"] = _us_per(
                lambda i: store._reader(locs[i][0]).record(locs[i][1]), ids)
            recs = {i: store._reader(locs[i][0]).record(locs[i][1]) for i in ids}
        out["features.astype(np.float32)"] = _us_per(lambda i: recs[i].features.astype(np.float32), ids)
        out["torch.from_numpy(features).float()"] = _us_per(
            lambda i: torch.from_numpy(recs[i].features).float(), ids)
        out["f16_to_f32_bits(features) (proposed, numpy)"] = _us_per(
            lambda i: f16_to_f32_bits(recs[i].features), ids)
        dense = np.abs(recs[ids[0]].features.astype(np.float32)) + np.float32(0.01)
        dense = dense.astype(np.float16)
        out["  astype on same-shape features w/o zeros"] = _us_per(
            lambda _: dense.astype(np.float32), ids[:200])
        zero_frac = float(np.mean(recs[ids[0]].features == 0))
        exact = all(np.array_equal(f16_to_f32_bits(recs[i].features).view(np.uint32),
                                   recs[i].features.astype(np.float32).view(np.uint32)) for i in ids[:50])
        out[f"(features are {zero_frac:.0%} zeros, like ReLU outputs; f16_to_f32_bits "
            f"bit-exact vs astype on 50 records: {exact})"] = float("nan")
        out["= FeatureStore.get, whole"] = _us_per(store.get, ids)
    except Exception as exc:  # internals changed: the breakdown is optional
        out[f"unavailable ({type(exc).__name__}: {exc})"] = float("nan")
    return out


def write_breakdown(records: list[FeatureRecord]) -> dict[str, float]:
    """Microseconds per record of the CPU pieces of FeatureStoreWriter.add (no I/O)."""
    out = {}
    try:
        out["FeatureRecord.validate"] = _us_per(lambda r: r.validate(FEATURE_DIM), records)
        out["  of which np.isfinite(float16 features)"] = _us_per(
            lambda r: np.all(np.isfinite(r.features)), records)
        out["  alternative: exponent bits on a uint16 view"] = _us_per(
            lambda r: not np.any((r.features.view(np.uint16) & 0x7C00) == 0x7C00), records)
        out["codec.encode (lmdb value)"] = _us_per(codec.encode, records)
    except Exception as exc:
        out[f"unavailable ({type(exc).__name__}: {exc})"] = float("nan")
    return out


def cprofile_top(fn, items, limit: int = 10) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for x in items:
        fn(x)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(limit)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next((k for k, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    return "\n".join(lines[start:])


def print_breakdown(title: str, pieces: dict[str, float]) -> None:
    print(title)
    for name, us in pieces.items():
        print(f"    {name}" if np.isnan(us) else f"    {name:46s} {us:8.1f} us")


# --------------------------------------------------------------------------- main

def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def warm_up_writers(root: Path) -> None:
    """Untimed tiny writes, so first-use imports and allocations are not timed."""
    records = make_records(8, 4, seed=12345)
    for fmt in ("lmdb", "arrow"):
        with FeatureStoreWriter(root / f"warmup-{fmt}", storage=fmt, mode="overwrite") as writer:
            for r in records:
                writer.add(r)
        store = FeatureStore(root / f"warmup-{fmt}")
        for r in records:
            read_one(fmt, store, r.image_id, "t32")
        store.close()
        shutil.rmtree(root / f"warmup-{fmt}")


def run_box_count(boxes: int, n: int, args, root: Path, cores: int) -> dict:
    print(f"\n=== {boxes} boxes x {n} records ===", flush=True)
    t0 = time.perf_counter()
    records = make_records(n, boxes, seed=boxes)
    ids = [r.image_id for r in records]
    stored = {"lmdb": stored_payload_bytes(records[0]), "arrow": stored_payload_bytes(records[0]),
              "pickled": volta_raw_bytes(records[0])}
    fp32_total = sum(fp32_payload_bytes(r) for r in records)
    print(f"generated in {time.perf_counter() - t0:.1f}s (not timed); payload per record: "
          f"{stored['lmdb'] / 1e3:.1f} kB stored by vlp (float16 features), "
          f"{fp32_total / n / 1e3:.1f} kB as float32, {stored['pickled'] / 1e3:.1f} kB in the baseline "
          "(float32, int64 ids) before base64", flush=True)
    print("MB/s columns: stored payload (arrays in the store's dtypes); fp32-eq: same records/s "
          "times the float32 payload, comparable across formats")
    res = {fmt: {} for fmt in FORMATS}
    paths = {}

    # 1. writes
    for fmt in ("lmdb", "arrow"):
        path = root / f"b{boxes}-{fmt}"
        paths[fmt] = path
        gc.collect()
        t0 = time.perf_counter()
        with FeatureStoreWriter(path, storage=fmt, shard_size=args.shard_size,
                                feature_dim=FEATURE_DIM, mode="overwrite") as writer:
            for r in records:
                writer.add(r)
        dt = time.perf_counter() - t0
        res[fmt]["write_rps"] = n / dt
        print(f"write {fmt:7s}: {dt:6.2f}s {n / dt:8,.0f} rec/s {n * stored[fmt] / dt / MB:6.0f} MB/s stored "
              f"{fp32_total / dt / MB:6.0f} MB/s fp32-eq  (validate + encode + fsync'd shards + index)",
              flush=True)
    if args.profile:
        print_breakdown(f"write CPU per record, {boxes} boxes (first 200 records, no I/O):",
                        write_breakdown(records[:200]))
    items = [volta_item(r) for r in records]
    del records
    gc.collect()
    path = root / f"b{boxes}-pickled"
    paths["pickled"] = path
    t0 = time.perf_counter()
    write_volta_lmdb(path, items)
    dt = time.perf_counter() - t0
    res["pickled"]["write_rps"] = n / dt
    print(f"write pickled: {dt:6.2f}s {n / dt:8,.0f} rec/s {n * stored['pickled'] / dt / MB:6.0f} MB/s raw   "
          f"{fp32_total / dt / MB:6.0f} MB/s fp32-eq  (pickle + put of pre-built base64 TSV rows, 1 txn)",
          flush=True)
    del items
    gc.collect()

    # 5. sizes
    for fmt in FORMATS:
        size = dir_bytes(paths[fmt])
        res[fmt]["size"] = size
        res[fmt]["size_ratio"] = size / fp32_total
    print(f"size on disk (float32 payload {fp32_total / MB:,.1f} MB): " + ", ".join(
        f"{fmt} {res[fmt]['size'] / MB:,.1f} MB = {res[fmt]['size_ratio']:.3f}" for fmt in FORMATS),
        flush=True)

    # 2. single-process random reads
    sources = {"lmdb": FeatureStore(paths["lmdb"]), "arrow": FeatureStore(paths["arrow"]),
               "pickled": VoltaReader(paths["pickled"])}
    if sorted(k.decode() for k in sources["pickled"].keys()) != sorted(ids):
        print("  (baseline keys entry does not match the written ids)", file=sys.stderr)
    rng = np.random.default_rng(1)
    for fmt in FORMATS:
        time_pass(make_getter(fmt, sources[fmt], "t32"), ids)  # warm-up: hot page cache, shards open
        parts = []
        for mode in MODES:
            if fmt == "pickled" and mode == "np32":
                continue  # features are float32 already: same work as the raw get
            t, busy = time_reads(make_getter(fmt, sources[fmt], mode), ids, rng, args.repeats)
            res[fmt][mode] = n / t
            parts.append(f"{mode} {n / t:8,.0f} rec/s {n * stored[fmt] / t / MB:6.0f} MB/s"
                         + (f" (on CPU only {busy:.0%} of the time)" if busy < 0.9 else ""))
        if fmt == "pickled":
            res[fmt]["np32"] = res[fmt]["raw"]
            parts.insert(1, "np32 = raw (already float32)")
        print(f"read  {fmt:7s} 1 process: " + " | ".join(parts), flush=True)

    # 3. DataLoader
    dl_modes = [("lmdb", "t32"), ("arrow", "t32"), ("pickled", "t32"), ("lmdb", "np32"), ("arrow", "np32")]
    for fmt, mode in dl_modes:
        t, cpu = time_dataloader(fmt, sources[fmt], ids, mode, args.workers, args.batch_size, args.epochs)
        res[fmt][f"dl_{mode}"] = n / t
        res[fmt][f"dl_{mode}_cpu"] = n / cpu
        print(f"read  {fmt:7s} DataLoader {args.workers} workers, batch {args.batch_size}, {mode:4s}: "
              f"{n / t:8,.0f} rec/s total {n / t / cores:8,.0f} rec/s per core (total/{cores}) "
              f"{n / cpu:8,.0f} rec/CPU-s (measured, {cpu / t:.2f} cores busy) "
              f"{n * stored[fmt] / t / MB:6.0f} MB/s", flush=True)
    res["pickled"]["dl_np32"] = res["pickled"]["dl_t32"]
    res["pickled"]["dl_np32_cpu"] = res["pickled"]["dl_t32_cpu"]

    if args.profile:
        sample = list(ids[: min(len(ids), 1500)])
        rng.shuffle(sample)
        for fmt in ("lmdb", "arrow"):
            print_breakdown(f"read time per record, pieces of FeatureStore.get, {fmt}, {boxes} boxes "
                            f"({len(sample)} shuffled ids, hot cache):", read_breakdown(sources[fmt], sample))
        print(f"baseline pieces, {boxes} boxes:")
        reader = sources["pickled"]
        keys = [i.encode() for i in sample]
        vals = [bytes(reader._txn.get(k)) for k in keys]
        objs = [pickle.loads(v) for v in vals]
        for name, us in {"txn.get": _us_per(reader._txn.get, keys),
                         "pickle.loads": _us_per(pickle.loads, vals),
                         "b64decode(features)": _us_per(lambda o: base64.b64decode(o["features"]), objs),
                         "= VoltaReader.get, whole": _us_per(reader.get, sample)}.items():
            print(f"    {name:46s} {us:8.1f} us")
        del vals, objs
        print(f"cProfile, lmdb store, get + numpy fp32, {boxes} boxes, top by own time:")
        print("    " + cprofile_top(make_getter("lmdb", sources["lmdb"], "np32"), sample).replace("\n", "\n    "))
    for src in sources.values():
        src.close()
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--records", type=int, default=4000, help="records for 36 boxes")
    p.add_argument("--records-100", type=int, default=None,
                   help="records for box counts above 36 (unset: --records * 36 / boxes, at least 500)")
    p.add_argument("--boxes", default="36,100", help="comma-separated box counts")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    p.add_argument("--batch-size", type=int, default=32, help="DataLoader batch size")
    p.add_argument("--shard-size", type=int, default=1000, help="records per shard")
    p.add_argument("--repeats", type=int, default=3, help="timed single-process passes (median)")
    p.add_argument("--epochs", type=int, default=2, help="timed DataLoader epochs (median)")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the per-piece time breakdowns and cProfile (shown by default)")
    p.add_argument("--out", default=None, help="directory for the stores (unset: a temp dir, deleted at the end)")
    p.add_argument("--keep", action="store_true", help="keep the stores")
    args = p.parse_args(argv)
    box_counts = [int(b) for b in args.boxes.split(",") if b.strip()]
    # The baseline's and vlp's arrays are read-only; a trainer only reads them.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    warnings.filterwarnings("ignore", message="This DataLoader will create")

    # DataLoader workers run torch with 1 thread; do the same in the 1-process measurements
    # (with 2 threads, the intra-op pool's spinning made .float() 5-50x slower and noisy here).
    torch.set_num_threads(1)
    info = machine_info()
    cores = min(args.workers, info["usable_cpus"]) if args.workers > 0 else 1
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="vlp-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    print("vlp feature-store benchmark (benchmarks/bench_stores.py)")
    print(f"machine: {info['cpus']} CPUs ({info['usable_cpus']} usable), {info['cpu_model']}, "
          f"{info['mem_gib']} GiB RAM, {info['platform']}")
    print(f"versions: python {info['python']}, numpy {info['numpy']}, lmdb {info['lmdb']}, "
          f"pyarrow {info['pyarrow']}, torch {info['torch']}")
    print(f"stores in {root} on {_fs_of(root)}; shard_size {args.shard_size}; "
          f"features {FEATURE_DIM}-d; images {IMAGE_W}x{IMAGE_H}")
    print("reads: random order (ids shuffled every pass), after one untimed warm-up pass, so the "
          f"page cache is HOT (no disk reads); 1-process figures are the median of {args.repeats} "
          f"passes; DataLoader figures the median of {args.epochs} epochs after a warm-up epoch "
          "(persistent workers), shuffle=True, collate passes only counts back (no tensor IPC)")
    print("torch.set_num_threads(1) in the main process, as in DataLoader workers")
    print(f"per core = total / min(workers={args.workers}, cpus={info['usable_cpus']}) = total / {cores}")
    print("baseline 'pickled': one LMDB env as VOLTA's convert_*_lmdb.py writes it from the LXMERT TSV "
          "(pickled dict of base64 str fields + b'keys'), read as VOLTA's ImageFeaturesH5Reader does "
          "(pickle.loads + b64decode + frombuffer float32), without its O(N) keys.index() per get")
    t_start = time.perf_counter()
    results = {}
    capacity = [parallel_capacity(cores)]
    print(f"parallel capacity now: {cores} busy processes get {capacity[0]:.2f} cores' worth of CPU "
          f"(pure-Python loop; below {cores} means other work shares the CPUs); "
          f"load average {_loadavg()}", flush=True)
    try:
        warm_up_writers(root)
        for boxes in box_counts:
            if boxes <= 36:
                n = args.records
            elif args.records_100 is not None:
                n = args.records_100
            else:
                n = max(500, args.records * 36 // boxes)
            results[boxes] = (n, run_box_count(boxes, n, args, root, cores))
    finally:
        if not args.keep and not args.out:
            shutil.rmtree(root, ignore_errors=True)
        elif not args.keep:
            for boxes in box_counts:
                for fmt in FORMATS:
                    shutil.rmtree(root / f"b{boxes}-{fmt}", ignore_errors=True)

    capacity.append(parallel_capacity(cores))
    print(f"\nparallel capacity at the end: {capacity[1]:.2f} cores' worth for {cores} processes; "
          f"load average {_loadavg()}")
    print_summary(results, cores, args, capacity)
    print(f"\ntotal run time {time.perf_counter() - t_start:.0f}s")


def print_summary(results: dict, cores: int, args, capacity: list[float]) -> None:
    print("\n=== summary: records/s (hot page cache, random order); x = vlp / pickled baseline ===")
    cols = [("write", lambda r: r["write_rps"]), ("raw", lambda r: r["raw"]),
            ("np32", lambda r: r["np32"]), ("t32", lambda r: r["t32"]),
            ("DL t32", lambda r: r["dl_t32"]), ("DL/core", lambda r: r["dl_t32"] / cores),
            ("DL/CPU-s", lambda r: r["dl_t32_cpu"]), ("DL np32", lambda r: r["dl_np32"])]
    header = (f"{'boxes':>5} {'format':8}" + "".join(f"{c[0]:>9}" for c in cols)
              + f"{'x raw':>7}{'x np32':>7}{'x t32':>7}{'x DL':>7}{'size/fp32':>10}")
    print(header)
    print("-" * len(header))
    for boxes, (n, res) in results.items():
        base = res["pickled"]
        for fmt in FORMATS:
            r = res[fmt]
            cells = "".join(f"{fmt_rate(get(r)):>9}" for _, get in cols)
            if fmt == "pickled":
                ratios = " " * 28
            else:
                ratios = "".join(f"{r[k] / base[k]:>7.2f}" for k in ("raw", "np32", "t32", "dl_t32"))
            print(f"{boxes:>5} {fmt:8}{cells}{ratios}{r['size_ratio']:>10.3f}")
    print("raw: store.get only; np32: + record.features_float32() (numpy out); t32: + torch.from_numpy(f).float(); "
          f"DL: DataLoader, {args.workers} workers, t32 unless np32; DL/core: DL t32 total / {cores}; "
          "DL/CPU-s: records per CPU-second used by workers + main process (independent of how "
          f"many cores the VM actually gave us: {capacity[0]:.2f} at the start, {capacity[1]:.2f} at the end)")
    ok = lambda c: "met" if c else "MISSED"
    print("\ntargets (the trainer path is t32: torch conversion; np32 shown for a numpy-only consumer):")
    for boxes, (n, res) in results.items():
        base = res["pickled"]
        for fmt in ("lmdb", "arrow"):
            r = res[fmt]
            sp_t = min(r["t32"] / base["t32"], r["dl_t32"] / base["dl_t32"])
            sp_n = min(r["np32"] / base["np32"], r["dl_np32"] / base["dl_np32"])
            line = (f"  {boxes:>3} boxes {fmt:5}: speed-up >= {TARGET_SPEEDUP:g}x: t32 {sp_t:.1f}x "
                    f"[{ok(sp_t >= TARGET_SPEEDUP)}], np32 {sp_n:.2f}x [{ok(sp_n >= TARGET_SPEEDUP)}]; "
                    f"size <= {TARGET_SIZE_RATIO}: {r['size_ratio']:.3f} [{ok(r['size_ratio'] <= TARGET_SIZE_RATIO)}]")
            if boxes == 36:
                pc, pcc, pcn = r["dl_t32"] / cores, r["dl_t32_cpu"], r["dl_np32_cpu"]
                line += (f"; per core >= {TARGET_PER_CORE:,}: t32 {pc:,.0f}/core [{ok(pc >= TARGET_PER_CORE)}] "
                         f"{pcc:,.0f}/CPU-s [{ok(pcc >= TARGET_PER_CORE)}], "
                         f"np32 {pcn:,.0f}/CPU-s [{ok(pcn >= TARGET_PER_CORE)}]")
            print(line)
    print("  (speed-up = the smaller of the 1-process and the DataLoader ratio)")


if __name__ == "__main__":
    main()
