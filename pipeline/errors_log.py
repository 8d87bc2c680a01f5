"""``errors.jsonl``: one JSON object per input that could not be used, for people and scripts.

Lines are appended and flushed one at a time, so a killed run leaves at most one torn
last line; :meth:`ErrorLog.read` drops it (and :meth:`ErrorLog.open` cuts it off before
appending), so a resumed run neither chokes on it nor duplicates what was logged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

ERRORS_NAME = "errors.jsonl"


class ErrorLog:
    def __init__(self, path):
        self.path = Path(path)
        self._handle = None
        self.count = 0  # lines written by this object

    def read(self) -> list[dict]:
        """The complete lines already in the file (none if it does not exist)."""
        if not self.path.is_file():
            return []
        entries = []
        with open(self.path, "rb") as handle:
            for line in handle:
                if not line.endswith(b"\n"):
                    break  # torn by a kill mid-write
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return entries

    def _cut_torn_tail(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb+") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size == 0:
                return
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return  # the usual case: no need to read the log
            handle.seek(0)
            data = handle.read()
            handle.truncate(data.rfind(b"\n") + 1)

    def add(self, entry: dict) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._cut_torn_tail()
            self._handle = open(self.path, "a", encoding="utf-8")
        self._handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._handle.flush()
        self.count += 1

    def sync(self) -> None:
        if self._handle is not None:
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    @property
    def written(self) -> Optional[Path]:
        return self.path if self.count else None
