"""Loop-level reference for the image-sentence score and ragged random inputs, shared by the score tests.

The reference follows the definition literally (select the real regions and words, max, sum; 0 for an empty
image or sentence) so it shares no masking tricks with the backends under test.
"""

from __future__ import annotations

import torch


def naive_score(regions: torch.Tensor, region_mask: torch.Tensor, words: torch.Tensor,
                word_mask: torch.Tensor) -> torch.Tensor:
    rows = []
    for k in range(regions.shape[0]):
        row = []
        for j in range(words.shape[0]):
            v, w = regions[k][region_mask[k]], words[j][word_mask[j]]
            if len(v) == 0 or len(w) == 0:
                row.append(torch.zeros((), dtype=regions.dtype))
            else:
                row.append((w @ v.T).max(dim=1).values.sum())
        rows.append(torch.stack(row) if row else torch.zeros(0, dtype=regions.dtype))
    return torch.stack(rows) if rows else torch.zeros(0, words.shape[0], dtype=regions.dtype)


def reference(regions: torch.Tensor, region_mask: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
              grad_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S, dL/dregions, dL/dwords in float64 for L = sum(S * grad_scores), from the inputs as given (already
    rounded when they are bf16)."""
    v = regions.detach().double().requires_grad_()
    w = words.detach().double().requires_grad_()
    s = naive_score(v, region_mask, w, word_mask)
    grad_v, grad_w = torch.autograd.grad(s, (v, w), grad_scores.double(), allow_unused=True,
                                         materialize_grads=True)
    return s.detach(), grad_v, grad_w


def ragged_inputs(n_img: int, n_sent: int, n_reg: int, n_wrd: int, dim: int, seed: int = 0,
                  dtype: torch.dtype = torch.float64, empty_rows: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random features with random (not only prefix) masks; with empty_rows, image 1 has no real region and
    the last sentence no real word. Padded entries hold large finite garbage that a masking bug would show."""
    gen = torch.Generator().manual_seed(seed)
    regions = torch.randn(n_img, n_reg, dim, generator=gen, dtype=torch.float64)
    words = torch.randn(n_sent, n_wrd, dim, generator=gen, dtype=torch.float64)
    region_mask = torch.rand(n_img, n_reg, generator=gen) < 0.7
    word_mask = torch.rand(n_sent, n_wrd, generator=gen) < 0.7
    region_mask[:, 0] |= ~region_mask.any(1)
    word_mask[:, 0] |= ~word_mask.any(1)
    if empty_rows and n_img > 1:
        region_mask[1] = False
    if empty_rows and n_sent > 1:
        word_mask[-1] = False
    regions = regions.masked_fill(~region_mask[..., None], 50.0)
    words = words.masked_fill(~word_mask[..., None], -30.0)
    return regions.to(dtype), region_mask, words.to(dtype), word_mask
