"""``manifest.json``: what a store directory holds, written last and atomically.

A shard belongs to the store only when the manifest lists it. Writers rewrite the
manifest after every finished shard (``complete: false``) and once more at the end
(``complete: true``), always atomically (:func:`vlp.core.durable.atomic_write_json`).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from vlp.schemas.errors import StoreError

MANIFEST_NAME = "manifest.json"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_manifest(root: Path, kind: str, supported_versions: tuple[int, ...]) -> dict:
    """Read and check the manifest of a store of ``kind`` ("vlp-features", "vlp-pairs")."""
    path = Path(root) / MANIFEST_NAME
    if not path.exists():
        if not Path(root).is_dir():
            raise StoreError(f"{root}: no such directory")
        raise StoreError(f"{path}: missing; {root} is not a finished vlp store "
                         "(a store is readable once its manifest is written)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != kind:
        raise StoreError(f"{path}: not a {kind} manifest (format={manifest.get('format')!r})")
    version = manifest.get("schema_version")
    if version not in supported_versions:
        raise StoreError(f"{path}: schema_version {version!r}; this vlp reads {list(supported_versions)}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "name" in s for s in shards):
        raise StoreError(f"{path}: 'shards' must be a list of {{name, records, bytes, sha256}}")
    return manifest
