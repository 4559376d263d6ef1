"""Bidirectional max-margin ranking loss over image-sentence scores (paper Eq. 9), with a VSE++ variant.

Written so that a rank holding only some rows (its images against all sentences) and some columns (all images
against its sentences) computes exactly its share of the global loss: the shares of all ranks sum to the
single-process loss on the whole batch (see :mod:`dsalign.train.distributed`).
"""

from __future__ import annotations

import torch

REDUCTIONS = ("sum", "mean")


def _ranking_terms(scores: torch.Tensor, offset: int, margin: float, hardest_negative: bool) -> torch.Tensor:
    """Sum over rows k of the hinge costs of row k, whose positive sits in column ``offset + k``.

    scores [b, N]: b queries (images or sentences) against all N candidates of the global batch.
    """
    rows = torch.arange(scores.shape[0], device=scores.device)
    positive = scores[rows, offset + rows]
    cost = (margin + scores - positive[:, None]).clamp(min=0)
    is_positive = torch.zeros_like(cost, dtype=torch.bool)
    is_positive[rows, offset + rows] = True
    cost = cost.masked_fill(is_positive, 0)
    if hardest_negative:
        return cost.max(dim=1).values.sum()
    return cost.sum()


def local_ranking_loss(image_rows: torch.Tensor, sentence_cols: torch.Tensor, image_offset: int,
                       sentence_offset: int, margin: float = 1.0, hardest_negative: bool = False) -> torch.Tensor:
    """One rank's share of Eq. 9 (summed, not averaged).

    image_rows [b_img, N]: the rank's images (global indices image_offset + k) against all N sentences;
    sentence_cols [N, b_sent]: all N images against the rank's sentences. Sentence l matches image l.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    image_to_text = _ranking_terms(image_rows, image_offset, margin, hardest_negative)
    text_to_image = _ranking_terms(sentence_cols.T, sentence_offset, margin, hardest_negative)
    return image_to_text + text_to_image


def ranking_loss(scores: torch.Tensor, margin: float = 1.0, hardest_negative: bool = False,
                 reduction: str = "sum") -> torch.Tensor:
    """Eq. 9 on a square score matrix S [N, N] whose diagonal holds the matching pairs.

    ``sum`` is the paper's C; ``mean`` divides by N so the scale does not grow with the batch size.
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"expected a square score matrix, got {tuple(scores.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    loss = local_ranking_loss(scores, scores, 0, 0, margin, hardest_negative)
    return loss / scores.shape[0] if reduction == "mean" else loss
