"""Stage 7 (aggregation) as shuffles by hash: the same result as :func:`.run.aggregate`,
with no step that needs every row in one process.

The input is a dataset of narrow survivor rows (:data:`ROW_SCHEMA`: order, key, shard, norm
text, sha256, pHash, score, and what the store and the funnel page need); the output is the
same rows, each with a verdict (``stage``/``reason``/``values`` null: kept), sorted by input
order. Steps, each a map or a group-by on one column:

1. ``keep_fraction``: a per-block count of each score value, summed in the driver (at most
   as many entries as distinct scores: 10,001 for the 4-decimal scores of the semantic
   stage), gives numpy's ``quantile(..., method="higher")`` exactly; a map rejects below it;
2. group by key: the first row in input order of each key stays (later: ``duplicate_key``);
3. image groups (connected components): every live row emits one hyperedge key for its
   sha256 and, with ``phash_distance`` d >= 0, one per pHash band (d + 1 bands of the 64
   bits); group by hyperedge key: inside a group, rows whose pHashes are at most d bits
   apart are joined (local union-find), each local component of two rows or more becomes a
   hyperedge; then rounds of min-label propagation (group by row, group by hyperedge) until
   no label changes (duplicate clusters are small: two or three rounds); the label of a
   row is the smallest input order in its component (the reference's union-find root);
4. group by row order: the label rows meet their data row;
5. group by normalized text: a text on more than K distinct labels is ``shared_text``;
6. group by label: the best score stays (ties: the first in input order), the others are
   ``duplicate_image``;
7. sort by input order.

Each group-by step is a function of one key's rows. Two back ends run the same step
functions: :class:`RayBackend` (Ray Data: a map gives each row a hash bucket of its key,
``groupby("_bucket").map_groups`` brings a bucket to one task, which groups its rows by key;
``sort``; the driver only ever holds one batch of the output, the score histogram and a
count of changed labels per round) and :class:`MemoryBackend` (pyarrow tables in this
process; tests).
"""

from __future__ import annotations

import functools
import json
import math
import zlib
from collections import Counter
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROW_SCHEMA = pa.schema([
    ("order", pa.int64()), ("key", pa.string()), ("shard", pa.string()), ("url", pa.string()),
    ("text", pa.string()), ("norm", pa.string()), ("image_id", pa.string()), ("sha256", pa.string()),
    ("phash", pa.string()), ("score", pa.float64()), ("thumb", pa.string()), ("label", pa.int64()),
    ("stage", pa.string()), ("reason", pa.string()), ("values", pa.string()),
])
#: columns read from the survivor files
INPUT_COLUMNS = ("order", "key", "shard", "url", "text", "norm", "image_id", "sha256", "phash", "score", "thumb")
_EDGE_SCHEMA = pa.schema([("hkey", pa.string()), ("node", pa.int64()), ("phash", pa.string())])
_MEMBER_SCHEMA = pa.schema([("hid", pa.string()), ("node", pa.int64()), ("label", pa.int64()), ("prev", pa.int64()),
                            ("changed", pa.int64())])
_HIST_SCHEMA = pa.schema([("score", pa.float64()), ("count", pa.int64())])


def as_rows(table: pa.Table) -> pa.Table:
    """Survivor columns -> :data:`ROW_SCHEMA` (verdict and label columns null)."""
    columns = []
    for field in ROW_SCHEMA:
        if field.name in table.column_names:
            columns.append(table[field.name].cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=ROW_SCHEMA)


def _table(rows: list, schema: pa.Schema = ROW_SCHEMA) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def _live(row: dict) -> bool:
    return row["reason"] is None


def _verdict(row: dict, stage: str, reason: str, values: dict) -> None:
    row["stage"], row["reason"], row["values"] = stage, reason, json.dumps(values)


# --------------------------------------------------------------------------- step functions


def _score_counts(table: pa.Table) -> pa.Table:
    counts = pc.value_counts(table["score"])
    return pa.Table.from_arrays([counts.field("values"), counts.field("counts").cast(pa.int64())],
                                schema=_HIST_SCHEMA)


def _below_threshold(threshold: float, table: pa.Table) -> pa.Table:
    rows = table.to_pylist()
    for row in rows:
        if _live(row) and row["score"] < threshold:
            _verdict(row, "semantic", "below_keep_fraction", {"score": row["score"], "threshold": round(threshold, 4)})
    return _table(rows)


def _first_of_key(rows: list) -> list:
    rows.sort(key=lambda r: r["order"])
    first = True
    for row in rows:
        if _live(row):
            if not first:
                _verdict(row, "input", "duplicate_key", {})
            first = False
    return rows


def _band_keys(phash_distance: int, phash: str) -> list:
    bands = phash_distance + 1
    width = -(-64 // bands)
    mask = (1 << width) - 1
    value = int(phash, 16)
    return [f"p{b}:{(value >> (b * width)) & mask}" for b in range(bands)]


def _hyperedge_keys(phash_distance: int, table: pa.Table) -> pa.Table:
    out = {"hkey": [], "node": [], "phash": []}
    for row in table.to_pylist():
        if not _live(row):
            continue
        keys = ["s:" + row["sha256"]]
        if phash_distance >= 0:
            keys += _band_keys(phash_distance, row["phash"])
        for key in keys:
            out["hkey"].append(key)
            out["node"].append(row["order"])
            out["phash"].append(row["phash"])
    return pa.Table.from_pydict(out, schema=_EDGE_SCHEMA)


def _local_components(phash_distance: int, rows: list) -> list:
    """One hyperedge key's rows -> memberships of its local components of >= 2 rows."""
    if len(rows) < 2:
        return []
    hkey = rows[0]["hkey"]
    if hkey.startswith("s:"):
        components = [sorted({r["node"] for r in rows})]
    else:
        by_value: dict = {}
        for r in rows:
            by_value.setdefault(int(r["phash"], 16), []).append(r["node"])
        values = list(by_value)
        parent = list(range(len(values)))

        def find(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        if len(values) > 1:
            bits = np.array(values, dtype=np.uint64)
            for i in range(len(values) - 1):
                near = np.flatnonzero(np.bitwise_count(bits[i + 1:] ^ bits[i]) <= phash_distance) + i + 1
                for j in near:
                    a, b = find(i), find(int(j))
                    if a != b:
                        parent[max(a, b)] = min(a, b)
        grouped: dict = {}
        for i, value in enumerate(values):
            grouped.setdefault(find(i), []).extend(by_value[value])
        components = [sorted(set(members)) for members in grouped.values()]
    out = []
    for members in components:
        if len(members) < 2:
            continue
        low = members[0]
        out += [{"hid": f"{hkey}/{low}", "node": m, "label": low, "prev": m, "changed": 0} for m in members]
    return out


def _min_over_node(rows: list) -> list:
    low = min(r["label"] for r in rows)
    changed = int(low != rows[0]["prev"])
    for row in rows:
        row["label"], row["prev"], row["changed"] = low, low, changed
    return rows


def _min_over_hyperedge(rows: list) -> list:
    low = min(r["label"] for r in rows)
    for row in rows:
        row["label"], row["changed"] = low, 0
    return rows


def _as_label_rows(table: pa.Table) -> pa.Table:
    n = table.num_rows
    columns = {f.name: pa.nulls(n, f.type) for f in ROW_SCHEMA}
    columns["order"] = table["node"]
    columns["label"] = table["label"]
    return pa.Table.from_arrays([columns[f.name] for f in ROW_SCHEMA], schema=ROW_SCHEMA)


def _attach_label(rows: list) -> list:
    data = [r for r in rows if r["key"] is not None]
    labels = [r["label"] for r in rows if r["key"] is None]
    for row in data:
        row["label"] = min(labels + [row["order"]])
    return data


def _shared_text(max_images_per_text: int, rows: list) -> list:
    live = [r for r in rows if _live(r)]
    n = len({r["label"] for r in live})
    if n > max_images_per_text:
        for row in live:
            _verdict(row, "aggregation", "shared_text", {"images": n, "max_images_per_text": max_images_per_text})
    return rows


def _best_of_group(rows: list) -> list:
    live = sorted((r for r in rows if _live(r)), key=lambda r: r["order"])
    if live:
        winner = live[0]
        for row in live[1:]:
            if row["score"] > winner["score"]:
                winner = row
        for row in live:
            if row is not winner:
                _verdict(row, "aggregation", "duplicate_image",
                         {"kept": winner["key"], "same_file": winner["sha256"] == row["sha256"],
                          "score": row["score"], "kept_score": winner["score"]})
    return rows


def _apply_per_key(key: str, fn, schema: pa.Schema, table: pa.Table) -> pa.Table:
    """``fn`` on the rows (dicts) of each value of ``key`` in ``table``; one table out."""
    groups: dict = {}
    for row in table.to_pylist():
        groups.setdefault(row[key], []).append(row)
    out: list = []
    for rows in groups.values():
        out += fn(rows)
    return pa.Table.from_pylist(out, schema=schema)


def _stable_hash(value) -> int:
    return zlib.crc32(str(value).encode("utf-8", "surrogatepass"))


def _add_bucket(key: str, buckets: int, table: pa.Table) -> pa.Table:
    bucket = [_stable_hash(v) % buckets for v in table[key].to_pylist()]
    return table.append_column("_bucket", pa.array(bucket, pa.int64()))


# --------------------------------------------------------------------------- back ends


class MemoryBackend:
    """The steps on pyarrow tables in this process (tests; no Ray)."""

    def map(self, ds: pa.Table, fn) -> pa.Table:
        return fn(ds)

    def groupby(self, ds: pa.Table, key: str, fn, schema: pa.Schema) -> pa.Table:
        return _apply_per_key(key, fn, schema, ds)

    def union(self, a: pa.Table, b: pa.Table) -> pa.Table:
        return pa.concat_tables([a, b])

    def sort(self, ds: pa.Table, key: str) -> pa.Table:
        return ds.sort_by(key)

    def materialize(self, ds: pa.Table) -> pa.Table:
        return ds

    def iter_tables(self, ds: pa.Table) -> Iterator[pa.Table]:
        yield ds

    def count(self, ds: pa.Table) -> int:
        return ds.num_rows


class RayBackend:
    """The steps on Ray Data (a running Ray). A group-by on ``key`` is a shuffle by hash:
    a map gives each row a bucket (CRC-32 of the key modulo ``buckets``), Ray Data's
    ``groupby("_bucket").map_groups`` brings each bucket's rows to one task (``partitions``
    shuffle partitions), and that task groups them by key in Python (so the step function
    runs once per key without a Ray call per key). Sort and iteration: Ray Data's.

    ``shuffle``: the Ray Data shuffle under the group-by: ``sort`` (its pull-based sort
    shuffle: range partitions, no actors) or ``hash`` (its hash shuffle: aggregator actors).
    """

    def __init__(self, partitions: int, buckets: Optional[int] = None, batch_size: int = 4096,
                 shuffle: str = "sort"):
        import ray.data

        self.partitions = max(1, int(partitions))
        self.buckets = max(self.partitions, int(buckets or 4 * self.partitions))
        self.batch_size = batch_size
        strategies = {"hash": "hash_shuffle", "sort": "sort_shuffle_pull_based"}
        if shuffle not in strategies:
            raise ValueError(f"shuffle must be one of {sorted(strategies)}, got {shuffle!r}")
        ray.data.DataContext.get_current().shuffle_strategy = strategies[shuffle]

    def map(self, ds, fn):
        return ds.map_batches(fn, batch_format="pyarrow", batch_size=self.batch_size)

    def groupby(self, ds, key: str, fn, schema: pa.Schema):
        ds = ds.map_batches(functools.partial(_add_bucket, key, self.buckets), batch_format="pyarrow",
                            batch_size=self.batch_size)
        return ds.groupby("_bucket", num_partitions=self.partitions).map_groups(
            functools.partial(_apply_per_key, key, fn, schema), batch_format="pyarrow")

    def union(self, a, b):
        return a.union(b)

    def sort(self, ds, key: str):
        return ds.sort(key)

    def materialize(self, ds):
        return ds.materialize()

    def iter_tables(self, ds) -> Iterator[pa.Table]:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=self.batch_size):
            yield batch

    def count(self, ds) -> int:
        return ds.count()


# --------------------------------------------------------------------------- the aggregation


def quantile_higher(histogram: dict, q: float) -> float:
    """``np.quantile(scores, q, method="higher")`` from a {score: count} histogram."""
    n = sum(histogram.values())
    k = int(np.ceil((n - 1) * np.float64(q)))
    seen = 0
    for score in sorted(histogram):
        seen += histogram[score]
        if seen > k:
            return float(score)
    raise ValueError("empty histogram")


def _components(backend, ds, phash_distance: int):
    """Label rows (order = a row in a duplicate cluster, label = the cluster's smallest order),
    or None when no two rows are one image."""
    edges = backend.map(ds, functools.partial(_hyperedge_keys, phash_distance))
    members = backend.materialize(backend.groupby(edges, "hkey", functools.partial(_local_components, phash_distance),
                                                 _MEMBER_SCHEMA))
    if not any(t.num_rows for t in backend.iter_tables(members)):
        return None
    rounds = 0
    while True:
        members = backend.materialize(backend.groupby(members, "node", _min_over_node, _MEMBER_SCHEMA))
        rounds += 1
        changed = sum(pc.sum(t["changed"]).as_py() or 0 for t in backend.iter_tables(members))
        if not changed:
            break
        members = backend.groupby(members, "hid", _min_over_hyperedge, _MEMBER_SCHEMA)
    return backend.map(members, _as_label_rows)


def aggregate_dataset(backend, ds, *, max_images_per_text: int = 10, phash_distance: int = 4,
                      keep_fraction: Optional[float] = None):
    """Every row of ``ds`` (:data:`ROW_SCHEMA`) with its verdict, sorted by input order."""
    ds = backend.materialize(ds)
    if not backend.count(ds):
        return ds
    if keep_fraction is not None and keep_fraction < 1:
        histogram: Counter = Counter()
        for part in backend.iter_tables(backend.map(ds, _score_counts)):
            for score, count in zip(part["score"].to_pylist(), part["count"].to_pylist()):
                histogram[score] += count
        if histogram:
            threshold = quantile_higher(histogram, 1.0 - keep_fraction)
            ds = backend.map(ds, functools.partial(_below_threshold, threshold))
    ds = backend.materialize(backend.groupby(ds, "key", _first_of_key, ROW_SCHEMA))
    labels = _components(backend, ds, phash_distance)
    if labels is not None:
        ds = backend.groupby(backend.union(ds, labels), "order", _attach_label, ROW_SCHEMA)
    else:
        ds = backend.map(ds, _own_label)
    ds = backend.groupby(ds, "norm", functools.partial(_shared_text, max_images_per_text), ROW_SCHEMA)
    ds = backend.groupby(ds, "label", _best_of_group, ROW_SCHEMA)
    return backend.sort(ds, "order")


def _own_label(table: pa.Table) -> pa.Table:
    return table.set_column(ROW_SCHEMA.get_field_index("label"), "label", table["order"])


def verdict_rows(backend, ds) -> Iterator[dict]:
    """Stream the rows of an aggregated dataset as dicts (``values`` decoded)."""
    for table in backend.iter_tables(ds):
        for row in table.to_pylist():
            if row["values"] is not None:
                row["values"] = json.loads(row["values"])
            yield row


def partitions_for(rows: int, cpus: int, rows_per_partition: int = 50_000) -> int:
    """Shuffle partitions: one per CPU, more when a partition would exceed
    ``rows_per_partition``. The output's blocks are partitions, and the driver fetches a
    whole block to iterate over it: this bounds the driver's memory, whatever the input size."""
    return max(1, cpus, math.ceil(rows / rows_per_partition))


def buckets_for(rows: int, partitions: int, rows_per_bucket: int = 20_000) -> int:
    """Hash buckets of a group-by: four per partition, more when a bucket (the rows one task
    holds at once) would exceed ``rows_per_bucket``."""
    return max(4 * partitions, math.ceil(rows / rows_per_bucket))


def rejection_of(row: dict) -> dict:
    """A verdict row as a rejection entry (the fields :func:`.run.aggregate` gives)."""
    entry = {"key": row["key"], "shard": row["shard"], "stage": row["stage"], "reason": row["reason"],
             "values": row["values"]}
    for k in ("url", "text", "thumb"):
        if row.get(k):
            entry[k] = row[k]
    return entry
