"""Snippet alignment: batched Potts-chain Viterbi (paper Eqs. 10-12) and run extraction.

The solver is the compiled op ``torch.ops.dsalign.viterbi`` from ``dsalign._C`` (C++ on CPU, one warp per
sentence on CUDA). It is loaded on first use, so ``import dsalign.ops`` works without a build; calling
``viterbi`` without one raises an error that says how to build it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch

__all__ = ["extension_available", "snippets", "viterbi"]

_BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation .` "
    "(or `pip install --no-build-isolation -e .` for a development install) after installing torch"
)
_ext_error: BaseException | None = None
_ext_loaded = False


def _load_extension() -> bool:
    """Import ``dsalign._C`` once (it registers the ops); remember why it failed instead of raising."""
    global _ext_loaded, _ext_error
    if _ext_loaded:
        return True
    if _ext_error is not None:
        return False
    try:
        importlib.import_module("dsalign._C")
    except (ImportError, OSError) as err:  # not built, or built against another torch (undefined symbols)
        _ext_error = err
        return False
    _ext_loaded = True
    return True


def extension_available() -> bool:
    """True when the compiled op library ``dsalign._C`` can be loaded."""
    return _load_extension()


def _as_lengths(x: torch.Tensor | Sequence[int], name: str, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        lengths = torch.as_tensor(x, device=device)
    except (TypeError, ValueError, RuntimeError):
        lengths = None
    # 4.5 words would otherwise be truncated to 4 without a word; an empty list is float32 to torch
    if lengths is None or (lengths.numel() and (lengths.dtype == torch.bool or lengths.is_floating_point()
                                                or lengths.is_complex())):
        raise TypeError(f"viterbi: {name} must be an integer tensor or a sequence of ints, got {x!r}")
    return lengths.long()


def viterbi(
    unary: torch.Tensor,
    n_words: torch.Tensor | Sequence[int],
    n_regions: torch.Tensor | Sequence[int],
    beta: float,
) -> torch.Tensor:
    """Best region for every word under the Potts chain MRF, for a batch of (sentence, image) pairs.

    Maximises ``sum_j unary[b, j, a_j] + beta * #{j : a_j == a_{j+1}}`` over ``a_j in [0, n_regions[b])`` for
    the first ``n_words[b]`` words. ``beta`` trades word-level (0) against sentence-level (large) alignment;
    a negative ``beta`` penalises staying on a region. Exact ties go to the lowest region index, both for the
    last word and for every backpointer, so results equal an O(N·M²) reference bit for bit. NaN scores are not
    refused (that would cost a device sync per call; loaded bundles are checked for non-finite weights): they
    never win a comparison, and labels stay in ``[0, n_regions)`` whatever the values.

    Args:
        unary: ``[B, N, M]`` float32/float64 word-region scores (CPU or CUDA).
        n_words: ``[B]`` integer sentence lengths, ``0 <= n_words <= N``.
        n_regions: ``[B]`` integer region counts, ``1 <= n_regions <= M`` where ``n_words > 0``.
        beta: finite bonus for consecutive words on the same region.

    Returns:
        ``[B, N]`` int64 region labels, ``-1`` past ``n_words``.
    """
    if not _load_extension():
        raise RuntimeError(
            "dsalign.ops.viterbi needs the compiled extension dsalign._C, which could not be loaded "
            f"({type(_ext_error).__name__}: {_ext_error}); {_BUILD_HINT}."
        )
    if not isinstance(unary, torch.Tensor):
        raise TypeError(f"viterbi: unary must be a torch.Tensor [B, N, M], got {type(unary).__name__}")
    n_words = _as_lengths(n_words, "n_words", unary.device)
    n_regions = _as_lengths(n_regions, "n_regions", unary.device)
    return torch.ops.dsalign.viterbi(unary, n_words, n_regions, float(beta))


def snippets(
    labels: torch.Tensor, n_words: torch.Tensor | Sequence[int] | None = None
) -> list[list[tuple[int, int, int]]]:
    """Maximal runs of equal labels per sequence as ``(region, start, end)``, ``end`` exclusive.

    These runs are the paper's region-snippet pairs: the unit the region-level generator trains on.

    Args:
        labels: ``[B, N]`` integer labels as returned by :func:`viterbi`.
        n_words: ``[B]`` lengths; positions at or past them are ignored. ``None`` uses each row up to its
            first negative label.
    """
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.dim() != 2:
        raise ValueError(f"snippets: labels must be 2-D [B, N], got shape {tuple(labels.shape)}")
    rows = labels.tolist()
    if n_words is None:
        lengths = [next((i for i, a in enumerate(row) if a < 0), len(row)) for row in rows]
    else:
        lengths = [int(n) for n in (n_words.tolist() if isinstance(n_words, torch.Tensor) else n_words)]
        if len(lengths) != len(rows):
            raise ValueError(f"snippets: n_words has {len(lengths)} entries for {len(rows)} label rows")
    out: list[list[tuple[int, int, int]]] = []
    for row, n in zip(rows, lengths):
        if not 0 <= n <= len(row):
            raise ValueError(f"snippets: length {n} is outside [0, {len(row)}]")
        runs: list[tuple[int, int, int]] = []
        start = 0
        for j in range(1, n + 1):
            if j == n or row[j] != row[start]:
                runs.append((row[start], start, j))
                start = j
        out.append(runs)
    return out
