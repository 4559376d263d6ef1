"""Image-sentence score S_kl = sum_{t in g_l} max_{i in g_k} v_i . s_t (paper Eq. 8) with selectable backends.

Conventions shared by every backend:
- regions [B_img, R, D] with region_mask [B_img, R] and words [B_sent, T, D] with word_mask [B_sent, T]
  (bool, True = real; ``None`` = all real). Padded regions are -inf before the max over regions; padded words
  contribute 0 after it.
- A pair whose image has no real region, or whose sentence has no real word, scores exactly 0 and passes no
  gradient (a max over an empty set has no value; 0 keeps the ranking loss finite).
- S is float32 for fp32/fp16/bf16 inputs (float64 for float64 inputs, torch backends only): the ranking loss
  compares scores at margin 1, which bf16 cannot resolve at typical |S|. Gradients come back in the input
  dtype.
- Ties between regions send the whole gradient to one of them (the first, for the Triton kernel).
- Non-finite features: ``triton`` scores NaN for every pair with a non-finite real region or word (its max
  would otherwise skip a NaN), so features that stopped being finite never leave the loss finite; the torch
  backends give whatever the arithmetic gives (NaN or +-inf, or a finite score when the bad value loses every
  max).

Backends:
- ``torch``: reference; materialises the [B_img, R, B_sent, T] similarity tensor. For tests and small inputs.
- ``torch_chunked``: same maths in blocks of images x sentences whose similarity tensor holds at most
  ``chunk_elems`` elements; backward recomputes each block, so peak memory is bounded. The CPU default.
- ``triton``: the fused kernel of ``dsalign.kernels`` (CUDA; CPU only under ``TRITON_INTERPRET=1``).

Selection: the ``backend`` argument, else the environment variable ``DSALIGN_SCORE_BACKEND``, else by device
(CUDA -> ``triton`` when triton imports and the dtype is fp16/bf16, otherwise ``torch_chunked``; ``triton``
takes fp32 too when asked for).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch

from dsalign.ops.maxsim_grad import scatter_onehot
from dsalign.validation import range_error

BACKENDS = ("torch", "torch_chunked", "triton")
ENV_VAR = "DSALIGN_SCORE_BACKEND"
DEFAULT_CHUNK_ELEMS = 1 << 22
# Picked by default for 16-bit inputs only: with exact fp32 (no TF32) the kernel's dots run on the FMA units and
# measured 3x slower than torch_chunked's cuBLAS blocks on an H200 (docs/benchmarks.md).
_TRITON_AUTO_DTYPES = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 arithmetic for fp32 and 16-bit inputs; float64 stays float64 (test references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(regions: torch.Tensor, region_mask: torch.Tensor | None, words: torch.Tensor,
             word_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes/devices, default the masks to all-real and bring both features to one float dtype."""
    for name, value in (("regions", regions), ("words", words)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if regions.dim() != 3 or words.dim() != 3 or regions.shape[2] != words.shape[2]:
        raise ValueError(f"expected regions [B_img, R, D] and words [B_sent, T, D] with the same D; got "
                         f"{tuple(regions.shape)} and {tuple(words.shape)}")
    if regions.device != words.device:
        raise ValueError(f"regions on {regions.device} but words on {words.device}")
    if not (regions.is_floating_point() and words.is_floating_point()):
        raise TypeError("regions and words must be floating point")
    region_mask = torch.ones(regions.shape[:2], dtype=torch.bool, device=regions.device) if region_mask is None \
        else torch.as_tensor(region_mask)
    word_mask = torch.ones(words.shape[:2], dtype=torch.bool, device=words.device) if word_mask is None \
        else torch.as_tensor(word_mask)
    if tuple(region_mask.shape) != tuple(regions.shape[:2]):
        raise ValueError(f"region_mask must be {tuple(regions.shape[:2])}, got {tuple(region_mask.shape)}")
    if tuple(word_mask.shape) != tuple(words.shape[:2]):
        raise ValueError(f"word_mask must be {tuple(words.shape[:2])}, got {tuple(word_mask.shape)}")
    dtype = torch.promote_types(regions.dtype, words.dtype)
    return (regions.to(dtype), region_mask.to(device=regions.device, dtype=torch.bool),
            words.to(dtype), word_mask.to(device=regions.device, dtype=torch.bool))


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import dsalign.kernels  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Pick the backend: explicit argument > $DSALIGN_SCORE_BACKEND > device type."""
    name = backend or os.environ.get(ENV_VAR) or None
    if name is None:
        # the kernel's tiles are tuned for sm_80+ (bf16 MMA, cp.async); older GPUs take the cuBLAS path
        if (device.type == "cuda" and dtype in _TRITON_AUTO_DTYPES and _triton_importable()
                and torch.cuda.get_device_capability(device) >= (8, 0)):
            return "triton"
        return "torch_chunked"
    if name not in BACKENDS:
        source = "backend argument" if backend else f"${ENV_VAR}"
        raise ValueError(f"unknown score backend {name!r} (from the {source}); choose one of {BACKENDS}")
    return name


def _block_sim(regions: torch.Tensor, region_mask: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Similarities [b_img, R, b_sent, T] with unreal regions at -inf.

    One GEMM of (image, region) rows by (sentence, word) columns, as in the Triton kernel; in this layout the
    one-hot backward below is two plain GEMMs on views, with no permuted copies.
    """
    n_img, n_reg, dim = regions.shape
    n_sent, n_wrd, _ = words.shape
    sim = (regions.reshape(-1, dim) @ words.reshape(-1, dim).T).view(n_img, n_reg, n_sent, n_wrd)
    return sim.masked_fill_(~region_mask[:, :, None, None], float("-inf"))


def _keep(region_mask: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
    """[b_img, b_sent, T]: which (image, sentence, word) terms enter the sum."""
    return region_mask.any(1)[:, None, None] & word_mask[None, :, :]


def _score_torch(regions: torch.Tensor, region_mask: torch.Tensor, words: torch.Tensor,
                 word_mask: torch.Tensor) -> torch.Tensor:
    cdt = _compute_dtype(regions.dtype)
    best = _block_sim(regions.to(cdt), region_mask, words.to(cdt)).max(dim=1).values
    zero = torch.zeros((), dtype=cdt, device=best.device)
    return torch.where(_keep(region_mask, word_mask), best, zero).sum(-1)


def _chunk_sizes(n_img: int, n_sent: int, n_reg: int, n_wrd: int, chunk_elems: int) -> tuple[int, int]:
    """Images and sentences per block so a block's similarity tensor holds <= chunk_elems elements.

    Blocks are as square as the batch allows: the block GEMM is (b_img*R) x D x (b_sent*T), and a thin one
    (few sentences against all images) runs markedly slower on CPU for the same budget.
    """
    pairs = max(1, chunk_elems // max(n_reg * n_wrd, 1))
    b_img = min(max(n_img, 1), max(1, math.isqrt(pairs)))
    b_sent = min(max(n_sent, 1), max(1, pairs // b_img))
    b_img = min(max(n_img, 1), max(1, pairs // b_sent))
    return b_img, b_sent


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


class _ChunkedScore(torch.autograd.Function):
    """Blocked MaxSim whose backward recomputes each block's argmax instead of saving anything 4-D."""

    @staticmethod
    def forward(ctx, regions: torch.Tensor, region_mask: torch.Tensor, words: torch.Tensor,
                word_mask: torch.Tensor, chunk_elems: int) -> torch.Tensor:
        cdt = _compute_dtype(regions.dtype)
        n_img, n_reg, _ = regions.shape
        n_sent, n_wrd, _ = words.shape
        b_img, b_sent = _chunk_sizes(n_img, n_sent, n_reg, n_wrd, chunk_elems)
        scores = torch.zeros(n_img, n_sent, dtype=cdt, device=regions.device)
        for ks in _blocks(n_img, b_img):
            for ls in _blocks(n_sent, b_sent):
                best = _block_sim(regions[ks].to(cdt), region_mask[ks], words[ls].to(cdt)).amax(dim=1)
                scores[ks, ls] = best.masked_fill(~_keep(region_mask[ks], word_mask[ls]), 0).sum(-1)
        ctx.save_for_backward(regions, region_mask, words, word_mask)
        ctx.chunk_elems = chunk_elems
        return scores

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_scores: torch.Tensor):
        regions, region_mask, words, word_mask = ctx.saved_tensors
        cdt = _compute_dtype(regions.dtype)
        n_img, n_reg, _ = regions.shape
        n_sent, n_wrd, _ = words.shape
        b_img, b_sent = _chunk_sizes(n_img, n_sent, n_reg, n_wrd, ctx.chunk_elems)
        grad_v = torch.zeros(regions.shape, dtype=cdt, device=regions.device)
        grad_w = torch.zeros(words.shape, dtype=cdt, device=words.device)
        grad_scores = grad_scores.to(cdt)
        for ks in _blocks(n_img, b_img):
            v = regions[ks].to(cdt)
            for ls in _blocks(n_sent, b_sent):
                w = words[ls].to(cdt)
                sim = _block_sim(v, region_mask[ks], w)
                idx = sim.max(dim=1, keepdim=True).indices  # max().indices: ~5x faster than argmax on CPU
                coef = torch.where(_keep(region_mask[ks], word_mask[ls]), grad_scores[ks, ls, None], 0)
                # One-hot of the argmax region scaled by dL/dS: both gradients become plain GEMMs.
                onehot = scatter_onehot(sim, idx, coef[:, None])
                grad_v[ks] += (onehot @ w.reshape(-1, w.shape[-1])).view_as(v)
                grad_w[ls] += (onehot.T @ v.reshape(-1, v.shape[-1])).view_as(w)
        return grad_v.to(regions.dtype), None, grad_w.to(words.dtype), None, None


def _score_triton(regions: torch.Tensor, region_mask: torch.Tensor, words: torch.Tensor,
                  word_mask: torch.Tensor) -> torch.Tensor:
    try:
        from dsalign.kernels import interpreted, maxsim_score
    except ImportError as err:
        raise ImportError(f"score backend 'triton' needs the triton package ({err}); install a CUDA build of "
                          "torch with triton, or use backend='torch_chunked'") from err
    if regions.device.type != "cuda" and not interpreted():
        raise RuntimeError(f"score backend 'triton' needs CUDA tensors (got {regions.device}); set "
                           "TRITON_INTERPRET=1 before triton is imported to run it on CPU (tests only, "
                           "slow), or use backend='torch_chunked'")
    return maxsim_score(regions, region_mask, words, word_mask)  # which checks shapes and dtypes


def score(regions: torch.Tensor, region_mask: torch.Tensor | None, words: torch.Tensor,
          word_mask: torch.Tensor | None, backend: str | None = None, *,
          chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> torch.Tensor:
    """Differentiable image-sentence scores S [B_img, B_sent] (see the module docstring for conventions).

    chunk_elems bounds the per-block similarity tensor of the ``torch_chunked`` backend.
    """
    regions, region_mask, words, word_mask = _prepare(regions, region_mask, words, word_mask)
    name = resolve_backend(backend, regions.device, regions.dtype)
    if regions.shape[1] == 0 or words.shape[1] == 0 or regions.shape[2] == 0:
        # No region or no word slot at all, or D = 0 (every similarity is 0): every pair scores 0 and stays in the
        # autograd graph.
        cdt = _compute_dtype(regions.dtype)
        zeros = torch.zeros(regions.shape[0], words.shape[0], dtype=cdt, device=regions.device)
        return zeros + 0 * (regions.to(cdt).sum() + words.to(cdt).sum())
    if name == "torch":
        return _score_torch(regions, region_mask, words, word_mask)
    if name == "torch_chunked":
        return _ChunkedScore.apply(regions, region_mask, words, word_mask, chunk_elems)
    return _score_triton(regions, region_mask, words, word_mask)


@torch.no_grad()
def score_matrix(regions: torch.Tensor, region_mask: torch.Tensor | None, words: torch.Tensor,
                 word_mask: torch.Tensor | None, backend: str | None = None, *, block_images: int = 256,
                 block_sentences: int = 1024, device: torch.device | str | None = None) -> torch.Tensor:
    """S for a whole retrieval set (e.g. 1K images x 5K sentences) without autograd, block by block.

    Blocks bound the memory of every backend (``torch`` included); ``device`` streams CPU-held features
    through an accelerator block by block. The float32 result stays on the device of ``regions``.
    """
    for name, size in (("block_images", block_images), ("block_sentences", block_sentences)):
        if problem := range_error(size, int, 1):
            raise ValueError(f"score_matrix: {name}: {problem}, got {size!r}")
    regions, region_mask, words, word_mask = _prepare(regions, region_mask, words, word_mask)
    target = torch.device(device) if device is not None else regions.device
    out = torch.empty(regions.shape[0], words.shape[0], dtype=_compute_dtype(regions.dtype),
                      device=regions.device)
    for ls in _blocks(words.shape[0], block_sentences):
        w, wm = words[ls].to(target), word_mask[ls].to(target)
        for ks in _blocks(regions.shape[0], block_images):
            block = score(regions[ks].to(target), region_mask[ks].to(target), w, wm, backend)
            out[ks, ls] = block.to(out.device)
    return out


class WordRegionAlignment(NamedTuple):
    """Per (image, sentence) pair: similarity [P, T, R] (-inf where the region or the word is padded) and the
    best region per word [P, T] (long; -1 for padded words and for images without a real region)."""

    similarity: torch.Tensor
    best_region: torch.Tensor


def word_region_similarity(regions: torch.Tensor, region_mask: torch.Tensor | None, words: torch.Tensor,
                           word_mask: torch.Tensor | None,
                           pairs: torch.Tensor | Sequence[tuple[int, int]]) -> WordRegionAlignment:
    """Word-region similarities and per-word argmax for chosen (image, sentence) pairs.

    The unaries of the snippet MRF (paper Eq. 10) and the word-to-box pictures come from here; it is
    differentiable and only ever materialises [P, T, R].
    """
    regions, region_mask, words, word_mask = _prepare(regions, region_mask, words, word_mask)
    idx = torch.as_tensor(pairs, dtype=torch.long, device=regions.device).reshape(-1, 2)
    counts = torch.tensor([regions.shape[0], words.shape[0]], device=idx.device)
    outside = (idx < 0) | (idx >= counts)
    if outside.any():  # one host sync; negative indices would silently wrap
        row, column = map(int, torch.nonzero(outside)[0])
        raise ValueError(f"pairs: {('image', 'sentence')[column]} index {int(idx[row, column])} is outside "
                         f"[0, {int(counts[column])})")
    cdt = _compute_dtype(regions.dtype)
    vm, wm = region_mask[idx[:, 0]], word_mask[idx[:, 1]]
    sim = torch.bmm(words[idx[:, 1]].to(cdt), regions[idx[:, 0]].to(cdt).transpose(1, 2))
    valid = wm[:, :, None] & vm[:, None, :]
    sim = sim.masked_fill(~valid, float("-inf"))
    best = sim.argmax(dim=-1).masked_fill(~valid.any(-1), -1)
    return WordRegionAlignment(sim, best)
