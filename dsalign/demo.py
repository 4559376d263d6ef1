"""``dsalign demo``: the whole pipeline, as far as it is built, on the built-in shapes data set.

Today: generate scenes → image shards (through the same `prepare` path as real data) → read one training
epoch and one evaluation pass through the shard pipeline → print where everything went.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from dsalign.data.pipeline import ImageSampleDecoder, ShardLoader, ShardStream, collate_images
from dsalign.data.prepare import prepare_dataset
from dsalign.data.shapes import generate_shapes
from dsalign.data.shards import shard_paths
from dsalign.text import Vocabulary


def run_demo(out_dir: str | Path, n_train: int = 2000, n_val: int = 200, n_test: int = 200, seed: int = 0,
             batch_size: int = 64, num_workers: int = 2, progress: bool = True) -> dict:
    """Run every built stage; return a summary dict of paths and measured numbers."""
    out = Path(out_dir)
    start = time.perf_counter()
    counts = {"train": n_train, "val": n_val, "test": n_test}
    records = itertools.chain.from_iterable(generate_shapes(n, split, seed=seed) for split, n in counts.items())
    shards = out / "shards"
    manifest = prepare_dataset(records, shards, "shapes", shard_size=500, total=sum(counts.values()),
                               overwrite=True, progress=progress)
    vocab = Vocabulary.load(shards / manifest["vocab"])
    summary: dict = {"shards": str(shards), "vocab_size": len(vocab), "prepare_s": time.perf_counter() - start}

    decoder = ImageSampleDecoder(vocab)
    batches = max(1, n_train // batch_size)
    train = ShardLoader(ShardStream(shard_paths(shards, "train"), decoder, collate_images, batch_size,
                                    mode="train", batches_per_rank=batches, seed=seed), num_workers=num_workers)
    tick = time.perf_counter()
    seen = sum(len(batch["image_ids"]) for batch in train)
    summary["train_epoch"] = {"batches": batches, "images": seen,
                              "images_per_s": seen / (time.perf_counter() - tick), "skipped": train.report()}
    evaluation = ShardLoader(ShardStream(shard_paths(shards, "val"), decoder, collate_images, batch_size,
                                         mode="eval"), num_workers=num_workers)
    ids = [image_id for batch in evaluation for image_id in batch["image_ids"]]
    summary["val_pass"] = {"images": len(ids), "unique": len(set(ids)), "skipped": evaluation.report()}
    summary["total_s"] = time.perf_counter() - start
    return summary


def format_summary(summary: dict) -> str:
    train, val = summary["train_epoch"], summary["val_pass"]
    return "\n".join([
        f"shards:      {summary['shards']} (vocabulary {summary['vocab_size']} words, "
        f"{summary['prepare_s']:.1f} s)",
        f"train epoch: {train['batches']} batches, {train['images']} images, {train['images_per_s']:.0f} images/s, "
        f"{train['skipped']}",
        f"val pass:    {val['images']} images ({val['unique']} unique), {val['skipped']}",
        f"total:       {summary['total_s']:.1f} s",
    ])
