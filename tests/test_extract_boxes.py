"""vlp-extract --boxes: given boxes through the Ray pipeline (the detector's given-box mode):
one region per given box in the given order, features equal to Detector.features_for_boxes,
bad lines and boxes that do not fit their image in errors.jsonl, the manifest names the
boxes file, a resume continues and another boxes file is refused; the boxes file parser
never raises on any input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from vlp.synthetic.world import image_path as world_image
from hypothesis import HealthCheck, given, settings, strategies as st

from vlp.core.errors_log import ErrorLog
from vlp.pipeline.discover import discover
from vlp.pipeline.extract import ExtractSettings, read_boxes_file, run_extract
from vlp.schemas import FeatureStore
from vlp.schemas.errors import StoreError

SMALL = {"min_size": 320, "max_size": 480, "extra_min_sizes": [], "mirrored_reading": False}  # one reading, for speed


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vlp.synthetic import generate

    root = tmp_path_factory.mktemp("boxes-world")
    generate(root / "world", 6, seed=2, overwrite=True, web=False)
    return root / "world"


def _boxes_file(world: Path, path: Path) -> dict:
    """gt boxes of images 1..4 (the scene objects, in scene order) + bad lines."""
    truth = json.loads((world / "truth.json").read_text())
    scenes = {e["image_id"]: e["scene"] for e in truth["images"]}
    lines, expected = [], {}
    for image_id in (1, 2, 3, 4):
        boxes = [o["box"] for o in scenes[image_id]["objects"]]
        expected[str(image_id)] = boxes
        key = {"image": world_image(world, image_id).name} if image_id % 2 else {"image_id": str(image_id)}
        lines.append(json.dumps({**key, "boxes": boxes}))
    width = scenes[5]["width"]
    lines += ["not json", json.dumps({"image": world_image(world, 5).name,  # a box outside the image
                                      "boxes": [[0, 0, width + 50, 10]]}),
              json.dumps({"image": "nope.jpg", "boxes": [[0, 0, 1, 1]]}),
              json.dumps({"image_id": "6", "boxes": [[5, 5, 1, 1]]})]
    path.write_text("\n".join(lines) + "\n")
    return expected


@pytest.mark.slow
def test_given_boxes_through_the_pipeline_resume_and_refusal(world, tmp_path):
    import ray

    from vlp.detectors import load_detector
    from vlp.core.decode import decode_file

    boxes_path = tmp_path / "boxes.jsonl"
    expected = _boxes_file(world, boxes_path)
    out = tmp_path / "gt-features"
    settings_ = ExtractSettings(preset="demo", overrides=dict(SMALL), progress="off", chunk_size=2, shard_size=2,
                                boxes=str(boxes_path), num_cpus=2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        stats = run_extract(world / "images", out, settings_)
        assert stats["stored"] == 4 and stats["complete"]
        assert stats["failures_by_kind"] == {"bad_boxes": 3, "missing": 1}
        store = FeatureStore(out)
        assert sorted(store.keys()) == ["1", "2", "3", "4"]
        detector = load_detector(preset="demo", device="cpu", **SMALL)
        for image_id, boxes in expected.items():
            record = store.get(image_id)
            assert record.num_boxes == len(boxes)
            np.testing.assert_allclose(record.boxes, np.asarray(boxes, dtype=np.float32))
            direct = detector.features_for_boxes(decode_file(world_image(world, image_id)), boxes, image_id)
            np.testing.assert_allclose(np.asarray(record.features, np.float32), np.asarray(direct.features, np.float32),
                                       atol=2e-2, rtol=1e-2)
            assert list(record.objects_id) == list(direct.objects_id)
        store.close()
        manifest = json.loads((out / "manifest.json").read_text())
        given_boxes = manifest["source"]["given_boxes"]
        assert given_boxes["file"].endswith("boxes.jsonl") and given_boxes["images"] == 5  # image 5 is refused later, by its size
        errors = {e["path"].rsplit(":", 1)[-1]: e for e in ErrorLog(out / "errors.jsonl").read()}
        assert set(errors) == {"5", "5.jpg", "7", "8"}  # file lines, and the image whose boxes do not fit it
        assert errors["5"]["kind"] == "bad_boxes" and errors["7"]["kind"] == "missing"
        assert errors["5.jpg"]["kind"] == "bad_boxes" and "outside" in errors["5.jpg"]["reason"]
        assert errors["5.jpg"]["image_id"] == "5" and "x2 < x1" in errors["8"]["reason"]

        again = run_extract(world / "images", out, settings_)  # a rerun: everything is done
        assert again["nothing_to_do"] and again["already_stored"] == 4
        other = tmp_path / "other.jsonl"
        other.write_text(json.dumps({"image": "1.jpg", "boxes": [[0, 0, 10, 10]]}) + "\n")
        with pytest.raises(StoreError, match="given boxes"):
            run_extract(world / "images", out, ExtractSettings(**{**settings_.__dict__, "boxes": str(other)}))
        with pytest.raises(StoreError, match="detected boxes"):
            run_extract(world / "images", out, ExtractSettings(**{**settings_.__dict__, "boxes": None}))
    finally:
        ray.shutdown()


_JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(
                            ["image", "image_id", "boxes", "x"]), inner, max_size=4), max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(_JSONISH.map(json.dumps), st.binary(max_size=20).map(lambda b: b.decode("latin1"))),
                      max_size=6))
def test_boxes_file_parser_never_raises(tmp_path_factory, lines):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "a.jpg").write_bytes(b"x")
    path = root / "boxes.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogateescape"))
    boxes, errors, info = read_boxes_file(path, discover(root, glob="*.jpg"))
    assert set(boxes) <= {"a.jpg"} and info["images"] == len(boxes)
    for entry in errors:
        assert entry[2] in ("bad_boxes", "missing") and entry[3]
    for box_list in boxes.values():
        assert all(len(b) == 4 and b[2] >= b[0] and b[3] >= b[1] for b in box_list)
