"""vlp-build hard-negatives: exact blocked top-M cosine search equals a brute-force numpy result."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from vlp.builders.hard_negatives import build_hard_negatives, mean_features, top_similar
from vlp.cli import build_main
from vlp.schemas import FeatureRecord, FeatureStoreWriter
from vlp.schemas.pairs import PairStore, PairStoreWriter


def brute_force(vectors, m, exclude=None):
    x = vectors.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    for row, others in (exclude or {}).items():
        s[row, others] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :m]
    return order, np.take_along_axis(s, order, 1)


def clustered(n, d, seed):
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.standard_normal((max(2, n // 8), d)))
    return np.abs(centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, d))).astype(np.float32)


@pytest.mark.parametrize("precision, block, candidates", [("fp32", 7, None), ("fp32", 1000, None),
                                                          ("bf16", 16, None), ("bf16", 50, 6)])
def test_top_similar_equals_brute_force(precision, block, candidates):
    vectors = clustered(150, 32, seed=1)
    exclude = {0: np.array([1, 2]), 5: np.array([149])}
    indices, scores, info = top_similar(vectors, 5, block=block, precision=precision, candidates=candidates,
                                        exclude=exclude, device="cpu")
    want_idx, want_scores = brute_force(vectors, 5, exclude)
    np.testing.assert_allclose(scores, want_scores, atol=2e-6)
    assert (indices == want_idx).mean() > 0.99  # equal up to exact ties
    assert not np.any(indices == np.arange(150)[:, None])
    assert not set(indices[0]) & {1, 2} and 149 not in indices[5]
    if candidates == 6:
        assert info["rows_recomputed_fp32"] > 0  # few candidates: the certificate sends rows to fp32


def test_fewer_images_than_m_pads():
    vectors = clustered(4, 8, seed=2)
    indices, scores, _ = top_similar(vectors, 6, device="cpu")
    assert (indices[:, 3:] == -1).all() and np.isnan(scores[:, 3:]).all()
    assert sorted(indices[0, :3]) == [1, 2, 3]


def write_features(root, vectors, regions=3, seed=0):
    rng = np.random.default_rng(seed)
    with FeatureStoreWriter(root, storage="arrow", feature_dim=vectors.shape[1], shard_size=20) as writer:
        for k, v in enumerate(vectors):
            feats = np.repeat(v[None], regions, 0) + rng.standard_normal((regions, len(v))) * 0.05
            writer.add(FeatureRecord.from_arrays(f"im{k:03d}", 50, 50, boxes=np.tile([0, 0, 10, 10], (regions, 1)),
                                                 features=np.abs(feats).astype(np.float32)))


def test_build_hard_negatives_with_caption_exclusion(tmp_path):
    vectors = clustered(60, 16, seed=3)
    write_features(tmp_path / "f", vectors)
    ids, means = mean_features(tmp_path / "f")
    assert ids[0] == "im000" and means.dtype == np.float32
    with PairStoreWriter(tmp_path / "c", "caption") as writer:
        writer.add({"pair_id": "a", "image_id": "im000", "text": "A red  circle"})
        writer.add({"pair_id": "b", "image_id": "im001", "text": "a red circle"})
        writer.add({"pair_id": "c", "image_id": "im001", "text": "something else"})
        writer.add({"pair_id": "d", "image_id": "im002", "text": "unique"})
    result = build_hard_negatives(tmp_path / "f", tmp_path / "h", top_m=4, captions=tmp_path / "c", progress="off")
    want_idx, want_scores = brute_force(means, 4, {0: np.array([1]), 1: np.array([0])})
    store = PairStore(tmp_path / "h")
    assert len(store) == 60 and result.stats["images_with_caption_exclusions"] == 2
    for k, pair in enumerate(store):
        assert pair["image_id"] == ids[k] and pair["text"] == ""
        assert pair["negatives"] == [ids[j] for j in want_idx[k]]
        np.testing.assert_allclose(pair["negative_scores"], want_scores[k], atol=2e-6)
    assert "im001" not in store[0]["negatives"]


def test_cli_hard_negatives(tmp_path):
    write_features(tmp_path / "f", clustered(30, 8, seed=4))
    runner = CliRunner()
    assert "--top-m" in runner.invoke(build_main, ["hard-negatives", "--help"]).output
    result = runner.invoke(build_main, ["hard-negatives", str(tmp_path / "f"), "--out", str(tmp_path / "h"),
                                        "--top-m", "3", "--precision", "bf16", "--progress", "off"])
    assert result.exit_code == 0, result.output
    assert "Wrote 30 hard_negatives pairs" in result.output
    ids, means = mean_features(tmp_path / "f")
    want_idx, _ = brute_force(means, 3)
    assert [p["negatives"] for p in PairStore(tmp_path / "h")] == [[ids[j] for j in row] for row in want_idx]


def test_progress_counts_each_pass_over_the_images_and_splits_from(tmp_path, capsys):
    store = tmp_path / "f"
    vectors = clustered(60, 8, seed=3)
    with FeatureStoreWriter(store, storage="arrow", feature_dim=8) as writer:
        for i, v in enumerate(vectors):
            writer.add(FeatureRecord.from_arrays(f"img{i}", 10, 10, boxes=np.zeros((1, 4), np.float32),
                                                 features=v[None]))
    (tmp_path / "splits.json").write_text(json.dumps({f"img{i}": "val" if i < 6 else "train" for i in range(59)}))
    result = build_hard_negatives(store, tmp_path / "hn", top_m=3, progress="lines", device="cpu",
                                  splits_from=tmp_path / "splits.json", split="train")
    err = capsys.readouterr().err
    assert "hard-negatives: read: 60/60 img (100%)" in err and "hard-negatives: search: 60/60 img (100%)" in err
    assert "120" not in err
    splits = [p["split"] for p in PairStore(tmp_path / "hn")]
    assert splits.count("val") == 6 and splits.count("train") == 54
    assert result.stats["images_without_split"] == 1
