"""Growing a trained detector: Net2Wider bottlenecks and added anchor sizes, each giving the
same outputs from a larger network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlp.detectors import load_detector
from vlp.detectors.checkpoint import read_checkpoint, save_checkpoint
from vlp.detectors.config import make_config
from vlp.detectors.errors import CheckpointError
from vlp.detectors.model import FasterRCNN, apply_deltas, init_random_weights
from vlp.detectors.widen import add_anchor_sizes, add_anchor_sizes_checkpoint, widen_bottlenecks, widen_checkpoint

SMALL = dict(preset="demo", min_size=160, max_size=240, extra_min_sizes=[], mirrored_reading=False, device="cpu")
NARROW = dict(bottleneck_channels=16)  # the demo preset's width before it was widened to 24
DEMO_SIZES = [32, 64, 128, 256]  # its anchor sizes before stage 19 added 512
EARLY = dict(NARROW, anchor_sizes=tuple(DEMO_SIZES))  # the demo detector of its early stages


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((150, 200, 3), 90, np.uint8)
    for _ in range(4):  # a few flat rectangles so the RPN has edges to fire on
        x, y = rng.integers(0, 150), rng.integers(0, 100)
        image[y:y + 40, x:x + 50] = rng.integers(0, 255, 3)
    return image


def _assert_same_records(before, after, *, box_atol, conf_atol, feature_atol, feature_rtol=0.0):
    """Both detectors write the same records for a few images: ids exact, values within the
    given tolerances (float32 sums in another order)."""
    for seed in range(3):
        a, = before.detect([_image(seed)])
        b, = after.detect([_image(seed)])
        assert np.array_equal(a.objects_id, b.objects_id) and np.array_equal(a.attrs_id, b.attrs_id)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=box_atol)
        np.testing.assert_allclose(a.objects_conf, b.objects_conf, atol=conf_atol)
        np.testing.assert_allclose(a.features.astype(np.float32), b.features.astype(np.float32),
                                   atol=feature_atol, rtol=feature_rtol)


@pytest.fixture(scope="module")
def slim(tmp_path_factory):
    model = init_random_weights(FasterRCNN(make_config("demo", **EARLY).arch), seed=3)
    path = tmp_path_factory.mktemp("widen") / "narrow.pt"
    save_checkpoint(model, path)
    return path


def test_the_widened_detector_writes_the_same_records(slim, tmp_path):
    wide_path = widen_checkpoint(slim, tmp_path / "wide.pt", bottleneck_channels=24, seed=5)
    narrow = load_detector(slim, **EARLY, **SMALL)
    wide = load_detector(wide_path, bottleneck_channels=24, anchor_sizes=DEMO_SIZES, **SMALL)
    state = torch.load(wide_path, weights_only=True)
    # every stage 1.5x wider inside its bottlenecks; block inputs and outputs unchanged
    assert state["backbone.res2.0.conv2.weight"].shape == (24, 24, 3, 3)
    assert state["roi_heads.res5.1.conv1.weight"].shape == (192, 384, 1, 1)
    assert state["roi_heads.res5.1.conv3.weight"].shape == (384, 192, 1, 1)
    # tolerances far below anything a record shows
    _assert_same_records(narrow, wide, box_atol=1e-2, conf_atol=1e-5, feature_atol=2e-3, feature_rtol=2e-3)


def test_the_copies_differ_in_their_outgoing_weights_so_training_can_separate_them(slim):
    state = read_checkpoint(slim)
    wide = widen_bottlenecks(state, 24, seed=0)
    conv3 = wide["backbone.res2.0.conv3.weight"][:, :, 0, 0]
    conv1 = wide["backbone.res2.0.conv1.weight"][:, :, 0, 0]
    copies = [(i, j) for i in range(16) for j in range(16, 24) if torch.equal(conv1[i], conv1[j])]
    assert len(copies) == 8
    for i, j in copies:  # same incoming weights, outgoing split 0.5 +- d with d != 0
        assert not torch.allclose(conv3[:, i], conv3[:, j])
        original = state["backbone.res2.0.conv3.weight"][:, i, 0, 0].float()
        torch.testing.assert_close(conv3[:, i] + conv3[:, j], original)
    assert widen_bottlenecks(state, 24, seed=0).keys() == wide.keys()
    assert all(torch.equal(wide[k], v) for k, v in widen_bottlenecks(state, 24, seed=0).items())


def test_widening_refuses_what_it_cannot_do(slim):
    state = read_checkpoint(slim)
    with pytest.raises(ValueError, match="between the checkpoint's 16 and twice it"):
        widen_bottlenecks(state, 12)
    with pytest.raises(ValueError, match="between"):
        widen_bottlenecks(state, 40)
    with pytest.raises(CheckpointError, match="no bottleneck"):
        widen_bottlenecks({"x.weight": torch.zeros(2)}, 24)
    unchanged = widen_bottlenecks(state, 16)
    assert all(torch.equal(unchanged[k], v.float()) for k, v in state.items())


# -- added anchor sizes -----------------------------------------------------------------


def _rpn_outputs(state: dict, anchor_sizes, features: torch.Tensor):
    """Per anchor (location-major): objectness logit and decoded box, for one feature map."""
    model = FasterRCNN(make_config("demo", **NARROW, anchor_sizes=anchor_sizes).arch)
    model.load_state_dict(state, strict=False)
    rpn = model.proposal_generator
    with torch.no_grad():
        logits, deltas = rpn.rpn_head(features)
    num, (fh, fw) = rpn.anchor_generator.num_anchors, features.shape[-2:]
    logits = logits[0].permute(1, 2, 0).reshape(fh, fw, num)
    deltas = deltas[0].reshape(num, 4, fh, fw).permute(2, 3, 0, 1).reshape(-1, 4)
    boxes = apply_deltas(deltas, rpn.anchor_generator.grid_anchors(fh, fw)).reshape(fh, fw, num, 4)
    return logits, boxes


def test_an_added_anchor_proposes_its_source_anchors_box_less_confidently(slim):
    state = read_checkpoint(slim)
    grown = add_anchor_sizes(state, [16, *DEMO_SIZES, 512], objectness_offset=-2.0)
    features = torch.randn(1, 192, 5, 7, generator=torch.Generator().manual_seed(0))
    old_logits, old_boxes = _rpn_outputs({k: v.float() for k, v in state.items()}, DEMO_SIZES, features)
    new_logits, new_boxes = _rpn_outputs(grown, [16, *DEMO_SIZES, 512], features)
    assert new_logits.shape[-1] == 18 and grown["proposal_generator.anchor_generator.cell_anchors.0"].shape == (18, 4)
    # sizes 32..256 keep their rows: anchors 3..14 of the new layout are the old 0..11
    torch.testing.assert_close(new_logits[..., 3:15], old_logits, rtol=0, atol=0)
    torch.testing.assert_close(new_boxes[..., 3:15, :], old_boxes, rtol=0, atol=0)
    # 16 copies 32 (old 0..2), 512 copies 256 (old 9..11): the same boxes, logit - 2
    for new, old in ((slice(0, 3), slice(0, 3)), (slice(15, 18), slice(9, 12))):
        torch.testing.assert_close(new_logits[..., new], old_logits[..., old] - 2.0)
        torch.testing.assert_close(new_boxes[..., new, :], old_boxes[..., old, :], rtol=1e-5, atol=1e-3)
    cells = grown["proposal_generator.anchor_generator.cell_anchors.0"]
    widths = cells[:, 2] - cells[:, 0]
    heights = cells[:, 3] - cells[:, 1]
    torch.testing.assert_close((widths * heights).sqrt()[[0, 15]], torch.tensor([16.0, 512.0]))


def test_the_detector_with_an_added_anchor_size_writes_the_same_records(slim, tmp_path):
    grown_path = add_anchor_sizes_checkpoint(slim, tmp_path / "a512.pt", [*DEMO_SIZES, 512])
    # every anchor reaches NMS (no pre-NMS cut), where each copy falls to its higher-scoring source
    everything = dict(SMALL, rpn_pre_nms_topk=100000)
    before = load_detector(slim, **EARLY, **everything)
    after = load_detector(grown_path, **NARROW, anchor_sizes=[*DEMO_SIZES, 512], **everything)
    _assert_same_records(before, after, box_atol=1e-3, conf_atol=1e-6, feature_atol=1e-3)
    # written in the layout of the output's suffix, as every checkpoint writer of the project
    pickled = add_anchor_sizes_checkpoint(slim, tmp_path / "a512.pkl", [*DEMO_SIZES, 512])
    assert read_checkpoint(pickled).keys() == torch.load(grown_path, weights_only=True).keys()
    with pytest.raises(CheckpointError, match="unknown checkpoint type '.bin5'"):
        add_anchor_sizes_checkpoint(slim, tmp_path / "a512.bin5", [*DEMO_SIZES, 512])
    no_rpn = tmp_path / "no-rpn.pt"
    torch.save({"x.weight": torch.zeros(2)}, no_rpn)
    for grow in (lambda out: add_anchor_sizes_checkpoint(no_rpn, out, DEMO_SIZES),
                 lambda out: widen_checkpoint(no_rpn, out, bottleneck_channels=24)):
        with pytest.raises(CheckpointError) as info:
            grow(tmp_path / "out.pt")
        assert str(info.value).startswith(f"{no_rpn}: ")  # the file whose contents are refused
    assert not (tmp_path / "out.pt").exists()


def test_adding_anchor_sizes_refuses_what_it_cannot_do(slim):
    state = read_checkpoint(slim)
    with pytest.raises(ValueError, match="keep every size of the checkpoint \\(32, 64, 128, 256\\)"):
        add_anchor_sizes(state, [64, 128, 256, 512])
    with pytest.raises(ValueError, match="positive"):
        add_anchor_sizes(state, [*DEMO_SIZES, 0])
    with pytest.raises(ValueError, match="repeat"):
        add_anchor_sizes(state, [*DEMO_SIZES, 256])
    with pytest.raises(CheckpointError, match="missing proposal_generator"):
        add_anchor_sizes({"x.weight": torch.zeros(2)}, DEMO_SIZES)
    broken = dict(state)
    broken["proposal_generator.anchor_generator.cell_anchors.0"] = torch.zeros(12, 4)
    with pytest.raises(CheckpointError, match="without area"):
        add_anchor_sizes(broken, DEMO_SIZES)
    broken["proposal_generator.anchor_generator.cell_anchors.0"] = torch.rand(12, 4) + torch.tensor([0, 0, 2, 2])
    with pytest.raises(CheckpointError, match="size-major grid"):
        add_anchor_sizes(broken, DEMO_SIZES)
    unchanged = add_anchor_sizes(state, list(reversed(DEMO_SIZES)))  # same sizes, listed in another order
    assert unchanged["proposal_generator.anchor_generator.cell_anchors.0"].shape == (12, 4)
