"""Decoding images from the web into BGR uint8 arrays, or a reason why not.

Everything a crawl throws at an extractor is either converted or refused with a short
reason (which goes to ``errors.jsonl``):

* EXIF orientation is applied, so ``image_w``/``image_h`` and boxes refer to the image
  as people see it;
* grayscale, palette, CMYK and 16-bit images are converted to 8-bit RGB (16-bit values
  are scaled, not clipped); images with transparency are composited onto white;
* animated GIF/WebP/PNG files give their first frame;
* empty files, files that are not images, truncated files and images above the pixel
  cap (a decompression bomb guard, checked on the header before any pixel is decoded)
  raise :class:`DecodeError`.

Decoding is Pillow's (libjpeg-turbo for JPEG). The output is BGR, the detector's order.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own bomb threshold; a 12k x 7.5k photo passes, a 1 GB bitmap header does not.
DEFAULT_MAX_PIXELS = 89_478_485


class DecodeError(ValueError):
    """An image that cannot be used: ``str()`` is the reason and ``kind`` its class for
    errors.jsonl (empty, not_an_image, truncated, too_large, unreadable, undecodable)."""

    def __init__(self, reason: str, kind: str = "undecodable"):
        super().__init__(reason)
        self.kind = kind


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image)
        if mode == "F":
            array = np.clip(np.nan_to_num(array), 0.0, 1.0) * 255.0 if array.max(initial=0) <= 1.0 \
                else np.clip(array, 0, 255)
        else:
            # 16-bit data (Pillow stores it in "I;16*" or "I"): scale 0..65535 to 0..255.
            array = np.clip(array.astype(np.float64) / 257.0, 0, 255)
        return Image.fromarray(np.round(array).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return image


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes into a contiguous H x W x 3 uint8 BGR array."""
    return _decode(io.BytesIO(data), len(data), max_pixels)


def decode_file(path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """:func:`decode_image` on a file, read lazily: the pixel cap is checked on the header
    before the rest of the file is read. An unreadable file is a DecodeError too."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            return _decode(handle, size, max_pixels)
    except OSError as exc:
        raise DecodeError(f"cannot read the file: {exc.strerror or exc}", "unreadable") from None


def _decode(source, size: int, max_pixels: int) -> np.ndarray:
    if size == 0:
        raise DecodeError("empty file (0 bytes)", "empty")
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        # Pillow refuses images above twice its own cap outright; a larger cap of ours lifts it.
        Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        # Our own cap below replaces Pillow's bomb warning; its hard error stays as a backstop.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(source)
        except UnidentifiedImageError:
            raise DecodeError(f"not an image file (unrecognised format, {size} bytes)", "not_an_image") from None
        except Image.DecompressionBombError as exc:
            raise DecodeError(f"too large (decompression-bomb guard): {exc}", "too_large") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise DecodeError(f"unreadable image header: {exc}", "unreadable") from None
        width, height = image.size
        if width < 1 or height < 1:
            raise DecodeError(f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise DecodeError(f"too large: {width}x{height} = {width * height:,} pixels exceeds the "
                              f"cap of {max_pixels:,} (decompression-bomb guard; raise --max-pixels "
                              "to allow it)", "too_large")
        try:
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image) or image
            rgb = _to_rgb(image)
            array = np.asarray(rgb)
        except Image.DecompressionBombError as exc:
            raise DecodeError(f"too large (decompression-bomb guard): {exc}", "too_large") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            reason = str(exc) or type(exc).__name__
            if "truncated" in reason.lower():
                raise DecodeError(f"truncated file ({size} bytes): {reason}", "truncated") from None
            raise DecodeError(f"cannot decode {image.format or 'image'}: {reason}") from None
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise DecodeError(f"unexpected decoded layout {array.shape} {array.dtype}")
    return np.ascontiguousarray(array[:, :, ::-1])

