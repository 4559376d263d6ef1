"""The ``dsalign`` command line. Each subcommand parses its flags and calls the library; errors that come
from bad input (a wrong path, a malformed file or config) print one line and exit with status 2."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dsalign import __version__
from dsalign.cli_args import non_negative, positive

EXIT_USAGE = 2


class CommandError(Exception):
    """An error whose message is the whole story for the user (no traceback)."""




def _add_prepare(sub: argparse._SubParsersAction) -> None:
    prepare = sub.add_parser(
        "prepare", help="turn a caption data set (or the built-in shapes scenes) into WebDataset shards",
        description="Write per-split WebDataset shards (image bytes, id, split, captions raw + tokens, boxes) "
                    "plus vocab.json (train split only, words seen >= --min-count times) and manifest.json.")
    prepare.add_argument("source", choices=["karpathy", "flickr8k", "coco", "shapes"],
                         help="karpathy: dataset_*.json; flickr8k: Flickr8k.token.txt + split lists; "
                              "coco: captions_*.json; shapes: the built-in synthetic scenes")
    prepare.add_argument("--out", required=True, type=Path, help="output folder")
    prepare.add_argument("--captions", type=Path, nargs="+",
                         help="caption file(s): the Karpathy JSON, Flickr8k.token.txt, or COCO captions_*.json")
    prepare.add_argument("--images", type=Path, help="image folder (COCO Karpathy files: the folder holding "
                                                       "train2014/ and val2014/)")
    prepare.add_argument("--split", nargs="+", help="coco: the split of each --captions file (e.g. train val)")
    prepare.add_argument("--splits-dir", type=Path, help="flickr8k: folder of Flickr_8k.*Images.txt "
                                                        "(default: beside the token file)")
    prepare.add_argument("--restval", choices=["train", "keep"], default="train",
                         help="karpathy COCO: merge 'restval' into train (default) or keep it as its own split")
    prepare.add_argument("--shard-size", type=positive, default=1000, help="samples per shard (default 1000)")
    prepare.add_argument("--max-side", type=positive, help="re-encode images whose longer side exceeds this "
                                                            "as JPEG (default: keep the original bytes)")
    prepare.add_argument("--min-count", type=positive, default=5, help="vocabulary threshold (default 5)")
    prepare.add_argument("--vocab", type=Path, help="reuse this vocab.json instead of building one")
    prepare.add_argument("--n-train", type=non_negative, default=2000, help="shapes: training images")
    prepare.add_argument("--n-val", type=non_negative, default=200, help="shapes: validation images")
    prepare.add_argument("--n-test", type=non_negative, default=200, help="shapes: test images")
    prepare.add_argument("--seed", type=int, default=0, help="shapes: generator seed")
    prepare.add_argument("--image-size", type=positive, default=128, help="shapes: image side in pixels")
    prepare.add_argument("--workers", type=non_negative, default=0,
                         help="processes that read, check and (--max-side) shrink the images; the output is the "
                              "same (default 0: in line)")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing prepared data set")
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")
    prepare.set_defaults(func=_run_prepare)


def _records_for(args: argparse.Namespace) -> tuple[object, int | None]:
    from dsalign.data import readers

    if args.source == "shapes":
        from dsalign.data.shapes import generate_shapes

        counts = {"train": args.n_train, "val": args.n_val, "test": args.n_test}
        records = itertools.chain.from_iterable(
            generate_shapes(n, split, seed=args.seed, image_size=args.image_size) for split, n in counts.items())
        return records, sum(counts.values())
    if not args.captions:
        raise CommandError(f"prepare {args.source}: --captions is required")
    if args.images is None:
        raise CommandError(f"prepare {args.source}: --images is required")
    if not args.images.is_dir():
        raise CommandError(f"image folder not found: {args.images}")
    if args.source == "karpathy":
        records = [r for path in args.captions
                   for r in readers.read_karpathy(path, args.images, restval_as_train=args.restval == "train")]
    elif args.source == "flickr8k":
        records = readers.read_flickr8k_tokens(args.captions[0], args.images, args.splits_dir)
    else:
        if not args.split or len(args.split) != len(args.captions):
            raise CommandError("prepare coco: give one --split per --captions file")
        records = [r for path, split in zip(args.captions, args.split)
                   for r in readers.read_coco_captions(path, args.images, split)]
    return records, len(records)


def _run_prepare(args: argparse.Namespace) -> None:
    from dsalign.data.prepare import prepare_dataset
    from dsalign.text import Vocabulary

    records, total = _records_for(args)
    vocab = Vocabulary.load(args.vocab) if args.vocab else None
    name = "shapes" if args.source == "shapes" else args.captions[0].stem
    manifest = prepare_dataset(records, args.out, name, shard_size=args.shard_size, max_side=args.max_side,
                               min_count=args.min_count, vocab=vocab, total=total, overwrite=args.overwrite,
                               progress=not args.quiet, workers=args.workers)
    print(_summary(manifest, args.out))


def _summary(manifest: dict, out: Path) -> str:
    lines = [f"{manifest['name']}: vocabulary {manifest['vocab_size']} words -> {out}"]
    for split, info in sorted(manifest["splits"].items(), key=lambda item: _split_order(item[0])):
        skipped = sum(info["skipped"].values())
        detail = ", ".join(f"{k}={v}" for k, v in info["skipped"].items())
        lines.append(f"  {split:>5}: {info['images']} images, {info['captions']} captions, "
                     f"{len(info['shards'])} shards" + (f", skipped {skipped} ({detail})" if skipped else ""))
    return "\n".join(lines)


def _split_order(split: str) -> tuple[int, str]:
    from dsalign.data.records import SPLITS

    return (SPLITS.index(split) if split in SPLITS else len(SPLITS), split)


def _add_info(sub: argparse._SubParsersAction) -> None:
    info = sub.add_parser("info", help="summarise a prepared data set and optionally read every sample",
                          description="Print the manifest summary of a prepared data set; with --verify, read "
                                      "every shard of every split and report unreadable samples.")
    info.add_argument("folder", type=Path, help="a folder written by `dsalign prepare`")
    info.add_argument("--verify", action="store_true", help="read and decode every sample")
    info.add_argument("--json", action="store_true", help="print the manifest as JSON")
    info.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> None:
    from dsalign.data.manifest import load_manifest

    manifest = load_manifest(args.folder)
    print(json.dumps(manifest, indent=2) if args.json else _summary(manifest, args.folder))
    if args.verify:
        from dsalign.data.verify import verify_split

        for split in sorted(manifest["splits"], key=_split_order):
            print(f"  {split:>5}: {verify_split(args.folder, split)}")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run the whole pipeline on the built-in shapes data set",
                          description="Generate the shapes scenes, write image shards, extract region features, "
                                      "train the alignment model, evaluate retrieval, align snippets with the "
                                      "MRF, train the full-image and region generators, evaluate them, and "
                                      "write an HTML report and a metrics table, printing where each output "
                                      "went (about 10 minutes on a 2-core CPU).")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    demo.add_argument("--n-train", type=positive, default=2000, help="training scenes (default 2000)")
    demo.add_argument("--n-val", type=positive, default=200, help="validation scenes (default 200)")
    demo.add_argument("--n-test", type=positive, default=200, help="test scenes (default 200)")
    demo.add_argument("--steps", type=positive, default=600, help="alignment training steps (default 600)")
    demo.add_argument("--caption-steps", type=positive, default=400,
                      help="training steps of each generator, full-image and region (default 400)")
    demo.add_argument("--report-images", type=positive, default=8, help="test images in the report (default 8)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--workers", type=non_negative, default=0, help="data loader workers (default 0)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from dsalign.demo import format_summary, run_demo

    summary = run_demo(args.out, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=args.seed,
                       steps=args.steps, caption_steps=args.caption_steps, num_workers=args.workers,
                       report_images=args.report_images, progress=not args.quiet)
    print(format_summary(summary))


def _commands() -> Sequence[Callable[[argparse._SubParsersAction], None]]:
    from dsalign.api_cli import add_api_parsers
    from dsalign.features.cli import add_parser as add_features
    from dsalign.snippet_cli import add_align_parser
    from dsalign.train.cli import add_train_parser

    return (_add_prepare, _add_info, add_features, add_train_parser, add_align_parser, add_api_parsers,
            _add_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsalign",
        description="Deep visual-semantic alignments (Karpathy & Fei-Fei, CVPR 2015): data preparation, "
                    "region features, alignment training, snippet alignment, captioning and evaluation.")
    parser.add_argument("--version", action="version", version=f"dsalign {__version__}")
    # The deepspeed launcher passes --local_rank=N before the subcommand; the rank comes from LOCAL_RANK.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _commands():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CommandError, ValueError, OSError, RuntimeError) as exc:
        print(f"dsalign {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"dsalign {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
