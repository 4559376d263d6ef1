"""The in-memory form every reader and generator produces and every shard writer consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass
class Caption:
    """One sentence. ``spans`` is ground truth when known: (start, end, box_index), token end exclusive."""

    raw: str
    tokens: list[str]
    spans: list[tuple[int, int, int]] | None = None


@dataclass
class ImageRecord:
    """One image with its captions. Exactly one of ``image_path`` / ``image_bytes`` is set.

    ``boxes`` are normalised [x0, y0, x1, y1] in [0, 1] (image width/height = 1); ``box_labels`` names them
    (e.g. the phrase of a shapes object) when the data set knows it.
    """

    image_id: str
    split: str
    captions: list[Caption]
    image_path: Path | None = None
    image_bytes: bytes | None = None
    image_ext: str = "jpg"
    boxes: list[list[float]] | None = None
    box_labels: list[str] | None = None
    extra: dict = field(default_factory=dict)
