"""Image decoding and optional re-encoding; every failure becomes a ValueError with a one-line reason."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError


def decode_rgb(data: bytes) -> Image.Image:
    """Decode bytes into an RGB PIL image (any source mode: L, RGBA, P, CMYK, ...).

    Truncated files and decompression bombs (PIL's pixel limit) are data errors, not crashes; so is the
    TypeError Pillow's TIFF plugin raises on some corrupt files (found by fuzzing).
    """
    if not data:
        raise ValueError("empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError, ValueError, TypeError) as exc:
        raise ValueError(f"undecodable image: {exc}") from exc
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def decode_rgb_array(data: bytes) -> np.ndarray:
    """Decode into an HxWx3 uint8 array."""
    return np.asarray(decode_rgb(data))


def shrink_and_encode(data: bytes, max_side: int, quality: int = 90) -> tuple[bytes, str] | None:
    """Re-encode as JPEG with the longer side at most ``max_side``; None when the image is already small
    enough (the original bytes are kept, so nothing is re-compressed needlessly)."""
    image = decode_rgb(data)
    if max(image.size) <= max_side:
        return None
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    out = io.BytesIO()
    image.resize(size, Image.Resampling.BICUBIC).save(out, format="JPEG", quality=quality)
    return out.getvalue(), "jpg"
