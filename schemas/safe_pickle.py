"""A restricted unpickler for the pickles the field ships (detectron2 weights, VOLTA LMDBs).

It rebuilds numpy arrays, dicts, lists, tuples, strings, bytes and numbers, and refuses
every other global: a pickle that names ``os.system`` or any class fails with an
error naming it instead of running code. Never use a bare ``pickle.load`` on a file
a user supplies.
"""

from __future__ import annotations

import io
import pickle

import numpy as np

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray, numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray, numeric as _numeric

# (module, name) pairs a numpy-array pickle needs, across numpy 1.x and 2.x layouts.
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _NUMPY_GLOBALS[(_module, "_reconstruct")] = _multiarray._reconstruct
    _NUMPY_GLOBALS[(_module, "scalar")] = _multiarray.scalar
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    _NUMPY_GLOBALS[(_module, "_frombuffer")] = _numeric._frombuffer
for _dtype_class in ("Float32DType", "Float64DType", "Float16DType", "Int64DType", "Int32DType",
                     "Int16DType", "Int8DType", "UInt8DType", "BoolDType", "BytesDType", "StrDType"):
    if hasattr(getattr(np, "dtypes", None), _dtype_class):
        _NUMPY_GLOBALS[("numpy.dtypes", _dtype_class)] = getattr(np.dtypes, _dtype_class)


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles written by Python 2 store bytes as _codecs.encode(str, "latin1").
    import codecs
    if not isinstance(text, str):
        raise pickle.UnpicklingError("_codecs.encode is only allowed on str")
    return codecs.encode(text, encoding, errors)


_ALLOWED = dict(_NUMPY_GLOBALS)
_ALLOWED[("_codecs", "encode")] = _codecs_encode
_ALLOWED[("collections", "OrderedDict")] = __import__("collections").OrderedDict


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, *, source: str = "pickle"):
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self.source}: refusing to load {module}.{name}; only numpy arrays, dicts, "
                "lists, strings and numbers are allowed in this file") from None


def safe_load(file, source: str = "pickle"):
    """Unpickle from a binary file object with the restricted unpickler."""
    return RestrictedUnpickler(file, source=source).load()


def safe_loads(data: bytes, source: str = "pickle"):
    return safe_load(io.BytesIO(data), source=source)
