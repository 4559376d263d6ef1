"""``manifest.json``: what a prepared data set folder holds (splits, counts, shards, vocabulary, skips)."""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "dsalign-shards/1"


def write_manifest(directory: str | Path, manifest: dict) -> Path:
    """Write atomically (temporary name + rename) so a reader never sees half a manifest."""
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, **manifest}, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def load_manifest(directory: str | Path) -> dict:
    """Load and sanity-check a manifest; raises ValueError with a one-line reason when it is unusable."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"no {MANIFEST_NAME} in {directory}: not a prepared data set (run `dsalign prepare`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupt manifest {path}: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise ValueError(f"malformed manifest {path}: missing 'splits'")
    for name, split in manifest["splits"].items():
        if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
            raise ValueError(f"malformed manifest {path}: split {name!r} has no shard list")
        for shard in split["shards"]:
            # Outputs are written at the same relative paths: they must stay inside the folder.
            if not isinstance(shard, str) or PurePosixPath(shard).is_absolute() or ".." in PurePosixPath(shard).parts:
                raise ValueError(f"malformed manifest {path}: shard path {shard!r} must be relative, without '..'")
    return manifest
