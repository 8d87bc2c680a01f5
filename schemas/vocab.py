"""The Visual Genome vocabularies of the bottom-up-attention detector.

The files are the exact BUTD ``objects_vocab.txt`` (1600 lines) and
``attributes_vocab.txt`` (400 lines). A line may hold comma-separated synonyms
("gray,grey"); the first one is the display name. Ids are 0-based line numbers,
which is also the detector's class index (background / no-attribute is the extra
last class of the detector and never appears as an id in a record).
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

NUM_OBJECTS = 1600
NUM_ATTRIBUTES = 400


class Vocabulary:
    """An ordered list of entries, each a tuple of synonyms."""

    def __init__(self, kind: str, lines: list[str], sha256: str):
        self.kind = kind
        self.synonyms: list[tuple[str, ...]] = [
            tuple(s.strip() for s in line.split(",")) for line in lines
        ]
        self.names: list[str] = [syn[0] for syn in self.synonyms]
        self.sha256 = sha256
        self._by_name: dict[str, int] = {}
        for index, syn in enumerate(self.synonyms):
            for name in syn:
                self._by_name.setdefault(name, index)

    def __len__(self) -> int:
        return len(self.names)

    def name(self, index: int) -> str:
        """Display name (first synonym) of an id."""
        if not 0 <= index < len(self.names):
            raise IndexError(f"{self.kind} id {index} is outside 0..{len(self.names) - 1}")
        return self.names[index]

    def id(self, name: str) -> int:
        """Id of a display name or any synonym; KeyError names the vocabulary."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in the {self.kind} vocabulary") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def describe(self) -> dict:
        return {"size": len(self), "sha256": self.sha256}


def _load(kind: str, filename: str, expected: int) -> Vocabulary:
    data = resources.files("vlp.schemas").joinpath("vocab", filename).read_bytes()
    lines = data.decode("utf-8").split("\n")
    if len(lines) != expected:
        raise RuntimeError(f"{filename}: expected {expected} entries, found {len(lines)}")
    return Vocabulary(kind, lines, hashlib.sha256(data).hexdigest())


@functools.cache
def objects() -> Vocabulary:
    """The 1600 Visual Genome object categories."""
    return _load("objects", "objects_vocab.txt", NUM_OBJECTS)


@functools.cache
def attributes() -> Vocabulary:
    """The 400 Visual Genome attributes."""
    return _load("attributes", "attributes_vocab.txt", NUM_ATTRIBUTES)
