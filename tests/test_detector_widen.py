"""Net2Wider widening of a detector's bottlenecks: same outputs, a wider network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlp.detectors import load_detector
from vlp.detectors.checkpoint import read_checkpoint, save_checkpoint
from vlp.detectors.config import make_config
from vlp.detectors.errors import CheckpointError
from vlp.detectors.model import FasterRCNN, init_random_weights
from vlp.detectors.widen import widen_bottlenecks, widen_checkpoint

SMALL = dict(preset="demo", min_size=160, max_size=240, device="cpu")
NARROW = dict(bottleneck_channels=16)  # the demo preset's width before it was widened to 24


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((150, 200, 3), 90, np.uint8)
    for _ in range(4):  # a few flat rectangles so the RPN has edges to fire on
        x, y = rng.integers(0, 150), rng.integers(0, 100)
        image[y:y + 40, x:x + 50] = rng.integers(0, 255, 3)
    return image


@pytest.fixture(scope="module")
def slim(tmp_path_factory):
    model = init_random_weights(FasterRCNN(make_config("demo", **NARROW).arch), seed=3)
    path = tmp_path_factory.mktemp("widen") / "narrow.pt"
    save_checkpoint(model, path)
    return path


def test_the_widened_detector_writes_the_same_records(slim, tmp_path):
    wide_path = widen_checkpoint(slim, tmp_path / "wide.pt", bottleneck_channels=24, seed=5)
    narrow = load_detector(slim, **NARROW, **SMALL)
    wide = load_detector(wide_path, bottleneck_channels=24, **SMALL)
    state = torch.load(wide_path, weights_only=True)
    # every stage 1.5x wider inside its bottlenecks; block inputs and outputs unchanged
    assert state["backbone.res2.0.conv2.weight"].shape == (24, 24, 3, 3)
    assert state["roi_heads.res5.1.conv1.weight"].shape == (192, 384, 1, 1)
    assert state["roi_heads.res5.1.conv3.weight"].shape == (384, 192, 1, 1)
    for seed in range(3):
        a, = narrow.detect([_image(seed)])
        b, = wide.detect([_image(seed)])
        assert np.array_equal(a.objects_id, b.objects_id) and np.array_equal(a.attrs_id, b.attrs_id)
        # float32 sums in another order: tolerance far below anything a record shows
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-2)
        np.testing.assert_allclose(a.objects_conf, b.objects_conf, atol=1e-5)
        np.testing.assert_allclose(a.features.astype(np.float32), b.features.astype(np.float32),
                                   atol=2e-3, rtol=2e-3)


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
