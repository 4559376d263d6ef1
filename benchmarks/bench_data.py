"""Data-path throughput: shard read + JPEG decode + batching vs plain PIL decoding of the same files.

Measures, in one run and on the same images: (a) plain: read each JPEG file from disk and decode it to an RGB
array with PIL, one process; (b) pipeline: `ShardLoader` in evaluation mode with 0 workers (the per-worker
cost: tar parsing, JSON, decode, caption ids, padding into batch tensors); (c) the same with N workers.
Target: (b) >= 80% of (a). Writes JSON.

    python benchmarks/bench_data.py [--data ../shared/data/flickr8k] [--images 1000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dsalign.data.pipeline import ImageSampleDecoder, ShardLoader, ShardStream, collate_images
from dsalign.data.prepare import prepare_dataset
from dsalign.data.readers import read_karpathy
from dsalign.data.shards import shard_paths
from dsalign.text import Vocabulary

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def plain_decode(paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            np.asarray(image.convert("RGB"))
    return time.perf_counter() - start


def pipeline_pass(urls: list[str], vocab: Vocabulary, workers: int, batch_size: int) -> tuple[float, int]:
    loader = ShardLoader(ShardStream(urls, ImageSampleDecoder(vocab), collate_images, batch_size, mode="eval"),
                         num_workers=workers)
    start = time.perf_counter()
    n = sum(len(batch["image_ids"]) for batch in loader)
    return time.perf_counter() - start, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Flickr8k folder (Karpathy JSON + images)")
    parser.add_argument("--images", type=int, default=2000, help="how many images to time")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="best of N passes for each method")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "data.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    records = read_karpathy(args.data / "dataset_flickr8k.json", args.data / "images")[: args.images]
    with tempfile.TemporaryDirectory() as tmp:
        prepare_dataset(records, tmp, "bench", shard_size=500, min_count=1, progress=False)
        urls = [u for split in ("train", "val", "test") if (Path(tmp) / split).is_dir()
                for u in shard_paths(tmp, split)]
        vocab = Vocabulary.load(Path(tmp) / "vocab.json")
        paths = [r.image_path for r in records]
        plain_decode(paths[:200])  # warm the page cache for both methods
        plain = min(plain_decode(paths) for _ in range(args.repeats))
        one = min(pipeline_pass(urls, vocab, 0, args.batch_size)[0] for _ in range(args.repeats))
        many, n = min(pipeline_pass(urls, vocab, args.workers, args.batch_size) for _ in range(args.repeats))
    assert n == len(records), (n, len(records))
    result = {
        "benchmark": "data", "date": date.today().isoformat(), "machine": f"{platform.machine()} CPU",
        "images": len(records), "batch_size": args.batch_size,
        "plain_pil_decode_images_per_s": len(records) / plain,
        "pipeline_1proc_images_per_s": len(records) / one,
        f"pipeline_{args.workers}workers_images_per_s": len(records) / many,
        "pipeline_vs_plain_per_worker": plain / one,
        "target_per_worker": 0.8,
    }
    for key, value in result.items():
        print(f"{key:>36}: {value:.3f}" if isinstance(value, float) else f"{key:>36}: {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
