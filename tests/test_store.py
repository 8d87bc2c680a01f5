import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from vlp.demo import random_records
from vlp.schemas import FeatureRecord, FeatureStore, FeatureStoreWriter, SchemaError, StoreError
from vlp.schemas.shards import LmdbShardReader, LmdbShardWriter
from vlp.schemas.verify import verify_store

FORMATS = ["lmdb", "arrow"]


def write_store(root, records, storage, shard_size=7, **kwargs):
    with FeatureStoreWriter(root, storage=storage, shard_size=shard_size, **kwargs) as writer:
        for record in records:
            writer.add(record)
    return root


@pytest.mark.parametrize("storage", FORMATS)
def test_round_trip_is_bit_exact(tmp_path, storage):
    records = list(random_records(25, seed=3))
    rng = np.random.default_rng(0)
    for r in records:  # optional soft labels travel too
        r.cls_prob = rng.uniform(0, 1, (r.num_boxes, 1601)).astype(np.float16)
    write_store(tmp_path / "s", records, storage)
    store = FeatureStore(tmp_path / "s")
    assert len(store) == 25 and len(store.shard_names) == 4  # 7+7+7+4
    assert store.fields == ("boxes", "features", "objects_id", "objects_conf", "attrs_id",
                            "attrs_conf", "cls_prob")
    for r in records:
        got = store.get(r.image_id)
        assert got.equals(r), r.image_id
        assert got.features.dtype == np.float16 and got.boxes.dtype == np.float32
    assert sorted(store.keys()) == sorted(r.image_id for r in records)
    assert [r.image_id for r in store] == list(store.keys())
    assert "demo/000003" in store and "nope" not in store
    with pytest.raises(KeyError, match="'nope' is not in the feature store"):
        store.get("nope")
    assert verify_store(tmp_path / "s").ok


def test_float32_input_is_stored_as_exact_float16(tmp_path):
    features = np.random.default_rng(0).standard_normal((3, 2048)).astype(np.float32)
    record = FeatureRecord.from_arrays("a", 10, 10, boxes=[[0, 0, 5, 5]] * 3, features=features)
    write_store(tmp_path / "s", [record], "arrow")
    got = FeatureStore(tmp_path / "s").get("a").features
    assert np.array_equal(got, features.astype(np.float16))
    # fp16 keeps 11 significant bits: relative error below 2^-11
    assert np.max(np.abs(got.astype(np.float32) - features) / np.maximum(np.abs(features), 1e-3)) < 2 ** -10


class _StoreDataset(torch.utils.data.Dataset):
    def __init__(self, store, ids):
        self.store, self.ids = store, ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        r = self.store.get(self.ids[i])
        return self.ids[i], float(r.features.astype(np.float64).sum()), r.boxes.copy(), os.getpid()


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
@pytest.mark.parametrize("storage", FORMATS)
def test_random_access_from_four_dataloader_workers(tmp_path, storage):
    records = list(random_records(60, seed=5))
    write_store(tmp_path / "s", records, storage, shard_size=16)
    store = FeatureStore(tmp_path / "s")
    store.get(records[0].image_id)  # opened in the parent before the workers fork
    expected = {r.image_id: (float(r.features.astype(np.float64).sum()), r.boxes) for r in records}
    ids = [r.image_id for r in records] * 2
    np.random.default_rng(0).shuffle(ids)
    loader = torch.utils.data.DataLoader(_StoreDataset(store, ids), batch_size=None, num_workers=4)
    seen, pids = 0, set()
    for image_id, total, boxes, pid in loader:
        assert total == expected[image_id][0]
        assert np.array_equal(np.asarray(boxes), expected[image_id][1])
        pids.add(pid)
        seen += 1
    assert seen == len(ids) and len(pids) == 4 and os.getpid() not in pids


@pytest.mark.slow
def test_store_pickles_as_its_path_and_works_in_spawned_workers(tmp_path):
    records = list(random_records(12, seed=6))
    write_store(tmp_path / "s", records, "lmdb")
    store = FeatureStore(tmp_path / "s")
    store.get(records[0].image_id)
    blob = pickle.dumps(store)
    assert len(blob) < 300 and b"features" not in blob
    ids = [r.image_id for r in records]
    loader = torch.utils.data.DataLoader(_StoreDataset(store, ids), batch_size=None, num_workers=2,
                                         multiprocessing_context="spawn")
    got = {i: t for i, t, _, _ in loader}
    assert got == {r.image_id: float(r.features.astype(np.float64).sum()) for r in records}


def test_lmdb_map_grows_instead_of_failing(tmp_path):
    records = list(random_records(12, seed=7))  # about 2.6 MB of values
    writer = LmdbShardWriter(tmp_path / "one.lmdb", map_size=1 << 20, txn_bytes=1 << 19)
    for r in records:
        writer.add(r)
    info = writer.close()
    assert info.records == 12
    reader = LmdbShardReader(tmp_path / "one.lmdb")
    assert all(reader.get(r.image_id).equals(r) for r in records)


TORN_WRITER = textwrap.dedent("""
    import sys, time
    from vlp.demo import random_records
    from vlp.schemas import FeatureStoreWriter
    writer = FeatureStoreWriter(sys.argv[1], storage=sys.argv[2], shard_size=10)
    for i, record in enumerate(random_records(1000, seed=1)):
        writer.add(record)
        if i == 14:
            print("first shard committed", flush=True)
        if i > 14:
            time.sleep(0.05)
""")


@pytest.mark.parametrize("storage", FORMATS)
def test_shard_torn_by_kill_is_ignored_and_reported(tmp_path, storage):
    root = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-c", TORN_WRITER, str(root), storage],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "first shard committed"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(p.name.endswith(".partial") for p in root.iterdir())
    with pytest.warns(UserWarning, match=r"ignoring 1 file\(s\) not in the manifest"):
        store = FeatureStore(root)
    assert len(store) == 10 and len(list(store.keys())) == 10
    assert not store.manifest["complete"]
    report = verify_store(root)
    assert report.ok and any("not in the manifest" in w for w in report.warnings)
    assert any("has not finished" in w for w in report.warnings)
    store.close()
    # appending removes the torn shard and continues after the committed one
    writer = FeatureStoreWriter(root, storage=storage, shard_size=10, mode="append")
    assert not any(p.name.endswith(".partial") for p in root.iterdir())
    for record in random_records(25, seed=1):
        if record.image_id not in writer:
            writer.add(record)
    writer.close()
    store = FeatureStore(root)
    assert len(store) == 25 and store.manifest["complete"]
    assert sorted(store.keys()) == [f"demo/{i:06d}" for i in range(25)]


@pytest.mark.parametrize("storage", FORMATS)
def test_corrupted_byte_is_caught_by_verify(tmp_path, storage):
    write_store(tmp_path / "s", list(random_records(10, seed=2)), storage, shard_size=5)
    shard = tmp_path / "s" / f"shard-00001.{storage}"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    report = verify_store(tmp_path / "s")
    assert not report.ok
    assert len(report.errors) == 1
    assert "shard-00001" in report.errors[0] and "sha256" in report.errors[0]
    assert report.records_checked == 5  # the intact shard was still checked


def test_writer_modes_and_duplicates(tmp_path):
    records = list(random_records(6, seed=4))
    root = write_store(tmp_path / "s", records[:3], "lmdb")
    with pytest.raises(StoreError, match="already holds a feature store"):
        FeatureStoreWriter(root)
    with pytest.raises(StoreError, match="storage='lmdb'"):
        FeatureStoreWriter(root, storage="arrow", mode="append")
    with pytest.raises(StoreError, match="detector=None"):
        FeatureStoreWriter(root, mode="append", detector={"name": "other"})
    writer = FeatureStoreWriter(root, mode="append")
    with pytest.raises(StoreError, match="already in the store"):
        writer.add(records[0])
    writer.add(records[3])
    with pytest.raises(StoreError, match="already in the store"):
        writer.add(records[3])
    no_labels = FeatureRecord.from_arrays("x", 5, 5, boxes=[[0, 0, 1, 1]], features=np.zeros((1, 2048)))
    with pytest.raises(SchemaError, match="this store holds"):
        writer.add(no_labels)
    writer.close()
    assert sorted(FeatureStore(root).keys()) == sorted(r.image_id for r in records[:4])
    FeatureStoreWriter(root, mode="overwrite").close()
    assert len(FeatureStore(root)) == 0


def test_missing_index_falls_back_to_memory(tmp_path, caplog):
    records = list(random_records(9, seed=8))
    root = write_store(tmp_path / "s", records, "arrow", shard_size=4)
    (root / "index.lmdb").unlink()
    store = FeatureStore(root)
    assert store.get(records[5].image_id).equals(records[5])
    assert "building the image index in memory" in caplog.text


def test_missing_shard_and_bad_manifest_are_named(tmp_path):
    root = write_store(tmp_path / "s", list(random_records(4, seed=9)), "lmdb", shard_size=2)
    (root / "shard-00001.lmdb").unlink()
    with pytest.raises(StoreError, match="shard-00001.lmdb: listed in the manifest but missing"):
        FeatureStore(root)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="manifest.json: not valid JSON"):
        FeatureStore(root)
    with pytest.raises(StoreError, match="manifest.json: missing"):
        FeatureStore(tmp_path)
