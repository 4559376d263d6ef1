"""Small on-disk data sets written by the tests themselves (no network, no shared data needed)."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image

WORDS = ["dog", "cat", "runs", "sits", "grass", "red", "ball", "the", "a", "on"]


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    image = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def caption(i: int, j: int) -> str:
    words = [WORDS[(i + j + k) % len(WORDS)] for k in range(3 + (i + j) % 4)]
    return " ".join(words).capitalize() + " ."


def write_karpathy(root: Path, n_images: int = 12, splits: tuple[str, ...] = ("train", "val", "test"),
                   captions_per_image: int = 5) -> tuple[Path, Path]:
    """A Karpathy-format JSON + JPEG folder; split of image i is splits[i % len(splits)]."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n_images):
        name = f"img{i:03d}.jpg"
        (images / name).write_bytes(jpeg_bytes(i))
        sentences = [{"raw": caption(i, j), "tokens": caption(i, j).lower().rstrip(" .").split(),
                      "imgid": i, "sentid": i * captions_per_image + j} for j in range(captions_per_image)]
        entries.append({"filename": name, "imgid": i, "split": splits[i % len(splits)], "sentences": sentences,
                        "sentids": [s["sentid"] for s in sentences]})
    path = root / "dataset_test.json"
    path.write_text(json.dumps({"images": entries, "dataset": "test"}))
    return path, images


FLICKR8K_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                        "test": "Flickr_8k.testImages.txt"}


def write_flickr8k(root: Path, token_text: str | bytes, split_names: dict[str, list[str]]) -> Path:
    """``Flickr8k.token.txt`` holding ``token_text`` as given, and the three split lists; returns the token file."""
    for split, filename in FLICKR8K_SPLIT_FILES.items():
        (root / filename).write_text("\n".join(split_names.get(split, [])))
    token_file = root / "Flickr8k.token.txt"
    token_file.write_bytes(token_text if isinstance(token_text, bytes) else token_text.encode("utf-8", "replace"))
    return token_file


# Hypothesis settings and strategies shared by the property-based tests.

FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
"""Hypothesis settings for the default run: few examples, a fixed seed (CI sees the same cases every time)."""

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
"""Any JSON value, NaN and Infinity included (``json`` writes and reads them)."""


def shaped(**fields: st.SearchStrategy) -> st.SearchStrategy:
    """Objects with the expected keys, each either of the right kind, of any JSON type, or missing."""
    return st.fixed_dictionaries({}, optional={key: strategy | json_values for key, strategy in fields.items()})


# Shards with bad samples in them: hand-made metadata, images and tar members that ShardWriter cannot write.


@dataclass(frozen=True)
class NonFile:
    """A tar member that is not a regular file (``tarfile.DIRTYPE``, ``SYMTYPE``, ...): readers must ignore it."""

    type: bytes
    linkname: str = ""


def meta_bytes(*captions: str, **fields: object) -> bytes:
    """Sample metadata as a shard holds it: the captions with whitespace tokens, plus ``fields`` as given."""
    meta = {"image_id": "x", "captions": [{"raw": c, "tokens": c.split()} for c in captions], **fields}
    return json.dumps(meta).encode()


def png_bytes(size: tuple[int, int] = (8, 6), color: tuple[int, int, int] = (1, 2, 3)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` with no pixel data: Pillow refuses to write a 0x0 image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def write_shard(path: Path, samples: dict[str, dict[str, bytes | NonFile]]) -> Path:
    """A tar with each sample's members ``KEY.EXT`` in key order then extension order, as ShardWriter lays
    them out, but any member may be a :class:`NonFile`."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples.items():
            for ext in sorted(members):
                data = members[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                if isinstance(data, NonFile):
                    info.type, info.linkname = data.type, data.linkname
                    tar.addfile(info)
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path
