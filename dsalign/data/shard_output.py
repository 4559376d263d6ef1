"""Resumable per-shard outputs (feature shards, snippet shards): one output shard per input shard.

Each output is written into a temporary folder, its stats file is written next, and the tar is renamed into
place last, so a killed run never leaves a shard that counts as finished; a finished shard is one whose tar
and stats file both exist. Leftover temporaries of a killed run, and the earlier output of a shard being redone,
are removed before the shard is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

from dsalign.data.shards import ShardWriter

STATS_SUFFIX = ".stats.json"
TMP_PREFIX = ".tmp-"
_UNLIMITED = 1 << 62


def stats_path(shard: Path) -> Path:
    return shard.with_name(shard.name + STATS_SUFFIX)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON under a temporary name, then rename: readers see the old file or the new one, never half."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def finished_stats(shard: Path) -> dict | None:
    """The stats of a finished output shard, or None when it is missing or unfinished (no stats beside it,
    or a stats file that cannot be read: the shard is then redone)."""
    stats = stats_path(shard)
    if not (shard.is_file() and stats.is_file()):
        return None
    try:
        data = json.loads(stats.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and "settings" in data else None


def remove_stale_temps(shard: Path) -> None:
    """Leftovers of a killed run on this shard (ignored by resume, removed before the shard is redone)."""
    for stale in shard.parent.glob(f"{TMP_PREFIX}{shard.name}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


class AtomicShard:
    """Collects one output shard in a temporary folder; :meth:`commit` publishes it with its stats."""

    def __init__(self, out_path: Path):
        self.out_path = out_path
        remove_stale_temps(out_path)
        # A shard redone over an earlier one (other settings, unreadable stats) is unfinished from here on:
        # commit writes the new stats before the new tar, which must never meet the old tar.
        out_path.unlink(missing_ok=True)
        stats_path(out_path).unlink(missing_ok=True)
        self.tmp_dir = out_path.parent / f"{TMP_PREFIX}{out_path.name}-{os.getpid()}"
        self.tmp_dir.mkdir(parents=True)
        self.writer = ShardWriter(self.tmp_dir, "part", max_count=_UNLIMITED, max_bytes=_UNLIMITED)

    def commit(self, stats: dict) -> None:
        """Stats first, then the tar under its final name (an empty tar when nothing was written)."""
        self.writer.close()
        part = self.writer.paths[0] if self.writer.paths else self.tmp_dir / "part-000000.tar"
        if not self.writer.paths:
            tarfile.open(part, "w", format=tarfile.USTAR_FORMAT).close()
        write_json_atomic(stats_path(self.out_path), stats)
        os.replace(part, self.out_path)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
