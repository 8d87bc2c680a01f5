"""Presets, overrides, the config hash, and the no-weights error."""

import json

import pytest

from vlp.detectors import (ArchitectureConfig, MissingWeightsError, config_from_dict, get_preset,
                           load_detector, make_config, preset_names, register_preset)
from vlp.detectors.config import PRESETS, RESERVED_PRESETS, DetectorConfig
from vlp.detectors.errors import DetectorConfigError
from vlp.detectors.inference import resized_size


def test_presets_are_documented_values():
    assert {"butd-10-100", "butd-36", "lxmert-36"} <= set(preset_names())
    butd = get_preset("butd-10-100")
    assert (butd.min_size, butd.max_size, butd.resize) == (600, 1000, "cv2")
    assert (butd.rpn_pre_nms_topk, butd.rpn_nms_threshold, butd.rpn_post_nms_topk) == (6000, 0.7, 300)
    assert (butd.nms_threshold, butd.score_threshold, butd.min_boxes, butd.max_boxes) == (0.3, 0.2, 10, 100)
    assert (butd.selection, butd.boxes) == ("per_class", "rois")
    fixed = get_preset("butd-36")
    assert (fixed.min_boxes, fixed.max_boxes) == (36, 36)
    lx = get_preset("lxmert-36")
    assert (lx.min_size, lx.max_size, lx.resize, lx.selection, lx.boxes) == (800, 1333, "pil", "agnostic_loop",
                                                                            "regressed")
    assert (lx.min_boxes, lx.max_boxes) == (36, 36)
    arch = butd.arch
    assert arch.blocks == (3, 4, 23, 3) and arch.feature_dim == 2048 and arch.res4_channels == 1024
    assert arch.num_anchors == 12 and arch.pixel_mean == (102.9801, 115.9465, 122.7717)


def test_demo_preset_is_registered_and_registry_is_open():
    demo = get_preset("demo")
    assert demo.preset == "demo" and demo.arch.pooler == "roialign" and demo.arch.feature_dim == 384
    assert (demo.selection, demo.boxes) == ("per_class", "regressed")  # trained with box regression
    assert get_preset("butd-10-100").arch.pooler == "roipool"
    RESERVED_PRESETS["test-only-reserved"] = "a later issue"
    try:
        with pytest.raises(KeyError, match="reserved"):
            get_preset("test-only-reserved")
    finally:
        RESERVED_PRESETS.pop("test-only-reserved")
    with pytest.raises(KeyError, match="available presets"):
        get_preset("nope")
    register_preset("test-only-slim", lambda: DetectorConfig(arch=ArchitectureConfig(blocks=(1, 1, 1, 1))))
    try:
        assert get_preset("test-only-slim").preset == "test-only-slim"
        with pytest.raises(ValueError, match="already registered"):
            register_preset("test-only-slim", DetectorConfig)
    finally:
        PRESETS.pop("test-only-slim")


def test_every_threshold_is_an_override():
    cfg = make_config("butd-10-100", score_threshold=0.3, min_boxes=5, max_boxes=50, nms_threshold=0.4,
                      min_size=480, max_size=800, rpn_post_nms_topk=100, blocks=[1, 2, 3, 1])
    assert (cfg.score_threshold, cfg.min_boxes, cfg.max_boxes, cfg.nms_threshold) == (0.3, 5, 50, 0.4)
    assert (cfg.min_size, cfg.max_size, cfg.rpn_post_nms_topk) == (480, 800, 100)
    assert cfg.arch.blocks == (1, 2, 3, 1)
    with pytest.raises(TypeError, match=r"unknown detector setting score_treshold \(did you mean score_threshold\?\)"):
        make_config(score_treshold=0.3)
    with pytest.raises(DetectorConfigError, match="min_boxes"):
        make_config(min_boxes=20, max_boxes=10)
    with pytest.raises(DetectorConfigError, match="selection"):
        make_config(selection="magic")
    assert make_config(res4_dilation=2, feature_stride=8).arch.res4_dilation == 2
    with pytest.raises(DetectorConfigError, match="feature_stride must be 8 with res4_dilation 2, got 16"):
        make_config(res4_dilation=2)
    with pytest.raises(DetectorConfigError, match="res4_dilation must be 1 or 2, got 4"):
        make_config(res4_dilation=4, feature_stride=4)
    with pytest.raises(DetectorConfigError, match="res4_dilation 2 needs stride_in_1x1"):
        make_config(res4_dilation=2, feature_stride=8, stride_in_1x1=False)


def test_override_values_are_type_checked_and_numbers_normalised():
    with pytest.raises(DetectorConfigError, match="min_boxes must be an integer, got 'abc'"):
        make_config(min_boxes="abc")
    with pytest.raises(DetectorConfigError, match="min_boxes must be an integer, got 3.5"):
        make_config(min_boxes=3.5)
    with pytest.raises(DetectorConfigError, match="with_probs must be true or false, got 1"):
        make_config(with_probs=1)
    with pytest.raises(DetectorConfigError, match=r"blocks must be a list of integers, got \[1, 1, 'a', 1\]"):
        make_config(blocks=[1, 1, "a", 1])
    with pytest.raises(DetectorConfigError, match="nms_thresholds must be a list"):
        make_config(nms_thresholds=0.5)
    # --set score_threshold=1 parses as the integer 1: stored as 1.0, so it hashes as 1.0 does
    assert make_config(score_threshold=1).score_threshold == 1.0
    assert make_config(score_threshold=1).config_hash() == make_config(score_threshold=1.0).config_hash()
    assert make_config(nms_thresholds=[0.5, 1]).nms_thresholds == (0.5, 1.0)
    # a whole ArchitectureConfig is an override too
    arch = ArchitectureConfig(blocks=(1, 1, 1, 1))
    assert DetectorConfig().replace(arch=arch).arch == arch


def test_config_dict_is_json_and_hash_is_stable():
    cfg = make_config()
    data = cfg.to_dict()
    text = json.dumps(data, sort_keys=True)
    assert json.loads(text) == data
    assert data["score_threshold"] == 0.2 and data["arch"]["blocks"] == [3, 4, 23, 3]
    assert config_from_dict(data) == cfg
    # Pinned: changing a default changes every manifest's config hash; do it on purpose.
    # (225e94f08882c1f9 -> efa510e937b6301d when ArchitectureConfig gained the `pooler`
    # field, default "roipool": to_dict() lists every field, so the hash changed although
    # the butd-10-100 behaviour did not; efa510e937b6301d -> 79926cb6984b704f when
    # DetectorConfig gained `image_feature`, default false; 79926cb6984b704f -> 62cd3ca7d42f4327
    # when ArchitectureConfig gained `res4_dilation`, default 1; 62cd3ca7d42f4327 ->
    # 54bd725d5234761c when DetectorConfig gained `extra_min_sizes`, default empty;
    # 54bd725d5234761c -> 01f5aeab65e6204d when it gained `mirrored_reading`, default false.)
    assert cfg.config_hash() == "01f5aeab65e6204d"
    assert make_config().config_hash() == cfg.config_hash()
    assert make_config(score_threshold=0.3).config_hash() != cfg.config_hash()
    assert make_config(dtype="bfloat16").config_hash() != cfg.config_hash()
    assert make_config("butd-36").config_hash() != cfg.config_hash()


def test_missing_weights_error_names_both_checkpoints():
    with pytest.raises(MissingWeightsError) as info:
        load_detector()
    message = str(info.value)
    assert "unc-nlp/frcnn-vg-finetuned" in message and "pytorch_model.bin" in message
    assert "faster_rcnn_from_caffe_attr.pkl" in message and "allow_random=True" in message
    with pytest.raises(FileNotFoundError, match="faster_rcnn_from_caffe_attr.pkl"):
        load_detector("/nonexistent/pytorch_model.bin")


def test_resize_rules():
    butd = make_config()
    assert resized_size(480, 640, butd)[:2] == (600, 800)
    assert resized_size(300, 1000, butd)[:2] == (300, 1000)  # long side caps: scale 1.0
    assert resized_size(500, 2000, butd)[:2] == (250, 1000)
    lx = make_config("lxmert-36")
    assert resized_size(480, 640, lx)[:2] == (800, 1067)
    assert resized_size(640, 480, lx)[:2] == (1067, 800)
    assert resized_size(100, 1000, lx)[:2] == (133, 1333)


def test_set_pairs_read_json_values_and_keep_other_text():
    from vlp.detectors.config import parse_setting_pairs

    assert parse_setting_pairs(["bottleneck_channels=24", "score_threshold=0.3", "dedupe=true",
                                "anchor_sizes=[32, 64]", "resize=pil"]) == {
        "bottleneck_channels": 24, "score_threshold": 0.3, "dedupe": True, "anchor_sizes": [32, 64],
        "resize": "pil"}
    assert parse_setting_pairs(None) == {}
    for bad in ("min_boxes", "=36"):
        with pytest.raises(ValueError, match="--set expects KEY=VALUE"):
            parse_setting_pairs([bad])
