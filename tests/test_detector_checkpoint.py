"""Strict, safe checkpoint loading for both real layouts (key lists from the real files)."""

import dataclasses
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlp.schemas.shards import sha256_file
import torch

from vlp.detectors import ArchitectureConfig, CheckpointError, FasterRCNN, load_detector, save_checkpoint
from vlp.detectors.checkpoint import (ABSENT_CLASS_LOGIT, CLASS_SUBSET_KEY, KEY_RENAMES, load_weights,
                                      interpolate_checkpoints, match_state_dict, read_checkpoint,
                                      subset_checkpoint)

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


# -- class-subset checkpoints -----------------------------------------------------------

KEPT = [5, 17, 1599]
PREDICTOR = "roi_heads.box_predictor."


@pytest.fixture(scope="module")
def slim_source():
    return load_detector(allow_random=True, seed=3, **_slim_overrides())


@pytest.mark.parametrize("name", ["subset.pt", "subset.pkl"])
def test_class_subset_checkpoint_stores_the_kept_rows_and_loads_to_the_full_layout(tmp_path, slim_source, name):
    model = slim_source.model
    full = tmp_path / "full.pt"
    save_checkpoint(model, full)
    sha = save_checkpoint(model, tmp_path / name, classes=[1599, 5, 17, 5])  # any order, duplicates merged
    raw = read_checkpoint(tmp_path / name)
    assert raw[CLASS_SUBSET_KEY].tolist() == KEPT and raw[CLASS_SUBSET_KEY].dtype == torch.int64
    dim = model.roi_heads.box_predictor.cls_score.in_features
    assert raw[PREDICTOR + "cls_score.weight"].shape == (4, dim)  # 3 classes + background
    assert raw[PREDICTOR + "bbox_pred.weight"].shape == (12, dim)
    assert raw[PREDICTOR + "cls_embedding.weight"].shape == (4, SLIM.cls_embedding_dim)
    assert (tmp_path / name).stat().st_size < full.stat().st_size / 2

    loaded = load_detector(tmp_path / name, **_slim_overrides())
    assert loaded.weights_sha256 == sha
    before, after = model.state_dict(), loaded.model.state_dict()
    with_background = KEPT + [1600]
    absent = torch.ones(1601, dtype=torch.bool)
    absent[with_background] = False
    for key in before:
        if key == PREDICTOR + "cls_score.bias":
            assert torch.equal(after[key][with_background], before[key][with_background])
            assert bool((after[key][absent] == ABSENT_CLASS_LOGIT).all())
        elif key in (PREDICTOR + "cls_score.weight", PREDICTOR + "cls_embedding.weight"):
            assert torch.equal(after[key][with_background], before[key][with_background])
            assert not after[key][absent].any()
        elif key.startswith(PREDICTOR + "bbox_pred."):
            rows = torch.tensor([4 * c + i for c in KEPT for i in range(4)])
            assert torch.equal(after[key][rows], before[key][rows])
            assert int(torch.count_nonzero(after[key])) == int(torch.count_nonzero(before[key][rows]))
        else:
            assert torch.equal(after[key], before[key]), key

    # Behaviour: the kept classes' probabilities are the full model's, renormalised over them;
    # a left-out class has probability 0.
    features = torch.randn(50, dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p_full = model.roi_heads.box_predictor.class_logits(features).softmax(-1)
        p_subset = loaded.model.roi_heads.box_predictor.class_logits(features).softmax(-1)
    expected = p_full[:, with_background] / p_full[:, with_background].sum(-1, keepdim=True)
    torch.testing.assert_close(p_subset[:, with_background], expected, rtol=1e-5, atol=1e-7)
    assert float(p_subset[:, absent].max()) == 0.0

    # The same file from the full checkpoint on disk, byte for byte.
    assert subset_checkpoint(full, tmp_path / ("again" + Path(name).suffix), KEPT) == sha
    with pytest.raises(CheckpointError, match="already a class-subset checkpoint"):
        subset_checkpoint(tmp_path / name, tmp_path / "twice.pt", KEPT)
    partial = {k: v for k, v in model.state_dict().items() if k != PREDICTOR + "cls_embedding.weight"}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"partial.pt: no box predictor to subset \(missing "
                                              r"roi_heads.box_predictor.cls_embedding.weight\)"):
        subset_checkpoint(tmp_path / "partial.pt", tmp_path / "none.pt", KEPT)
    assert not (tmp_path / "none.pt").exists()


@pytest.fixture(scope="module")
def subset_state(slim_source):
    path_state = {k: v.clone() for k, v in slim_source.model.state_dict().items()}
    from vlp.detectors.checkpoint import _subset_state
    return _subset_state(path_state, KEPT)


@pytest.mark.parametrize("kept,message", [
    (torch.tensor([], dtype=torch.int64), "non-empty 1-D integer"),
    (torch.tensor([5.0, 17.0, 1599.0]), "non-empty 1-D integer"),
    (torch.tensor([[5, 17, 1599]]), "non-empty 1-D integer"),
    (torch.tensor([17, 5, 1599]), "ascending and distinct"),
    (torch.tensor([5, 5, 1599]), "ascending and distinct"),
    (torch.tensor([5, 17, 1600]), r"must lie in \[0, 1600\)"),
    (torch.tensor([-1, 17, 1599]), r"must lie in \[0, 1600\)"),
    (torch.tensor([5, 1599]), "cls_score.weight of a class-subset checkpoint must be floating point with 3 rows"),
])
def test_a_malformed_class_subset_is_a_clear_error(slim_source, subset_state, kept, message):
    state = dict(subset_state)
    state[CLASS_SUBSET_KEY] = kept
    with pytest.raises(CheckpointError, match=f"subset.pt: .*{message}"):
        match_state_dict(state, FasterRCNN(SLIM), source="subset.pt")


def test_class_subset_rows_must_match_their_classes(subset_state):
    state = dict(subset_state)
    state[PREDICTOR + "bbox_pred.bias"] = state[PREDICTOR + "bbox_pred.bias"][:-4]
    with pytest.raises(CheckpointError, match=r"bbox_pred.bias .* with 12 rows for its 3 classes, got "):
        match_state_dict(state, FasterRCNN(SLIM), source="subset.pt")
    # a subset of another architecture is reported as such, with the full shapes
    wider = dataclasses.replace(SLIM, res2_channels=2 * SLIM.res2_channels)
    with pytest.raises(CheckpointError, match="subset.pt does not match the detector architecture") as info:
        match_state_dict(dict(subset_state), FasterRCNN(wider), source="subset.pt")
    assert ("roi_heads.box_predictor.cls_score.weight: checkpoint (1601, 256) vs model (1601, 512)"
            in info.value.mismatched)
    state = dict(subset_state)
    del state[PREDICTOR + "cls_embedding.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\s+roi_heads.box_predictor.cls_embedding.weight"):
        match_state_dict(state, FasterRCNN(SLIM), source="subset.pt")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kept=st.lists(st.integers(-3, 1603), max_size=6), dtype=st.sampled_from([torch.int64, torch.int32,
                                                                               torch.float32, torch.bool]),
       score_rows=st.integers(0, 8), box_rows=st.integers(0, 30))
def test_fuzzed_class_subsets_load_or_fail_clearly(subset_state, kept, dtype, score_rows, box_rows):
    """Whatever the subset key and row counts say, loading either works or raises CheckpointError."""
    state = dict(subset_state)
    state[CLASS_SUBSET_KEY] = torch.tensor(kept, dtype=dtype) if kept else torch.zeros(0, dtype=dtype)
    dim = state[PREDICTOR + "cls_score.weight"].shape[1]
    state[PREDICTOR + "cls_score.weight"] = torch.zeros(score_rows, dim)
    state[PREDICTOR + "bbox_pred.weight"] = torch.zeros(box_rows, dim)
    try:
        loaded, _ = match_state_dict(state, FasterRCNN(SLIM), source="fuzz.pt")
    except CheckpointError as exc:
        assert str(exc).startswith("fuzz.pt")
    else:
        assert loaded[PREDICTOR + "cls_score.weight"].shape[0] == 1601


def test_interpolated_checkpoint_mixes_floats_and_refuses_what_cannot_be_mixed(tmp_path):
    torch.manual_seed(0)
    model_a, model_b = FasterRCNN(SLIM).eval(), FasterRCNN(SLIM).eval()
    for p in model_b.parameters():
        p.data.normal_()
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    save_checkpoint(model_a, a)
    save_checkpoint(model_b, b, half=True)
    state_a, state_b = read_checkpoint(a), read_checkpoint(b)
    for weight in (0.0, 0.3, 1.0):
        out = tmp_path / f"mix{weight}.pt"
        interpolate_checkpoints(a, b, out, weight)
        mixed = read_checkpoint(out)
        assert mixed.keys() == state_a.keys()
        for name, value in mixed.items():
            assert value.dtype == torch.float32
            expected = (1 - weight) * state_a[name].float() + weight * state_b[name].float()
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
        load_weights(FasterRCNN(SLIM), out)  # the strict loader takes it
    interpolate_checkpoints(a, b, tmp_path / "h.pt", 0.5, half=True)
    assert all(v.dtype == torch.float16 for v in read_checkpoint(tmp_path / "h.pt").values())
    with pytest.raises(ValueError, match="between 0 and 1"):
        interpolate_checkpoints(a, b, tmp_path / "bad.pt", 1.5)
    other = FasterRCNN(dataclasses.replace(SLIM, rpn_channels=16))
    save_checkpoint(other, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other.pt: .*rpn_head.conv.weight: shape \(32, 128, 3, 3\) against \(16, 128, 3, 3\)"):
        interpolate_checkpoints(a, tmp_path / "other.pt", tmp_path / "bad.pt", 0.5)
    subset_checkpoint(a, tmp_path / "sub.pt", [3, 7])
    with pytest.raises(CheckpointError, match="a class-subset checkpoint: interpolate the full files"):
        interpolate_checkpoints(tmp_path / "sub.pt", b, tmp_path / "bad.pt", 0.5)
    assert not (tmp_path / "bad.pt").exists()
