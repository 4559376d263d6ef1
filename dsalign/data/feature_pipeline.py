"""Reading region-feature shards (written by ``dsalign features``) for training and evaluation.

Plugs into :class:`~dsalign.data.pipeline.ShardStream` / ``ShardLoader`` like the image decoder does::

    stream = ShardStream(shard_paths(folder, "train"), FeatureSampleDecoder(vocab), collate_features, 100, ...)

A sample whose features are missing, unreadable, non-finite or of the wrong shape is skipped and counted as
``bad_features``; malformed region boxes count as ``bad_boxes``.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsalign.data.manifest import load_manifest
from dsalign.data.pipeline import (
    RawSample,
    SampleError,
    caption_fields,
    decode_boxes,
    decode_meta,
    pad_boxes,
    pad_captions,
)
from dsalign.text import Vocabulary

FEATURE_MEMBER = "npy"


def load_feature_manifest(folder: str | Path) -> dict:
    """The manifest of a feature folder (``feature_dim``, ``max_regions``, ``backbone``, splits, ...);
    ValueError when ``folder`` holds images rather than features."""
    manifest = load_manifest(folder)
    if manifest.get("kind") != "features":
        raise ValueError(f"{folder} is not a feature folder (run `dsalign features` on it first)")
    return manifest


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
FEATURE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


def read_npy(data: bytes) -> np.ndarray:
    """The array a .npy file holds, as a read-only view of ``data`` (its header parsed once, nothing copied).

    ValueError unless the file holds exactly the bytes its header promises, of a dtype without Python objects:
    ``np.load`` would allocate whatever a corrupt header claims (terabytes: MemoryError) before it finds the
    data short, and load an .npz archive as an object without ``ndim``.
    """
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version not in _NPY_HEADER_READERS:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, fortran_order, dtype = _NPY_HEADER_READERS[version](stream)
    if dtype.hasobject:
        raise ValueError(f"dtype {dtype} holds Python objects")
    if not all(type(n) is int for n in shape):  # numpy's header check lets True/False through as sizes
        raise ValueError(f"shape {shape} is not a tuple of integers")
    if dtype.itemsize * math.prod(shape) != len(data) - stream.tell():
        raise ValueError(f"header promises {dtype} {shape}, data holds {len(data) - stream.tell()} bytes")
    flat = np.frombuffer(data, dtype, offset=stream.tell())
    return flat.reshape(shape[::-1]).T if fortran_order else flat.reshape(shape)


def decode_feature_rows(raw: RawSample, feature_dim: int | None) -> np.ndarray:
    """The sample's float [R, F] feature rows (a single vector [F] is one row), a read-only view of the raw
    bytes; SampleError when unusable."""
    if FEATURE_MEMBER not in raw:
        raise SampleError("bad_features", "no feature member")
    try:
        array = read_npy(raw[FEATURE_MEMBER])
    except (ValueError, OSError, EOFError) as exc:
        raise SampleError("bad_features", str(exc)) from exc
    if array.ndim == 1:
        array = array[None]
    if array.dtype not in FEATURE_DTYPES or array.ndim != 2 or array.shape[0] == 0:
        raise SampleError("bad_features", f"expected float [R, F], got {array.dtype} {array.shape}")
    if feature_dim is not None and array.shape[1] != feature_dim:
        raise SampleError("bad_features", f"feature size {array.shape[1]}, expected {feature_dim}")
    if not np.isfinite(array).all():
        raise SampleError("bad_features", "non-finite value")
    return array


@dataclass
class FeatureSampleDecoder:
    """Raw feature-shard sample → dict with region features [R, F], region boxes [R, 4] and captions.

    ``feature_dim`` (from the manifest) makes a sample of another width a skip instead of a collate crash;
    ``keep_fp16`` keeps rows stored as float16 in float16 (half the host memory) instead of converting them to
    float32; rows stored as float32 stay float32.
    """

    vocab: Vocabulary
    max_len: int | None = None
    feature_dim: int | None = None
    keep_fp16: bool = False

    def __call__(self, key: str, raw: RawSample) -> dict:
        meta = decode_meta(raw)
        sample = caption_fields(key, meta, self.vocab, self.max_len)
        features = decode_feature_rows(raw, self.feature_dim)
        region_boxes = meta.get("region_boxes")
        if not isinstance(region_boxes, list) or len(region_boxes) != features.shape[0]:
            raise SampleError("bad_features", "region_boxes do not match the feature rows")
        boxes = decode_boxes({"boxes": region_boxes})
        if len(boxes) != features.shape[0]:  # e.g. a flat list of R numbers read as R/4 boxes
            raise SampleError("bad_features", f"{len(boxes)} region boxes for {features.shape[0]} feature rows")
        stored_fp16 = self.keep_fp16 and features.dtype == np.float16  # float32 rows are never rounded down
        regions = torch.from_numpy(features.astype(np.float16 if stored_fp16 else np.float32, copy=True))
        return {**sample, "regions": regions, "boxes": boxes}


def collate_features(samples: list[dict]) -> dict:
    """Zero-pad regions to the batch's largest count: ``regions`` [B, R, F], ``region_mask`` [B, R] (True =
    real region), ``boxes`` [B, R, 4], plus ``tokens``/``token_mask``/``caption_mask`` as for images."""
    n_regions = max(len(s["regions"]) for s in samples)
    first = samples[0]["regions"]
    dtype = functools.reduce(torch.promote_types, (s["regions"].dtype for s in samples))  # float16 + float32 shards
    regions = torch.zeros(len(samples), n_regions, first.shape[1], dtype=dtype)
    for b, sample in enumerate(samples):
        regions[b, : len(sample["regions"])] = sample["regions"]
    boxes = pad_boxes(samples)
    return {
        "keys": [s["key"] for s in samples],
        "image_ids": [s["image_id"] for s in samples],
        "regions": regions,
        "region_mask": boxes["box_mask"],
        "boxes": boxes["boxes"],
        "raw_captions": [s["raw_captions"] for s in samples],
        **pad_captions(samples),
    }
