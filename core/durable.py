"""Durable files: the one place that knows how to survive kill -9 and power loss.

* :func:`atomic_write` - write a file under a temporary name in the same folder, fsync it,
  rename it over the target and fsync the folder, so a reader sees the old file or the new
  one, never a mix. ``atomic_write_text`` / ``atomic_write_json`` / ``atomic_path`` build on it.
* :class:`JsonLines` - an append-only JSON-lines file: each line is written and flushed
  whole, so a killed writer leaves at most one torn last line; opening the file for
  appending cuts that line off, and reading skips it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


def fsync_dir(folder: PathLike) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(written: PathLike, path: PathLike, *, sync: bool = True) -> Path:
    """Rename a finished file (written under another name in the same folder) to ``path``:
    fsync it, replace, fsync the folder. A reader sees the old ``path`` or the new one."""
    written, path = Path(written), Path(path)
    if sync:
        with open(written, "rb+") as handle:
            os.fsync(handle.fileno())
    os.replace(written, path)
    if sync:
        fsync_dir(path.parent)
    return path


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


@contextlib.contextmanager
def atomic_path(path: PathLike, *, sync: bool = True) -> Iterator[Path]:
    """A temporary path to write to; on leaving the block it replaces ``path`` atomically.

    For writers that want a file name (``torch.save``, ``savefig``). On an exception the
    temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        yield tmp
        publish(tmp, path, sync=sync)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: PathLike, data: Union[bytes, Callable[[object], None]], *, sync: bool = True) -> Path:
    """Replace ``path`` with ``data`` (bytes, or a function that writes to a binary handle)."""
    path = Path(path)
    with atomic_path(path, sync=False) as tmp:
        with open(tmp, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            if sync:
                handle.flush()
                os.fsync(handle.fileno())
    if sync:
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: PathLike, text: str, *, sync: bool = True) -> Path:
    return atomic_write(path, text.encode("utf-8"), sync=sync)


def atomic_write_json(path: PathLike, data, *, indent: Optional[int] = 2, sync: bool = True) -> Path:
    text = json.dumps(data, indent=indent, ensure_ascii=False) + "\n"
    # A lone surrogate (a file name that was not UTF-8) is written as its JSON escape.
    return atomic_write(path, text.encode("utf-8", errors="backslashreplace"), sync=sync)


def cut_torn_tail(path: PathLike) -> None:
    """Cut an incomplete last line (a writer killed mid-line) so appends start on a new line."""
    path = Path(path)
    if not path.is_file():
        return
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as handle:
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return  # the usual case: nothing torn, nothing more to read
        position, chunk = size, 1 << 16
        while position > 0:
            start = max(0, position - chunk)
            handle.seek(start)
            cut = handle.read(position - start).rfind(b"\n")
            if cut >= 0:
                handle.truncate(start + cut + 1)
                return
            position = start
        handle.truncate(0)


def read_json_lines(path: PathLike) -> Iterator[dict]:
    """The complete, parseable lines of a JSON-lines file (nothing if it does not exist).

    A torn last line and lines that are not JSON objects are skipped.
    """
    path = Path(path)
    if not path.is_file():
        return
    with open(path, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                return  # torn by a kill mid-write
            try:
                row = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(row, dict):
                yield row


class JsonLines:
    """An append-only JSON-lines file; each :meth:`append` writes and flushes one whole line."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._handle = None
        self.count = 0  # lines appended through this object

    def __iter__(self) -> Iterator[dict]:
        return read_json_lines(self.path)

    def append(self, row: dict) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            cut_torn_tail(self.path)
            # errors: a lone surrogate (a file name that was not UTF-8) becomes its JSON escape
            self._handle = open(self.path, "a", encoding="utf-8", errors="backslashreplace")
        self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()
        self.count += 1

    def sync(self) -> None:
        if self._handle is not None:
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "JsonLines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
