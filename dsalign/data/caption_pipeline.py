"""Training batches for the caption generator: one CNN vector per sentence.

Two sources, one batch layout (``features`` [N, F], ``tokens`` / ``token_mask`` [N, T]) so the generator's
trainer does not care which it reads:

- full-image captions: feature shards (``dsalign features``); the vector is region 0 (the whole image) and every
  caption of an image is one sentence (a batch of B images has about 5B sentences);
- region-level descriptions: snippet shards (``dsalign align``); one (region vector, snippet) pair per sample.

Bad samples are skipped and counted by :class:`~dsalign.data.pipeline.ShardStream` like everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsalign.data.feature_pipeline import FeatureSampleDecoder, decode_feature_rows
from dsalign.data.pipeline import RawSample, SampleError, caption_fields, decode_meta, pad_captions
from dsalign.text import Vocabulary


@dataclass
class WholeImageDecoder:
    """Feature-shard sample -> its whole-image vector (region 0) and its captions."""

    vocab: Vocabulary
    max_len: int | None = None
    feature_dim: int | None = None

    def __post_init__(self) -> None:
        # float16 as stored: only region 0 is kept, and collate_sentences converts it (exactly) to float32
        self.inner = FeatureSampleDecoder(self.vocab, self.max_len, self.feature_dim, keep_fp16=True)

    def __call__(self, key: str, raw: RawSample) -> dict:
        sample = self.inner(key, raw)
        return {"key": key, "image_id": sample["image_id"], "feature": sample["regions"][0],
                "captions": sample["captions"], "raw_captions": sample["raw_captions"]}


@dataclass
class SnippetDecoder:
    """Snippet-shard sample -> its region vector and the snippet as a one-caption list."""

    vocab: Vocabulary
    max_len: int | None = None
    feature_dim: int | None = None

    def __call__(self, key: str, raw: RawSample) -> dict:
        meta = decode_meta(raw)
        tokens = meta.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise SampleError("bad_metadata", "snippet without a token list")
        sample = caption_fields(key, {**meta, "captions": [{"tokens": tokens, "raw": " ".join(tokens)}]},
                                self.vocab, self.max_len)
        rows = decode_feature_rows(raw, self.feature_dim)
        if rows.shape[0] != 1:
            raise SampleError("bad_features", f"a snippet has one region vector, got {rows.shape[0]}")
        return {**sample, "feature": torch.from_numpy(rows[0].copy())}


def collate_sentences(samples: list[dict]) -> dict:
    """Every caption of every sample as one row: ``features`` [N, F] float32 (the sample's vector repeated per
    caption), ``tokens`` / ``token_mask`` [N, T], plus ``image_ids`` and ``raw_captions`` per sample."""
    padded = pad_captions(samples)
    keep = padded["caption_mask"]
    features = torch.stack([s["feature"] for s in samples]).float()
    rows = keep.nonzero()[:, 0]
    length = max(int(padded["token_mask"][keep].sum(1).max()), 1)
    return {
        "features": features[rows],
        "tokens": padded["tokens"][keep][:, :length],
        "token_mask": padded["token_mask"][keep][:, :length],
        "image_ids": [s["image_id"] for s in samples],
        "image_features": features,
        "raw_captions": [s["raw_captions"] for s in samples],
    }
