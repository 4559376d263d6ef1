"""``dsalign prepare``: image records → per-split WebDataset shards + vocabulary + manifest.

Bad records (missing or undecodable image, no non-empty caption) are skipped, counted per reason and listed
in the manifest, so nothing is silently lost. Output is deterministic for the same input.
"""

from __future__ import annotations

import itertools
import re
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from dsalign.data.images import decode_rgb, shrink_and_encode
from dsalign.data.manifest import MANIFEST_NAME, write_manifest
from dsalign.data.ordered_workers import OrderedWorkers
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


def _load_image(image_path: Path | None, image_bytes: bytes | None, image_ext: str, max_side: int | None
                ) -> tuple[bytes, str] | _Skip:
    """The record's image as stored (checked to decode, or shrunk and re-encoded), or why it is skipped
    (returned, not raised: worker processes send it back)."""
    if image_bytes is not None:
        data, ext = image_bytes, image_ext
    else:
        if image_path is None:
            return _Skip("missing_image")
        try:
            data = Path(image_path).read_bytes()
        except OSError:
            return _Skip("missing_image")
        ext = Path(image_path).suffix.lstrip(".").lower() or "jpg"
        ext = "jpg" if ext == "jpeg" else ext
    try:
        shrunk = shrink_and_encode(data, max_side) if max_side else None
        if shrunk is None:
            decode_rgb(data)  # verify it decodes, so training never meets it
        else:
            data, ext = shrunk
    except ValueError:
        return _Skip("bad_image")
    return data, ext


def _check_split(record: ImageRecord) -> ImageRecord:
    """The record, if its split is a plain name: it names an output folder, and anything else (``../x``,
    ``/tmp``) could write outside it."""
    if not isinstance(record.split, str) or not _PLAIN_NAME.fullmatch(record.split):
        raise ValueError(f"record {record.image_id}: split {record.split!r} must be a plain name "
                         "(letters, digits, '_' or '-')")
    return record


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
    workers: int = 0,
) -> dict:
    """Write shards under ``out_dir/<split>/<split>-NNNNNN.tar``; return the manifest written beside them.

    The vocabulary is built from the *train* split only (words seen >= ``min_count`` times) unless one is given.
    ``workers`` > 0: processes read, check (decode) and shrink the images; the output is the same (``records``
    are then read a few dozen ahead: each must be an object of its own). A run that fails leaves nothing behind.
    """
    out = Path(out_dir)
    _clear_previous(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    writers: dict[str, ShardWriter] = {}
    try:
        stats, skipped, train_tokens = _write_shards(records, out, writers, shard_size, max_side, total, name,
                                                     progress, workers)
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
    except BaseException:  # a bad record, a dead worker, Ctrl-C: leave the folder as found, so the command can rerun
        _remove_output(out, writers)
        raise
    return manifest


def _write_shards(records: Iterable[ImageRecord], out: Path, writers: dict[str, ShardWriter], shard_size: int,
                  max_side: int | None, total: int | None, name: str, progress: bool, workers: int
                  ) -> tuple[dict[str, SplitStats], list[dict], Counter[str]]:
    """Every usable record into its split's shards (``writers``, filled as splits appear); the counts, the
    skipped records and the training split's word counts."""
    stats: dict[str, SplitStats] = {}
    skipped: list[dict] = []
    train_tokens: Counter[str] = Counter()
    bar = tqdm(records, total=total, desc=f"prepare {name}", unit="img", disable=not progress)
    listing, jobs = itertools.tee(_check_split(record) for record in bar)
    arguments = ((r.image_path, r.image_bytes, r.image_ext, max_side) if any(c.tokens for c in r.captions)
                 else (None, None, "", None) for r in jobs)  # no captions: skipped as such, nothing to read
    loader = OrderedWorkers(workers, _load_image) if workers else None
    loaded = loader.starmap(arguments) if loader else (_load_image(*a) for a in arguments)
    try:
        for record, image in zip(listing, loaded):
            split_stats = stats.setdefault(record.split, SplitStats())
            captions = [c for c in record.captions if c.tokens]
            split_stats.skipped["empty_caption"] += len(record.captions) - len(captions)
            if not captions:
                image = _Skip("no_captions")
            if isinstance(image, _Skip):
                split_stats.skipped[str(image)] += 1
                skipped.append({"image_id": record.image_id, "split": record.split, "reason": str(image)})
                continue
            record.captions = captions
            if record.split not in writers:
                writers[record.split] = ShardWriter(out / record.split, record.split, max_count=shard_size)
            writers[record.split].write(f"{split_stats.images:09d}", record_to_sample(record, *image))
            split_stats.images += 1
            split_stats.captions += len(captions)
            if record.split == "train":
                for caption in captions:
                    train_tokens.update(caption.tokens)
    finally:
        loaded.close()  # an early stop drops the queued work
        if loader:
            loader.close()
        for writer in writers.values():
            writer.close()
    return stats, skipped, train_tokens


def _remove_output(out: Path, writers: dict[str, ShardWriter]) -> None:
    """Delete what a failed run wrote (its writers closed): its shards, their split folders once empty, the
    vocabulary."""
    for writer in writers.values():
        for path in writer.paths:
            path.unlink(missing_ok=True)
        if writer.directory.is_dir() and not any(writer.directory.iterdir()):
            writer.directory.rmdir()
    (out / VOCAB_NAME).unlink(missing_ok=True)
