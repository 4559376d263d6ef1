"""Differentiable and combinatorial ops with selectable backends (torch reference, Triton, C++/CUDA)."""

from dsalign.ops.score import (
    WordRegionAlignment,
    resolve_backend,
    score,
    score_matrix,
    word_region_similarity,
)
from dsalign.ops.viterbi import snippets, viterbi

__all__ = [
    "WordRegionAlignment",
    "resolve_backend",
    "score",
    "score_matrix",
    "snippets",
    "viterbi",
    "word_region_similarity",
]
