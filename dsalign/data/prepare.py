"""``dsalign prepare``: image records → per-split WebDataset shards + vocabulary + manifest.

Bad records (missing or undecodable image, no non-empty caption) are skipped, counted per reason and listed
in the manifest, so nothing is silently lost. Output is deterministic for the same input.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from dsalign.data.images import decode_rgb, shrink_and_encode
from dsalign.data.manifest import MANIFEST_NAME, write_manifest
from dsalign.data.records import ImageRecord
from dsalign.data.shards import ShardWriter, record_to_sample
from dsalign.text import Vocabulary

VOCAB_NAME = "vocab.json"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class SplitStats:
    images: int = 0
    captions: int = 0
    skipped: Counter = field(default_factory=Counter)


class _Skip(Exception):
    """A record that cannot be written; the message is the reason counted in the manifest."""


def _load_image(record: ImageRecord, max_side: int | None) -> tuple[bytes, str]:
    if record.image_bytes is not None:
        data, ext = record.image_bytes, record.image_ext
    else:
        if record.image_path is None:
            raise _Skip("missing_image")
        try:
            data = Path(record.image_path).read_bytes()
        except OSError as exc:
            raise _Skip("missing_image") from exc
        ext = Path(record.image_path).suffix.lstrip(".").lower() or "jpg"
        ext = "jpg" if ext == "jpeg" else ext
    try:
        shrunk = shrink_and_encode(data, max_side) if max_side else None
        if shrunk is None:
            decode_rgb(data)  # verify it decodes, so training never meets it
        else:
            data, ext = shrunk
    except ValueError as exc:
        raise _Skip("bad_image") from exc
    return data, ext


def _check_split(record: ImageRecord) -> None:
    """The split names an output folder: anything but a plain name (``../x``, ``/tmp``) could write outside it."""
    if not isinstance(record.split, str) or not _PLAIN_NAME.fullmatch(record.split):
        raise ValueError(f"record {record.image_id}: split {record.split!r} must be a plain name "
                         "(letters, digits, '_' or '-')")


def _clear_previous(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"output folder {out_dir} is not empty (pass --overwrite to replace a prepared data set)")
    if not (out_dir / MANIFEST_NAME).is_file():
        raise ValueError(f"refusing to overwrite {out_dir}: it is not a prepared data set (no {MANIFEST_NAME})")
    (out_dir / MANIFEST_NAME).unlink()
    for child in out_dir.iterdir():
        if child.is_dir() and all(p.suffix == ".tar" for p in child.iterdir()):
            shutil.rmtree(child)
    (out_dir / VOCAB_NAME).unlink(missing_ok=True)


def prepare_dataset(
    records: Iterable[ImageRecord],
    out_dir: str | Path,
    name: str,
    shard_size: int = 1000,
    max_side: int | None = None,
    min_count: int = 5,
    vocab: Vocabulary | None = None,
    total: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write shards under ``out_dir/<split>/<split>-NNNNNN.tar``; return the manifest written beside them.

    The vocabulary is built from the *train* split only (words seen >= ``min_count`` times) unless one is given.
    """
    out = Path(out_dir)
    _clear_previous(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    writers: dict[str, ShardWriter] = {}
    stats: dict[str, SplitStats] = {}
    skipped: list[dict] = []
    train_tokens: Counter[str] = Counter()
    bar = tqdm(records, total=total, desc=f"prepare {name}", unit="img", disable=not progress)
    for record in bar:
        _check_split(record)
        split_stats = stats.setdefault(record.split, SplitStats())
        captions = [c for c in record.captions if c.tokens]
        split_stats.skipped["empty_caption"] += len(record.captions) - len(captions)
        try:
            if not captions:
                raise _Skip("no_captions")
            data, ext = _load_image(record, max_side)
        except _Skip as skip:
            split_stats.skipped[str(skip)] += 1
            skipped.append({"image_id": record.image_id, "split": record.split, "reason": str(skip)})
            continue
        record.captions = captions
        if record.split not in writers:
            writers[record.split] = ShardWriter(out / record.split, record.split, max_count=shard_size)
        writers[record.split].write(f"{split_stats.images:09d}", record_to_sample(record, data, ext))
        split_stats.images += 1
        split_stats.captions += len(captions)
        if record.split == "train":
            for caption in captions:
                train_tokens.update(caption.tokens)
    for writer in writers.values():
        writer.close()
    if vocab is None:
        if not train_tokens:
            raise ValueError("no training captions to build a vocabulary from (pass --vocab FILE)")
        vocab = Vocabulary.from_counts(train_tokens, min_count=min_count)
    vocab.save(out / VOCAB_NAME)
    manifest = {
        "name": name,
        "vocab": VOCAB_NAME,
        "vocab_size": len(vocab),
        "max_side": max_side,
        "splits": {
            split: {
                "images": s.images,
                "captions": s.captions,
                "shards": [str(p.relative_to(out)) for p in writers[split].paths] if split in writers else [],
                "skipped": dict(sorted(s.skipped.items())),
            }
            for split, s in sorted(stats.items())
        },
        "skipped": skipped,
    }
    write_manifest(out, manifest)
    return manifest
