"""Throughput of ``dsalign features`` against the raw backbone forward on the same images or crops.

Raw forward: the backbone's trunk + pooling on pre-decoded, pre-resized image tensors (RoI path) or on
pre-cut crops (crop path), nothing else. Pipeline: ``extract_features`` itself (tar reading, image decoding,
region proposals, RoI pooling or crop-and-resize, float16 encoding, shard writing, manifest). The N images are
cut into chunks of ``--chunk`` images, and each chunk is timed raw and then through every pipeline before the
next chunk, so the load of a shared machine hits raw and pipeline runs alike. Feed rate: the same pipeline
with selective search over all N images as one shard, around a stand-in CNN that costs next to nothing, per
``--feed-workers`` count in turn, ``--feed-repeats`` times: the rate at which this host can feed an
accelerator's CNN, in line (0) and with worker processes decoding and proposing. Writes JSON (``--out``).

    .venv/bin/python benchmarks/bench_features.py --images 512 --threads 2
    python benchmarks/bench_features.py --device cuda --threads 4 --workers 8 --feed-workers 0,4,8,14   # a GPU node
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.ops import roi_align

from dsalign.cli_args import non_negative
from dsalign.data.images import decode_rgb
from dsalign.data.manifest import load_manifest, write_manifest
from dsalign.data.prepare import prepare_dataset
from dsalign.data.shards import ShardWriter, image_member, iter_tar_samples, shard_paths
from dsalign.features.backbones import Backbone, load_backbone
from dsalign.features.extract import (
    FeatureConfig,
    FeatureExtractor,
    RegionFeaturizer,
    default_batch_size,
    extract_features,
    finished_stats,
)
from dsalign.features.regions import grid_boxes

FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
FLICKR8K_IMAGES = 8000


def source_folder(work: Path, n_images: int, data: Path | None) -> tuple[Path, str]:
    """A prepared image folder to take samples from: ``data``, else the first ``n_images`` of Flickr8k when it
    is on this machine, else the built-in shapes scenes at 224 px."""
    if data is not None:
        return data, data.name
    prepared = work / "prepared"
    if (FLICKR8K / "dataset_flickr8k.json").is_file():
        from dsalign.data.readers import read_karpathy

        records, name = read_karpathy(FLICKR8K / "dataset_flickr8k.json", FLICKR8K / "images")[:n_images], "flickr8k"
    else:
        from dsalign.data.shapes import generate_shapes

        records, name = list(generate_shapes(n_images, "train", seed=0, image_size=224)), "shapes"
    prepare_dataset(records, prepared, name, shard_size=max(n_images, 1), min_count=1, progress=False)
    return prepared, name


def chunk_folders(source: Path, work: Path, label: str, n_images: int, chunk: int) -> list[Path]:
    """The first ``n_images`` samples of ``source`` as prepared folders of ``chunk`` samples (one shard each)."""
    manifest = load_manifest(source)
    samples = (members for split in sorted(manifest["splits"]) for url in shard_paths(source, split)
               for _, members in iter_tar_samples(url))
    folders: list[Path] = []
    for index, members in zip(range(n_images), samples):
        if index % chunk == 0:
            folders.append(work / f"{label}-{len(folders):04d}")
            writer = ShardWriter(folders[-1] / "train", "train", max_count=chunk)
        writer.write(f"{index:09d}", members)
        if index % chunk == chunk - 1 or index == n_images - 1:
            writer.close()
            count = index % chunk + 1
            (folders[-1] / "vocab.json").write_bytes((source / manifest["vocab"]).read_bytes())
            write_manifest(folders[-1], {"name": label, "vocab": "vocab.json", "vocab_size": manifest.get("vocab_size"),
                                         "splits": {"train": {"images": count, "captions": 0, "skipped": {},
                                                              "shards": ["train/train-000000.tar"]}}})
    return folders


def decoded(folder: Path, featurizer: RegionFeaturizer) -> torch.Tensor:
    """The folder's images decoded and resized to the CNN input: the raw forward's (untimed) input."""
    return torch.stack([featurizer.to_input(decode_rgb(image_member(m)[1]))
                        for url in shard_paths(folder, "train") for _, m in iter_tar_samples(url)])


def cut_crops(inputs: torch.Tensor, backbone: Backbone, top_k: int, crop_size: int) -> torch.Tensor:
    """The crops the crop path makes (whole image + grid regions), cut beforehand for the raw forward."""
    boxes = np.concatenate([[[0.0, 0.0, 1.0, 1.0]], grid_boxes(top_k)]) * inputs.shape[-1]
    rois = torch.cat([torch.cat([torch.full((len(boxes), 1), float(i)), torch.from_numpy(boxes).float()], 1)
                      for i in range(len(inputs))]).to(inputs.device)
    with torch.inference_mode():
        return roi_align(backbone.normalize(inputs), rois, crop_size, 1.0, 0, True)


@torch.inference_mode()
def time_raw(backbone: Backbone, inputs: torch.Tensor, batch_size: int, crops: bool = False) -> float:
    start = time.perf_counter()
    for batch in inputs.split(batch_size):
        backbone.pool(backbone.trunk(batch) if crops else backbone(batch))
    if inputs.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


class FeedOnlyBackbone(Backbone):
    """A stand-in CNN of next to no cost: every 32nd pixel (the real trunks' stride) through a 1 x 1 conv. A
    pipeline around it runs as fast as the host prepares images, as it would beside a fast GPU."""

    def __init__(self) -> None:
        super().__init__("feed-only", nn.Conv2d(3, 3, 1), nn.Identity(), 3, (0.5,) * 3, (0.5,) * 3, "none")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images[:, :, 16::32, 16::32].float())


def time_pipeline(src: Path, out: Path, extractor: FeatureExtractor) -> dict:
    """Seconds for extract_features over one chunk folder, with the images and regions it wrote."""
    start = time.perf_counter()
    manifest = extract_features(src, out, extractor.config, extractor=extractor, overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    assert manifest is not None
    stats = finished_stats(out / "train" / "train-000000.tar")
    assert stats is not None and not stats["skipped"], stats
    written = iter_tar_samples(out / "train" / "train-000000.tar")
    regions = sum(len(json.loads(members["json"])["region_boxes"]) for _, members in written)
    return {"seconds": seconds, "images": manifest["splits"]["train"]["images"], "regions": regions}


def _total(runs: list[dict]) -> dict:
    return {key: sum(run[key] for run in runs) for key in ("seconds", "images", "regions")}


def summarise(raw: list[dict], pipelines: dict[str, list[dict]], flickr8k: bool) -> dict:
    """Totals over chunks: throughput = all images (or regions) / all seconds; ratio = raw seconds / pipeline
    seconds on the same images, also as the median of the per-chunk ratios (robust to a burst of load on a
    shared machine); best = the fastest chunk (the least disturbed by other processes)."""
    raw_total = _total(raw)
    out: dict = {"raw_forward": {"images_per_s": raw_total["images"] / raw_total["seconds"],
                                 "crops_per_s": raw_total["regions"] / raw_total["seconds"],
                                 "best_chunk_images_per_s": max(r["images"] / r["seconds"] for r in raw)}}
    for name, runs in pipelines.items():
        total = _total(runs)
        ips = total["images"] / total["seconds"]
        out[name] = {"images_per_s": ips, "crops_per_s": total["regions"] / total["seconds"],
                     "regions_per_image": total["regions"] / total["images"],
                     "ratio_vs_raw_forward": raw_total["seconds"] / total["seconds"],
                     "median_chunk_ratio_vs_raw_forward": statistics.median(
                         r["seconds"] / p["seconds"] for r, p in zip(raw, runs)),
                     "best_chunk_images_per_s": max(r["images"] / r["seconds"] for r in runs)}
        if flickr8k:
            out[name]["flickr8k_8000_images_minutes_extrapolated"] = FLICKR8K_IMAGES / ips / 60
    return out


def summarise_feed(runs: dict[int, list[dict]]) -> dict:
    """Images per second per worker count, and the ratio to the first count's rate (in line, by default) on the
    same images, overall and as the median over the repeats."""
    base = runs[next(iter(runs))]
    out = {}
    for workers, repeats in runs.items():
        total = _total(repeats)
        out[f"workers_{workers}"] = {
            "images_per_s": total["images"] / total["seconds"],
            "ratio_vs_first": _total(base)["seconds"] / total["seconds"],
            "median_ratio_vs_first": statistics.median(b["seconds"] / r["seconds"] for b, r in zip(base, repeats)),
            "best_images_per_s": max(r["images"] / r["seconds"] for r in repeats)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="images for the RoI path (default 512)")
    parser.add_argument("--crop-images", type=int, default=32, help="images for the crop path (default 32)")
    parser.add_argument("--chunk", type=int, default=64, help="images per interleaved chunk (default 64)")
    parser.add_argument("--data", type=Path, help="prepared image folder (default: Flickr8k, else shapes)")
    parser.add_argument("--regions", nargs="+", default=["grid", "selective-search"])
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--crop-size", type=int, default=112)
    parser.add_argument("--top-k", type=int, default=19)
    parser.add_argument("--device", default="cpu", help="the CNN's device, e.g. cuda (default cpu)")
    parser.add_argument("--batch-size", type=int, help="images per CNN batch (default: 4 on CPU, 32 on GPU)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--workers", type=int, default=0,
                        help="worker processes of the pipelines timed against the raw forward (default 0)")
    parser.add_argument("--feed-workers", default="0,1,2", type=lambda text: [non_negative(w) for w in text.split(",")],
                        help="comma list of worker process counts for the feed rate (default 0,1,2)")
    parser.add_argument("--feed-repeats", type=int, default=3, help="feed-rate runs per worker count (default 3)")
    parser.add_argument("--out", type=Path,
                        help="JSON file (default benchmarks/results/features.json, features_cuda.json on a GPU)")
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.batch_size = args.batch_size or default_batch_size(args.device)
    args.out = args.out or Path(f"benchmarks/results/features{'_cuda' if cuda else ''}.json")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    backbone = load_backbone(args.backbone, device=args.device)
    config = FeatureConfig(args.backbone, top_k=args.top_k, image_size=args.image_size)
    extractors = {r: FeatureExtractor(FeatureConfig(**{**vars(config), "regions": r}), args.device, args.batch_size,
                                      backbone=backbone, workers=args.workers) for r in args.regions}
    cropper = FeatureExtractor(FeatureConfig(**{**vars(config), "regions": "grid", "pooling": "crop",
                                                "crop_size": args.crop_size}),
                               args.device, args.batch_size, backbone=backbone, workers=args.workers)
    feeders = {w: FeatureExtractor(FeatureConfig(**{**vars(config), "backbone": "feed-only"}),
                                   batch_size=32, backbone=FeedOnlyBackbone(), workers=w)
               for w in args.feed_workers}
    feed_runs: dict[int, list[dict]] = {w: [] for w in args.feed_workers}
    roi_runs: dict[str, list[dict]] = {r: [] for r in args.regions}
    raw_roi: list[dict] = []
    crop_runs: list[dict] = []
    raw_crop: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_features_") as tmp:
        work = Path(tmp)
        source, name = source_folder(work, max(args.images, args.crop_images), args.data)
        chunks = chunk_folders(source, work, "roi", args.images, args.chunk)
        time_raw(backbone, decoded(chunks[0], cropper.featurizer)[: args.batch_size].to(args.device),
                 args.batch_size)  # warm-up
        for i, folder in enumerate(chunks):
            inputs = decoded(folder, cropper.featurizer).to(args.device)
            seconds = time_raw(backbone, inputs, args.batch_size)
            raw_roi.append({"seconds": seconds, "images": len(inputs), "regions": len(inputs)})
            for region, extractor in extractors.items():
                roi_runs[region].append(time_pipeline(folder, work / "out", extractor))
            print(f"chunk {i + 1}/{len(chunks)}: raw {seconds:.1f} s, "
                  + ", ".join(f"{r} {runs[-1]['seconds']:.1f} s" for r, runs in roi_runs.items()), file=sys.stderr)
        feed_folder = chunk_folders(source, work, "feed", args.images, args.images)[0]  # one shard, as in a long run
        for repeat in range(args.feed_repeats):
            for w, feeder in feeders.items():
                feed_runs[w].append(time_pipeline(feed_folder, work / "out", feeder))
            print(f"feed {repeat + 1}/{args.feed_repeats}: "
                  + ", ".join(f"{w} workers {runs[-1]['seconds']:.2f} s" for w, runs in feed_runs.items()),
                  file=sys.stderr)
        crop_chunk = max(1, min(args.chunk, args.crop_images) // 4)
        for folder in chunk_folders(source, work, "crop", args.crop_images, crop_chunk):
            crops = cut_crops(decoded(folder, cropper.featurizer).to(args.device), backbone, args.top_k,
                              args.crop_size)
            seconds = time_raw(backbone, crops, cropper.featurizer.crop_batch, crops=True)
            raw_crop.append({"seconds": seconds, "images": len(crops) // (args.top_k + 1), "regions": len(crops)})
            crop_runs.append(time_pipeline(folder, work / "out", cropper))
    results = {
        "date": datetime.date.today().isoformat(),
        "data": name,
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "torch": torch.__version__,
                    "python": platform.python_version(), "loadavg_1_5_15_before": load_before,
                    "loadavg_1_5_15_after": os.getloadavg(),
                    "device": torch.cuda.get_device_name(args.device) if cuda else "cpu"},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "roi": summarise(raw_roi, {f"pipeline_{r}": runs for r, runs in roi_runs.items()}, name == "flickr8k"),
        "crop": summarise(raw_crop, {"pipeline_grid": crop_runs}, False),
        "feed_selective_search": summarise_feed(feed_runs),
        "chunks": {"raw_roi": raw_roi, **{f"pipeline_{r}": runs for r, runs in roi_runs.items()},
                   "raw_crop": raw_crop, "crop_pipeline_grid": crop_runs,
                   **{f"feed_workers_{w}": runs for w, runs in feed_runs.items()}},
    }
    for extractor in (*extractors.values(), cropper, *feeders.values()):
        extractor.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("machine", "roi", "crop", "feed_selective_search")}, indent=2))
    return results


if __name__ == "__main__":
    main()
