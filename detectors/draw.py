"""Draw a record's boxes with "attribute object confidence" captions onto its image -> PNG."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlp.schemas import vocab
from vlp.schemas.record import FeatureRecord

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def caption(record: FeatureRecord, i: int) -> str:
    """'red car 0.87' (attribute, object display names, object confidence) for box i."""
    if record.objects_id is None:
        return f"#{i}"
    name = vocab.objects().name(int(record.objects_id[i]))
    attr = vocab.attributes().name(int(record.attrs_id[i])) if record.attrs_id is not None else ""
    return f"{attr} {name} {float(record.objects_conf[i]):.2f}".strip()


def draw(image: np.ndarray, record: FeatureRecord, max_boxes: int = 20, *, color: str = "bgr",
         line_width: int = 2) -> bytes:
    """PNG bytes of ``image`` (uint8 H x W x 3, BGR unless color="rgb") with the first
    ``max_boxes`` boxes of ``record`` (records are sorted by confidence) and captions."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 H x W x 3 image, got {image.dtype} {image.shape}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if color not in ("bgr", "rgb"):
        raise ValueError(f"color must be 'bgr' or 'rgb', got {color!r}")
    rgb = image[:, :, ::-1] if color == "bgr" else image
    if (rgb.shape[1], rgb.shape[0]) != (record.image_w, record.image_h):
        raise ValueError(f"record {record.image_id!r} is for a {record.image_w}x{record.image_h} image, "
                         f"got a {rgb.shape[1]}x{rgb.shape[0]} one")
    canvas = Image.fromarray(np.ascontiguousarray(rgb)).convert("RGB")
    pen = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    count = min(int(max_boxes), record.num_boxes)
    for i in reversed(range(count)):  # best box drawn last, on top
        x1, y1, x2, y2 = (float(v) for v in record.boxes[i])
        colour = PALETTE[i % len(PALETTE)]
        pen.rectangle([x1, y1, x2, y2], outline=colour, width=line_width)
        text = caption(record, i)
        left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 4 if y1 - th - 4 >= 0 else y1
        pen.rectangle([x1, ty, x1 + tw + 4, ty + th + 4], fill=colour)
        pen.text((x1 + 2, ty + 2 - top), text, fill=(0, 0, 0), font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
