import numpy as np
import pytest

from vlp.schemas import FeatureRecord, SchemaError
from vlp.schemas import codec


def make(n=5, **overrides):
    rng = np.random.default_rng(0)
    fields = dict(boxes=np.tile([[10, 20, 110, 220]], (n, 1)), features=rng.standard_normal((n, 2048)),
                  objects_id=np.arange(n), objects_conf=np.full(n, 0.5), attrs_id=np.arange(n),
                  attrs_conf=np.full(n, 0.25))
    fields.update(overrides)
    return FeatureRecord.from_arrays("img/1", 640, 480, **fields)


def test_from_arrays_converts_to_storage_dtypes():
    r = make().validate()
    assert r.boxes.dtype == np.float32 and r.features.dtype == np.float16
    assert r.objects_id.dtype == np.int32 and r.attrs_conf.dtype == np.float32
    assert r.num_boxes == 5 and r.feature_dim == 2048


@pytest.mark.parametrize("overrides, message", [
    (dict(boxes=np.zeros((0, 4)), features=np.zeros((0, 2048)), objects_id=[], objects_conf=[],
          attrs_id=[], attrs_conf=[]), "num_boxes=0"),
    (dict(boxes=[[10, 20, 700, 220]] * 5), "outside the 640x480 image"),
    (dict(boxes=[[100, 20, 10, 220]] * 5), "x2<x1"),
    (dict(features=np.full((5, 2048), np.nan)), "non-finite"),
    (dict(features=np.full((5, 2048), 1e6)), "float16 fields overflow"),
    (dict(objects_id=[0, 1, 2, 3, 1600]), "objects_id has id 1600 outside 0..1599"),
    (dict(attrs_id=[-1, 1, 2, 3, 4]), "attrs_id has id -1"),
    (dict(objects_conf=[0, 0, 0, 0, 1.5]), "objects_conf must lie in"),
    (dict(objects_id=np.arange(4)), "objects_id has shape (4,)"),
    (dict(attrs_id=None, attrs_conf=None), "label fields come together"),
])
def test_validation_names_the_field(overrides, message):
    with pytest.raises(SchemaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make(**overrides).validate()


def test_more_than_1000_boxes_rejected():
    n = 1001
    with pytest.raises(SchemaError, match="num_boxes=1001"):
        make(n, boxes=np.tile([[0, 0, 1, 1]], (n, 1))).validate()


def test_feature_dim_must_match_store():
    with pytest.raises(SchemaError, match="the store holds 1024-d"):
        make().validate(feature_dim=1024)


def test_fractional_ids_rejected():
    with pytest.raises(SchemaError, match="whole numbers"):
        make(objects_id=[0.5, 1, 2, 3, 4])


def test_bad_image_ids():
    for bad in ("", "a\x00b", "x" * 600):
        with pytest.raises(SchemaError):
            FeatureRecord.from_arrays(bad, 10, 10, boxes=[[0, 0, 1, 1]], features=np.zeros((1, 4))).validate()


def test_codec_round_trip_is_bit_exact_and_pickle_free():
    r = make(cls_prob=np.random.default_rng(1).uniform(0, 1, (5, 1601)))
    r.image_feature = np.ones(2048, np.float16)
    value = codec.encode(r)
    assert value[:4] == b"VLPR" and b"pickle" not in value
    back = codec.decode(value)
    assert back.equals(r)
    assert back.features.dtype == np.float16 and not back.features.flags.writeable


def test_codec_rejects_garbage_with_location():
    value = bytearray(codec.encode(make()))
    with pytest.raises(SchemaError, match="where-1: not a vlp record"):
        codec.decode(b"XXXX" + bytes(value[4:]), "where-1")
    with pytest.raises(SchemaError, match="corrupt record"):
        codec.decode(bytes(value[:-16]), "where-2")
    with pytest.raises(SchemaError, match="too short"):
        codec.decode(b"VL", "where-3")


def test_nonfinite_float16_detected_by_exponent_bits():
    r = make()
    features = np.array(r.features)
    features[2, 7] = np.float16("inf")
    features[3, 9] = np.float16("nan")
    r.features = features
    with pytest.raises(SchemaError, match="features has 2 non-finite"):
        r.validate()


def test_features_float32_is_exact():
    r = make()
    f16 = np.array(r.features)
    f16[0, :4] = [6e-8, -6e-5, 65504, 0]  # subnormal, tiny, largest, zero
    r.features = f16
    assert np.array_equal(r.features_float32(), f16.astype(np.float32))
    assert r.features_float32().dtype == np.float32
