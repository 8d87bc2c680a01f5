import base64
import json
import pickle

import lmdb
import numpy as np
import pytest

from vlp.demo import random_records
from vlp.pipeline.import_features import (ImportIssue, import_pickled_lmdb, import_tsv,
                                          write_tsv)
from vlp.schemas import FeatureStore, StoreError


def float32_reference(records):
    """What the source TSV holds, read back as the exporters wrote it (float32)."""
    return {r.image_id: r for r in records}


@pytest.mark.parametrize("layout", ["lxmert", "butd"])
@pytest.mark.parametrize("storage", ["lmdb", "arrow"])
def test_tsv_import_equals_source_arrays(tmp_path, layout, storage):
    records = list(random_records(30, seed=11))
    tsv = tmp_path / "features.tsv"
    write_tsv(records, tsv, layout=layout)
    stats = import_tsv([tsv], tmp_path / "s", storage=storage, shard_size=8, progress=False)
    assert stats.records == 30 and stats.skipped == 0
    store = FeatureStore(tmp_path / "s")
    assert len(store) == 30
    for r in records:
        got = store.get(r.image_id)
        assert (got.image_w, got.image_h) == (r.image_w, r.image_h)
        assert np.array_equal(got.boxes, r.boxes)
        assert np.array_equal(got.features, r.features)
        if layout == "lxmert":
            assert np.array_equal(got.objects_id, r.objects_id)
            assert np.array_equal(got.attrs_conf, r.attrs_conf)
        else:
            assert got.objects_id is None
    assert store.manifest["complete"] and store.manifest["source"]["kind"] == "tsv"


def test_butd_and_lxmert_disagree_on_width_height_order(tmp_path):
    record = next(random_records(1, seed=2))
    assert record.image_w != record.image_h
    for layout in ("lxmert", "butd"):
        write_tsv([record], tmp_path / f"{layout}.tsv", layout=layout)
        import_tsv([tmp_path / f"{layout}.tsv"], tmp_path / layout, progress=False)
        got = FeatureStore(tmp_path / layout).get(record.image_id)
        assert (got.image_w, got.image_h) == (record.image_w, record.image_h)


def _corrupt_rows(path):
    lines = path.read_bytes().split(b"\n")
    cells = lines[2].split(b"\t")
    lines[2] = b"\t".join(cells[:5])  # line 3: too few columns
    cells = lines[4].split(b"\t")
    cells[-1] = b"!!!notbase64!!!"
    lines[4] = b"\t".join(cells)  # line 5: bad base64
    cells = lines[6].split(b"\t")
    cells[7] = b"7"  # line 7: num_boxes disagrees with the arrays
    lines[6] = b"\t".join(cells)
    path.write_bytes(b"\n".join(lines))


def test_malformed_rows_stop_with_file_and_line(tmp_path):
    records = list(random_records(10, seed=12))
    tsv = tmp_path / "f.tsv"
    write_tsv(records, tsv)
    _corrupt_rows(tsv)
    with pytest.raises(ImportIssue, match=r"f\.tsv:3: 5 columns, expected 10"):
        import_tsv([tsv], tmp_path / "s", shard_size=1, progress=False)
    store = FeatureStore(tmp_path / "s")  # rows before the error are kept, marked incomplete
    assert len(store) == 2 and not store.manifest["complete"]


def test_malformed_rows_skipped_and_listed(tmp_path):
    records = list(random_records(10, seed=12))
    tsv = tmp_path / "f.tsv"
    write_tsv(records, tsv)
    _corrupt_rows(tsv)
    stats = import_tsv([tsv], tmp_path / "s", on_error="skip", progress=False)
    assert stats.records == 7 and stats.skipped == 3
    issues = [json.loads(line) for line in (tmp_path / "s" / "errors.jsonl").read_text().splitlines()]
    assert [i["where"].rsplit(":", 1)[1] for i in issues] == ["3", "5", "7"]
    assert "not valid base64" in issues[1]["reason"]
    assert "num_boxes=7" in issues[2]["reason"]
    store = FeatureStore(tmp_path / "s")
    assert sorted(store.keys()) == sorted(r.image_id for i, r in enumerate(records) if i not in (2, 4, 6))


def test_box_outside_image_is_reported_with_line(tmp_path):
    record = next(random_records(1, seed=3))
    record.boxes = record.boxes.copy()
    record.boxes[0, 2] = record.image_w + 50
    write_tsv([record], tmp_path / "f.tsv")
    with pytest.raises(ImportIssue, match=r"f\.tsv:1: .*lies outside"):
        import_tsv([tmp_path / "f.tsv"], tmp_path / "s", progress=False)


def _volta_lmdb(path, records, as_base64=True):
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for r in records:
            item = {"img_id": r.image_id, "img_h": r.image_h, "img_w": r.image_w, "num_boxes": r.num_boxes}
            for name, dtype in (("boxes", np.float32), ("features", np.float32),
                                ("objects_id", np.int64), ("objects_conf", np.float32),
                                ("attrs_id", np.int64), ("attrs_conf", np.float32)):
                array = getattr(r, name).astype(dtype)
                item[name] = base64.b64encode(array.tobytes()) if as_base64 else array
            txn.put(r.image_id.encode(), pickle.dumps(item))
        txn.put(b"keys", pickle.dumps([r.image_id.encode() for r in records]))
    env.close()


@pytest.mark.parametrize("as_base64", [True, False])
def test_pickled_lmdb_import(tmp_path, as_base64):
    records = list(random_records(8, seed=13))
    _volta_lmdb(tmp_path / "volta", records, as_base64)
    with pytest.raises(StoreError, match="pass trust_pickle=True"):
        import_pickled_lmdb(tmp_path / "volta", tmp_path / "s", progress=False)
    stats = import_pickled_lmdb(tmp_path / "volta", tmp_path / "s", trust_pickle=True, progress=False)
    assert stats.records == 8
    store = FeatureStore(tmp_path / "s")
    for r in records:
        assert store.get(r.image_id).equals(r)


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo owned > /dev/null",))


def test_pickled_lmdb_never_runs_code(tmp_path):
    records = list(random_records(3, seed=14))
    _volta_lmdb(tmp_path / "volta", records)
    env = lmdb.open(str(tmp_path / "volta"))
    with env.begin(write=True) as txn:
        txn.put(b"evil", pickle.dumps({"img_id": "evil", "features": _Evil()}))
    env.close()
    with pytest.raises(ImportIssue, match=r"volta\[evil\]: cannot unpickle .*refusing to load posix.system"):
        import_pickled_lmdb(tmp_path / "volta", tmp_path / "s", trust_pickle=True, progress=False)
    stats = import_pickled_lmdb(tmp_path / "volta", tmp_path / "s2", trust_pickle=True,
                                on_error="skip", progress=False)
    assert stats.records == 3 and stats.skipped == 1
