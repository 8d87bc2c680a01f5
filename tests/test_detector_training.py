"""Faster R-CNN training: target assignment, a short training run, checkpoint round trip,
the evaluation metric on hand-made predictions, and the shipped demo detector."""

import dataclasses
import shutil

import numpy as np
import pytest
from vlp.synthetic.world import image_path as world_image

from vlp.schemas.shards import sha256_file
import torch

import vlp.detectors.inference as inference
from vlp.detectors import DetectorConfigError, ShippedWeightsError, load_detector, make_config
from vlp.detectors.evaluate import (FALSE_POSITIVE_KINDS, error_anatomy, evaluate_detector, evaluate_predictions,
                                    false_positive_anatomy, voc_ap)
from vlp.detectors.inference import Detector
from vlp.detectors.annotations import Annotation
from vlp.detectors.training import (DetectorTrainer, TrainImage, TrainSettings, encode_deltas, match_anchors,
                                    match_rois, part_boxes, sample_rois, subsample, train_detector)
from vlp.detectors.model import apply_deltas
from vlp.schemas import vocab

BG = 1600
TINY = dict(min_size=224, max_size=352, rpn_post_nms_topk=50, extra_min_sizes=[], mirrored_reading=False)


# -- target assignment ------------------------------------------------------------------


def test_anchor_labels_on_hand_made_boxes():
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0], [200.0, 200.0, 230.0, 260.0]])
    anchors = torch.tensor([
        [0.0, 0.0, 100.0, 100.0],     # IoU 1 with gt0 -> positive
        [0.0, 0.0, 100.0, 80.0],      # IoU 0.8 -> positive
        [0.0, 0.0, 100.0, 50.0],      # IoU 0.5 -> ignored
        [0.0, 0.0, 100.0, 20.0],      # IoU 0.2 -> negative
        [400.0, 400.0, 500.0, 500.0],  # IoU 0 -> negative
        [190.0, 190.0, 250.0, 270.0],  # gt1's best anchor (IoU 0.43 < 0.7) -> positive anyway
        [300.0, 0.0, 400.0, 100.0],    # negative
    ])
    labels, matched = match_anchors(anchors, gt)
    assert labels.tolist() == [1, 1, -1, 0, 0, 1, 0]
    assert matched[0] == 0 and matched[1] == 0 and matched[5] == 1


def test_roi_labels_background_last_and_appended_gt_is_foreground():
    gt_boxes = torch.tensor([[10.0, 10.0, 60.0, 60.0], [100.0, 100.0, 150.0, 180.0]])
    classes = torch.tensor([vocab.objects().id("circle"), vocab.objects().id("star")])
    proposals = torch.tensor([[12.0, 10.0, 60.0, 62.0],   # IoU > 0.5 with gt0
                              [35.0, 35.0, 85.0, 85.0],   # IoU ~0.14 -> background
                              [300.0, 300.0, 340.0, 340.0]])
    labels, matched = match_rois(proposals, gt_boxes, classes, background=BG)
    assert labels.tolist() == [int(classes[0]), BG, BG]
    assert matched[0] == 0
    image = TrainImage(torch.zeros(3, 200, 200), (200, 200), gt_boxes, classes, torch.tensor([5, 7]))
    settings = TrainSettings(rois_per_image=16, roi_positive_fraction=0.5)
    rois, labels, matched = sample_rois(proposals, image, settings, BG, torch.Generator().manual_seed(0))
    # 3 proposals + 2 appended GT boxes: the GT boxes and proposal 0 are foreground.
    assert rois.shape[0] == 5
    fg = labels != BG
    assert int(fg.sum()) == 3 and int((labels == BG).sum()) == 2
    for box in gt_boxes:
        row = (rois == box).all(dim=1).nonzero().flatten()
        assert row.numel() == 1 and labels[row].item() != BG
    assert set(labels[fg].tolist()) == {int(c) for c in classes}


def test_sampling_respects_the_positive_fraction():
    gt = torch.tensor([[0.0, 0.0, 50.0, 50.0]])
    proposals = torch.cat([gt.repeat(20, 1), torch.tensor([[100.0, 100.0, 140.0, 140.0]]).repeat(40, 1)])
    image = TrainImage(torch.zeros(3, 200, 200), (200, 200), gt, torch.tensor([3]), torch.tensor([-1]))
    settings = TrainSettings(rois_per_image=16, roi_positive_fraction=0.25)
    _, labels, _ = sample_rois(proposals, image, settings, BG, torch.Generator().manual_seed(0))
    assert labels.numel() == 16 and int((labels != BG).sum()) == 4


def test_part_boxes_lie_inside_a_gt_box_below_the_foreground_iou():
    from torchvision.ops import box_iou
    gt = torch.tensor([[10.0, 10.0, 110.0, 60.0], [200.0, 200.0, 220.0, 400.0]])
    parts = part_boxes(gt, 500, torch.Generator().manual_seed(0))
    inside = ((parts[:, None, :2] >= gt[None, :, :2] - 1e-4).all(-1)
              & (parts[:, None, 2:] <= gt[None, :, 2:] + 1e-4).all(-1))
    assert inside.sum(dim=1).eq(1).all()  # each part inside exactly one of these disjoint boxes
    share = box_iou(parts, gt).max(dim=1).values
    assert 0.05 <= float(share.min()) and float(share.max()) < 0.5
    widths, heights = parts[:, 2] - parts[:, 0], parts[:, 3] - parts[:, 1]
    # slivers and squat halves both occur: thin parts of either orientation
    assert float((widths / heights).min()) < 0.5 and float((widths / heights).max()) > 4
    assert part_boxes(gt, 0, torch.Generator()).shape == (0, 4)
    assert part_boxes(gt[:0], 8, torch.Generator()).shape == (0, 4)


def test_part_negatives_are_added_as_background_unless_another_gt_claims_them():
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    image = TrainImage(torch.zeros(3, 200, 200), (200, 200), gt, torch.tensor([3]), torch.tensor([-1]))
    proposals = gt.repeat(4, 1)
    settings = TrainSettings(rois_per_image=8, roi_part_negatives=6)
    rois, labels, _ = sample_rois(proposals, image, settings, BG, torch.Generator().manual_seed(0))
    # 5 foreground candidates, at most 4 (half of 8) sampled, no background ones; then the 6 parts
    assert rois.shape[0] == 4 + 6 and labels[-6:].eq(BG).all() and labels[:4].ne(BG).all()
    # a GT box nested in another claims the parts of the outer box that mostly cover it
    from torchvision.ops import box_iou
    nested = torch.cat([gt, torch.tensor([[0.0, 0.0, 100.0, 45.0]])])
    two = TrainImage(image.tensor, image.size, nested, torch.tensor([3, 4]), torch.tensor([-1, -1]))
    rois, labels, _ = sample_rois(gt[:0], two, dataclasses.replace(settings, roi_part_negatives=300), BG,
                                  torch.Generator().manual_seed(1))
    parts, part_labels = rois[-300:], labels[-300:]
    claimed = box_iou(parts, nested[1:]).flatten() >= 0.5
    assert 0 < int(claimed.sum()) < 300
    assert part_labels[claimed].eq(4).all() and part_labels[~claimed].eq(BG).all()


def test_hard_negatives_are_the_first_background_proposals_and_leave_the_draw_to_the_rest():
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    image = TrainImage(torch.zeros(3, 400, 400), (400, 400), gt, torch.tensor([3]), torch.tensor([-1]))
    # in objectness order: a near miss (IoU 0.45), the object, then empty background
    near_miss = torch.tensor([[0.0, 0.0, 100.0, 45.0]])
    empty = torch.stack([torch.tensor([200.0 + i, 200.0, 260.0 + i, 260.0]) for i in range(40)])
    proposals = torch.cat([near_miss, gt, empty])
    settings = TrainSettings(rois_per_image=6, roi_positive_fraction=0.5, roi_hard_negatives=3)
    rois, labels, _ = sample_rois(proposals, image, settings, BG, torch.Generator().manual_seed(0))
    assert rois.shape[0] == 6 + 3
    # the three hard ones come last, in objectness order: the near miss, then the first empties
    assert torch.equal(rois[-3:], torch.cat([near_miss, empty[:2]])) and labels[-3:].eq(BG).all()
    drawn = rois[:-3]
    assert int(labels[:-3].ne(BG).sum()) == 2  # the object as proposal and as GT box
    for box in rois[-3:]:  # no RoI twice
        assert int((drawn == box).all(dim=1).sum()) == 0
    # 0 hard negatives draws exactly what the sampler drew before they existed
    plain = TrainSettings(rois_per_image=6, roi_positive_fraction=0.5)
    a = sample_rois(proposals, image, plain, BG, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    ref_labels, _ = match_rois(torch.cat([proposals, gt]), gt, torch.tensor([3]), background=BG)
    pos, neg = subsample(ref_labels, 6, 0.5, positive=lambda x: x != BG, negative=lambda x: x == BG, generator=g)
    assert torch.equal(a[0], torch.cat([proposals, gt])[torch.cat([pos, neg])])


def test_delta_encoding_inverts_apply_deltas():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 90.0], [0.0, 0.0, 8.0, 8.0]])
    targets = torch.tensor([[12.0, 18.0, 55.0, 80.0], [1.0, 2.0, 20.0, 9.0]])
    for weights in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        deltas = encode_deltas(boxes, targets, weights)
        assert torch.allclose(apply_deltas(deltas, boxes, weights), targets, atol=1e-4)


# -- training -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from vlp.synthetic import generate

    root = tmp_path_factory.mktemp("world")
    generate(root, 8, seed=11, split_fractions=(1.0, 0.0, 0.0), overwrite=True, web=False)
    return root


@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "tiny.pt"
    config = make_config("demo", **TINY)
    record, model = train_detector(tiny_world, out, config=config, iterations=30, batch_size=2, seed=0,
                                   log_every=5, checkpoint_every=0, half=False, log=lambda *_: None,
                                   return_model=True, lr=2e-3, warmup_iterations=5, rois_per_image=16,
                                   rpn_post_nms_topk=100)
    return record, model, out, config


@pytest.mark.slow
def test_training_loss_decreases(trained):
    record, _, out, _ = trained
    losses = record["losses"]
    assert record["iterations_done"] == 30 and len(losses) == 6
    first, last = losses[0], losses[-1]  # means over iterations 1-5 and 26-30
    assert last["total"] < 0.6 * first["total"], (first, last)
    for name in ("rpn_cls", "roi_cls", "attr"):
        assert last[name] < first[name], name
    assert (out.parent / (out.name + ".log.json")).is_file()


@pytest.mark.slow
def test_trained_checkpoint_round_trips_into_the_inference_detector(trained, tiny_world):
    import cv2

    _, model, out, config = trained
    images = [cv2.imread(str(world_image(tiny_world, i))) for i in (1, 2)]
    live = Detector(model, config, device="cpu").detect(images)
    loaded = load_detector(out, preset="demo", device="cpu", **TINY)
    again = loaded.detect(images)
    for a, b in zip(live, again):
        assert a.num_boxes == b.num_boxes
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.objects_id, b.objects_id)
        np.testing.assert_array_equal(a.attrs_id, b.attrs_id)
        np.testing.assert_array_equal(a.objects_conf, b.objects_conf)


def test_multi_scale_training_draws_each_images_shortest_side_from_the_list(tiny_world, tmp_path):
    from vlp.detectors.annotations import load_vg_annotations
    from vlp.detectors.training import load_train_image

    config = make_config("demo", **TINY)
    sizes = (160, 192, 224)
    settings = TrainSettings(batch_size=4, seed=5, threads=1, train_min_sizes=sizes)
    trainer = DetectorTrainer(tiny_world, tmp_path / "m.pt", config=config, settings=settings, log=lambda *_: None)
    seen = set()
    for _ in range(6):
        for image in trainer.next_batch():
            short, long = min(image.size), max(image.size)
            # the drawn size, unless the preset's max_size capped the longest side first
            assert short in sizes or long == config.max_size, image.size
            seen.add(short)
    assert seen & {160, 192}, seen  # not only the preset's 224
    # the boxes follow their image's own scale
    for annotation in load_vg_annotations(tiny_world, None):
        image = load_train_image(annotation, dataclasses.replace(config, min_size=160), flip=False)
        scale = min(160 / min(annotation.height, annotation.width),
                    config.max_size / max(annotation.height, annotation.width))
        np.testing.assert_allclose(image.boxes.numpy(), annotation.boxes * scale, rtol=0.01, atol=0.5)
    with pytest.raises(DetectorConfigError, match="train_min_sizes"):
        DetectorTrainer(tiny_world, tmp_path / "n.pt", config=config, log=lambda *_: None,
                        settings=TrainSettings(train_min_sizes=(config.max_size + 1,)))


def test_stored_classes_trained_writes_the_training_classes_only(tiny_world, tmp_path):
    import cv2

    from vlp.detectors.annotations import load_vg_annotations
    from vlp.detectors.checkpoint import CLASS_SUBSET_KEY, read_checkpoint

    config = make_config("demo", **TINY)
    settings = TrainSettings(batch_size=1, seed=5, threads=1)
    trainer = DetectorTrainer(tiny_world, tmp_path / "m.pt", config=config, settings=settings,
                              stored_classes="trained", log=lambda *_: None)
    trainer.export()
    world_classes = sorted({int(c) for a in load_vg_annotations(tiny_world, None) for c in a.classes})
    assert 1 < len(world_classes) <= 8 and trainer.record["stored_classes"] == world_classes
    assert read_checkpoint(tmp_path / "m.pt")[CLASS_SUBSET_KEY].tolist() == world_classes
    detector = load_detector(tmp_path / "m.pt", preset="demo", device="cpu", score_threshold=0.0, **TINY)
    records = detector.detect([cv2.imread(str(world_image(tiny_world, 1)))])
    assert records[0].num_boxes > 0 and set(records[0].objects_id.tolist()) <= set(world_classes)
    # a run started from a class-subset file can still learn the classes it left out: their
    # rows start from the run's own initialisation, not from logit -1e4
    again = DetectorTrainer(tiny_world, tmp_path / "again.pt", config=config, settings=settings,
                            init_weights=tmp_path / "m.pt", log=lambda *_: None)
    fresh = DetectorTrainer(tiny_world, tmp_path / "fresh.pt", config=config, settings=settings,
                            log=lambda *_: None)
    before, after = trainer.model.state_dict(), again.model.state_dict()
    other = [c for c in range(1601) if c not in world_classes + [1600]]
    for name in ("cls_score.weight", "cls_score.bias", "cls_embedding.weight"):
        key = "roi_heads.box_predictor." + name
        torch.testing.assert_close(after[key][world_classes + [1600]], before[key][world_classes + [1600]],
                                   rtol=1e-3, atol=1e-3)  # the file's rows (float16)
        assert torch.equal(after[key][other], fresh.model.state_dict()[key][other])
    with pytest.raises(ValueError, match="stored_classes must be 'all' or 'trained'"):
        DetectorTrainer(tiny_world, tmp_path / "n.pt", config=config, settings=settings, stored_classes="some",
                        log=lambda *_: None)


@pytest.mark.parametrize("extra", [{}, dict(train_min_sizes=(160, 224), roi_part_negatives=4)],
                         ids=["single-scale", "multi-scale+parts"])
def test_an_interrupted_run_resumes_bit_for_bit(tiny_world, tmp_path, extra):
    config = make_config("demo", **TINY)
    settings = TrainSettings(iterations=4, batch_size=1, rois_per_image=8, warmup_iterations=1, seed=3, threads=1,
                             **extra)
    options = dict(config=config, settings=settings, log_every=1, checkpoint_every=0, half=False,
                   log=lambda *_: None)
    caller_threads = torch.get_num_threads()
    straight = DetectorTrainer(tiny_world, tmp_path / "a.pt", **options)
    seen = []
    whole = straight.run(should_stop=lambda: seen.append(torch.get_num_threads()) or False)
    # settings.threads while it trains; the caller's thread count again afterwards
    assert set(seen) == {1} and torch.get_num_threads() == caller_threads
    answers = iter([False, True])  # asked after iterations 1 and 2: stop after 2 (Ctrl-C)
    first = DetectorTrainer(tiny_world, tmp_path / "b.pt", **options)
    stopped = first.run(should_stop=lambda: next(answers))
    assert stopped["interrupted"] == 2 and first.iteration == 2 and "finished" not in stopped
    del first
    if not extra:  # a state written before roi_part_negatives existed resumes as one without parts
        state_path = tmp_path / "b.pt.state.pt"
        state = torch.load(state_path, weights_only=True)
        del state["record"]["settings"]["roi_part_negatives"]
        torch.save(state, state_path)
    again = DetectorTrainer(tiny_world, tmp_path / "b.pt", **options)
    again.resume()
    assert again.iteration == 2
    resumed = again.run()
    assert resumed["iterations_done"] == 4 and resumed["finished"]
    # the same losses, the same weights (bytes and sha256), the same optimiser state
    strip = lambda entries: [{k: v for k, v in e.items() if k != "seconds"} for e in entries]  # noqa: E731
    assert strip(resumed["losses"]) == strip(whole["losses"]) and len(whole["losses"]) == 4
    assert resumed["sha256"] == whole["sha256"]
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[name]), name
    a, b = straight.optimizer.state_dict()["state"], again.optimizer.state_dict()["state"]
    assert all(torch.equal(a[k]["exp_avg_sq"], b[k]["exp_avg_sq"]) for k in a)


# -- evaluation ---------------------------------------------------------------------------


def _gt(image_id, boxes, classes, attrs):
    return Annotation(image_id, None, 640, 480, np.asarray(boxes, np.float32).reshape(-1, 4),
                      np.asarray(classes, np.int64), [list(a) for a in attrs])


def _pred(boxes, classes, confs, attrs):
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "objects_id": np.asarray(classes),
            "objects_conf": np.asarray(confs, np.float32), "attrs_id": np.asarray(attrs)}


A, B = 10, 20  # class ids
RED, BLUE, LARGE = 1, 2, 3
GT = [_gt(1, [[0, 0, 50, 50], [100, 100, 200, 200]], [A, A], [[RED, LARGE], [BLUE]]),
      _gt(2, [[10, 10, 60, 60], [300, 300, 340, 380]], [A, B], [[BLUE], [RED]])]


def test_perfect_predictions_score_one():
    preds = [_pred(GT[0].boxes, [A, A], [0.9, 0.8], [RED, BLUE]),
             _pred(GT[1].boxes, [A, B], [0.7, 0.95], [BLUE, RED])]
    result = evaluate_predictions(preds, GT)
    assert result["mAP"] == 1.0 and result["ap_by_id"] == {A: 1.0, B: 1.0}
    assert result["attribute_accuracy"] == 1.0 and result["attribute_matches"] == 4
    assert result["precision"] == 1.0 and result["recall"] == 1.0


def test_false_positive_ranked_first_gives_the_exact_ap():
    # Class A: a false positive first (conf 0.99), then the three GT boxes.
    # Precision at recall 1/3, 2/3, 1 = 1/2, 2/3, 3/4 -> interpolated 3/4 everywhere.
    preds = [_pred([[400, 400, 450, 450], *GT[0].boxes], [A, A, A], [0.99, 0.9, 0.8], [RED, RED, RED]),
             _pred(GT[1].boxes, [A, B], [0.7, 0.95], [BLUE, RED])]
    result = evaluate_predictions(preds, GT)
    assert result["ap_by_id"][A] == pytest.approx(0.75)
    assert result["ap_by_id"][B] == 1.0
    assert result["mAP"] == pytest.approx(0.875)
    assert result["attribute_accuracy"] == pytest.approx(0.75)  # the 2nd GT box is blue, predicted red
    assert result["precision"] == pytest.approx(4 / 5) and result["recall"] == 1.0


def test_false_positive_in_the_middle_duplicates_and_low_scores():
    # A: TP 0.9, duplicate of it 0.8 (FP), TP 0.7, TP 0.05 (below the score threshold).
    # Precision 1, 1/2, 2/3, 3/4 at recall 1/3, 1/3, 2/3, 1 -> AP = 1/3 + 1/3 * 3/4 + 1/3 * 3/4.
    preds = [_pred([GT[0].boxes[0], GT[0].boxes[0] + 1, GT[0].boxes[1]], [A, A, A], [0.9, 0.8, 0.7],
                   [RED, RED, BLUE]),
             _pred([GT[1].boxes[0], GT[1].boxes[1], [0, 0, 5, 5]], [A, B, B], [0.05, 0.6, 0.3], [BLUE, RED, RED])]
    result = evaluate_predictions(preds, GT)
    assert result["ap_by_id"][A] == pytest.approx(1 / 3 + 0.5)
    assert result["ap_by_id"][B] == 1.0  # the FP of class B ranks after its only TP
    assert result["num_predictions_at_threshold"] == 5
    assert result["precision"] == pytest.approx(3 / 5) and result["recall"] == pytest.approx(3 / 4)
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 0.5])) == pytest.approx(0.75)


def test_error_anatomy_separates_missed_misnamed_and_outranked_objects():
    from vlp.schemas import vocab

    preds = [_pred([GT[0].boxes[0], GT[0].boxes[0] + 2, GT[0].boxes[1]], [B, A, A], [0.9, 0.5, 0.8],
                   [RED, RED, BLUE]),  # 1st object: named A, but B ranks first; 2nd: right
             _pred([GT[1].boxes[0], [0, 400, 30, 430]], [B, B], [0.6, 0.95], [RED, RED])]
    # image 2: the A object only named B; the B object has no box near it
    anatomy = error_anatomy(preds, GT)
    assert anatomy["objects"] == 4
    assert (anatomy["located"], anatomy["class_found"], anatomy["class_first"]) == (0.75, 0.5, 0.25)
    # relative sizes (sqrt area / short side 480): 0.104, 0.208, 0.104, 0.118
    assert anatomy["by_size"] == {
        "0.1-0.2": {"objects": 3, "located": 2 / 3, "class_found": 1 / 3, "class_first": 0.0},
        "0.2-0.4": {"objects": 1, "located": 1.0, "class_found": 1.0, "class_first": 1.0}}
    names = vocab.objects()
    assert anatomy["by_category"][names.name(A)] == {"objects": 3, "located": 1.0, "class_found": 2 / 3,
                                                     "class_first": 1 / 3}
    assert anatomy["by_category"][names.name(B)]["located"] == 0.0
    assert "by_group" not in anatomy
    # The same outcomes, tabled by a label each object carries (here: which image it is in).
    grouped = error_anatomy(preds, GT, object_groups={"image": [["first", "first"], ["second", "second"]]})
    assert {k: grouped[k] for k in anatomy} == anatomy
    assert grouped["by_group"] == {"image": {
        "first": {"objects": 2, "located": 1.0, "class_found": 1.0, "class_first": 0.5},
        "second": {"objects": 2, "located": 0.5, "class_found": 0.0, "class_first": 0.0}}}
    with pytest.raises(ValueError, match="object group 'image': labels for 1 images, 2"):
        error_anatomy(preds, GT, object_groups={"image": [["first", "first"]]})
    with pytest.raises(ValueError, match=r"object group 'image', image \S+: 1 labels for 2 objects"):
        error_anatomy(preds, GT, object_groups={"image": [["first"], ["second", "second"]]})
    with pytest.raises(ValueError, match="ascending"):
        error_anatomy(preds, GT, size_edges=(0.2, 0.1))
    with pytest.raises(ValueError, match="2 predictions for 1"):
        error_anatomy(preds, GT[:1])



def test_false_positive_anatomy_sorts_each_false_positive_and_gives_the_exact_aps():
    from vlp.schemas import vocab

    # Class A, ranked: TP, duplicate of it, localisation (IoU 0.4 with the 2nd A box),
    # confusion (on the B object), two background, TP, background after the last TP.
    preds = [_pred([GT[0].boxes[0], GT[0].boxes[0] + 2, [100, 100, 200, 140], [400, 400, 450, 450], GT[0].boxes[1]],
                   [A, A, A, A, A], [0.95, 0.9, 0.85, 0.72, 0.7], [RED] * 5),
             _pred([GT[1].boxes[1], [500, 400, 560, 460], GT[1].boxes[1], [600, 10, 630, 40]],
                   [A, A, B, A], [0.8, 0.75, 0.6, 0.3], [RED] * 4)]
    # image 2's A object is never found: 2 of A's 3 GT boxes are matched.
    anatomy = false_positive_anatomy(preds, GT)
    names = vocab.objects()
    a, b = anatomy["by_category"][names.name(A)], anatomy["by_category"][names.name(B)]
    # precision 1 at recall 1/3, 2/7 at 2/3 -> AP 1/3 + 1/3 * 2/7
    assert a["ap"] == pytest.approx(3 / 7) and a["recall_ceiling"] == pytest.approx(2 / 3)
    assert a["false_positives"] == {"duplicate": 1, "localisation": 1, "confusion": 1, "background": 2}
    # without one of the single false positives the 2nd TP ranks 6th; without background, 5th
    assert a["ap_without"] == pytest.approx({"duplicate": 4 / 9, "localisation": 4 / 9, "confusion": 4 / 9,
                                             "background": 7 / 15})
    assert b == {"ap": 1.0, "recall_ceiling": 1.0, "ap_without": dict.fromkeys(FALSE_POSITIVE_KINDS, 1.0),
                 "false_positives": dict.fromkeys(FALSE_POSITIVE_KINDS, 0)}
    assert anatomy["mAP"] == pytest.approx(evaluate_predictions(preds, GT)["mAP"]) == pytest.approx((3 / 7 + 1) / 2)
    assert anatomy["recall_ceiling"] == pytest.approx(5 / 6)
    assert anatomy["ap_without"]["background"] == pytest.approx((7 / 15 + 1) / 2)
    with pytest.raises(ValueError, match="near_iou < iou_threshold"):
        false_positive_anatomy(preds, GT, near_iou=0.5)
    with pytest.raises(ValueError, match="2 predictions for 1"):
        false_positive_anatomy(preds, GT[:1])

# -- the shipped demo detector --------------------------------------------------------------


# The targets of the embedded default (README, "The demo detector"), on a held-out world the
# detector never saw (training used seeds 0, 2-6 and 8, checkpoint selection seed 1). The
# shipped weights (stage 21) under the demo preset reach mAP@0.5 0.971 / attribute accuracy
# 1.000 on the first 60 images of this set, which the fixture reads (the benchmark reads 120).
# On those 120 stage 21 reaches 0.967 / 1.000; stage 19 (stride 8, RPN 6,000 / 300, read at 512
# and 800 px) reached mAP@0.5 0.967 / attribute accuracy 0.998 (read at 512 alone 0.955 /
# 0.998; stage 17 at 512 0.955 / 1.000; regressed boxes, the preset's default; stage 17 at
# stride 16 with 1,000 / 100 proposals 0.907 / 0.998; stage 13 had 0.921 / 0.998, stage 12
# 0.910 / 0.994, stage 10 0.924 / 0.996, the weights before issue 19 0.921 / 1.000); the
# floors guard the target itself and the attribute accuracy.
DEMO_MEETS_TARGETS = True
TARGET_MAP, TARGET_ATTR = 0.90, 0.85
FLOOR_MAP, FLOOR_ATTR = 0.90, 0.98


def test_shipped_demo_weights_fit_the_size_budget_and_know_the_world_classes():
    from vlp.detectors.checkpoint import CLASS_SUBSET_KEY, read_checkpoint
    from vlp.synthetic import palette

    path = inference.WEIGHTS_DIR / inference.SHIPPED_WEIGHTS["demo"][0]
    assert path.stat().st_size <= 10_000_000  # issue 19: the same 10 MB budget as before
    # a class-subset file (since stage 13) that keeps every category the world draws
    assert read_checkpoint(path)[CLASS_SUBSET_KEY].tolist() == sorted(palette.CATEGORY_IDS.values())


def test_the_weights_readme_names_the_shipped_file():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "detectors" / "weights" / "README.md").read_text()
    name, sha256 = inference.SHIPPED_WEIGHTS["demo"]
    assert re.search(r"^sha256: `([0-9a-f]{64})`$", readme, re.M).group(1) == sha256
    size = (inference.WEIGHTS_DIR / name).stat().st_size
    assert re.search(r"^size: (\d+) ", readme, re.M).group(1) == str(size)


@pytest.fixture(scope="module")
def demo_heldout(tmp_path_factory):
    from vlp.synthetic import generate

    root = tmp_path_factory.mktemp("heldout")
    # the classic world (training used seed 0); the first 60 of the benchmark's 120 images
    generate(root, 60, seed=7, split_fractions=(0.0, 0.0, 1.0), style="classic", web=False)
    detector = load_detector(preset="demo", device="cpu")
    assert detector.weights_sha256 == inference.SHIPPED_WEIGHTS["demo"][1]
    assert detector.feature_dim == 384
    result = evaluate_detector(detector, root)
    assert result["num_images"] == 60 and len(result["ap"]) == 8
    return result


@pytest.mark.xfail(not DEMO_MEETS_TARGETS, strict=True,
                   reason="shipped demo weights below the mAP@0.5 0.90 target")
@pytest.mark.slow
def test_shipped_demo_detector_meets_the_targets(demo_heldout):
    assert demo_heldout["mAP"] >= TARGET_MAP, demo_heldout["ap"]
    assert demo_heldout["attribute_accuracy"] >= TARGET_ATTR, demo_heldout


@pytest.mark.slow
def test_shipped_demo_detector_regression_floor(demo_heldout):
    assert demo_heldout["mAP"] >= FLOOR_MAP, demo_heldout["ap"]
    assert demo_heldout["attribute_accuracy"] >= FLOOR_ATTR, demo_heldout


def test_shipped_weights_sha256_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    name, expected = inference.SHIPPED_WEIGHTS["demo"]
    copy = tmp_path / name
    shutil.copyfile(inference.WEIGHTS_DIR / name, copy)
    data = bytearray(copy.read_bytes())
    data[-100] ^= 0xFF
    copy.write_bytes(bytes(data))
    monkeypatch.setattr(inference, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ShippedWeightsError) as info:
        load_detector(preset="demo", device="cpu")
    message = str(info.value)
    assert str(copy) in message and expected in message and sha256_file(copy) in message
    copy.unlink()
    with pytest.raises(ShippedWeightsError, match="missing"):
        load_detector(preset="demo", device="cpu")


# -- the shipped demo detector beyond its own renderer (issue 19) -----------------------------

# Targets of issue 19, on sets the detector never saw: the wide world (the default of
# vlp.synthetic.generate), the independent renderer's world, and single shapes on plain
# white / light backgrounds (the top box must be the shape). The shipped weights (stage 21:
# stage 19 trained on worlds whose object colours spread +-40 around their words) read by the
# demo preset (at 512 and 800 px) meet the attribute, the independent renderer's and the
# single-shape targets but not the wide world's mAP (benchmarks/RESULTS.md, "Demo detector
# stage 21"); the floors below guard the measured figures on these small sets.
TARGETS = {"wide": (0.90, 0.95), "independent": (0.80, 0.80)}
TARGETS_MET = {"wide": False, "independent": True}
SINGLE_TOP_BOX_TARGET = 0.95
SINGLE_TOP_BOX_MET = True
# Measured with the shipped weights (stage 21) under the demo preset (stride 8, RPN 6,000 /
# 300, read at 512 and 800 px) on the sets of the fixture below (wide world of generator 1.3):
# wide mAP 0.883 / attribute accuracy 0.991 (0.842 / 0.982 on generator 1.2's set, whose
# scenes could hide an object inside a same-coloured one), independent 0.922 / 0.954, single
# shapes top box 0.967 (58 of 60); read at 512, 800 and 384 px and mirrored at 512 (the preset
# for a day), 0.890 / 0.983, 0.921 / 0.954, 0.983. On generator 1.2's sets: stage 19: 0.800 / 0.962,
# 0.872 / 0.895, 0.900 (54 of 60); read at 512 alone: 0.763 / 0.970,
# 0.825 / 0.903, 0.950 (57 of 60). Stage 17 at 512 alone: 0.766 / 0.990,
# 0.806 / 0.893, 0.950; at stride 16 with 1,000 / 100 proposals: 0.727 /
# 0.960, 0.725 / 0.887, 0.950. Stage 13:
# 0.725 / 0.970, 0.713 / 0.884, 0.933 (56 of 60). On generator 1.1's wide set: stage 13
# 0.682 / 0.960; stage 12 0.640 / 0.989 (independent
# 0.698 / 0.890, top box 0.933); stage 10: 0.586 / 0.957, 0.606 / 0.922, 0.933; stage 8:
# 0.549 / 0.976, 0.615 / 0.921, 0.933; the weights before issue 19 (generator 1.0 sets):
# 0.260 / 0.814, 0.236 / 0.795 and 0.050.
WIDE_FLOORS = {"wide": (0.85, 0.97), "independent": (0.89, 0.93)}
SINGLE_TOP_BOX_FLOOR = 0.93


@pytest.fixture(scope="module")
def demo_beyond(tmp_path_factory):
    from vlp.detectors.evaluate import detect_vg, top_box_accuracy
    from vlp.synthetic import generate
    from vlp.synthetic.independent import generate_independent, generate_single_shapes

    root = tmp_path_factory.mktemp("beyond")
    generate(root / "wide", 40, seed=7, split_fractions=(0.0, 0.0, 1.0), web=False)
    generate_independent(root / "independent", 40, seed=0)
    generate_single_shapes(root / "single", 60, seed=0)
    detector = load_detector(preset="demo", device="cpu")
    results = {}
    for name in ("wide", "independent", "single"):
        records, gt = detect_vg(detector, root / name)
        results[name] = evaluate_predictions(records, gt, score_threshold=0.2)
        if name == "single":
            results[name]["top_box"] = top_box_accuracy(records, gt)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    pytest.param(name, marks=[] if met else pytest.mark.xfail(
        strict=True, reason=f"shipped demo weights below issue 19's mAP target on the {name} set"))
    for name, met in TARGETS_MET.items()])
def test_shipped_demo_detector_meets_the_issue_19_targets(demo_beyond, name):
    target_map, target_attr = TARGETS[name]
    assert demo_beyond[name]["attribute_accuracy"] >= target_attr, name
    assert demo_beyond[name]["mAP"] >= target_map, (name, demo_beyond[name]["ap"])


@pytest.mark.xfail(not SINGLE_TOP_BOX_MET, strict=True,
                   reason="shipped demo detector below issue 19's single-shape top-box target")
@pytest.mark.slow
def test_shipped_demo_detector_meets_the_single_shape_target(demo_beyond):
    assert demo_beyond["single"]["top_box"]["rate"] >= SINGLE_TOP_BOX_TARGET, demo_beyond["single"]["top_box"]


@pytest.mark.slow
def test_shipped_demo_detector_beyond_its_renderer_floor(demo_beyond):
    for name, (floor_map, floor_attr) in WIDE_FLOORS.items():
        assert demo_beyond[name]["mAP"] >= floor_map, (name, demo_beyond[name]["ap"])
        assert demo_beyond[name]["attribute_accuracy"] >= floor_attr, name
    assert demo_beyond["single"]["top_box"]["rate"] >= SINGLE_TOP_BOX_FLOOR, demo_beyond["single"]["top_box"]
