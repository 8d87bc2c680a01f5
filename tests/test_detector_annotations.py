"""The detector's Visual-Genome-format reader (vlp.detectors.annotations): what it reads,
and hostile folders, which may only end in an AnnotationError or a missing-image error that
names the file."""

import json
import tempfile
from pathlib import Path

import cv2
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlp.detectors.annotations import load_vg_annotations
from vlp.detectors.errors import AnnotationError
from vlp.schemas import vocab


def _write_folder(root: Path, objects, attributes, image_data, image_ids=(1, 2)) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for image_id in image_ids:
        cv2.imwrite(str(root / "images" / f"{image_id}.png"), np.zeros((8, 8, 3), np.uint8))
    for name, data in (("objects.json", objects), ("attributes.json", attributes), ("image_data.json", image_data)):
        (root / name).write_text(json.dumps(data))
    return root


def _object(object_id, name, x=1, y=2, w=3, h=4, attributes=None):
    out = {"object_id": object_id, "names": [name], "x": x, "y": y, "w": w, "h": h}
    if attributes is not None:
        out["attributes"] = attributes
    return out


def test_reads_boxes_classes_and_attributes(tmp_path):
    root = _write_folder(tmp_path, [{"image_id": 1, "objects": [_object(5, "star"), _object(6, "no such thing")]},
                                    {"image_id": 2, "objects": [_object(7, "heart", 0, 0, 10, 20)]}],
                         [{"image_id": 1, "attributes": [_object(5, "star", attributes=["red", "striped"])]}],
                         [{"image_id": 1, "width": 8, "height": 8}, {"image_id": 2, "width": 8, "height": 8}])
    one, two = load_vg_annotations(root)
    assert one.boxes.tolist() == [[1, 2, 4, 6]] and one.classes.tolist() == [vocab.objects().id("star")]
    assert one.attributes == [[vocab.attributes().id("red"), vocab.attributes().id("striped")]]
    assert two.boxes.tolist() == [[0, 0, 10, 20]] and two.attributes == [[]] and two.width == 8


def test_an_object_id_repeated_in_another_image_keeps_its_own_attributes(tmp_path):
    # folders merged from several sources repeat object ids; attributes belong to their image
    root = _write_folder(tmp_path, [{"image_id": 1, "objects": [_object(1001, "star")]},
                                    {"image_id": 2, "objects": [_object(1001, "heart")]}],
                         [{"image_id": 1, "attributes": [_object(1001, "star", attributes=["red"])]},
                          {"image_id": 2, "attributes": [_object(1001, "heart", attributes=["blue"])]}],
                         [{"image_id": i, "width": 8, "height": 8} for i in (1, 2)])
    one, two = load_vg_annotations(root)
    assert one.attributes == [[vocab.attributes().id("red")]]
    assert two.attributes == [[vocab.attributes().id("blue")]]


scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=False),
                    st.text(max_size=6), st.sampled_from(["star", "red", "image_id", "objects"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                           max_leaves=4)
ids = st.one_of(st.sampled_from([1, 2, 3]), json_values)


def _maybe(value):
    """The value itself, any JSON value instead, or the key left out (None)."""
    return st.one_of(st.just(value), st.just(value), json_values, st.none())


def _entry(fields: dict):
    return st.fixed_dictionaries({k: _maybe(v) for k, v in fields.items()}).map(
        lambda d: {k: v for k, v in d.items() if v is not None})


objects_entries = st.lists(st.one_of(_entry({"image_id": 1, "objects": [_object(5, "star")]}),
                                     st.builds(lambda i, objs: {"image_id": i, "objects": objs}, ids,
                                               st.lists(_entry(_object(5, "star")), max_size=3)),
                                     json_values), max_size=4)
attribute_entries = st.lists(st.one_of(_entry({"image_id": 1, "attributes": [_object(5, "star", attributes=["red"])]}),
                                       json_values), max_size=3)
image_entries = st.lists(st.one_of(_entry({"image_id": 1, "width": 8, "height": 8}), json_values), max_size=3)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(objects=st.one_of(objects_entries, json_values), attributes=st.one_of(attribute_entries, json_values),
       image_data=st.one_of(image_entries, json_values), image_ids=st.one_of(st.none(), st.lists(ids, max_size=3)))
def test_hostile_folders_end_in_a_clear_error_or_annotations(objects, attributes, image_data, image_ids):
    with tempfile.TemporaryDirectory() as tmp:
        root = _write_folder(Path(tmp), objects, attributes, image_data)
        try:
            annotations = load_vg_annotations(root, image_ids if image_ids is None or all(
                isinstance(i, int) for i in image_ids) else None)
        except AnnotationError as exc:
            assert str(root) in str(exc)
            return
        except FileNotFoundError as exc:  # an image id without an image file
            assert str(root) in str(exc) and "no image file" in str(exc)
            return
        for ann in annotations:
            assert ann.boxes.shape == (len(ann.classes), 4) and len(ann.attributes) == len(ann.classes)
