"""Small on-disk data sets written by the tests themselves (no network, no shared data needed)."""

from __future__ import annotations

import io
import json
from pathlib import Path

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
