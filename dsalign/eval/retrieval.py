"""Image-sentence retrieval metrics (paper Table 1): R@1/5/10 and median rank in both directions.

Conventions (those of VSE++ ``i2t``/``t2i``, computed without sorting):
- ``sims[i, j]`` is the score of image ``i`` with sentence ``j``; higher is better.
- Image annotation (``i2t``): the rank of an image is the rank of the best-ranked of its true sentences.
  Image search (``t2i``): the rank of a sentence is the rank of its one true image.
- A 0-based rank is the number of wrong items ranked above the true one; R@K is the percentage of queries with
  rank < K; the median rank is 1-based: ``floor(median(0-based ranks)) + 1`` (``numpy.median``, so an even
  count averages the two middle values first).
- Ties: with ``ties="pessimistic"`` (default) every wrong item that scores exactly as high as the true one is
  ranked above it; with ``"optimistic"`` none is. For untied scores both equal the sort-based VSE++ ranks, which
  leave ties to the sort order. Pessimistic is the default so that a collapsed model (every score equal) gets
  the worst ranks, not R@1 = 100.
- Non-finite scores raise ``ValueError``: a NaN compares false with everything and would rank as a perfect hit.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Ties = Literal["pessimistic", "optimistic"]
KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "rsum")
_RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
_BLOCK_ELEMS = 1 << 24  # rows are compared in blocks of about this many scores: bounded temporaries at COCO 5K


def recall_at_k(
    sims: torch.Tensor | np.ndarray,
    captions_per_image: int = 5,
    *,
    sentence_to_image: torch.Tensor | np.ndarray | None = None,
    ties: Ties = "pessimistic",
) -> dict[str, float]:
    """Retrieval metrics of a [n_images, n_sentences] score matrix; recalls in percent, ``rsum`` their sum.

    Sentence ``j`` belongs to image ``j // captions_per_image``, unless ``sentence_to_image`` (one image index per
    sentence, any number of sentences per image but at least one) is given; then ``captions_per_image`` is
    ignored. Torch tensors are copied to the CPU (numpy counts booleans several times faster than torch there).
    """
    scores = _as_scores(sims)
    owner = _sentence_owner(scores.shape, captions_per_image, sentence_to_image)
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")
    n_images, n_sentences = scores.shape
    # Compare in float32 or float64: float16 comparisons are slow in numpy, integers are exact in float64.
    work = np.float32 if scores.dtype in (np.float16, np.float32) else np.float64
    true = scores[owner, np.arange(n_sentences)].astype(work)  # score of each sentence with its own image
    best = np.full(n_images, -np.inf, dtype=work)
    np.fmax.at(best, owner, true)  # each image's best true sentence (fmax: NaNs are reported below, not warned)
    # Pessimistic i2t counts scores >= best, minus the image's true sentences tied at best (they are not wrong).
    true_at_best = np.bincount(owner, weights=true == best[owner], minlength=n_images).astype(np.int64)

    i2t = np.empty(n_images, dtype=np.int64)
    t2i = np.zeros(n_sentences, dtype=np.int64)
    above = np.greater if ties == "optimistic" else np.greater_equal
    step = max(1, _BLOCK_ELEMS // n_sentences)
    for r0 in range(0, n_images, step):
        block = scores[r0 : r0 + step].astype(work, copy=False)
        if not np.isfinite(block).all():
            raise ValueError("sims holds NaN or infinite scores")
        i2t[r0 : r0 + step] = np.count_nonzero(above(block, best[r0 : r0 + step, None]), axis=1)
        t2i += np.count_nonzero(above(block, true), axis=0)
    if ties == "pessimistic":
        i2t -= true_at_best
        t2i -= 1  # the sentence's own image was counted (its score equals itself)

    out = {**_summary("i2t", i2t), **_summary("t2i", t2i)}
    out["rsum"] = sum(out[k] for k in _RECALL_KEYS)
    return out


def coco_1k(
    sims: torch.Tensor | np.ndarray, captions_per_image: int = 5, *, fold_size: int = 1000, ties: Ties = "pessimistic"
) -> dict[str, float]:
    """COCO "1K test": the mean of every metric (median ranks too) over consecutive folds of ``fold_size`` images.

    On the 5,000-image Karpathy test split these are the usual 5 folds of 1,000 images / 5,000 sentences; the
    images must be ordered with their sentences (sentence ``j`` of image ``j // captions_per_image``).
    """
    scores = _as_scores(sims)
    n_images = scores.shape[0]
    if fold_size < 1 or n_images % fold_size:
        raise ValueError(f"{n_images} images do not split into folds of {fold_size}")
    _sentence_owner(scores.shape, captions_per_image, None)  # whole-matrix shape check before slicing
    folds = []
    for f in range(n_images // fold_size):
        rows = slice(f * fold_size, (f + 1) * fold_size)
        cols = slice(f * fold_size * captions_per_image, (f + 1) * fold_size * captions_per_image)
        folds.append(recall_at_k(scores[rows, cols], captions_per_image, ties=ties))
    return {k: float(np.mean([m[k] for m in folds])) for k in KEYS}


def coco_5k(
    sims: torch.Tensor | np.ndarray, captions_per_image: int = 5, *, ties: Ties = "pessimistic"
) -> dict[str, float]:
    """COCO "5K test": :func:`recall_at_k` on the whole 5,000-image test split (refuses any other size)."""
    scores = _as_scores(sims)
    if scores.shape[0] != 5000:
        raise ValueError(f"COCO 5K needs the 5,000 test images, got {scores.shape[0]}")
    return recall_at_k(scores, captions_per_image, ties=ties)


def _summary(prefix: str, ranks: np.ndarray) -> dict[str, float]:
    out = {f"{prefix}_r{k}": float(100.0 * np.mean(ranks < k)) for k in (1, 5, 10)}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)) + 1)
    return out


def _as_scores(sims: torch.Tensor | np.ndarray) -> np.ndarray:
    """A 2-D numpy view (no copy for numpy or CPU float32/float64 tensors); finiteness is checked per block later."""
    if isinstance(sims, torch.Tensor):
        sims = sims.detach().cpu()
        sims = (sims.float() if sims.dtype == torch.bfloat16 else sims).numpy()  # numpy has no bfloat16
    scores = np.asarray(sims)
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"sims must be a non-empty [n_images, n_sentences] matrix, got shape {scores.shape}")
    if scores.dtype.kind not in "fiu":
        raise ValueError(f"sims must hold real scores, got {scores.dtype}")
    return scores


def _sentence_owner(
    shape: tuple[int, int], captions_per_image: int, sentence_to_image: torch.Tensor | np.ndarray | None
) -> np.ndarray:
    """Image index of every sentence (validated: in range, every image owns at least one sentence)."""
    n_images, n_sentences = shape
    if sentence_to_image is None:
        if isinstance(captions_per_image, bool) or not isinstance(captions_per_image, int) or captions_per_image < 1:
            raise ValueError(f"captions_per_image must be a positive int, got {captions_per_image!r}")
        if n_sentences != n_images * captions_per_image:
            raise ValueError(
                f"sims has shape ({n_images}, {n_sentences}); {captions_per_image} captions per image needs "
                f"({n_images}, {n_images * captions_per_image})"
            )
        return np.arange(n_sentences) // captions_per_image
    if isinstance(sentence_to_image, torch.Tensor):
        sentence_to_image = sentence_to_image.detach().cpu().numpy()
    owner = np.asarray(sentence_to_image)
    if owner.ndim != 1 or owner.size != n_sentences:
        raise ValueError(f"sentence_to_image must be 1-D with {n_sentences} entries, got shape {owner.shape}")
    if owner.dtype.kind not in "iu":
        raise ValueError(f"sentence_to_image must hold integer image indices, got {owner.dtype}")
    owner = owner.astype(np.int64)
    if owner.min() < 0 or owner.max() >= n_images:
        raise ValueError(f"sentence_to_image holds indices outside [0, {n_images})")
    orphans = np.flatnonzero(np.bincount(owner, minlength=n_images) == 0)
    if orphans.size:
        raise ValueError(f"{orphans.size} images have no sentence (first: image {orphans[0]})")
    return owner
