"""vlp export: each format read back the way its project's reader reads it.

Every test re-implements the reader's parsing steps and the assertions its data loaders
make (short, below; the originals are named in each test), then compares every array
with the store. The store holds float16 features; the float32 targets carry them exactly.
"""

from __future__ import annotations

import base64
import csv
import json
import pickle
import pickletools
import sys

import lmdb
import numpy as np
import pytest

from vlp.exporters import export
from vlp.schemas import FeatureRecord, FeatureStore, FeatureStoreWriter
from vlp.schemas.record import NUM_CLS_PROB

DIM = 2048  # ViLBERT's reader hard-codes 2048 per box


def _record(rng, image_id, n, *, width=320, height=240, unsorted=False, overshoot=False, cls_prob=True):
    x1, y1 = rng.uniform(0, width - 20, n), rng.uniform(0, height - 20, n)
    x2, y2 = x1 + rng.uniform(2, width - x1), y1 + rng.uniform(2, height - y1)
    boxes = np.stack([x1, y1, x2, y2], 1).astype(np.float32)
    if overshoot:
        boxes[0, 2] = width + 0.6  # within vlp's 1-pixel tolerance, outside LXMERT's assertion
    conf = np.sort(rng.uniform(0.05, 1.0, n))[::-1]
    if unsorted:
        conf = rng.permutation(conf)
    arrays = dict(boxes=boxes, features=rng.standard_normal((n, DIM)).astype(np.float32) * 3,
                  objects_id=rng.integers(0, 1600, n), objects_conf=conf,
                  attrs_id=rng.integers(0, 400, n), attrs_conf=rng.uniform(0, 1, n))
    if cls_prob:
        arrays["cls_prob"] = rng.dirichlet(np.ones(NUM_CLS_PROB) * 0.1, n)
    return FeatureRecord.from_arrays(image_id, width, height, **arrays)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Six records: 36-48 boxes (confidence sorted or not, one box 0.6 px past the border),
    12 boxes (too few for LXMERT's 36) and 8 boxes (too few for UNITER's min_bb 10);
    one id that is not a number."""
    rng = np.random.default_rng(17)
    root = tmp_path_factory.mktemp("export") / "store"
    records = [_record(rng, "101", 40), _record(rng, "102", 48, unsorted=True),
               _record(rng, "103", 36, overshoot=True, width=500, height=375),
               _record(rng, "train/COCO_train2014_000000000205", 37),
               _record(rng, "105", 12), _record(rng, "106", 8)]
    with FeatureStoreWriter(root, feature_dim=DIM, detector={"name": "test", "config_hash": "abc123"}) as writer:
        for record in records:
            writer.add(record)
    return root


def _reader_view(record: FeatureRecord, keep=None):
    """The store's arrays as readers get them: store order (the detector's), the first
    ``keep``, boxes clipped to the image."""
    limits = np.array([record.image_w, record.image_h] * 2, dtype=np.float32)
    out = {name: getattr(record, name)[:keep] for name in record.present_fields()}
    out["boxes"] = np.clip(out["boxes"], 0, limits)
    return out


def _sidecar(path):
    return json.loads(path.read_text())


# -- LXMERT ------------------------------------------------------------------------------

LXMERT_FIELDNAMES = ["img_id", "img_h", "img_w", "objects_id", "objects_conf",
                     "attrs_id", "attrs_conf", "num_boxes", "boxes", "features"]


def lxmert_load_obj_tsv(fname):
    """airsplay/lxmert src/utils.py load_obj_tsv, step for step."""
    csv.field_size_limit(sys.maxsize)
    data = []
    with open(fname) as f:
        for item in csv.DictReader(f, LXMERT_FIELDNAMES, delimiter="\t"):
            for key in ["img_h", "img_w", "num_boxes"]:
                item[key] = int(item[key])
            boxes = item["num_boxes"]
            decode_config = [("objects_id", (boxes,), np.int64), ("objects_conf", (boxes,), np.float32),
                             ("attrs_id", (boxes,), np.int64), ("attrs_conf", (boxes,), np.float32),
                             ("boxes", (boxes, 4), np.float32), ("features", (boxes, -1), np.float32)]
            for key, shape, dtype in decode_config:
                item[key] = np.frombuffer(base64.b64decode(item[key]), dtype=dtype).reshape(shape)
                item[key].setflags(write=False)
            data.append(item)
    return data


def test_lxmert_tsv_reads_like_lxmert(store, tmp_path):
    out = tmp_path / "feats.tsv"
    stats = export(store, out, "lxmert-tsv", progress="off")
    assert (stats.exported, stats.skipped, stats.clipped_boxes) == (4, 2, 1)
    data = lxmert_load_obj_tsv(out)
    source = FeatureStore(store)
    assert [d["img_id"] for d in data] == ["101", "102", "103", "train/COCO_train2014_000000000205"]
    for item in data:
        record = source[item["img_id"]]
        assert (item["img_h"], item["img_w"]) == (record.image_h, record.image_w)  # h before w
        # LXMERT's task datasets (vqa_data.py, lxmert_pretrain.py): fixed 36 boxes, inside the image
        obj_num, feats, boxes = item["num_boxes"], item["features"].copy(), item["boxes"].copy()
        assert obj_num == len(boxes) == len(feats) == 36
        boxes[:, (0, 2)] /= item["img_w"]
        boxes[:, (1, 3)] /= item["img_h"]
        np.testing.assert_array_less(boxes, 1 + 1e-5)
        np.testing.assert_array_less(-boxes, 0 + 1e-5)
        want = _reader_view(record, 36)
        np.testing.assert_array_equal(item["features"], want["features"].astype(np.float32))
        np.testing.assert_array_equal(item["boxes"], want["boxes"])
        for name in ("objects_id", "objects_conf", "attrs_id", "attrs_conf"):
            np.testing.assert_array_equal(item[name], want[name])
        if record.image_id == "102":  # store order is kept even where confidences are not sorted
            assert not np.all(np.diff(item["objects_conf"]) <= 0)
    errors = [json.loads(line) for line in (tmp_path / "feats.tsv.errors.jsonl").read_text().splitlines()]
    assert {e["image_id"]: e["reason"] for e in errors} == {
        "105": "too few boxes: 12, the target needs at least 36",
        "106": "too few boxes: 8, the target needs at least 36"}
    sidecar = _sidecar(tmp_path / "feats.tsv.vlp-export.json")
    assert sidecar["complete"] and sidecar["format"] == "lxmert-tsv"
    assert sidecar["source"]["detector_config_hash"] == "abc123"
    assert sidecar["settings"] == {"num_boxes": 36}  # "auto": no detector config, LXMERT's 36
    assert sidecar["records"] == {"exported": 4, "skipped": 2, "clipped_boxes": 1}


def test_lxmert_tsv_round_trips_through_vlp_import(store, tmp_path):
    from vlp.pipeline.import_features import import_tsv

    export(store, tmp_path / "all.tsv", "lxmert-tsv", max_boxes=100, progress="off")
    import_tsv([tmp_path / "all.tsv"], tmp_path / "back", progress=False)
    source, back = FeatureStore(store), FeatureStore(tmp_path / "back")
    assert list(back.keys()) == list(source.keys())
    for record in source:
        want, got = _reader_view(record), back[record.image_id]
        assert (got.image_w, got.image_h) == (record.image_w, record.image_h)
        for name in ("boxes", "features", "objects_id", "objects_conf", "attrs_id", "attrs_conf"):
            np.testing.assert_array_equal(getattr(got, name), want[name])
        assert got.features.tobytes() == record.features.tobytes()  # float16 -> float32 -> float16 exact


# -- BUTD --------------------------------------------------------------------------------

BUTD_FIELDNAMES = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"]


def butd_read_tsv(fname):
    """bottom-up-attention-vqa tools/detection_features_converter.py's reading loop."""
    csv.field_size_limit(sys.maxsize)
    rows = []
    with open(fname, "r") as tsv_in_file:
        for item in csv.DictReader(tsv_in_file, delimiter="\t", fieldnames=BUTD_FIELDNAMES):
            item["num_boxes"] = int(item["num_boxes"])
            image_id = int(item["image_id"])
            image_w, image_h = float(item["image_w"]), float(item["image_h"])
            bboxes = np.frombuffer(base64.b64decode(item["boxes"]), dtype=np.float32).reshape((item["num_boxes"], -1))
            features = np.frombuffer(base64.b64decode(item["features"]),
                                     dtype=np.float32).reshape((item["num_boxes"], -1))
            rows.append((image_id, image_w, image_h, bboxes, features))
    return rows


@pytest.mark.parametrize("id_format, ids", [
    ("int", {101: "101", 102: "102", 103: "103", 105: "105", 106: "106"}),
    ("trailing-int", {101: "101", 102: "102", 103: "103", 205: "train/COCO_train2014_000000000205",
                      105: "105", 106: "106"}),
])
def test_butd_tsv_reads_like_butd(store, tmp_path, id_format, ids):
    out = tmp_path / "butd.tsv"
    stats = export(store, out, "butd-tsv", id_format=id_format, progress="off")
    source = FeatureStore(store)
    rows = butd_read_tsv(out)
    assert sorted(r[0] for r in rows) == sorted(ids)
    for image_id, image_w, image_h, bboxes, features in rows:
        record = source[ids[image_id]]
        assert (image_w, image_h) == (record.image_w, record.image_h)  # w before h
        assert bboxes.shape == (record.num_boxes, 4) and features.shape == (record.num_boxes, DIM)
        want = _reader_view(record)
        np.testing.assert_array_equal(bboxes, want["boxes"])
        np.testing.assert_array_equal(features, want["features"].astype(np.float32))
    if id_format == "int":
        assert stats.skipped == 1
        error = json.loads((tmp_path / "butd.tsv.errors.jsonl").read_text())
        assert error["image_id"] == "train/COCO_train2014_000000000205"
        assert "is not an integer" in error["reason"]
    else:
        assert stats.skipped == 0 and not (tmp_path / "butd.tsv.errors.jsonl").exists()


def test_butd_tsv_round_trips_through_vlp_import(store, tmp_path):
    from vlp.pipeline.import_features import import_tsv

    export(store, tmp_path / "b.tsv", "butd-tsv", id_format="trailing-int", progress="off")
    import_tsv([tmp_path / "b.tsv"], tmp_path / "back", layout="butd", progress=False)
    back = FeatureStore(tmp_path / "back")
    for record in FeatureStore(store):
        got = back[record.image_id if record.image_id.isdigit() else "205"]
        want = _reader_view(record)
        assert (got.image_w, got.image_h) == (record.image_w, record.image_h)
        np.testing.assert_array_equal(got.boxes, want["boxes"])
        np.testing.assert_array_equal(got.features, want["features"])


# -- VOLTA / ViLBERT multi-task ------------------------------------------------------------

def test_volta_lmdb_reads_like_volta_and_vilbert(store, tmp_path):
    out = tmp_path / "feats.lmdb"
    stats = export(store, out, "volta-lmdb", progress="off")
    assert (stats.exported, stats.skipped) == (6, 0)
    source = FeatureStore(store)
    env = lmdb.open(str(out), max_readers=1, readonly=True, lock=False, readahead=False, meminit=False)
    with env.begin(write=False) as txn:
        raw_keys = txn.get("keys".encode())
        image_ids = pickle.loads(raw_keys)
        assert image_ids == [k.encode() for k in source.keys()]
        for record in source:
            image_id = str(record.image_id).encode()
            index = image_ids.index(image_id)
            assert index >= 0
            raw = txn.get(image_id)
            # readable by Python 3.6's pickle (protocol <= 4), nothing numpy-specific inside
            ops = list(pickletools.genops(raw))
            assert ops[0][0].name == "PROTO" and ops[0][1] <= 4
            assert not [op for op in ops if op[0].name in ("GLOBAL", "STACK_GLOBAL", "REDUCE")]
            item = pickle.loads(raw)
            want = _reader_view(record)
            # VOLTA (volta/datasets/_image_features_reader.py)
            image_h, image_w = int(item["img_h"]), int(item["img_w"])
            features = np.frombuffer(base64.b64decode(item["features"]), dtype=np.float32).reshape(-1, DIM)
            boxes = np.frombuffer(base64.b64decode(item["boxes"]), dtype=np.float32).reshape(-1, 4)
            assert (image_w, image_h) == (record.image_w, record.image_h)
            np.testing.assert_array_equal(features, want["features"].astype(np.float32))
            np.testing.assert_array_equal(boxes, want["boxes"])
            location = boxes / np.array([image_w, image_h, image_w, image_h], dtype=np.float32)
            assert location.min() >= 0 and location.max() <= 1
            # ViLBERT multi-task (vilbert/datasets/_image_features_reader.py)
            assert item["image_id"] == (int(record.image_id) if record.image_id.isdigit() else record.image_id)
            assert (int(item["image_h"]), int(item["image_w"])) == (image_h, image_w)
            num_boxes = int(item["num_boxes"])
            np.frombuffer(base64.b64decode(item["features"]), dtype=np.float32).reshape(num_boxes, 2048)
            np.frombuffer(base64.b64decode(item["boxes"]), dtype=np.float32).reshape(num_boxes, 4)
    env.close()
    assert _sidecar(out / "vlp-export.json")["records"]["exported"] == 6


def test_volta_lmdb_round_trips_through_vlp_import(store, tmp_path):
    from vlp.pipeline.import_features import import_pickled_lmdb

    export(store, tmp_path / "v.lmdb", "volta-lmdb", progress="off")
    import_pickled_lmdb(tmp_path / "v.lmdb", tmp_path / "back", trust_pickle=True, progress=False)
    back = FeatureStore(tmp_path / "back")
    assert sorted(back.keys()) == sorted(FeatureStore(store).keys())
    for record in FeatureStore(store):
        got, want = back[record.image_id], _reader_view(record)
        assert (got.image_w, got.image_h) == (record.image_w, record.image_h)
        for name in ("boxes", "features", "objects_id", "objects_conf", "attrs_id", "attrs_conf"):
            np.testing.assert_array_equal(getattr(got, name), want[name])


# -- UNITER --------------------------------------------------------------------------------

def test_uniter_imgdb_reads_like_detect_feat_lmdb(store, tmp_path):
    import msgpack
    import msgpack_numpy
    import torch

    out = tmp_path / "img_db" / "coco_train2014"
    stats = export(store, out, "uniter-imgdb", progress="off")
    assert (stats.exported, stats.skipped) == (5, 1)
    assert "106" in (out / "errors.jsonl").read_text()
    # UNITER data/data.py DetectFeatLmdb(img_dir, conf_th=0.2, max_bb=100, min_bb=10, num_bb=36, compress=False)
    conf_th, max_bb, min_bb = 0.2, 100, 10
    db_name = f"feat_th{conf_th}_max{max_bb}_min{min_bb}"
    nbb = f"nbb_th{conf_th}_max{max_bb}_min{min_bb}.json"
    name2nbb = json.load(open(f"{out}/{nbb}"))
    env = lmdb.open(f"{out}/{db_name}", readonly=True, create=False, readahead=True)
    txn = env.begin(buffers=True)
    assert json.loads(bytes(txn.get(key=b"__keys__")).decode("utf-8")) == list(name2nbb)
    source = FeatureStore(store)
    for record in source:
        if record.image_id == "106":
            assert f"{record.image_id}.npz" not in name2nbb
            continue
        file_name = f"{record.image_id}.npz"
        want = _reader_view(record)
        expected_nbb = min(max_bb, max(min_bb, int((record.objects_conf > conf_th).sum())))
        assert name2nbb[file_name] == expected_nbb
        dump = txn.get(file_name.encode("utf-8"))
        img_dump = msgpack.loads(dump, raw=False, object_hook=msgpack_numpy.decode)  # = msgpack_numpy.patch()
        # __getitem__ and _get_img_feat
        img_feat = torch.tensor(img_dump["features"][:name2nbb[file_name], :]).float()
        bb = torch.tensor(img_dump["norm_bb"][:name2nbb[file_name], :]).float()
        img_bb = torch.cat([bb, bb[:, 4:5] * bb[:, 5:]], dim=-1)
        assert img_feat.shape == (expected_nbb, DIM) and img_bb.shape == (expected_nbb, 7)
        np.testing.assert_array_equal(img_feat.numpy(), want["features"][:expected_nbb].astype(np.float32))
        w, h = record.image_w, record.image_h
        b = want["boxes"][:expected_nbb].astype(np.float64)
        norm = np.stack([b[:, 0] / w, b[:, 1] / h, b[:, 2] / w, b[:, 3] / h, (b[:, 2] - b[:, 0]) / w,
                         (b[:, 3] - b[:, 1]) / h], 1)
        np.testing.assert_allclose(bb.numpy(), norm, atol=1e-3, rtol=1e-3)  # float16 storage
        # get_dump (MRC): every array cut to nbb, float16 -> float32; soft labels background first
        full = {k: arr.astype(np.float32) if arr.dtype == np.float16 else arr for k, arr in img_dump.items()}
        full = {k: arr[:name2nbb[file_name], ...] for k, arr in full.items()}
        assert set(full) == {"features", "norm_bb", "conf", "soft_labels"}
        soft = full["soft_labels"]
        assert soft.shape == (expected_nbb, 1601)
        probs = want["cls_prob"][:expected_nbb].astype(np.float32)
        np.testing.assert_array_equal(soft[:, 0], probs[:, -1])  # background
        np.testing.assert_array_equal(soft[:, 1:], probs[:, :-1])
        np.testing.assert_allclose(full["conf"], want["objects_conf"][:expected_nbb], rtol=1e-3)
        # UNITER's MRC target: argmax over the object columns, background excluded
        target = torch.max(torch.tensor(soft)[:, 1:], dim=-1)[1] + 1
        np.testing.assert_array_equal(target.numpy() - 1, probs[:, :-1].argmax(1))
    env.close()


def test_uniter_imgdb_settings_name_the_folder(store, tmp_path):
    out = tmp_path / "db"
    export(store, out, "uniter-imgdb", conf_th=0.5, max_boxes=20, min_boxes=5, key_suffix="",
           progress="off")
    name2nbb = json.loads((out / "nbb_th0.5_max20_min5.json").read_text())
    assert (out / "feat_th0.5_max20_min5" / "data.mdb").is_file()
    assert set(name2nbb) == set(FeatureStore(store).keys())
    assert max(name2nbb.values()) <= 20 and min(name2nbb.values()) >= 5


# -- MMF -----------------------------------------------------------------------------------

def test_mmf_npy_reads_like_mmf(store, tmp_path):
    out = tmp_path / "mmf"
    stats = export(store, out, "mmf-npy", progress="off")
    assert stats.exported == 6
    source = FeatureStore(store)
    max_loc = 100
    for record in source:
        image_feat_path = str(out / f"{record.image_id}.npy")
        # PaddedFasterRCNNFeatureReader._load / read
        image_info = {"features": np.load(image_feat_path, allow_pickle=True)}
        info_path = "{}_info.npy".format(image_feat_path.split(".npy")[0])
        # the pickle names numpy.core (numpy 1.x), never numpy._core (numpy 2 only), protocol 3
        raw = open(info_path, "rb").read()
        assert b"numpy._core" not in raw and b"numpy.core.multiarray" in raw
        with open(info_path, "rb") as handle:
            np.lib.format.read_magic(handle)
            np.lib.format.read_array_header_1_0(handle)
            ops = list(pickletools.genops(handle.read()))
        assert ops[0][0].name == "PROTO" and ops[0][1] == 3
        globals_ = {op[1] for op in ops if op[0].name == "GLOBAL"}
        assert globals_ <= {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
        image_info.update(np.load(info_path, allow_pickle=True).item())
        image_feature = image_info["features"]
        image_loc, image_dim = image_feature.shape
        tmp_image_feat = np.zeros((max_loc, image_dim), dtype=np.float32)
        tmp_image_feat[0:image_loc, ] = image_feature[:max_loc, :]
        want = _reader_view(record)
        assert image_feature.dtype == np.float32 and image_loc == record.num_boxes
        np.testing.assert_array_equal(tmp_image_feat[:image_loc], want["features"].astype(np.float32))
        assert not tmp_image_feat[image_loc:].any()
        np.testing.assert_array_equal(image_info["bbox"], want["boxes"])
        assert image_info["num_boxes"] == record.num_boxes
        assert (image_info["image_width"], image_info["image_height"]) == (record.image_w, record.image_h)
        np.testing.assert_array_equal(image_info["objects"], want["objects_id"])
        assert image_info["cls_prob"].shape == (record.num_boxes, 1600)  # no background column
        np.testing.assert_array_equal(image_info["cls_prob"], want["cls_prob"][:, :-1].astype(np.float32))
    assert (out / "train" / "COCO_train2014_000000000205_info.npy").is_file()


# -- the trainers' own environments -------------------------------------------------------------

_NUMPY1_READER = """
import base64, json, pickle, sys
import lmdb, numpy as np
assert int(np.__version__.split(".")[0]) == 1, np.__version__
out = {}
mmf, volta = sys.argv[1], sys.argv[2]
info = np.load(mmf + "/101_info.npy", allow_pickle=True).item()
out["mmf_bbox"] = info["bbox"].tolist()
out["mmf_cls_prob_sum"] = float(info["cls_prob"].sum())
out["mmf_features_sum"] = float(np.load(mmf + "/101.npy").sum())
env = lmdb.open(volta, readonly=True, lock=False)
with env.begin() as txn:
    keys = pickle.loads(txn.get(b"keys"))
    item = pickle.loads(txn.get(b"101"))
out["volta_keys"] = [k.decode() for k in keys]
out["volta_features_sum"] = float(np.frombuffer(base64.b64decode(item["features"]), dtype=np.float32).sum())
print(json.dumps(out))
"""


def test_exports_load_under_numpy_1(store, tmp_path):
    """MMF's and VOLTA's files load in a numpy 1.x interpreter (what those projects pin).

    Needs such an interpreter (numpy<2 and lmdb installed), named by VLP_NUMPY1_PYTHON; the
    pickletools checks above hold everywhere. Measured with numpy 1.24.4: a plain numpy-2
    ``np.save(dict)`` fails there with "No module named 'numpy._core'", these files load.
    """
    import os
    import subprocess

    python = os.environ.get("VLP_NUMPY1_PYTHON")
    if not python:
        pytest.skip("set VLP_NUMPY1_PYTHON to a Python with numpy<2 and lmdb to run this check")
    export(store, tmp_path / "mmf", "mmf-npy", progress="off")
    export(store, tmp_path / "v.lmdb", "volta-lmdb", progress="off")
    result = subprocess.run([python, "-c", _NUMPY1_READER, str(tmp_path / "mmf"), str(tmp_path / "v.lmdb")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    record = FeatureStore(store)["101"]
    np.testing.assert_array_equal(np.array(got["mmf_bbox"], dtype=np.float32), record.boxes)
    features = float(record.features.astype(np.float32).sum())
    assert got["mmf_features_sum"] == pytest.approx(features, rel=1e-5)
    assert got["volta_features_sum"] == pytest.approx(features, rel=1e-5)
    assert got["mmf_cls_prob_sum"] == pytest.approx(float(record.cls_prob[:, :-1].astype(np.float32).sum()), rel=1e-5)
    assert got["volta_keys"] == list(FeatureStore(store).keys())


def test_uniter_imgdb_compressed_reads_like_detect_feat_lmdb_default(store, tmp_path):
    """DetectFeatLmdb's own default (compress=True): the _compressed folder of npz values."""
    import io

    out = tmp_path / "img_db"
    export(store, out, "uniter-imgdb", compress=True, progress="off")
    name2nbb = json.load(open(f"{out}/nbb_th0.2_max100_min10.json"))
    env = lmdb.open(f"{out}/feat_th0.2_max100_min10_compressed", readonly=True, create=False)
    txn = env.begin(buffers=True)
    for record in FeatureStore(store):
        if record.image_id == "106":
            continue
        file_name = f"{record.image_id}.npz"
        nbb = name2nbb[file_name]
        dump = txn.get(file_name.encode("utf-8"))
        with io.BytesIO(dump) as reader:  # DetectFeatLmdb.__getitem__ with compress=True
            img_dump = np.load(reader, allow_pickle=True)
            img_dump = {"features": img_dump["features"], "norm_bb": img_dump["norm_bb"],
                        "soft_labels": img_dump["soft_labels"]}
        want = _reader_view(record, nbb)
        np.testing.assert_array_equal(img_dump["features"][:nbb].astype(np.float32),
                                      want["features"].astype(np.float32))
        assert img_dump["norm_bb"].shape == (nbb, 6) and img_dump["soft_labels"].shape == (nbb, 1601)
        np.testing.assert_array_equal(img_dump["soft_labels"][:, 0], want["cls_prob"][:, -1])
    env.close()
    assert not (out / "feat_th0.2_max100_min10").exists()


def test_mmf_npy_round_trips_through_vlp_import(store, tmp_path):
    from click.testing import CliRunner

    from vlp import cli

    export(store, tmp_path / "mmf", "mmf-npy", progress="off")
    result = CliRunner().invoke(cli.main, ["import", "mmf-npy", str(tmp_path / "mmf"), "-o", str(tmp_path / "back")])
    assert result.exit_code == 2 and "--trust-pickle" in result.output and not (tmp_path / "back").exists()
    result = CliRunner().invoke(cli.main, ["import", "mmf-npy", str(tmp_path / "mmf"), "-o", str(tmp_path / "back"),
                                           "--trust-pickle"])
    assert result.exit_code == 0, result.output
    back = FeatureStore(tmp_path / "back")
    assert sorted(back.keys()) == sorted(FeatureStore(store).keys())
    for record in FeatureStore(store):
        got, want = back[record.image_id], _reader_view(record)
        assert (got.image_w, got.image_h) == (record.image_w, record.image_h)
        np.testing.assert_array_equal(got.boxes, want["boxes"])
        assert got.features.tobytes() == record.features.tobytes()
        # MMF drops the background column; it comes back as 1 - the rest (float16 storage)
        np.testing.assert_array_equal(got.cls_prob[:, :-1], record.cls_prob[:, :-1])
        np.testing.assert_allclose(got.cls_prob[:, -1].astype(np.float32),
                                   record.cls_prob[:, -1].astype(np.float32), atol=2e-3)
        assert got.objects_id is None  # MMF keeps no confidences or attributes
