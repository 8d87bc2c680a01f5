"""Pickles that the old environments of V&L trainers can load.

numpy 2 pickles arrays through ``numpy._core.multiarray._reconstruct``; numpy 1.x (what
LXMERT, VOLTA, UNITER and MMF pin) has no ``numpy._core`` and fails to load them. The
pickler here names ``numpy.core.*`` instead, which numpy 1.x defines and numpy 2 still
resolves (to the same functions). Protocol 3 (numpy's own choice for ``.npy`` object
arrays) loads on every Python 3.
"""

from __future__ import annotations

import io
import pickle

import numpy as np

PROTOCOL = 3


class _Numpy1Pickler(pickle._Pickler):
    """The pure-Python pickler with numpy 2's private module names mapped to numpy 1.x's."""

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", None) or ""
        if module == "numpy._core" or module.startswith("numpy._core."):
            qualname = name or obj.__qualname__
            module = "numpy.core" + module[len("numpy._core"):]
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode("ascii"))
            self.memoize(obj)
            return
        super().save_global(obj, name)


def dumps(obj, protocol: int = PROTOCOL) -> bytes:
    buffer = io.BytesIO()
    _Numpy1Pickler(buffer, protocol=protocol).dump(obj)
    return buffer.getvalue()


def write_object_npy(handle, obj) -> None:
    """Write ``obj`` as numpy's ``.npy`` of a 0-d object array (``np.save(path, dict)``),
    loadable with ``np.load(path, allow_pickle=True).item()`` under numpy 1.x and 2.x."""
    holder = np.empty((), dtype=object)
    holder[()] = obj
    np.lib.format.write_array_header_1_0(handle, {"descr": "|O", "fortran_order": False, "shape": ()})
    handle.write(dumps(holder))
