"""Read a whole split once and report how many samples are usable: the check behind ``dsalign info --verify``."""

from __future__ import annotations

from pathlib import Path

from dsalign.data.feature_pipeline import FeatureSampleDecoder, collate_features
from dsalign.data.manifest import load_manifest
from dsalign.data.pipeline import ImageSampleDecoder, ShardLoader, ShardStream, collate_images
from dsalign.data.shards import shard_paths
from dsalign.text import Vocabulary


def verify_split(folder: str | Path, split: str, batch_size: int = 64) -> str:
    """Decode every sample of ``split`` (image or feature shards); return a one-line count of good and
    skipped samples."""
    manifest = load_manifest(folder)
    urls = shard_paths(folder, split)
    if not urls:
        return "no shards"
    vocab = Vocabulary.load(Path(folder) / manifest["vocab"])
    if manifest.get("kind") == "features":
        decoder, collate = FeatureSampleDecoder(vocab, feature_dim=manifest.get("feature_dim")), collate_features
    else:
        decoder, collate = ImageSampleDecoder(vocab), collate_images
    loader = ShardLoader(ShardStream(urls, decoder, collate, batch_size, mode="eval"))
    good = sum(len(batch["image_ids"]) for batch in loader)
    return f"{good} readable samples, {loader.report()}"
