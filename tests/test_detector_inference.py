"""End-to-end detector runs on CPU with random weights: records, batching, given boxes, colour order.

Most tests use a slim variant of the same architecture (same code, 1 block per stage,
narrow widths) so they run in seconds; one test runs the full ResNet-101.
"""

import dataclasses
import json
import pickle

import cv2
import numpy as np
import pytest
import torch

from vlp.detectors import load_detector
from vlp.detectors.config import DetectorConfigError, apply_overrides, parse_setting_pairs
from vlp.detectors.inference import mirror_boxes, prepare_image
from vlp.detectors.model import apply_deltas, clip_boxes
from vlp.detectors.postprocess import butd_select
from vlp.schemas import FeatureRecord

SLIM = dict(blocks=(1, 1, 1, 1), stem_channels=8, res2_channels=32, bottleneck_channels=8, rpn_channels=32,
            cls_embedding_dim=16, attr_hidden_dim=32)
SMALL = dict(min_size=128, max_size=224)
# Batched vs one-at-a-time (the stated tolerance): boxes within 1e-3 px, float32 features
# within 1e-4 (relative to their largest magnitude), stored float16 features within 1e-2.
BOX_ATOL = 1e-3
FEATURE_RTOL = 1e-4


def scene(height, width, seed):
    """A synthetic photo: smooth background and a few filled shapes."""
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 4)
    for _ in range(4):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        if rng.random() < 0.5:
            cv2.circle(image, (x, y), int(rng.integers(5, max(6, min(height, width) // 3))), colour, -1)
        else:
            cv2.rectangle(image, (x, y), (x + int(rng.integers(5, width // 2)), y + int(rng.integers(5, height // 2))),
                          colour, -1)
    return image


IMAGES = [scene(120, 200, 0), scene(150, 100, 1), scene(97, 131, 2), scene(60, 240, 3)]


@pytest.fixture(scope="module")
def slim():
    return load_detector(allow_random=True, seed=1, **SLIM, **SMALL)


def assert_records_close(a: FeatureRecord, b: FeatureRecord, feature_atol=1e-2):
    assert (a.image_id, a.image_w, a.image_h, a.num_boxes) == (b.image_id, b.image_w, b.image_h, b.num_boxes)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=BOX_ATOL, rtol=0)
    np.testing.assert_allclose(a.features.astype(np.float32), b.features.astype(np.float32), atol=feature_atol,
                               rtol=1e-3)
    assert np.array_equal(a.objects_id, b.objects_id) and np.array_equal(a.attrs_id, b.attrs_id)


def test_records_are_valid_and_follow_the_rules(slim):
    records = slim.detect(IMAGES, image_ids=["a", "b", "c", "d"])
    assert [r.image_id for r in records] == ["a", "b", "c", "d"]
    for image, record in zip(IMAGES, records):
        record.validate(256)
        assert (record.image_h, record.image_w) == image.shape[:2]
        assert 10 <= record.num_boxes <= 100
        assert record.features.dtype == np.float16 and record.features.shape[1] == 256
        assert record.cls_prob is None  # with_probs=False by default
        assert np.all(record.boxes[:, [0, 2]] <= image.shape[1]) and np.all(record.boxes[:, [1, 3]] <= image.shape[0])
    # Random weights give flat class scores: at 0.2 only the floor of 10 boxes is kept ...
    assert [r.num_boxes for r in records] == [10] * len(IMAGES)
    # ... a lower threshold lets more through, up to the cap.
    low = load_detector(allow_random=True, seed=1, score_threshold=0.02, **SLIM, **SMALL)
    counts = [r.num_boxes for r in low.detect(IMAGES)]
    assert all(10 <= n <= 100 for n in counts) and max(counts) > 10


def test_batched_equals_one_at_a_time(slim):
    single = [slim.detect([im], image_ids=[str(i)])[0] for i, im in enumerate(IMAGES)]
    batched = slim.detect(IMAGES, batch_size=4)
    for a, b in zip(single, batched):
        assert_records_close(a, b)
    # float32 features before storage, for the stated tolerance
    prepared = [prepare_image(im, slim.detector_config) for im in IMAGES]
    alone = [slim._detect_prepared([p])[0] for p in prepared]
    together = slim._detect_prepared(prepared)
    for a, b in zip(alone, together):
        assert torch.allclose(a["boxes"], b["boxes"], atol=BOX_ATOL, rtol=0)
        scale = float(a["features"].abs().max())
        assert float((a["features"] - b["features"]).abs().max()) <= FEATURE_RTOL * scale


def test_prepared_images_in_aspect_buckets_come_back_in_order(slim):
    prepared = [pickle.loads(pickle.dumps(slim.prepare(im))) for im in IMAGES]  # e.g. from a CPU worker
    records = slim.detect_prepared(prepared, image_ids=["p0", "p1", "p2", "p3"], batch_size=2)
    direct = slim.detect(IMAGES, image_ids=["p0", "p1", "p2", "p3"], batch_size=1)
    for a, b in zip(records, direct):
        assert_records_close(a, b)
    with pytest.raises(ValueError, match="image_ids"):
        slim.detect_prepared(prepared, image_ids=["a"])


def test_backbone_ignores_batch_neighbours(slim):
    """The padded region never leaks into an image's features (exact up to kernel rounding)."""
    prepared = [prepare_image(im, slim.detector_config) for im in IMAGES[:2]]
    backbone = slim.model.backbone
    sizes = [p.size for p in prepared]
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    batch = torch.zeros(2, 3, h, w)
    for i, p in enumerate(prepared):
        batch[i, :, : p.size[0], : p.size[1]] = p.tensor
    with torch.inference_mode():
        together, _ = backbone(batch.contiguous(memory_format=torch.channels_last), sizes)
        # Garbage in the padding must not matter either.
        noisy = batch.clone()
        noisy[0, :, prepared[0].size[0]:, :] = 1000.0
        noisy[1, :, :, prepared[1].size[1]:] = -1000.0
        with_noise, _ = backbone(noisy.contiguous(memory_format=torch.channels_last), sizes)
        for i, p in enumerate(prepared):
            alone, _ = backbone(p.tensor[None].contiguous(memory_format=torch.channels_last))
            fh, fw = alone.shape[-2:]
            scale = float(alone.abs().max())
            assert float((together[i, :, :fh, :fw] - alone[0]).abs().max()) <= FEATURE_RTOL * scale
            outside = together[i].clone()
            outside[:, :fh, :fw] = 0
            assert float(outside.abs().max()) == 0.0  # the padding is zero at res4 too
    # Whatever the padding holds, it is zeroed before the first conv.
    assert torch.equal(with_noise, together)


def test_masks_follow_strides_in_the_3x3_variant():
    """detectron2's torchvision-style ResNet (stride on the 3x3 conv) batches exactly too."""
    det = load_detector(allow_random=True, seed=2, stride_in_1x1=False, res5_dilation=1, **SLIM, **SMALL)
    single = [det.detect([im], image_ids=[str(i)])[0] for i, im in enumerate(IMAGES[:3])]
    for a, b in zip(single, det.detect(IMAGES[:3], batch_size=3)):
        assert_records_close(a, b)


def test_res4_at_stride_8_is_the_stride_16_network_on_a_twice_denser_grid(slim):
    """res4_dilation=2 with the same weights: at every even res4 cell the features and the
    RPN outputs are those of stride 16 (the a trous identity; float rounding only)."""
    dense = load_detector(allow_random=True, seed=1, res4_dilation=2, feature_stride=8, **SLIM, **SMALL)
    dense.model.load_state_dict(slim.model.state_dict())
    prepared = prepare_image(IMAGES[0], slim.detector_config)
    x = prepared.tensor[None]
    with torch.inference_mode():
        coarse, _ = slim.model.backbone(x)
        fine, _ = dense.model.backbone(x)
        assert tuple(fine.shape[-2:]) == dense.model.backbone.feature_size(*prepared.size)
        assert tuple(coarse.shape[-2:]) == slim.model.backbone.feature_size(*prepared.size)
        assert fine[..., ::2, ::2].shape == coarse.shape
        scale = float(coarse.abs().max())
        assert float((fine[..., ::2, ::2] - coarse).abs().max()) <= 1e-5 * scale
        coarse_logits, coarse_deltas = slim.model.proposal_generator.rpn_head(coarse)
        fine_logits, fine_deltas = dense.model.proposal_generator.rpn_head(fine)
    np.testing.assert_allclose(fine_logits[..., ::2, ::2], coarse_logits, atol=1e-4)
    np.testing.assert_allclose(fine_deltas[..., ::2, ::2], coarse_deltas, atol=1e-4)
    # Anchors follow the denser grid: cell (i, j) sits at (8j, 8i).
    anchors = dense.model.proposal_generator.anchor_generator.grid_anchors(2, 3)
    cell = dense.model.proposal_generator.anchor_generator.cell_anchors[0]
    assert torch.equal(anchors.reshape(2, 3, -1, 4)[1, 2], cell + torch.tensor([16.0, 8.0, 16.0, 8.0]))
    # And it batches exactly like stride 16 does.
    single = [dense.detect([im], image_ids=[str(i)])[0] for i, im in enumerate(IMAGES[:3])]
    for a, b in zip(single, dense.detect(IMAGES[:3], batch_size=3)):
        assert_records_close(a, b)


def test_given_boxes_reproduce_detect(slim):
    image = IMAGES[0]
    record = slim.detect([image], image_ids=["x"])[0]
    given = slim.features_for_boxes(image, record.boxes, image_id="x")
    given.validate(256)
    assert np.array_equal(given.boxes, record.boxes)
    np.testing.assert_allclose(given.features.astype(np.float32), record.features.astype(np.float32),
                               atol=1e-3, rtol=1e-3)
    assert np.array_equal(given.objects_id, record.objects_id)
    np.testing.assert_allclose(given.objects_conf, record.objects_conf, atol=1e-5)
    assert np.array_equal(given.attrs_id, record.attrs_id)
    assert given.cls_prob.shape == (record.num_boxes, 1601) and given.attr_prob.shape == (record.num_boxes, 401)
    probs = given.cls_prob.astype(np.float32)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=2e-2)
    # labels are the argmax excluding background / no-attribute (the last column)
    assert np.array_equal(given.objects_id, probs[:, :-1].argmax(1))
    attrs = given.attr_prob.astype(np.float32)
    assert np.all(given.attrs_id < 400)
    np.testing.assert_allclose(given.attrs_conf, attrs[np.arange(len(attrs)), given.attrs_id], atol=1e-3)


def test_given_boxes_any_box(slim):
    image = IMAGES[1]
    boxes = [[0, 0, 100, 150], [10.5, 20.25, 60, 80], [99, 149, 100, 150]]
    record = slim.features_for_boxes(image, boxes, image_id="given")
    assert record.num_boxes == 3 and np.array_equal(record.boxes, np.float32(boxes))
    for bad in ([[0, 0, 10]], [[10, 0, 5, 5]], [[0, 0, 500, 10]], np.zeros((0, 4)), [[np.nan, 0, 1, 1]]):
        with pytest.raises(ValueError):
            slim.features_for_boxes(image, bad)


def test_rgb_input_with_color_rgb_equals_bgr_input(slim):
    bgr = IMAGES[2]
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    from_bgr = slim.detect([bgr])[0]
    from_rgb = slim.detect([rgb], color="rgb")[0]
    assert from_bgr.equals(from_rgb)
    wrong = slim.detect([rgb])[0]  # RGB passed as BGR: what the HF demo did
    assert not wrong.equals(from_bgr)
    given_rgb = slim.features_for_boxes(rgb, from_bgr.boxes, color="rgb")
    given_bgr = slim.features_for_boxes(bgr, from_bgr.boxes)
    assert given_rgb.equals(given_bgr)


def test_speed_ups_do_not_change_results(slim):
    reference = load_detector(allow_random=True, seed=1, fold_norms=False, channels_last=False, dedupe_rois=False,
                              roi_chunk_size=None, nms_method="loop", **SLIM, **SMALL)
    for image in IMAGES[:2]:
        assert_records_close(reference.detect([image])[0], slim.detect([image])[0])
    assert reference.config_hash == slim.config_hash
    # RoIs that RoIPool quantises to the same feature-map box run through res5 once.
    image = IMAGES[0]  # 120x200 -> 128x213: scale 16/15
    boxes = [[0, 0, 90, 90], [2, 1, 91, 89], [30, 30, 120, 100], [0, 0, 90, 90]]
    scale = slim.prepare(image).scale[0]
    keys = slim.model.roi_heads.pooled_key(torch.cat([torch.zeros(4, 1), torch.tensor(boxes) * scale], 1))
    assert torch.equal(keys[0], keys[1]) and not torch.equal(keys[0], keys[2])
    fast, plain = slim.features_for_boxes(image, boxes), reference.features_for_boxes(image, boxes)
    np.testing.assert_allclose(fast.features.astype(np.float32), plain.features.astype(np.float32), atol=1e-2,
                               rtol=1e-3)
    assert np.array_equal(fast.features[0], fast.features[1]) and np.array_equal(fast.features[0], fast.features[3])


@pytest.mark.slow
def test_the_shipped_detector_selects_the_same_boxes_with_every_nms_method(tmp_path):
    """The per-class NMS of the BUTD rule on real score distributions (a trained model; its 8
    classes, the other 1,592 score 0 and skip it): the rank sweep (the CPU default) and the
    fixed-point matrix (the CUDA default) give records identical to one torchvision NMS per
    class."""
    from vlp.synthetic import generate

    generate(tmp_path, 4, seed=11, split_fractions=(0.0, 0.0, 1.0), web=False)
    images = [cv2.imread(str(p)) for p in sorted((tmp_path / "images").iterdir())]
    assert len(images) == 4
    records = {method: load_detector(preset="demo", device="cpu", nms_method=method).detect(images)
               for method in ("loop", "auto", "matrix")}
    for loop, sweep, matrix in zip(records["loop"], records["auto"], records["matrix"]):
        assert loop.equals(sweep) and loop.equals(matrix)
    with pytest.raises(ValueError, match="nms_method must be one of"):
        load_detector(preset="demo", device="cpu", nms_method="fast")


def test_input_validation(slim):
    with pytest.raises(ValueError, match="uint8"):
        slim.detect([IMAGES[0].astype(np.float32)])
    with pytest.raises(ValueError, match="H x W x 3"):
        slim.detect([IMAGES[0][:, :, :2]])
    with pytest.raises(ValueError, match="image_ids"):
        slim.detect(IMAGES[:2], image_ids=["only-one"])
    with pytest.raises(ValueError, match="image 1.*too elongated"):
        slim.detect([IMAGES[0], np.zeros((2, 400, 3), np.uint8)])
    with pytest.raises(ValueError, match="color"):
        slim.detect([IMAGES[0]], color="hsv")
    gray = cv2.cvtColor(IMAGES[0], cv2.COLOR_BGR2GRAY)
    assert slim.detect([gray])[0].equals(slim.detect([np.repeat(gray[:, :, None], 3, 2)])[0])


def test_description_for_the_manifest(slim):
    assert slim.weights_sha256 is None
    assert json.loads(json.dumps(slim.config)) == slim.config
    assert slim.config["score_threshold"] == 0.2 and slim.config["arch"]["blocks"] == [1, 1, 1, 1]
    assert len(slim.config_hash) == 16
    assert slim.describe()["config_hash"] == slim.config_hash
    assert load_detector(allow_random=True, **SLIM, **SMALL, score_threshold=0.5).config_hash != slim.config_hash


def test_with_probs_and_presets(slim):
    det = load_detector(allow_random=True, seed=1, preset="butd-36", with_probs=True, **SLIM, **SMALL)
    record = det.detect([IMAGES[0]])[0]
    assert record.num_boxes == 36 and record.cls_prob.shape == (36, 1601) and record.attr_prob.shape == (36, 401)
    lx = load_detector(allow_random=True, seed=1, preset="lxmert-36", **SLIM, **SMALL)
    records = lx.detect(IMAGES)
    assert [r.num_boxes for r in records] == [36] * len(IMAGES)
    for r in records:
        r.validate(256)
    # regressed boxes differ from the RoIs the features come from
    butd = slim.detect([IMAGES[0]])[0]
    assert not np.array_equal(records[0].boxes[:10], butd.boxes[:10])


def test_image_feature_is_the_whole_image_box_pooled_in_the_same_pass(slim):
    """With image_feature, each record also holds the RoI feature of a box over the whole
    image; the regions are exactly those of a run without it, and the feature equals the
    given-box mode's feature of that box."""
    det = load_detector(allow_random=True, seed=1, image_feature=True, **SLIM, **SMALL)
    records = det.detect(IMAGES[:2])
    plain = slim.detect(IMAGES[:2])
    for record, reference, image in zip(records, plain, IMAGES[:2]):
        np.testing.assert_array_equal(record.boxes, reference.boxes)
        np.testing.assert_array_equal(record.features, reference.features)
        height, width = image.shape[:2]
        given = slim.features_for_boxes(image, [[0.0, 0.0, float(width), float(height)]])
        assert record.image_feature.shape == (256,) and record.image_feature.dtype == np.float16
        np.testing.assert_allclose(record.image_feature.astype(np.float32), given.features[0].astype(np.float32),
                                   rtol=1e-2, atol=1e-2)
    assert det.config_hash != slim.config_hash and reference.image_feature is None


def test_full_resnet101_on_cpu():
    det = load_detector(allow_random=True, min_size=128, max_size=192, rpn_post_nms_topk=40)
    assert det.model.backbone.res4[22].conv2.weight.shape == (256, 256, 3, 3)
    image = IMAGES[0]
    record = det.detect([image], image_ids=["r101"])[0]
    record.validate(2048)
    assert 10 <= record.num_boxes <= 40
    assert record.features.shape == (record.num_boxes, 2048)
    assert np.all(np.isfinite(record.features.astype(np.float32)))
    assert float(record.features.astype(np.float32).std()) > 0


def test_bfloat16_cpu_autocast_agrees(slim):
    det = load_detector(allow_random=True, seed=1, dtype="bfloat16", device="cpu", **SLIM, **SMALL)
    boxes = slim.detect([IMAGES[0]])[0].boxes
    ref = slim.features_for_boxes(IMAGES[0], boxes).features.astype(np.float32)
    low = det.features_for_boxes(IMAGES[0], boxes).features.astype(np.float32)
    cos = (ref * low).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(low, axis=1))
    assert cos.min() > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bfloat16_matches_float32_on_cuda():
    fp32 = load_detector(allow_random=True, device="cuda", min_size=320, max_size=480)
    bf16 = load_detector(allow_random=True, device="cuda", dtype="bfloat16", min_size=320, max_size=480)
    image = scene(360, 480, 7)
    record = fp32.detect([image])[0]
    a = fp32.features_for_boxes(image, record.boxes).features.astype(np.float32)
    b = bf16.features_for_boxes(image, record.boxes).features.astype(np.float32)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.999
    assert bf16.detect([image])[0].num_boxes >= 10


# -- multi-scale and mirrored test (``extra_min_sizes``, ``mirrored_reading``) -----------
# The reference reads one image at a time at each shortest side (and mirrored at min_size),
# moves every reading's scored RoIs into the first reading's pixels (mirrored ones mirrored
# back, with the x offset of their box regression) and runs BUTD's selection once over them
# all, written out with the model's parts and no batching; the Detector must give the same
# records for batches of images of different shapes.


def test_mirror_boxes_on_tensors_and_arrays():
    boxes = [[10.0, 5.0, 30.0, 25.0], [0.0, 0.0, 100.0, 8.0]]
    expected = [[70.0, 5.0, 90.0, 25.0], [0.0, 0.0, 100.0, 8.0]]
    for kind in (torch.tensor, np.array):
        given = kind(boxes)
        mirrored = mirror_boxes(given, 100)
        assert type(mirrored) is type(given) and mirrored.tolist() == expected
        assert given.tolist() == boxes  # a new one; the input is left as it was
        assert mirror_boxes(mirrored, 100).tolist() == boxes


def slim_detector(**overrides):
    return load_detector(allow_random=True, seed=3, score_threshold=0.02, **SLIM, **{**SMALL, **overrides})


@torch.inference_mode()
def plain_union(detector, image):
    """(boxes in original pixels, class ids, image feature) of the reference multi-scale test."""
    cfg = detector.detector_config
    model = detector.model
    first = prepare_image(image, dataclasses.replace(cfg, extra_min_sizes=()))
    all_rois, all_pooled, all_flips, image_feature = [], [], [], None
    readings = [(size, False) for size in (cfg.min_size, *cfg.extra_min_sizes)]
    readings += [(cfg.min_size, True)] if cfg.mirrored_reading else []
    for size, mirrored in readings:
        reading = dataclasses.replace(cfg, min_size=size, max_size=round(cfg.max_size * size / cfg.min_size),
                                      extra_min_sizes=())
        p = prepare_image(image, reading)
        tensor = p.tensor.flip(-1) if mirrored else p.tensor  # the resized image, mirrored
        features, _ = model.backbone(tensor[None].contiguous(memory_format=torch.channels_last), [p.size])
        (rois, _), = model.proposal_generator(
            features, [model.backbone.feature_size(*p.size)], [p.size], pre_nms_topk=cfg.rpn_pre_nms_topk,
            nms_threshold=cfg.rpn_nms_threshold, post_nms_topk=cfg.rpn_post_nms_topk, min_size=cfg.rpn_min_size)
        first_reading = size == cfg.min_size and not mirrored
        if first_reading and cfg.image_feature:
            whole = torch.tensor([[0.0, 0.0, float(p.size[1]), float(p.size[0])]])
            rois = torch.cat([rois, whole])
        pooled = model.roi_heads.box_features(features, torch.cat([torch.zeros(len(rois), 1), rois], dim=1))
        if first_reading and cfg.image_feature:
            image_feature, rois, pooled = pooled[-1], rois[:-1], pooled[:-1]
        if mirrored:
            width = p.size[1]
            rois = torch.stack([width - rois[:, 2], rois[:, 1], width - rois[:, 0], rois[:, 3]], dim=1)
        all_flips.append(torch.full((len(rois),), mirrored))
        (sx, sy), (fx, fy) = p.scale, first.scale
        all_rois.append(rois * torch.tensor([fx / sx, fy / sy, fx / sx, fy / sy]))
        all_pooled.append(pooled)
    rois, pooled = torch.cat(all_rois), torch.cat(all_pooled)
    predictor = model.roi_heads.box_predictor
    prob = torch.softmax(predictor.class_logits(pooled), dim=-1)[:, :-1]
    boxes = rois
    if cfg.boxes == "regressed":
        best = prob.argmax(dim=1)
        deltas = predictor.box_deltas(pooled).view(len(rois), -1, 4)[torch.arange(len(rois)), best]
        deltas[torch.cat(all_flips), 0] *= -1
        boxes = clip_boxes(apply_deltas(deltas, rois, cfg.arch.bbox_reg_weights), *first.size)
    keep, _ = butd_select(rois, prob, nms_threshold=cfg.nms_threshold, score_threshold=cfg.score_threshold,
                          min_boxes=cfg.min_boxes, max_boxes=cfg.max_boxes)
    sx, sy = first.scale
    original = clip_boxes(boxes[keep] / torch.tensor([sx, sy, sx, sy]), *first.original_size)
    return original.numpy(), prob[keep].argmax(dim=1).numpy(), image_feature


@pytest.mark.parametrize("overrides", [
    dict(extra_min_sizes=(192,)),
    dict(extra_min_sizes=(96, 176), boxes="regressed", image_feature=True),
    dict(extra_min_sizes=(96,), mirrored_reading=True, boxes="regressed", image_feature=True),
    dict(mirrored_reading=True, boxes="rois"),
])
def test_extra_readings_equal_the_plain_union(overrides):
    detector = slim_detector(**overrides)
    records = detector.detect(IMAGES, batch_size=2)
    for image, record in zip(IMAGES, records):
        boxes, ids, image_feature = plain_union(detector, image)
        assert record.num_boxes == len(boxes)
        np.testing.assert_allclose(record.boxes, boxes, atol=BOX_ATOL, rtol=0)
        assert np.array_equal(record.objects_id, ids)
        if image_feature is not None:
            np.testing.assert_allclose(record.image_feature, image_feature.numpy(), atol=1e-2, rtol=1e-3)


def test_extra_readings_find_boxes_one_reading_does_not():
    one = slim_detector()
    more = slim_detector(extra_min_sizes=(192,))
    differs = 0
    for a, b in zip(one.detect(IMAGES), more.detect(IMAGES)):
        differs += a.num_boxes != b.num_boxes or not np.allclose(a.boxes, b.boxes)
    assert differs > 0  # the extra reading's RoIs take part in the selection


def test_a_mirrored_reading_makes_the_detector_mirror_equivariant():
    # Image I pools RoIs(I) and mirror(RoIs(mirror I)); mirror I pools the same two sets,
    # mirrored. With images at their own size (the resize is then exactly symmetric) the
    # records of mirror I are those of I mirrored: the same scores and classes, boxes within
    # BOX_ATOL. Without the mirrored reading they are not (the network is not symmetric).
    images = [scene(128, 200, 5), scene(160, 128, 6)]
    mirrored = slim_detector(mirrored_reading=True, boxes="regressed")
    plain = slim_detector(boxes="regressed")

    def mirrored_back(detector, image):
        record = detector.detect([image[:, ::-1].copy()])[0]
        width = image.shape[1]
        boxes = np.stack([width - record.boxes[:, 2], record.boxes[:, 1], width - record.boxes[:, 0],
                          record.boxes[:, 3]], axis=1)
        return record, boxes

    def ranked(confs, ids, boxes):
        order = np.lexsort((boxes[:, 0], -np.round(confs, 5)))
        return np.round(confs, 5)[order], ids[order], boxes[order]

    for image in images:
        a = mirrored.detect([image])[0]
        b, boxes = mirrored_back(mirrored, image)
        (ca, ia, ba), (cb, ib, bb) = ranked(a.objects_conf, a.objects_id, a.boxes), ranked(b.objects_conf, b.objects_id, boxes)
        np.testing.assert_allclose(ca, cb, atol=2e-5, rtol=0)
        assert np.array_equal(ia, ib)
        np.testing.assert_allclose(ba, bb, atol=BOX_ATOL, rtol=0)
    a = plain.detect([images[0]])[0]
    b, boxes = mirrored_back(plain, images[0])
    assert a.num_boxes != b.num_boxes or not np.allclose(np.sort(a.objects_conf), np.sort(b.objects_conf))


def test_given_boxes_are_read_at_min_size_alone():
    one = slim_detector(with_probs=True)
    more = slim_detector(with_probs=True, extra_min_sizes=(192,))
    boxes = np.array([[5.0, 5.0, 60.0, 50.0], [10.0, 20.0, 100.0, 90.0]], dtype=np.float32)
    a = one.features_for_boxes(IMAGES[0], boxes)
    b = more.features_for_boxes(IMAGES[0], boxes)
    assert np.array_equal(a.features, b.features) and np.array_equal(a.cls_prob, b.cls_prob)
    # an image too elongated for a further reading still takes given boxes
    narrow = slim_detector(with_probs=True, extra_min_sizes=(16,))
    with pytest.raises(ValueError, match="too elongated"):
        narrow.detect([IMAGES[3]])
    inside = np.array([[5.0, 5.0, 60.0, 50.0], [100.0, 10.0, 200.0, 55.0]], dtype=np.float32)
    assert narrow.features_for_boxes(IMAGES[3], inside).num_boxes == 2


def test_prepared_readings_travel_and_match_detect():
    detector = slim_detector(extra_min_sizes=(192,))
    prepared = [pickle.loads(pickle.dumps(detector.prepare(im))) for im in IMAGES]  # e.g. from a CPU worker
    assert all(len(p.extra) == 1 and min(p.extra[0].size) == 192 for p in prepared if max(p.original_size) * 192
               <= 336 * min(p.original_size))
    for a, b in zip(detector.detect_prepared(prepared, batch_size=3), detector.detect(IMAGES, batch_size=1)):
        assert_records_close(a, b)


def test_a_reading_too_small_for_an_image_is_named():
    detector = slim_detector(extra_min_sizes=(16,))
    with pytest.raises(ValueError, match=r"image 0: 240x60 becomes .* \(min_size=16, max_size=28\); too elongated"):
        detector.detect([IMAGES[3]])


def test_extra_min_sizes_setting_is_checked():
    config = slim_detector().detector_config
    given = apply_overrides(config, parse_setting_pairs(["extra_min_sizes=[192, 256]"]))
    assert given.extra_min_sizes == (192, 256)
    assert given.config_hash() != config.config_hash()
    for value, reason in (("[128]", "other than min_size"), ("[192, 192]", "distinct"), ("[0]", "positive"),
                          ("[192.5]", "list of integers"), ("192", "must be a list")):
        with pytest.raises(DetectorConfigError, match=reason):
            apply_overrides(config, parse_setting_pairs([f"extra_min_sizes={value}"]))
    mirrored = apply_overrides(config, parse_setting_pairs(["mirrored_reading=true"]))
    assert mirrored.mirrored_reading is True and mirrored.config_hash() != config.config_hash()
    with pytest.raises(DetectorConfigError, match="mirrored_reading must be true or false"):
        apply_overrides(config, parse_setting_pairs(["mirrored_reading=1"]))
