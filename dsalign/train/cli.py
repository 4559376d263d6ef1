"""``dsalign train align|caption``: the training subcommands, registered in :mod:`dsalign.cli`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` (with its ``align`` and ``caption`` subcommands) to the ``dsalign`` command line."""
    train = sub.add_parser("train", help="train a model (align: alignment model; caption: generator)",
                           description="Training commands. They run in one process, under torchrun, or under "
                                       "the deepspeed launcher (see docs/training.md).")
    kinds = train.add_subparsers(dest="train_command", metavar="MODEL", required=True)
    align = kinds.add_parser(
        "align", help="the alignment model (BRNN + region projection, ranking loss) on feature shards",
        description="Train the alignment model of Karpathy & Fei-Fei (Eqs. 1-9) on a folder written by "
                    "`dsalign features`, with DeepSpeed (ZeRO 0-2). Logs to the console, "
                    "<out_dir>/metrics.jsonl and TensorBoard (<out_dir>/tensorboard); keeps the best model "
                    "by validation rsum as a bundle in <out_dir>/best and rotating checkpoints in "
                    "<out_dir>/checkpoints.")
    _add_run_arguments(align, "align")
    caption = kinds.add_parser(
        "caption", help="the multimodal RNN generator on whole images (full) or region snippets (region)",
        description="Train the caption generator of Karpathy & Fei-Fei (Eqs. 13-15; cell rnn or lstm) with "
                    "DeepSpeed: --set data.level=full on whole-image vectors and their captions, "
                    "--set data.level=region on the region-snippet shards of `dsalign align` "
                    "(data.snippets). Keeps the best model by validation CIDEr (full) or, at the region level, the "
                    "share of boxes described correctly (attribute_match where the boxes carry attributes, "
                    "else exact phrase match) in <out_dir>/best; logs and checkpoints as `train align`.")
    _add_run_arguments(caption, "caption")


def _add_run_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    parser.add_argument("--config", required=True, type=Path, help="training config (JSON; see launch/configs)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in train.out_dir (same step, RNG and data "
                             "position); starts fresh when there is none")
    parser.add_argument("--export", type=Path, metavar="DIR",
                        help="at the end, write the best (else the final) model as a portable bundle to DIR")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (JSON value, e.g. --set train.max_steps=500); repeatable")
    parser.set_defaults(func=lambda args: _run(args, kind))


def _run(args: argparse.Namespace, kind: str) -> None:
    import torch.distributed as dist

    from dsalign.train.config import CaptionTrainConfig, TrainConfig, load_config

    train: Callable
    if kind == "align":
        from dsalign.train.align import train_alignment as train
    else:
        from dsalign.train.caption import train_caption as train
    config = load_config(args.config, args.overrides, TrainConfig if kind == "align" else CaptionTrainConfig)
    try:
        train(config, resume=args.resume, export_dir=args.export)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
