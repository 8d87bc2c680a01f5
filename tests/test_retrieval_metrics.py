"""Retrieval metrics (vlp.trainer.metrics) against a brute-force reference: every ranking
is re-done by sorting with ties broken against the true match, on random score matrices
with many ties and images with one to five captions."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from vlp.trainer.metrics import (coco_retrieval_metrics, retrieval_fold_metrics, retrieval_metrics,
                                 retrieval_ranks)


def brute_force(scores, text_image, ks=(1, 5, 10)):
    """Sort candidates by score, wrong ones first among equals (pessimistic), and read ranks."""
    n_texts, n_images = len(scores), len(scores[0])
    out = {}
    ir = []
    for t in range(n_texts):
        order = sorted(range(n_images), key=lambda j: (-scores[t][j], j == text_image[t]))
        ir.append(order.index(text_image[t]) + 1)
    tr = []
    for i in range(n_images):
        order = sorted(range(n_texts), key=lambda t: (-scores[t][i], text_image[t] == i))
        tr.append(min(pos + 1 for pos, t in enumerate(order) if text_image[t] == i))
    for k in ks:
        out[f"ir_r{k}"] = sum(r <= k for r in ir) / n_texts
    for k in ks:
        out[f"tr_r{k}"] = sum(r <= k for r in tr) / n_images
    return ir, tr, out


def random_case(rng, n_images, levels):
    captions = rng.integers(1, 6, n_images)
    text_image = np.repeat(np.arange(n_images), captions)
    rng.shuffle(text_image)
    scores = rng.integers(0, levels, (len(text_image), n_images)).astype(np.float64)  # few levels: many ties
    return scores, text_image


@pytest.mark.parametrize("seed", range(20))
def test_ranks_and_recalls_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    scores, text_image = random_case(rng, int(rng.integers(2, 30)), int(rng.integers(2, 6)))
    ir, tr, expected = brute_force(scores.tolist(), text_image.tolist())
    ir_rank, tr_rank = retrieval_ranks(scores, text_image)
    assert ir_rank.tolist() == ir and tr_rank.tolist() == tr
    got = retrieval_metrics(scores, text_image)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
    assert got["r_mean"] == pytest.approx(np.mean(list(expected.values())))
    assert got["n_texts"] == len(text_image) and got["n_images"] == scores.shape[1]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_brute_force_agreement_property(n_images, levels, seed):
    scores, text_image = random_case(np.random.default_rng(seed), n_images, levels)
    ir, tr, _ = brute_force(scores.tolist(), text_image.tolist())
    ir_rank, tr_rank = retrieval_ranks(scores, text_image)
    assert ir_rank.tolist() == ir and tr_rank.tolist() == tr


def test_hand_worked_example_with_ties_and_two_captions():
    # texts 0, 1 -> image 0; text 2 -> image 1; text 3 -> image 2
    scores = np.array([[0.9, 0.9, 0.1],   # tie with image 1: rank 2 (pessimistic)
                       [0.5, 0.2, 0.1],   # rank 1
                       [0.3, 0.3, 0.3],   # constant: rank 3
                       [0.0, 0.1, 0.2]])  # rank 1
    ir_rank, tr_rank = retrieval_ranks(scores, np.array([0, 0, 1, 2]))
    assert ir_rank.tolist() == [2, 1, 3, 1]
    # image 0: best caption 0.9, no other text >= 0.9 -> 1; image 1: its caption 0.3, beaten by
    # text 0 (0.9) -> 2; image 2: its caption 0.2, beaten by text 2 (0.3) -> 2
    assert tr_rank.tolist() == [1, 2, 2]
    m = retrieval_metrics(scores, np.array([0, 0, 1, 2]), ks=(1, 2))
    assert (m["ir_r1"], m["ir_r2"], m["tr_r1"], m["tr_r2"]) == (0.5, 0.75, pytest.approx(1 / 3), 1.0)
    assert m["r_mean"] == pytest.approx((0.5 + 0.75 + 1 / 3 + 1.0) / 4)


def test_constant_scorer_gets_nothing_right():
    m = retrieval_metrics(np.zeros((10, 10)), np.arange(10))
    assert m["ir_r1"] == 0.0 and m["tr_r1"] == 0.0 and m["ir_mean_rank"] == 10.0


def test_coco_1k_is_the_mean_over_five_folds():
    rng = np.random.default_rng(0)
    n = 5000
    text_image = np.repeat(np.arange(n), 2)
    scores = rng.standard_normal((2 * n, n)).astype(np.float32)
    scores[np.arange(2 * n), text_image] += 3.0
    out = coco_retrieval_metrics(scores, text_image)
    folds = [retrieval_metrics(scores[2000 * f:2000 * (f + 1), 1000 * f:1000 * (f + 1)],
                               text_image[2000 * f:2000 * (f + 1)] - 1000 * f) for f in range(5)]
    assert out["1k"]["folds"] == 5 and out["1k"]["n_images"] == 1000
    for key in ("ir_r1", "ir_r5", "tr_r1", "tr_r10", "r_mean"):
        assert out["1k"][key] == pytest.approx(np.mean([f[key] for f in folds]))
    assert out["5k"]["n_images"] == 5000
    assert out["5k"]["ir_r1"] < out["1k"]["ir_r1"]  # 5x the distractors


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[np.nan]]), np.array([0]))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(ValueError, match="folds of 1000"):
        retrieval_fold_metrics(np.zeros((3, 3)), np.array([0, 1, 2]))
