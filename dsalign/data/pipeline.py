"""Reading shards for training and evaluation, with exact skip accounting.

Training: every rank and worker draws shards at random with replacement (seeded by epoch, rank and worker),
shuffles samples in a buffer and yields a fixed number of batches per rank, so lock-step ranks never wait on
an uneven split. Evaluation: shards are split by rank then worker in a fixed order and every sample is read
exactly once. A corrupt tar, an undecodable image or a sample without captions is skipped; each worker
attaches its skip counts to the next batch it yields (and sends a final count-only record), so the loader's
totals are exact across processes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dsalign.data.images import decode_rgb
from dsalign.data.shards import image_member
from dsalign.data.tario import iter_samples
from dsalign.text import Vocabulary

SKIP_KEY = "skipped"
MAX_FAILURES_IN_A_ROW = 10_000  # a training stream that only yields garbage must fail, not spin

RawSample = dict[str, bytes]
Decoder = Callable[[str, RawSample], dict]
Collate = Callable[[list[dict]], dict]


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` is the counter key reported at the end of the pass."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple:
        """Pickle as (reason, detail), not as the joined message: feature worker processes send skips back."""
        return type(self), (self.reason, self.detail)


def iter_shard(url: str, skips: Counter) -> Iterator[tuple[str, RawSample]]:
    """Yield (key, {ext: bytes}) from one shard; a missing or broken shard counts ``corrupt_shard`` once, and
    the sample being read when it broke is still yielded, so the decoder counts it too."""

    def broken(_: Exception) -> None:
        skips["corrupt_shard"] += 1

    try:
        with wds.gopen(url, "rb") as stream:
            yield from iter_samples(stream, on_error=broken)
    except OSError as exc:
        broken(exc)


def _stable_seed(*parts: object) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else from RANK/WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def decode_meta(raw: RawSample) -> dict:
    if "json" not in raw:
        raise SampleError("missing_metadata")
    try:
        meta = json.loads(raw["json"].decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # also non-UTF-8, a 5000-digit number, nesting 100k deep
        raise SampleError("bad_metadata", str(exc)) from exc
    if not isinstance(meta, dict):
        raise SampleError("bad_metadata", "not an object")
    return meta


def usable_caption(caption: object) -> bool:
    """A caption the pipelines train on: a dict whose ``tokens`` are a non-empty list of strings."""
    tokens = caption.get("tokens") if isinstance(caption, dict) else None
    return isinstance(tokens, list) and bool(tokens) and all(isinstance(t, str) for t in tokens)


def decode_captions(meta: dict, vocab: Vocabulary, max_len: int | None) -> tuple[list[list[int]], list[str]]:
    """Token ids and raw text of every caption whose tokens are a non-empty list of strings (others are left
    out, as ``prepare`` leaves out empty ones); SampleError when none is left."""
    captions = meta.get("captions")
    if not isinstance(captions, list):
        raise SampleError("bad_metadata", "no caption list")
    ids, raws = [], []
    for caption in captions:
        if not usable_caption(caption):
            continue
        ids.append(vocab.encode(caption["tokens"][:max_len]))
        raws.append(str(caption.get("raw", "")))
    if not ids:
        raise SampleError("no_captions")
    return ids, raws


def caption_fields(key: str, meta: dict, vocab: Vocabulary, max_len: int | None) -> dict:
    """What every sample decoder returns: ``key``, ``image_id``, ``captions`` (token ids) and ``raw_captions``."""
    ids, raws = decode_captions(meta, vocab, max_len)
    return {"key": key, "image_id": str(meta.get("image_id", key)), "captions": ids, "raw_captions": raws}


def decode_boxes(meta: dict) -> np.ndarray:
    """Boxes as float32 [K, 4], normalised and clipped to [0, 1]; SampleError when malformed."""
    boxes = meta.get("boxes")
    if not boxes:
        return np.zeros((0, 4), dtype=np.float32)
    try:
        array = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: an integer beyond float range
        raise SampleError("bad_boxes", str(exc)) from exc
    if not np.isfinite(array).all():
        raise SampleError("bad_boxes", "non-finite coordinate")
    array = np.clip(array, 0.0, 1.0)
    if (array[:, 2] <= array[:, 0]).any() or (array[:, 3] <= array[:, 1]).any():
        raise SampleError("bad_boxes", "empty box")
    return array


@dataclass
class ImageSampleDecoder:
    """Raw image-shard sample → dict with a uint8 HWC image array, caption ids, raw captions and boxes."""

    vocab: Vocabulary
    max_len: int | None = None

    def __call__(self, key: str, raw: RawSample) -> dict:
        meta = decode_meta(raw)
        sample = caption_fields(key, meta, self.vocab, self.max_len)
        member = image_member(raw)
        if member is None:
            raise SampleError("missing_image")
        try:
            image = np.asarray(decode_rgb(member[1]))
        except ValueError as exc:
            raise SampleError("bad_image", str(exc)) from exc
        return {**sample, "image": image, "boxes": decode_boxes(meta)}


def pad_captions(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Captions of a batch as tokens [B, C, T] (PAD=0), token_mask [B, C, T] and caption_mask [B, C]."""
    n_caps = max(len(s["captions"]) for s in samples)
    n_tok = max(len(c) for s in samples for c in s["captions"])
    tokens = np.zeros((len(samples), n_caps, n_tok), dtype=np.int64)
    lengths = np.zeros((len(samples), n_caps), dtype=np.int64)
    for b, sample in enumerate(samples):
        for c, ids in enumerate(sample["captions"]):
            tokens[b, c, : len(ids)] = ids
            lengths[b, c] = len(ids)
    lengths_t = torch.from_numpy(lengths)
    token_mask = torch.arange(n_tok) < lengths_t.unsqueeze(-1)
    return {"tokens": torch.from_numpy(tokens), "token_mask": token_mask, "caption_mask": lengths_t > 0}


def pad_boxes(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Boxes [B, K, 4] (zeros past each sample's boxes) and box_mask [B, K]."""
    n_box = max(len(s["boxes"]) for s in samples)
    boxes = np.zeros((len(samples), n_box, 4), dtype=np.float32)
    box_mask = np.zeros((len(samples), n_box), dtype=bool)
    for b, sample in enumerate(samples):
        boxes[b, : len(sample["boxes"])] = sample["boxes"]
        box_mask[b, : len(sample["boxes"])] = True
    return {"boxes": torch.from_numpy(boxes), "box_mask": torch.from_numpy(box_mask)}


def collate_images(samples: list[dict]) -> dict:
    """Images as uint8 [B, 3, H, W] (a channels-last view), zero-padded to the batch's largest height and
    width; ``image_sizes`` holds each real (h, w)."""
    sizes = [s["image"].shape[:2] for s in samples]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    if all(size == (height, width) for size in sizes):
        images = np.stack([s["image"] for s in samples])
    else:
        images = np.zeros((len(samples), height, width, 3), dtype=np.uint8)
        for b, sample in enumerate(samples):
            h, w = sizes[b]
            images[b, :h, :w] = sample["image"]
    return {
        "keys": [s["key"] for s in samples],
        "image_ids": [s["image_id"] for s in samples],
        "images": torch.from_numpy(images).permute(0, 3, 1, 2),
        "image_sizes": torch.tensor(sizes, dtype=torch.long),
        "raw_captions": [s["raw_captions"] for s in samples],
        **pad_captions(samples),
        **pad_boxes(samples),
    }


class ShardStream(IterableDataset):
    """One process's (rank's) stream of batches; the DataLoader workers split it further.

    ``mode="train"``: resampled shards, shuffled samples, ``batches_per_rank`` full batches per epoch.
    ``mode="eval"``: shards split by rank then worker, each sample exactly once, the last batch may be short.
    """

    def __init__(self, urls: Sequence[str], decoder: Decoder, collate: Collate, batch_size: int,
                 mode: str = "train", batches_per_rank: int | None = None, shuffle_buffer: int = 1000,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if not urls:
            raise ValueError("no shards to read")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mode == "train" and (batches_per_rank is None or batches_per_rank < 1):
            raise ValueError("training streams need batches_per_rank >= 1 (every rank takes the same steps)")
        default_rank, default_world = dist_info()
        self.urls = list(urls)
        self.decoder, self.collate = decoder, collate
        self.batch_size, self.mode = batch_size, mode
        self.batches_per_rank = batches_per_rank
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reseed the resampling and shuffling; call before iterating each epoch."""
        self.epoch = epoch

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _decoded(self, raw_samples: Iterator[tuple[str, RawSample]], skips: Counter) -> Iterator[dict]:
        failures_in_a_row = 0
        for key, raw in raw_samples:
            try:
                yield self.decoder(key, raw)
                failures_in_a_row = 0
            except SampleError as exc:
                skips[exc.reason] += 1
                failures_in_a_row += 1
                if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                    raise RuntimeError(f"{failures_in_a_row} unusable samples in a row (last: {exc}); "
                                       f"skip counts so far: {dict(skips)}") from exc

    def _batches(self, samples: Iterator[dict], skips: Counter, drop_last: bool) -> Iterator[dict]:
        batch: list[dict] = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield {**self.collate(batch), SKIP_KEY: dict(skips)}
                skips.clear()
                batch = []
        if batch and not drop_last:
            yield {**self.collate(batch), SKIP_KEY: dict(skips)}
            skips.clear()

    def _train_samples(self, epoch: int, worker: int, skips: Counter) -> Iterator[tuple[str, RawSample]]:
        rng = random.Random(_stable_seed(self.seed, epoch, self.rank, worker))
        buffer: list[tuple[str, RawSample]] = []
        empty_in_a_row = 0
        while True:
            empty_in_a_row += 1
            if empty_in_a_row > 10 * len(self.urls) + 10:
                raise RuntimeError(f"no readable sample in {empty_in_a_row - 1} shard draws from "
                                   f"{len(self.urls)} shards (e.g. {self.urls[0]}); skip counts: {dict(skips)}")
            for item in iter_shard(rng.choice(self.urls), skips):
                empty_in_a_row = 0
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(item)
                    continue
                index = rng.randrange(len(buffer))
                buffer[index], item = item, buffer[index]
                yield item

    def __iter__(self) -> Iterator[dict]:
        # The epoch is read now, not at the first batch: a loader may start the next epoch's pass early.
        return self._iterate(self.epoch)

    def _iterate(self, epoch: int) -> Iterator[dict]:
        worker, n_workers = self._worker()
        skips: Counter = Counter()
        if self.mode == "train":
            assert self.batches_per_rank is not None
            per_worker = -(-self.batches_per_rank // n_workers)
            batches = self._batches(self._decoded(self._train_samples(epoch, worker, skips), skips), skips, True)
            for _, batch in zip(range(per_worker), batches):
                yield batch
            return
        mine = self.urls[self.rank :: self.world_size][worker::n_workers]
        raw = (item for url in mine for item in iter_shard(url, skips))
        yield from self._batches(self._decoded(raw, skips), skips, drop_last=False)
        if skips:
            yield {SKIP_KEY: dict(skips)}


def _as_is(batch: dict) -> dict:
    """The streams yield finished batches; DataLoader's default conversion would walk every string in them."""
    return batch


class ShardLoader:
    """Iterates a :class:`ShardStream` through DataLoader workers and keeps the pass's skip totals.

    In training mode it yields exactly ``batches_per_rank`` batches per epoch on every rank.
    """

    def __init__(self, stream: ShardStream, num_workers: int = 0, pin_memory: bool = False):
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.skipped: Counter = Counter()

    def __len__(self) -> int:
        if self.stream.mode != "train":
            raise TypeError("an evaluation pass has no length known in advance")
        assert self.stream.batches_per_rank is not None
        return self.stream.batches_per_rank

    def __iter__(self) -> Iterator[dict]:
        """One pass: all of an evaluation stream, or one epoch (the stream's current one) of a training stream."""
        return self._pass(self._started())

    def epochs(self, first: int, last: int | None = None) -> Iterator[tuple[int, Iterator[dict]]]:
        """Training: (epoch, that epoch's batches) from epoch ``first`` through ``last`` (None: without end; close
        the generator when done).

        With workers, each epoch's worker processes start when the previous epoch's pass starts, so their
        start-up (fork, filling the shuffle buffer) overlaps its training steps instead of stalling the first
        step of every epoch; they read ahead a few batches and wait. None are started beyond ``last``.
        """
        upcoming: Iterator[dict] | None = None
        for epoch in itertools.count(first) if last is None else range(first, last + 1):
            current = upcoming if upcoming is not None else self._started(epoch)
            ahead = self.num_workers > 0 and (last is None or epoch < last)
            upcoming = self._started(epoch + 1) if ahead else None
            yield epoch, self._pass(current)

    def _started(self, epoch: int | None = None) -> Iterator[dict]:
        """A DataLoader iterator over the stream at ``epoch`` (None: its current one); with workers, their
        processes are started (each takes the stream as it is now)."""
        if epoch is not None:
            self.stream.set_epoch(epoch)
        return iter(DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                               pin_memory=self.pin_memory, persistent_workers=False))

    def _pass(self, loader: Iterator[dict]) -> Iterator[dict]:
        self.skipped = Counter()
        limit = self.stream.batches_per_rank if self.stream.mode == "train" else None
        produced = 0
        for batch in loader:
            self.skipped.update(batch.pop(SKIP_KEY, {}))
            if not batch:
                continue
            produced += 1
            yield batch
            if produced == limit:
                break

    def report(self) -> str:
        """One line for the end of a pass: what was skipped and why."""
        if not self.skipped:
            return "skipped 0 samples"
        detail = ", ".join(f"{reason}={n}" for reason, n in sorted(self.skipped.items()))
        return f"skipped {sum(self.skipped.values())} ({detail})"
