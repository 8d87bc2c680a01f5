"""draw(): a PNG of the image with the record's boxes and captions."""

import io

import numpy as np
import pytest
from PIL import Image

from vlp.detectors import draw
from vlp.detectors.draw import caption
from vlp.schemas import FeatureRecord, vocab


def make_record(width=160, height=120):
    boxes = np.array([[10, 20, 80, 100], [50, 5, 150, 60], [0, 0, 160, 120]], np.float32)
    return FeatureRecord.from_arrays(
        "img", width, height, boxes=boxes, features=np.ones((3, 8), np.float32),
        objects_id=np.array([vocab.objects().id("car"), vocab.objects().id("tree"), 0]),
        objects_conf=np.array([0.91, 0.5, 0.1], np.float32),
        attrs_id=np.array([vocab.attributes().id("red"), vocab.attributes().id("green"), 0]),
        attrs_conf=np.array([0.8, 0.4, 0.1], np.float32)).validate()


def test_png_of_the_right_size_with_boxes_drawn():
    image = np.full((120, 160, 3), 255, np.uint8)
    record = make_record()
    png = draw(image, record, max_boxes=2)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = Image.open(io.BytesIO(png))
    assert decoded.format == "PNG" and decoded.size == (160, 120) and decoded.mode == "RGB"
    pixels = np.asarray(decoded)
    assert not np.array_equal(pixels[60, 10], [255, 255, 255])  # left edge of box 0
    assert not np.array_equal(pixels[30, 150], [255, 255, 255])  # right edge of box 1
    assert np.array_equal(pixels[110, 100], [255, 255, 255])  # box 2 not drawn (max_boxes=2)
    assert caption(record, 0) == "red car 0.91"
    assert caption(record, 1) == "green tree 0.50"


def test_bgr_input_is_shown_in_true_colours():
    bgr = np.zeros((120, 160, 3), np.uint8)
    bgr[:, :, 0] = 255  # pure blue in BGR
    pixels = np.asarray(Image.open(io.BytesIO(draw(bgr, make_record(), max_boxes=0))))
    assert pixels[5, 5].tolist() == [0, 0, 255]
    rgb_pixels = np.asarray(Image.open(io.BytesIO(draw(bgr[:, :, ::-1], make_record(), max_boxes=0, color="rgb"))))
    assert np.array_equal(pixels, rgb_pixels)


def test_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="160x120"):
        draw(np.zeros((50, 50, 3), np.uint8), make_record())
