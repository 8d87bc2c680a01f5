"""BUTD and HF-demo box selection on hand-constructed scores (no network involved)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlp.detectors.postprocess import (_fixed_point_nms, agnostic_loop_select, butd_select, max_conf_after_nms,
                                       per_class_nms_keep, select_by_confidence)


def disjoint_boxes(n):
    """n non-overlapping 10x10 boxes on a row."""
    x = torch.arange(n, dtype=torch.float32) * 20
    return torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], dim=1)


def scores_with_best(best, num_classes=5):
    """[R, C] class scores whose row maxima are ``best`` (class r % C), others tiny."""
    best = torch.as_tensor(best, dtype=torch.float32)
    s = torch.full((best.numel(), num_classes), 0.001)
    s[torch.arange(best.numel()), torch.arange(best.numel()) % num_classes] = best
    return s


def test_per_class_nms_and_max_conf_by_hand():
    boxes = torch.tensor([[0, 0, 10, 10],     # A
                          [1, 0, 11, 10],     # B: IoU(A, B) = 90/110 = 0.82
                          [20, 20, 30, 30],   # C: disjoint
                          [0, 0, 10, 4]],     # D: IoU(A, D) = 40/100 = 0.40, IoU(B, D) = 36/104 = 0.35
                         dtype=torch.float32)
    scores = torch.tensor([[0.90, 0.10, 0.00],
                           [0.80, 0.95, 0.00],
                           [0.50, 0.05, 0.00],
                           [0.70, 0.60, 0.30]])
    keep = per_class_nms_keep(boxes, scores, 0.3)
    # class 0: A first; suppresses B (0.82) and D (0.40 > 0.3); C survives.
    # class 1: B first; suppresses A (0.82) and D (0.35); C survives.
    # class 2: D first (0.30); everything else scores 0 but survives unless it overlaps D:
    #          A (0.40) and B (0.35) are suppressed, C survives.
    expected = torch.tensor([[True, False, False],
                             [False, True, False],
                             [True, True, True],
                             [False, False, True]])
    assert torch.equal(keep, expected)
    max_conf = max_conf_after_nms(boxes, scores, 0.3)
    assert torch.allclose(max_conf, torch.tensor([0.90, 0.95, 0.50, 0.30]))
    # At NMS 0.5 D survives class 0 (IoU 0.40 with A) and keeps its 0.70.
    assert torch.allclose(max_conf_after_nms(boxes, scores, 0.5), torch.tensor([0.90, 0.95, 0.50, 0.70]))


def test_nms_threshold_is_strict_and_iou_has_no_plus_one():
    # IoU exactly 0.5: [0,0,10,10] vs [0,0,10,5] -> 50 / 100. Suppression needs IoU > threshold.
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 5]], dtype=torch.float32)
    scores = torch.tensor([[0.9], [0.8]])
    assert per_class_nms_keep(boxes, scores, 0.5)[:, 0].tolist() == [True, True]
    assert per_class_nms_keep(boxes, scores, 0.49)[:, 0].tolist() == [True, False]


def test_floor_of_ten_boxes():
    conf = [0.9, 0.5, 0.3, 0.25, 0.21] + [0.1 - 0.005 * i for i in range(10)]
    boxes = disjoint_boxes(len(conf))
    keep, max_conf = butd_select(boxes, scores_with_best(conf), nms_threshold=0.3, score_threshold=0.2,
                                 min_boxes=10, max_boxes=100)
    assert keep.tolist() == list(range(10))  # 5 pass the threshold, topped up to 10 by score
    assert torch.allclose(max_conf, torch.tensor(conf))


def test_cap_of_hundred_boxes_sorted_by_score():
    conf = torch.linspace(0.25, 0.95, 150)[torch.randperm(150, generator=torch.Generator().manual_seed(0))]
    keep, _ = butd_select(disjoint_boxes(150), scores_with_best(conf), nms_threshold=0.3,
                          score_threshold=0.2, min_boxes=10, max_boxes=100)
    assert keep.numel() == 100
    kept = conf[keep]
    assert torch.all(kept[:-1] >= kept[1:])
    assert torch.equal(torch.sort(kept, descending=True).values, torch.sort(conf, descending=True).values[:100])


def test_between_floor_and_cap_keeps_exactly_those_above_threshold():
    conf = torch.cat([torch.linspace(0.2, 0.9, 30), torch.linspace(0.01, 0.19, 20)])
    conf = conf[torch.randperm(50, generator=torch.Generator().manual_seed(1))]
    keep, _ = butd_select(disjoint_boxes(50), scores_with_best(conf), nms_threshold=0.3,
                          score_threshold=0.2, min_boxes=10, max_boxes=100)
    assert keep.numel() == 30  # 0.2 itself passes (>=)
    assert torch.all(conf[keep] >= 0.2)
    assert torch.all(conf[keep][:-1] >= conf[keep][1:])


def test_suppressed_boxes_lose_their_score():
    # Ten copies of one box: per-class NMS keeps one per class, so max_conf of the others
    # comes only from classes where they survive; here they survive nowhere (one class).
    boxes = torch.tensor([[0, 0, 10, 10]] * 10 + [[50, 50, 60, 60]], dtype=torch.float32)
    scores = torch.tensor([[0.9 - 0.01 * i] for i in range(10)] + [[0.3]])
    keep, max_conf = butd_select(boxes, scores, nms_threshold=0.3, score_threshold=0.2,
                                 min_boxes=2, max_boxes=100)
    assert max_conf[1:10].eq(0).all()
    assert keep.tolist() == [0, 10]


def test_exactly_36():
    for passing in (5, 36, 60):
        conf = torch.cat([torch.linspace(0.3, 0.9, passing), torch.full((80 - passing,), 0.05)])
        keep, _ = butd_select(disjoint_boxes(80), scores_with_best(conf), nms_threshold=0.3,
                              score_threshold=0.2, min_boxes=36, max_boxes=36)
        assert keep.numel() == 36
    # Fewer RoIs than the floor: all of them.
    assert select_by_confidence(torch.rand(7), 0.2, 36, 36).numel() == 7


def test_ties_are_broken_by_proposal_rank():
    conf = torch.tensor([0.5, 0.7, 0.5, 0.7, 0.5])
    assert select_by_confidence(conf, 0.2, 1, 100).tolist() == [1, 3, 0, 2, 4]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sweep_matrix_and_loop_nms_agree(seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(120, 2, generator=g) * 200
    wh = torch.rand(120, 2, generator=g) * 80 + 1
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes = torch.cat([boxes, boxes[:15]])  # exact duplicates: equal scores below
    scores = torch.rand(120, 40, generator=g) ** 3
    scores = torch.cat([scores, scores[:15]])
    scores[:, 3] = 0.25  # one class where every score ties
    for threshold in (0.3, 0.7):
        loop = per_class_nms_keep(boxes, scores, threshold, method="loop")
        matrix = per_class_nms_keep(boxes, scores, threshold, method="matrix")
        sweep = per_class_nms_keep(boxes, scores, threshold, method="sweep")
        assert torch.equal(loop, matrix) and torch.equal(loop, sweep)
        assert torch.equal(per_class_nms_keep(boxes, scores, threshold), sweep)  # the CPU default
        # the GPU settings: float16 work tensors, all classes in one chunk / tiny chunks
        half = _fixed_point_nms(boxes, scores, threshold, max_elements=1 << 28, work_dtype=torch.float16)
        tiny = _fixed_point_nms(boxes, scores, threshold, max_elements=1)
        assert torch.equal(loop, half) and torch.equal(loop, tiny)


coordinate = st.integers(0, 12).map(float)  # a coarse grid: touching, nested, equal and empty boxes


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(coordinate, coordinate, coordinate, coordinate), min_size=1, max_size=12),
       st.data(), st.sampled_from([0.0, 0.3, 0.5, 0.7]))
def test_sweep_and_matrix_equal_one_nms_per_class_on_any_boxes(corners, data, threshold):
    boxes = torch.tensor([[min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)] for x0, y0, x1, y1 in corners])
    classes = data.draw(st.integers(1, 4))
    levels = st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0])  # few values: many ties
    scores = torch.tensor(data.draw(st.lists(st.lists(levels, min_size=classes, max_size=classes),
                                             min_size=len(corners), max_size=len(corners))))
    loop = per_class_nms_keep(boxes, scores, threshold, method="loop")
    assert torch.equal(per_class_nms_keep(boxes, scores, threshold, method="sweep"), loop)
    assert torch.equal(per_class_nms_keep(boxes, scores, threshold, method="matrix"), loop)
    assert torch.equal(max_conf_after_nms(boxes, scores, threshold, method="sweep"),
                       max_conf_after_nms(boxes, scores, threshold, method="loop"))
    assert torch.equal(max_conf_after_nms(boxes, scores, threshold), every_class_max_conf(boxes, scores, threshold))


def every_class_max_conf(boxes, scores, threshold):
    """generate_tsv's max_conf with one NMS for every class, zero-scoring ones included."""
    keep = per_class_nms_keep(boxes, scores, threshold, method="loop")
    return torch.where(keep, scores.float(), torch.zeros(())).amax(dim=1).clamp_min(0.0)


def test_classes_scoring_zero_everywhere_leave_max_conf_and_the_selection_unchanged():
    # a class-subset checkpoint: 8 live classes of 1,600, the rest exactly 0 after the softmax
    g = torch.Generator().manual_seed(5)
    xy = torch.rand(60, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + torch.rand(60, 2, generator=g) * 80 + 1], dim=1)
    logits = torch.full((60, 1601), -1e4)
    live = torch.tensor([719, 848, 917, 1090, 1114, 1269, 1533, 1594])
    logits[:, live] = torch.randn(60, 8, generator=g) * 3
    logits[:, -1] = torch.randn(60, generator=g) * 3  # background
    scores = torch.softmax(logits, dim=-1)[:, :-1]
    assert int((scores != 0).any(dim=0).sum()) == 8
    expected = every_class_max_conf(boxes, scores, 0.3)
    assert torch.equal(max_conf_after_nms(boxes, scores, 0.3), expected)
    keep, max_conf = butd_select(boxes, scores, nms_threshold=0.3, score_threshold=0.2, min_boxes=10, max_boxes=36)
    assert torch.equal(max_conf, expected)
    assert torch.equal(keep, select_by_confidence(expected, 0.2, 10, 36))
    # no live class at all: every max_conf is 0
    assert torch.equal(max_conf_after_nms(boxes, torch.zeros(60, 1600), 0.3), torch.zeros(60))


def test_unknown_nms_method_is_refused():
    with pytest.raises(ValueError, match="per-class NMS method"):
        per_class_nms_keep(disjoint_boxes(2), scores_with_best([0.5, 0.5]), 0.3, method="fast")


def test_agnostic_loop_stops_at_first_threshold_with_enough_boxes():
    # Three clusters of 20 near-identical boxes: NMS below ~0.9 IoU leaves one box per cluster.
    base = torch.tensor([[0, 0, 100, 100], [200, 0, 300, 100], [0, 200, 100, 300]], dtype=torch.float32)
    boxes = torch.cat([base + i * 0.5 for i in range(20)])
    scores = torch.linspace(1.0, 0.1, 60)
    keep = agnostic_loop_select(boxes, scores, nms_thresholds=(0.3, 0.5, 0.999), score_threshold=0.0,
                                min_boxes=10, max_boxes=36)
    assert keep.numel() == 36
    assert keep.tolist() == list(range(36))  # at 0.999 nothing overlaps that much: best 36 by score
    keep = agnostic_loop_select(boxes, scores, nms_thresholds=(0.3, 0.5), score_threshold=0.0,
                                min_boxes=3, max_boxes=36)
    assert keep.tolist() == [0, 1, 2]  # one per cluster already at 0.3


def test_agnostic_loop_tops_up_instead_of_reusing_stale_boxes():
    base = torch.tensor([[0, 0, 100, 100], [200, 0, 300, 100]], dtype=torch.float32)
    boxes = torch.cat([base + i * 0.5 for i in range(20)])
    scores = torch.linspace(1.0, 0.1, 40)
    keep = agnostic_loop_select(boxes, scores, nms_thresholds=(0.3, 0.5), score_threshold=0.0,
                                min_boxes=36, max_boxes=36)
    assert keep.numel() == 36 and len(set(keep.tolist())) == 36
    assert keep[:2].tolist() == [0, 1]  # the NMS survivors first, then the best remaining RoIs
    assert keep[2:].tolist() == list(range(2, 36))
    # Fewer RoIs than wanted: all of them, once each.
    keep = agnostic_loop_select(boxes[:5], scores[:5], nms_thresholds=(0.3,), score_threshold=0.0,
                                min_boxes=36, max_boxes=36)
    assert sorted(keep.tolist()) == [0, 1, 2, 3, 4]
