"""All-gather with gradient and the local ranking loss, so N ranks compute the single-process loss of the
global batch (open_clip's ``--gather-with-grad --local-loss`` idea, for the MaxSim score of Eq. 8).

Each rank embeds its own images and sentences, gathers everyone's (with gradient), and scores its images
against all sentences plus all images against its sentences. The per-rank losses sum to the global loss; the
backward of the gather sums every rank's gradient for each rank's chunk, so rank r's parameter gradient is
the part of dL/dθ that flows through its own samples, and the sum over ranks is dL/dθ exactly.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn import functional as F

from dsalign.models.losses import local_ranking_loss
from dsalign.ops.score import score


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward sums the incoming gradients over ranks and
    returns this rank's slice (an all-reduce rather than a reduce-scatter, which gloo lacks)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' tensors concatenated along dim 0 (same shape on every rank), differentiable."""
    return _GatherWithGrad.apply(tensor)


_host_group: tuple[object, dist.ProcessGroup | None] | None = None  # (its world, the group; None = the world)


def init_host_group(timeout: timedelta | None = None) -> None:
    """Choose the group for exchanging host-side numbers (tensor lengths) without a device sync: a NCCL collective
    on a GPU tensor would have to be read back with ``int()``, which waits for all the GPU work queued before it.
    A gloo world serves itself; otherwise a gloo group over every rank is made (a collective: every rank calls
    this at the same point). The trainer calls it at start-up with ``distributed.timeout_s``; without that, the
    first :func:`longest_over_ranks` of a world does, with torch's default timeout."""
    global _host_group
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    _host_group = (dist.group.WORLD, group)


def longest_over_ranks(*lengths: int) -> list[int]:
    """Each of these host-side lengths, maxed over all ranks in one exchange."""
    if _host_group is None or _host_group[0] is not dist.group.WORLD:
        init_host_group()
    assert _host_group is not None
    longest = torch.tensor(lengths, dtype=torch.long)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=_host_group[1])
    return longest.tolist()


def gather_padded(features: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather features [b, L, D] and mask [b, L] from all ranks, padded to ``length`` >= every rank's L first
    (each rank's collate pads to its own batch's longest sentence / most regions)."""
    pad = length - features.shape[1]
    features = F.pad(features, (0, 0, 0, pad))
    mask = F.pad(mask.to(torch.uint8), (0, pad))
    masks = [torch.empty_like(mask) for _ in range(dist.get_world_size())]
    dist.all_gather(masks, mask.contiguous())
    return gather_with_grad(features), torch.cat(masks).bool()


def alignment_loss(regions: torch.Tensor, region_mask: torch.Tensor, words: torch.Tensor,
                   word_mask: torch.Tensor, margin: float = 1.0, hardest_negative: bool = False,
                   backend: str | None = None) -> torch.Tensor:
    """This rank's share of the Eq. 9 loss (summed) of the global batch; sentence l matches image l.

    With one process it is the whole loss. Every rank must hold the same number of pairs.
    """
    rank, world_size = world()
    if world_size == 1:
        scores = score(regions, region_mask, words, word_mask, backend)
        return local_ranking_loss(scores, scores, 0, 0, margin, hardest_negative)
    most_regions, most_words = longest_over_ranks(regions.shape[1], words.shape[1])
    all_regions, all_region_mask = gather_padded(regions, region_mask, most_regions)
    all_words, all_word_mask = gather_padded(words, word_mask, most_words)
    offset = rank * regions.shape[0]
    image_rows = score(regions, region_mask, all_words, all_word_mask, backend)
    sentence_cols = score(all_regions, all_region_mask, words, word_mask, backend)
    return local_ranking_loss(image_rows, sentence_cols, offset, offset, margin, hardest_negative)
