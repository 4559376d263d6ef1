"""Training checkpoints that a kill can never leave half-written, loaded without unpickling code.

Layout under ``<out_dir>/checkpoints``::

    step_000200/ model.pt  rank0.pt  rank1.pt ...  meta.json
    latest                  (text: the name of the newest complete checkpoint)

Protocol: every rank writes its file into ``.tmp-step_000200/`` (temporary name + rename inside it); after a
barrier rank 0 writes ``meta.json`` (sizes and SHA-256 of every file) last, renames the folder to its final
name, then rewrites ``latest`` (temporary name + rename) and deletes the oldest checkpoints beyond ``keep``.
A kill at any point leaves either the previous complete checkpoint as ``latest`` or the new one; leftover
``.tmp-*`` folders are ignored and cleared by the next save. Files are read with
``torch.load(weights_only=True)``: tensors, numbers, strings and containers only.

Model weights are identical on every rank for ZeRO stages 0-2 and are stored once; each rank's file holds
its optimizer state (partitioned for ZeRO 1/2, so resuming needs the same world size and stage).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from dsalign.hashing import file_sha256

CHECKPOINT_FORMAT = "dsalign-checkpoint/1"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
LATEST = "latest"
META = "meta.json"
MODEL_FILE = "model.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, altered or incompatible with this run."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:09d}"


def _write_atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _torch_save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


def save_checkpoint(root: str | Path, step: int, rank: int, world_size: int, rank_state: dict,
                    model_state: dict | None, meta: dict, keep: int, barrier: Callable[[], None]) -> Path:
    """Collective: every rank calls it with its own ``rank_state``; rank 0 also passes ``model_state``.

    Returns the final folder. ``barrier`` synchronises the ranks (a no-op for one process).
    """
    root = Path(root)
    name = checkpoint_name(step)
    tmp = root / f"{TMP_PREFIX}{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    _torch_save_atomic(rank_state, tmp / rank_file(rank))
    if rank == 0:
        assert model_state is not None
        _torch_save_atomic(model_state, tmp / MODEL_FILE)
    barrier()
    final = root / name
    if rank == 0:
        files = [MODEL_FILE] + [rank_file(r) for r in range(world_size)]
        listing = {f: {"bytes": (tmp / f).stat().st_size, "sha256": file_sha256(tmp / f)} for f in files}
        record = {"format": CHECKPOINT_FORMAT, "step": step, "world_size": world_size, "files": listing, **meta}
        _write_atomic_bytes(tmp / META, json.dumps(record, indent=2, sort_keys=True).encode())
        if final.exists():  # a checkpoint of the same step from a run that was later resumed earlier
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic_bytes(root / LATEST, name.encode())
        _rotate(root, keep)
    barrier()
    return final


def _complete(root: Path) -> list[Path]:
    return sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir() and (p / META).is_file())


def _rotate(root: Path, keep: int) -> None:
    for old in _complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_latest(root: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete one; None when there is none."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / META).is_file():
            return candidate
    complete = _complete(root)
    return complete[-1] if complete else None


def read_meta(path: str | Path, verify: bool = True) -> dict:
    """meta.json of a checkpoint folder, after checking every listed file's size (and hash with verify)."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable {META}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a {CHECKPOINT_FORMAT} checkpoint")
    for name, info in meta.get("files", {}).items():
        file = path / name
        if not file.is_file() or file.stat().st_size != info["bytes"]:
            raise CheckpointError(f"checkpoint {path}: {name} is missing or has the wrong size")
        if verify and file_sha256(file) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its recorded SHA-256")
    return meta


def load_file(path: str | Path, name: str) -> dict:
    """One checkpoint file, loaded with ``weights_only=True`` (no code is ever unpickled)."""
    try:
        return torch.load(Path(path) / name, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError/RuntimeError for altered files
        raise CheckpointError(f"checkpoint {path}: cannot load {name}: {exc}") from exc


# The config keys that decide the shapes of the weights: the model's sizes and (through its vocabulary) the
# feature folder.
WEIGHT_KEYS = ("model.", "data.features")
_UNSET = object()


def state_mismatches(expected: dict, found: dict) -> list[str]:
    """Why ``found`` (a checkpoint's weights) cannot load into a model whose ``state_dict()`` is ``expected``:
    missing, extra and reshaped tensors, one line each, in the model's order."""
    problems = []
    for key, tensor in expected.items():
        if key not in found:
            problems.append(f"{key} is missing from the checkpoint")
        elif found[key].shape != tensor.shape:
            problems.append(f"{key} is {list(found[key].shape)} in the checkpoint, {list(tensor.shape)} now")
    return problems + [f"{key} is not in this model" for key in found if key not in expected]


def config_changes(saved: dict, current: dict, prefixes: tuple[str, ...] = WEIGHT_KEYS) -> list[str]:
    """``key=old in the checkpoint, new now`` for each dotted config key under ``prefixes`` whose value differs
    between the checkpoint's run (``saved``) and this one."""
    old, new = _flatten(saved), _flatten(current)
    keys = sorted(k for k in old.keys() | new.keys()
                  if k.startswith(prefixes) and old.get(k, _UNSET) != new.get(k, _UNSET))
    return [f"{k}={_shown(old, k)} in the checkpoint, {_shown(new, k)} now" for k in keys]


def _flatten(config: dict, prefix: str = "") -> dict:
    """``{"model": {"embed_dim": 32}}`` as ``{"model.embed_dim": 32}``."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(flat: dict, key: str) -> str:
    return json.dumps(flat[key]) if key in flat else "unset"
