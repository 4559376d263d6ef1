"""``dsalign train align``: the training subcommands, registered in :mod:`dsalign.cli`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` (with its ``align`` subcommand) to the ``dsalign`` command line."""
    train = sub.add_parser("train", help="train a model (align: the region-word alignment model)",
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
    align.add_argument("--config", required=True, type=Path, help="training config (JSON; see launch/configs)")
    align.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint in train.out_dir (same step, RNG and data "
                            "position); starts fresh when there is none")
    align.add_argument("--export", type=Path, metavar="DIR",
                       help="at the end, write the best (else the final) model as a portable bundle to DIR")
    align.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value (JSON value, e.g. --set train.max_steps=500); repeatable")
    align.set_defaults(func=_run_align)


def _run_align(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from dsalign.train.align import train_alignment
    from dsalign.train.config import load_config

    config = load_config(args.config, args.overrides)
    try:
        train_alignment(config, resume=args.resume, export_dir=args.export)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
