"""``dsalign align``: register with ``add_align_parser(subparsers)`` (see :mod:`dsalign.cli`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dsalign.api_cli import add_image_align_arguments, run_image_align
from dsalign.cli_args import bounded, positive


def _float_list(value: str) -> list[float]:
    """argparse type: comma-separated β values, each held to the same rule as ``--beta`` (a number >= 0)."""
    parse = bounded(float, 0.0)
    return [parse(x.strip()) for x in value.split(",") if x.strip()]


def add_align_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``align`` subcommand to the ``dsalign`` command line."""
    cmd = sub.add_parser(
        "align", help="snippet alignment: one image + sentence, or a whole split of feature shards",
        description="`dsalign align IMG SENTENCE --bundle B [--out fig.png] [--heatmap heat.png]` aligns one "
                    "sentence to one image's regions and prints/draws the snippets. With --features: embed "
                    "every (image, caption) pair of a split with a trained alignment bundle, assign each "
                    "word a region with the Potts chain MRF (Viterbi, bonus --beta for staying on one region), "
                    "and write one snippet shard per feature shard: per snippet its fp16 region feature, box, "
                    "tokens, source image id + caption index and score (mean word-region similarity). "
                    "--evaluate instead scores the alignment against the shapes ground truth; --picture draws "
                    "one image's alignments.")
    cmd.add_argument("--bundle", required=True, type=Path,
                     help="alignment bundle (from `dsalign train align`) or a folder of bundles holding one")
    cmd.add_argument("--features", type=Path, help="feature folder (from `dsalign features`): align a whole split")
    cmd.add_argument("--out", type=Path,
                     help="output folder for the snippet shards (single image: the picture, a PNG)")
    cmd.add_argument("--beta", type=bounded(float, 0.0),
                     help="bonus for consecutive words on one region: 0 = per-word argmax, large = one region "
                          "per caption (default 0 for --features; for a single image 0.5, or 0.2 for a "
                          "model.similarity=cosine model)")
    cmd.add_argument("--objects-only", action="store_true",
                     help="keep words off region 0 (the whole image) where an image has other regions "
                          "(default: the paper's setting, the whole image is a region like any other)")
    cmd.add_argument("--split", default="train", help="split of the feature folder to align (default train)")
    cmd.add_argument("--batch-size", type=positive, default=64, help="images per batch (default 64)")
    cmd.add_argument("--device", help="torch device (default: cpu for --features; cuda when available for a "
                                       "single image)")
    cmd.add_argument("--resume", action="store_true", help="keep finished output shards, redo the rest")
    cmd.add_argument("--evaluate", type=_float_list, metavar="BETAS",
                     help="shapes data: print word->object accuracy and boundary F1 for these β "
                          "(comma-separated) on --split and exit")
    cmd.add_argument("--limit", type=positive, help="--evaluate: at most this many images")
    cmd.add_argument("--picture", type=Path, metavar="PNG", help="draw --show-image's alignments into this PNG")
    cmd.add_argument("--show-image", help="image id for --picture (default: the split's first image)")
    cmd.add_argument("--images", type=Path,
                     help="--picture: the image folder the features came from (default: the feature "
                          "manifest's source)")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    add_image_align_arguments(cmd)
    cmd.set_defaults(func=_run_align)


def _run_align(args: argparse.Namespace) -> None:
    from dsalign.bundle import check_feature_folder, load_alignment_bundle
    from dsalign.snippet_align import align_folder, sweep_beta

    if args.features is None:
        run_image_align(args)
        return
    if args.inputs:
        raise ValueError("IMG SENTENCE and --features exclude each other")
    args.beta = 0.0 if args.beta is None else args.beta
    args.device = args.device or "cpu"
    bundle = load_alignment_bundle(args.bundle, args.device)
    check_feature_folder([bundle], args.features)
    if args.evaluate:
        for row in sweep_beta(bundle.model, bundle.vocab, args.features, args.evaluate, args.split,
                              args.batch_size, args.limit, whole_image=not args.objects_only,
                              device=args.device):
            print(json.dumps(row, sort_keys=True))
        return
    if args.picture:
        from dsalign.viz import picture_for

        image_id = picture_for(bundle.model, bundle.vocab, args.features, args.picture, args.beta, args.split,
                               args.show_image, args.images, args.device,
                               whole_image=not args.objects_only)
        print(f"align: {image_id} -> {args.picture}")
        return
    if args.out is None:
        raise ValueError("--out is required (unless --evaluate or --picture is given)")
    manifest = align_folder(bundle.model, bundle.vocab, args.features, args.out, args.beta, args.split,
                            args.batch_size, args.resume, args.device, model_id=bundle.weights_sha256,
                            progress=not args.quiet, whole_image=not args.objects_only)
    info = manifest["splits"][args.split]
    print(f"align {args.split}: {info.get('images', 0)} images, {info.get('pairs', 0)} pairs -> "
          f"{info.get('snippets', 0)} snippets in {len(info['shards'])} shards (beta {args.beta}, "
          f"{manifest['resumed_shards']} kept from a previous run) -> {args.out}")
