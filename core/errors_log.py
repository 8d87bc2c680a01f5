"""``errors.jsonl``: one JSON object per input that could not be used, for people and scripts.

An append-only :class:`vlp.core.durable.JsonLines` file: a killed run leaves at most one
torn last line, which reading skips and the next append cuts off, so a resumed run neither
chokes on it nor duplicates what was logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from vlp.core.durable import JsonLines

ERRORS_NAME = "errors.jsonl"


class ErrorLog(JsonLines):
    def read(self) -> list[dict]:
        """The complete lines already in the file (none if it does not exist)."""
        return list(self)

    def add(self, entry: dict) -> None:
        self.append(entry)

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    @property
    def written(self) -> Optional[Path]:
        return self.path if self.count else None
