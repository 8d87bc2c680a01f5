"""Finding the images of an extraction run and naming them.

An image's ``image_id`` is its path relative to the input root, with ``/`` separators
and without the extension (``2014/val/COCO_val2014_000000000042``). Two files that
would get the same id (``a.jpg`` and ``a.png``) are a *collision*: the first in sorted
order keeps the id, the others are reported and not extracted.

The order of the result is stable: sorted by relative path, whatever the file system's
directory order, so that ``--limit`` and reruns see the same images.

A file name that is not valid UTF-8 cannot be an ``image_id``: such a file is set aside
under its *display name* (:func:`display_name`: the undecodable bytes as ``\\xff``
escapes), which is what ``errors.jsonl`` shows.

A file list may name only files inside the root: an entry that is absolute outside it,
climbs out with ``..``, or is a symlink whose target lies outside the root is refused
(``Discovery.refused``), never opened.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from pathlib import Path, PurePosixPath
from typing import Optional

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
    ".ppm", ".pgm", ".pbm", ".pnm",
})


@dataclasses.dataclass
class Discovery:
    """The images of one run: relative paths in stable order, plus what was set aside."""

    root: Path
    paths: list  # relative POSIX paths (str), sorted, one per image_id
    skipped: list  # [(relative path, reason)]: id collisions; names that are not UTF-8 (display form)
    loops: list  # relative paths of directory symlinks not followed (already visited)
    missing: list  # file-list entries that do not exist (or are not files)
    refused: list = dataclasses.field(default_factory=list)  # [(file-list entry, reason)]: outside the root

    def __len__(self) -> int:
        return len(self.paths)

    def total_bytes(self) -> int:
        """Sum of the file sizes (one stat per file: for dry runs and estimates)."""
        total = 0
        for relative in self.paths:
            try:
                total += (self.root / relative).stat().st_size
            except OSError:
                pass
        return total


def image_id_of(relative_path: str) -> str:
    """``a/b/c.jpg`` -> ``a/b/c`` (only the last extension is removed)."""
    path = PurePosixPath(relative_path)
    return str(path.with_suffix("")) if path.suffix else str(path)


def display_name(relative_path: str) -> str:
    """A path as text that can always be written (UTF-8, JSON): bytes that are not UTF-8
    (kept by ``os.fsdecode`` as surrogate escapes) are shown as ``\\xNN``."""
    return os.fsencode(relative_path).decode("utf-8", "backslashreplace")


def is_utf8_name(relative_path: str) -> bool:
    try:
        relative_path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(root: Path) -> tuple[list[str], list[str]]:
    """All image files under root (following directory symlinks once each), and the loops."""
    found: list[str] = []
    loops: list[str] = []
    visited: set[tuple[int, int]] = set()
    stack = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            stat = directory.stat()
        except OSError:
            continue
        key = (stat.st_dev, stat.st_ino)
        if key in visited:
            loops.append(prefix.rstrip("/"))
            continue
        visited.add(key)
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            relative = prefix + entry.name
            try:
                if entry.is_dir(follow_symlinks=True):
                    stack.append((Path(entry.path), relative + "/"))
                elif entry.is_file(follow_symlinks=True) and is_image_name(entry.name):
                    found.append(relative)
            except OSError:  # a dangling symlink or a file removed meanwhile
                continue
    return found, loops


def _inside(path: Path, root: Path) -> Optional[Path]:
    try:
        return path.relative_to(root)
    except ValueError:
        return None


def _from_file_list(root: Path, file_list: Path) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """The entries of a file list that name files inside ``root``; the missing ones; and
    the refused ones with the reason (outside the root, lexically or through a symlink)."""
    found, missing, refused = [], [], []
    lexical_root = Path(os.path.normpath(os.path.abspath(root)))
    resolved_root = root.resolve()
    # surrogateescape: a listed name that is not UTF-8 still names its file (and is then set aside as bad_name)
    with open(file_list, encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            shown = display_name(entry)
            full = Path(os.path.normpath(entry if os.path.isabs(entry) else lexical_root / entry))
            relative = _inside(full, lexical_root)
            if relative is None and os.path.isabs(entry):
                relative = _inside(full, resolved_root)  # the root's real path, spelt out
            if relative is None:
                why = "an absolute path" if os.path.isabs(entry) else "a path that climbs out with '..'"
                refused.append((shown, f"{why} outside the image folder {display_name(str(root))}"))
                continue
            full = root / relative
            if not relative.parts:
                missing.append(shown)
                continue
            try:
                full.resolve().relative_to(resolved_root)
            except ValueError:
                refused.append((shown, "a symlink whose target is outside the image folder "
                                       f"{display_name(str(root))}"))
                continue
            except (OSError, RuntimeError):  # a symlink loop
                missing.append(shown)
                continue
            if not full.is_file():
                missing.append(shown)
                continue
            found.append(relative.as_posix())
    return found, missing, refused


def discover(root, *, file_list=None, glob: Optional[str] = None, limit: Optional[int] = None) -> Discovery:
    """Find the images under ``root``.

    file_list: a text file with one image path per line (relative to ``root``, or absolute
        inside it; ``#`` comments and blank lines ignored) instead of scanning. Entries
        that lead outside ``root`` go to ``refused``.
    glob: keep only relative paths matching this pattern (``fnmatch`` syntax where ``*``
        also crosses ``/``; e.g. ``train/*.jpg``, ``*_0001.png``).
    limit: keep the first N images in the stable order (after collisions are resolved).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such image folder")
    if file_list is not None:
        if not Path(file_list).is_file():
            raise FileNotFoundError(f"{file_list}: no such file list")
        found, missing, refused = _from_file_list(root, Path(file_list))
        loops: list[str] = []
    else:
        found, loops = _walk(root)
        missing, refused = [], []
    if glob:
        found = [p for p in found if fnmatch.fnmatchcase(p, glob)]
    # Sort by id first so that a.jpg / a.png are neighbours; the extension decides who keeps the id.
    found = sorted(set(found), key=lambda p: (image_id_of(p), p))
    paths, skipped = [], []
    owner: dict[str, str] = {}
    for relative in found:
        if not is_utf8_name(relative):
            skipped.append((display_name(relative), "the file name is not valid UTF-8, so it cannot be an image_id"))
            continue
        image_id = image_id_of(relative)
        if image_id in owner:
            skipped.append((relative, f"image_id collision: {image_id!r} is already the id of {owner[image_id]}"))
            continue
        owner[image_id] = relative
        paths.append(relative)
    paths.sort()
    if limit is not None:
        paths = paths[:max(0, int(limit))]
    return Discovery(root, paths, skipped, sorted(display_name(loop) for loop in loops), missing, refused)
