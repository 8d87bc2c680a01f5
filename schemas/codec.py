"""Pickle-free binary encoding of one FeatureRecord (the LMDB value format).

Layout, little-endian::

    b"VLPR" | u8 codec version | u8 0 | u16 header length | header (UTF-8 JSON)
    | zero padding to 8 bytes | array 1 | pad to 8 | array 2 | ...

The header is ``{"i": image_id, "w": width, "h": height, "a": [[field, shape], ...]}``.
Each field's dtype is fixed by the schema, so the header only carries shapes.
Decoding is ``numpy.frombuffer`` on the value: no copy, no code execution.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from vlp.schemas.errors import SchemaError
from vlp.schemas.record import FIELD_DTYPES, IMAGE_FEATURE_DTYPE, FeatureRecord

MAGIC = b"VLPR"
CODEC_VERSION = 1
_PREFIX = struct.Struct("<4sBxH")
_DTYPES = dict(FIELD_DTYPES, image_feature=IMAGE_FEATURE_DTYPE)


def _pad(n: int) -> int:
    return (-n) % 8


def encode(record: FeatureRecord) -> bytes:
    arrays = record.arrays()
    header = json.dumps(
        {"i": record.image_id, "w": record.image_w, "h": record.image_h,
         "a": [[name, list(a.shape)] for name, a in arrays.items()]},
        separators=(",", ":"),
    ).encode("utf-8")
    if len(header) > 0xFFFF:
        raise SchemaError(f"record {record.image_id!r}: header too long to encode")
    parts = [_PREFIX.pack(MAGIC, CODEC_VERSION, len(header)), header,
             b"\0" * _pad(_PREFIX.size + len(header))]
    for a in arrays.values():
        data = a.tobytes()
        parts.append(data)
        parts.append(b"\0" * _pad(len(data)))
    return b"".join(parts)


def decode(value, where: str = "value") -> FeatureRecord:
    """Decode bytes (or any buffer) produced by ``encode``; arrays are read-only views."""
    try:
        magic, version, header_len = _PREFIX.unpack_from(value, 0)
    except struct.error:
        raise SchemaError(f"{where}: too short to be a vlp record") from None
    if magic != MAGIC:
        raise SchemaError(f"{where}: not a vlp record (magic {bytes(magic)!r})")
    if version != CODEC_VERSION:
        raise SchemaError(f"{where}: record codec version {version}, this vlp reads {CODEC_VERSION}")
    start = _PREFIX.size
    try:
        header = json.loads(bytes(value[start:start + header_len]))
        offset = start + header_len
        offset += _pad(offset)
        arrays = {}
        for name, shape in header["a"]:
            dtype = _DTYPES[name]
            count = 1
            for dim in shape:
                count *= dim
            arrays[name] = np.frombuffer(value, dtype=dtype, count=count, offset=offset).reshape(shape)
            nbytes = count * dtype.itemsize
            offset += nbytes + _pad(nbytes)
        if offset != len(value):
            raise ValueError(f"{len(value) - offset} trailing bytes")
        return FeatureRecord(image_id=header["i"], image_w=header["w"], image_h=header["h"], **arrays)
    except (ValueError, KeyError, TypeError) as exc:
        raise SchemaError(f"{where}: corrupt record ({exc})") from None
