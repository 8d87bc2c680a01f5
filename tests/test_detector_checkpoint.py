"""Strict, safe checkpoint loading for both real layouts (key lists from the real files)."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from vlp.schemas.shards import sha256_file
import torch

from vlp.detectors import ArchitectureConfig, CheckpointError, FasterRCNN, load_detector, save_checkpoint
from vlp.detectors.checkpoint import KEY_RENAMES, load_weights, match_state_dict, read_checkpoint

LAYOUTS = Path(__file__).parent / "data" / "checkpoint-layouts"
HF_KEYS = LAYOUTS / "hf_frcnn_vg_finetuned.keys.tsv"
D2_KEYS = LAYOUTS / "detectron2_caffe_attr_pkl.keys.tsv"
SLIM = ArchitectureConfig(blocks=(1, 1, 1, 1), stem_channels=8, res2_channels=32, bottleneck_channels=8,
                          rpn_channels=32, cls_embedding_dim=16, attr_hidden_dim=32)
# Distinct values at a few keys, to check that each lands on the right parameter.
PROBES = ("roi_heads.box_predictor.cls_score.bias", "backbone.res4.22.conv2.norm.running_var",
          "proposal_generator.rpn_head.anchor_deltas.weight", "proposal_generator.anchor_generator.cell_anchors.0")


def read_layout(path):
    rows = []
    for line in path.read_text().splitlines():
        name, shape, dtype = line.split("\t")
        shape = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        rows.append((name, shape, dtype))
    return rows


def probe_values(name, shape):
    n = int(np.prod(shape))
    return (np.arange(n, dtype=np.float32).reshape(shape) % 97 + 1) / (7 + len(name))


def layout_state(rows):
    state = {}
    for name, shape, dtype in rows:
        if dtype == "torch.int64":
            state[name] = torch.tensor(1234, dtype=torch.int64)
        elif name in PROBES:
            state[name] = torch.from_numpy(probe_values(name, shape))
        else:
            state[name] = torch.zeros(shape, dtype=torch.float32)
    return state


@pytest.fixture(scope="module")
def r101():
    return FasterRCNN(ArchitectureConfig())


@pytest.fixture(scope="module")
def hf_state():
    rows = read_layout(HF_KEYS)
    assert len(rows) == 640 and sum(r[2] == "torch.int64" for r in rows) == 104
    return layout_state(rows)


def test_layouts_match_the_model_by_name_and_shape(r101):
    model_shapes = {k: tuple(v.shape) for k, v in r101.state_dict().items()}
    d2 = {name: shape for name, shape, _ in read_layout(D2_KEYS)}
    assert len(d2) == 536
    assert d2 == model_shapes
    hf = {name: shape for name, shape, _ in read_layout(HF_KEYS) if not name.endswith(".num_batches_tracked")}
    assert hf == model_shapes


def test_hf_bin_loads_strictly(tmp_path, r101, hf_state):
    path = tmp_path / "pytorch_model.bin"
    torch.save(hf_state, path)
    info = load_weights(r101, path)
    assert info["layout"] == "hf-state-dict" and len(info["ignored_keys"]) == 104
    assert info["sha256"] == sha256_file(path)
    state = r101.state_dict()
    for name in PROBES:
        assert torch.equal(state[name], hf_state[name]), name
    path.unlink()  # 180 MB


def test_detectron2_pkl_loads_strictly(tmp_path, r101):
    rows = read_layout(D2_KEYS)
    arrays = {name: (probe_values(name, shape) if name in PROBES else np.full(shape, 0.5, dtype=np.float32))
              for name, shape, _ in rows}
    path = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "test"}, f, protocol=2)
    info = load_weights(r101, path)
    assert info["layout"] == "detectron2" and info["num_keys"] == 536
    state = r101.state_dict()
    for name in PROBES:
        assert np.array_equal(state[name].numpy(), arrays[name]), name
    assert float(state["backbone.res2.0.conv1.weight"][0, 0, 0, 0]) == 0.5
    path.unlink()  # 180 MB


def test_missing_extra_and_misshaped_keys_are_listed_together(r101, hf_state):
    raw = dict(hf_state)
    del raw["roi_heads.res5.2.conv3.norm.bias"]
    raw["roi_heads.box_predictor.extra_head.weight"] = torch.zeros(3)
    raw["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(1600, 2048)
    with pytest.raises(CheckpointError) as info:
        match_state_dict(raw, r101, source="ckpt.bin")
    message = str(info.value)
    assert "ckpt.bin does not match" in message
    assert "missing keys (1):\n    roi_heads.res5.2.conv3.norm.bias" in message
    assert "unexpected keys (1):\n    roi_heads.box_predictor.extra_head.weight" in message
    assert ("roi_heads.box_predictor.cls_score.weight: checkpoint (1600, 2048) vs model (1601, 2048)"
            in message)
    assert info.value.missing == ["roi_heads.res5.2.conv3.norm.bias"]


@pytest.mark.parametrize("problem", ["missing", "extra", "shape"])
def test_each_problem_alone_fails_from_a_file(tmp_path, problem):
    model = FasterRCNN(SLIM)
    state = model.state_dict()
    if problem == "missing":
        del state["backbone.stem.conv1.weight"]
        expected = "missing keys (1):\n    backbone.stem.conv1.weight"
    elif problem == "extra":
        state["backbone.res6.0.conv1.weight"] = torch.zeros(1)
        expected = "unexpected keys (1):\n    backbone.res6.0.conv1.weight"
    else:
        state["roi_heads.box_predictor.attr_score.bias"] = torch.zeros(400)
        expected = "roi_heads.box_predictor.attr_score.bias: checkpoint (400,) vs model (401,)"
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_detector(path, allow_random=False, **_slim_overrides())
    assert expected in str(info.value) and str(path) in str(info.value)


def test_num_batches_tracked_only_accepted_on_norms(r101, hf_state):
    raw = dict(hf_state)
    raw["roi_heads.box_predictor.cls_score.num_batches_tracked"] = torch.tensor(0)
    with pytest.raises(CheckpointError, match="cls_score.num_batches_tracked"):
        match_state_dict(raw, r101)


def test_cell_anchors_optional_and_loaded_when_present(tmp_path):
    model = FasterRCNN(SLIM)
    state = model.state_dict()
    default = state["proposal_generator.anchor_generator.cell_anchors.0"].clone()
    custom = default * 2
    state["proposal_generator.anchor_generator.cell_anchors.0"] = custom
    loaded, _ = match_state_dict(state, FasterRCNN(SLIM))
    assert torch.equal(loaded["proposal_generator.anchor_generator.cell_anchors.0"], custom)
    del state["proposal_generator.anchor_generator.cell_anchors.0"]
    loaded, _ = match_state_dict(state, FasterRCNN(SLIM))
    assert torch.equal(loaded["proposal_generator.anchor_generator.cell_anchors.0"], default)


def test_rename_table_strips_data_parallel_prefix():
    assert KEY_RENAMES == [(r"^module\.", "")]
    model = FasterRCNN(SLIM)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    loaded, _ = match_state_dict(state, FasterRCNN(SLIM))
    assert set(loaded) == set(model.state_dict())


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_imports_os_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"backbone.stem.conv1.weight": _RunsShell(marker)}}, f)
    with pytest.raises(CheckpointError, match=r"refusing to load (os|posix)\.system"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_detector(path)
    assert not marker.exists()


def test_torch_file_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"backbone.stem.conv1.weight": _RunsShell(marker)}, path)
    with pytest.raises(CheckpointError, match=r"weights_only=True"):
        read_checkpoint(path)
    assert not marker.exists()


def test_unreadable_and_unknown_files(tmp_path):
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="junk.pkl"):
        read_checkpoint(junk)
    other = tmp_path / "weights.onnx"
    other.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint type '.onnx'"):
        read_checkpoint(other)
    not_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(CheckpointError, match="expected a dict"):
        read_checkpoint(not_dict)


@pytest.mark.parametrize("name,half", [("slim.pt", False), ("slim.pkl", False), ("slim-half.pth", True)])
def test_save_and_reload_round_trip(tmp_path, name, half):
    source = load_detector(allow_random=True, seed=3, **_slim_overrides())
    path = tmp_path / name
    sha = save_checkpoint(source.model, path, half=half)
    assert sha == sha256_file(path)
    raw = read_checkpoint(path)
    assert set(raw) == set(source.model.state_dict())
    assert all(v.dtype == (torch.float16 if half else torch.float32) for v in raw.values())
    loaded = load_detector(path, **_slim_overrides())
    assert loaded.weights_sha256 == sha and source.weights_sha256 is None
    for key, value in source.model.state_dict().items():
        other = loaded.model.state_dict()[key]
        if half:
            assert torch.allclose(other, value.half().float()), key
        else:
            assert torch.equal(other, value), key


def test_directory_with_a_known_file_name(tmp_path):
    model = FasterRCNN(SLIM)
    save_checkpoint(model, tmp_path / "pytorch_model.bin")
    det = load_detector(tmp_path, **_slim_overrides())
    assert det.weights_path.endswith("pytorch_model.bin")


def _slim_overrides():
    return dict(blocks=SLIM.blocks, stem_channels=SLIM.stem_channels, res2_channels=SLIM.res2_channels,
                bottleneck_channels=SLIM.bottleneck_channels, rpn_channels=SLIM.rpn_channels,
                cls_embedding_dim=SLIM.cls_embedding_dim, attr_hidden_dim=SLIM.attr_hidden_dim)
