"""Deterministic WebDataset shard writing and the sample layout shared by image and feature shards.

A sample is a group of tar members sharing one key: ``KEY.json`` (metadata: image id, split, captions with raw
text and tokens, boxes, ground-truth spans) plus payload members (``KEY.jpg``/``KEY.png`` image bytes, or
feature arrays). Tar headers carry fixed mtime/owner fields, so the same input gives byte-identical shards.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

from dsalign.data.records import Caption, ImageRecord
from dsalign.data.tario import iter_samples

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SAMPLE_FORMAT = "dsalign-sample/1"


def record_to_sample(record: ImageRecord, image_bytes: bytes, image_ext: str) -> dict[str, bytes]:
    """Encode one image record as tar members {ext: bytes} (the key is carried separately)."""
    meta = {
        "format": SAMPLE_FORMAT,
        "image_id": record.image_id,
        "split": record.split,
        "captions": [
            {"raw": c.raw, "tokens": list(c.tokens), **({"spans": [list(s) for s in c.spans]} if c.spans else {})}
            for c in record.captions
        ],
    }
    if record.boxes is not None:
        meta["boxes"] = [[float(x) for x in box] for box in record.boxes]
    if record.box_labels is not None:
        meta["box_labels"] = list(record.box_labels)
    if record.extra:
        meta["extra"] = record.extra
    return {"json": json.dumps(meta, sort_keys=True).encode("utf-8"), image_ext: image_bytes}


def meta_to_record(meta: dict, image_bytes: bytes | None = None, image_ext: str = "jpg") -> ImageRecord:
    """Inverse of :func:`record_to_sample` for the metadata part. Raises ValueError when malformed."""
    try:
        captions = [
            Caption(
                raw=str(c["raw"]),
                tokens=[str(t) for t in c["tokens"]],
                spans=[tuple(int(x) for x in s) for s in c["spans"]] if c.get("spans") else None,
            )
            for c in meta["captions"]
        ]
        return ImageRecord(
            image_id=str(meta["image_id"]),
            split=str(meta["split"]),
            captions=captions,
            image_bytes=image_bytes,
            image_ext=image_ext,
            boxes=meta.get("boxes"),
            box_labels=meta.get("box_labels"),
            extra=meta.get("extra") or {},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed sample metadata: {exc!r}") from exc


class ShardWriter:
    """Writes samples into ``{prefix}-{n:06d}.tar`` files, starting a new shard every ``max_count`` samples
    or once a shard exceeds ``max_bytes``. Headers are fixed (mtime 0, root owner) for deterministic output."""

    def __init__(self, directory: str | Path, prefix: str, max_count: int = 1000, max_bytes: int = 1 << 30):
        if max_count < 1:
            raise ValueError(f"shard size must be >= 1 sample, got {max_count}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.paths: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._bytes = 0

    def _open_next(self) -> None:
        self.close()
        path = self.directory / f"{self.prefix}-{len(self.paths):06d}.tar"
        self.paths.append(path)
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in close())
        self._count = 0
        self._bytes = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key must not contain '.' or '/': {key!r}")
        if self._tar is None or self._count >= self.max_count or self._bytes >= self.max_bytes:
            self._open_next()
        assert self._tar is not None
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            self._tar.addfile(info, io.BytesIO(data))
            self._bytes += len(data) + 512
        self._count += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_tar_samples(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Read a local shard sequentially as (key, {ext: bytes}). For tests and tools; training uses the pipeline."""
    with open(path, "rb") as stream:
        yield from iter_samples(stream)


def image_member(members: dict[str, bytes]) -> tuple[str, bytes] | None:
    """The (ext, bytes) of a sample's image member, if it has one."""
    for ext in IMAGE_EXTS:
        if ext in members:
            return ext, members[ext]
    return None


def shard_paths(manifest_dir: str | Path, split: str) -> list[str]:
    """Absolute shard paths of one split from a prepared data set's ``manifest.json``."""
    from dsalign.data.manifest import load_manifest

    manifest = load_manifest(manifest_dir)
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in {manifest_dir} (has: {', '.join(sorted(manifest['splits']))})")
    root = Path(manifest_dir)
    return [str(root / p) for p in manifest["splits"][split]["shards"]]

