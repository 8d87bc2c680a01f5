"""The web filter's aggregation as shuffles (builders/web_filter/shuffle.py) gives exactly what
the in-memory reference ``aggregate()`` gives: kept keys in input order, rejections as a
multiset; on pyarrow tables in this process (many random cases) and on Ray Data (a few)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlp.builders.web_filter import aggregate, texts
from vlp.builders.web_filter.shuffle import (MemoryBackend, RayBackend, aggregate_dataset, as_rows, quantile_higher,
                                             rejection_of, verdict_rows)

SHUFFLE = os.environ.get("VLP_TEST_SHUFFLE", "sort")
_TEXTS = ["a red circle", "A red circle!", "click here", "blue square on grey", "image", "two green dots"]
_BASES = [0x0123456789ABCDEF, 0xFFFF0000FFFF0000, 0x0F0F0F0F0F0F0F0F, 0]


@st.composite
def _rows(draw):
    n = draw(st.integers(0, 24))
    rows = []
    for i in range(n):
        base = draw(st.sampled_from(_BASES))
        flips = draw(st.lists(st.integers(0, 63), max_size=draw(st.sampled_from([0, 1, 3, 6]))))
        value = base
        for bit in flips:
            value ^= 1 << bit
        if draw(st.booleans()) and draw(st.booleans()):
            value = draw(st.integers(0, 2 ** 64 - 1))
        shard_index = draw(st.integers(0, 2)) if not rows else max(rows[-1]["_shard"], draw(st.integers(0, 2)))
        text = draw(st.sampled_from(_TEXTS))
        key = draw(st.sampled_from([f"k{i}", f"k{i}", "dup", f"k{i % 3}"]))
        rows.append({"_shard": shard_index, "key": key, "shard": f"0/r#{shard_index}", "url": f"https://x.invalid/{key}",
                     "text": text, "norm": texts.normalize(text), "image_id": key,
                     "sha256": draw(st.sampled_from(["s0", "s1", "s2", f"s{i + 3}", f"s{i + 3}"])),
                     "phash": f"{value:016x}", "score": draw(st.sampled_from([0.1, 0.25, 0.5, 0.5, 0.9, 0.9, 1.0])),
                     "thumb": draw(st.sampled_from([None, "", "AAAA"]))})
    counters: dict = {}
    for row in rows:  # input order: shard index, then the row's place in its shard
        i = counters.get(row["_shard"], 0)
        counters[row["_shard"]] = i + 1
        row["order"] = (row.pop("_shard") << 32) + i
    return rows


_OPTIONS = st.fixed_dictionaries({
    "max_images_per_text": st.integers(1, 4),
    "phash_distance": st.sampled_from([-1, 0, 1, 2, 4, 6, 16]),
    "keep_fraction": st.one_of(st.none(), st.floats(0.01, 1.0), st.sampled_from([0.5, 1.0, 0.3])),
})


def _line(entry: dict) -> str:
    return json.dumps({k: v for k, v in entry.items() if k != "thumb"}, sort_keys=True)


def _both(backend, rows, options, make_dataset=None):
    kept, rejected = aggregate([dict(r) for r in rows], **options)
    table = as_rows(pa.Table.from_pylist(rows)) if rows else as_rows(pa.table(
        {"order": pa.array([], pa.int64())}))
    ds = make_dataset(table) if make_dataset else table
    out = list(verdict_rows(backend, aggregate_dataset(backend, ds, **options)))
    assert [r["order"] for r in out] == sorted(r["order"] for r in rows)
    got_kept = [r["key"] for r in out if r["reason"] is None]
    got_rejected = sorted(_line(rejection_of(r)) for r in out if r["reason"] is not None)
    return ([r["key"] for r in kept], sorted(_line(r) for r in rejected)), (got_kept, got_rejected)


@settings(max_examples=300, deadline=None)
@given(rows=_rows(), options=_OPTIONS)
def test_shuffle_steps_match_the_in_memory_aggregation(rows, options):
    want, got = _both(MemoryBackend(), rows, options)
    assert got == want


def test_hand_made_case_near_copies_chain_k_rule_and_ties():
    # a chain of near copies (a~b~c, a and c 4 bits apart) is one image at distance 2
    rows = [{"order": i, "key": k, "shard": "0/r#0", "url": "", "text": t, "norm": texts.normalize(t), "image_id": k,
             "sha256": k, "phash": p, "score": s, "thumb": None}
            for i, (k, t, p, s) in enumerate([("a", "red circle", "ffff0000ffff0000", 0.5),
                                              ("b", "red ring", "ffff0000ffff0003", 0.5),
                                              ("c", "red disc", "ffff0000ffff000f", 0.9),
                                              ("d", "red disc", "0000ffff0000ffff", 0.9)])]
    options = {"max_images_per_text": 1, "phash_distance": 2, "keep_fraction": None}
    want, got = _both(MemoryBackend(), rows, options)
    assert got == want
    # "red disc" is on 2 images (c's cluster and d) > K = 1; of a and b (one image) a wins the tie
    assert got[0] == ["a"]


def test_quantile_from_a_histogram_is_numpys():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scores = rng.choice([0.1, 0.2, 0.35, 0.5, 0.9], size=rng.integers(1, 40)).tolist()
        q = float(rng.uniform(0, 1))
        histogram: dict = {}
        for s in scores:
            histogram[s] = histogram.get(s, 0) + 1
        assert quantile_higher(histogram, q) == float(np.quantile(np.array(scores), q, method="higher"))


@pytest.fixture(scope="module")
def local_ray():
    import logging

    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_rows(), options=_OPTIONS)
def test_ray_data_shuffles_match_the_in_memory_aggregation(local_ray, rows, options):
    import ray.data

    def make(table):  # several blocks, so groups really cross block boundaries
        return ray.data.from_arrow(table).repartition(3)

    want, got = _both(RayBackend(partitions=2, batch_size=5, shuffle=SHUFFLE), rows, options, make)
    assert got == want


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from([None, "", "T"])), max_size=40))
def test_funnel_samples_are_what_sorting_every_row_gives(rows):
    from vlp.builders.web_filter.funnel import SAMPLES, Samples

    samples = Samples()
    entries = [{"i": i, "thumb": thumb, "bucket": bucket} for i, (bucket, thumb) in enumerate(rows)]
    for entry in entries:
        samples.add(entry["bucket"], entry)
    for bucket in "abc":
        every = [e for e in entries if e["bucket"] == bucket]
        assert samples.rows(bucket) == sorted(every, key=lambda e: not e["thumb"])[:SAMPLES]
        assert samples.counts.get(bucket, 0) == len(every)
