"""MaxSim gradients as dense GEMMs over a one-hot operand, built a block at a time within a workspace budget.

With the argmax region per (image k, sentence l, word t), the gradient of S_kl = sum_t max_i v_{k,i} . s_{l,t}
is ``dV = P @ W`` and ``dW = P^T @ V`` over the [B_img * R, D] and [B_sent * T, D] row views, where
``P[(k, i), (l, t)] = dL/dS[k, l]`` if word t of sentence l took region i of image k and 0 otherwise. Whole, P
is the [B_img, R, B_sent, T] tensor the score backends avoid; here it exists one block of images (for dV) or of
sentences (for dW) at a time, each block sized to a byte budget, so memory stays O(B^2 + inputs + budget) (one
block is all of P when it fits: 0.84 GB in bf16 at B = 1024, R = T = 20). Each block's product is one BLAS call
(cuBLAS on a GPU): the tensor cores spend R times the needed products on zeros but run at dense-GEMM throughput,
and writing P costs one pass over the block's memory. Every entry of P is written by exactly one (image,
sentence, word), so P never depends on the order of writes, and the gradients are as reproducible as the BLAS.
"""

from __future__ import annotations

import torch


def scatter_onehot(out: torch.Tensor, best: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Zero ``out`` [b_img, R, b_sent, T], put ``coef`` at each (image, best region, sentence, word), and
    return it as the [b_img * R, b_sent * T] matrix P. ``best`` (int64) and ``coef`` are [b_img, 1, b_sent, T]."""
    b_img, n_reg, b_sent, n_wrd = out.shape
    return out.zero_().scatter_(1, best, coef).view(b_img * n_reg, b_sent * n_wrd)


def _block_sizes(n_img: int, n_sent: int, n_reg: int, n_wrd: int, elem_bytes: int,
                 workspace_bytes: int) -> tuple[int, int]:
    """Images per dV block and sentences per dW block whose P (plus per-term temporaries: dL/dS in the
    operand dtype, the int64 region index and a bool mask) fits ``workspace_bytes``; at least one each."""
    term_bytes = (n_reg + 1) * elem_bytes + 9
    terms = workspace_bytes // term_bytes
    return (min(n_img, max(1, terms // max(n_sent * n_wrd, 1))),
            min(n_sent, max(1, terms // max(n_img * n_wrd, 1))))


def onehot_gemm_grads(regions: torch.Tensor, words: torch.Tensor, grad_scores: torch.Tensor,
                      argmax: torch.Tensor, workspace_bytes: int, need_regions: bool = True,
                      need_words: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dL/dregions and dL/dwords (input dtype) from dL/dS [B_img, B_sent] and the argmax region per (image,
    sentence, word) [B_img, B_sent, T] (-1 where the term does not enter S).

    The GEMMs run in the input dtype with P holding dL/dS rounded to it (fp32 accumulation in the BLAS; TF32
    for fp32 inputs exactly when torch's matmul allows it). When one block covers every image, P is built
    once and serves both gradients.
    """
    n_img, n_reg, dim = regions.shape
    n_sent, n_wrd, _ = words.shape
    dtype = regions.dtype
    trivial = not (n_img and n_sent and n_reg and n_wrd and dim)
    alloc = torch.zeros if trivial else torch.empty  # otherwise the GEMMs write every row
    grad_v = alloc(regions.shape, dtype=dtype, device=regions.device) if need_regions else None
    grad_w = alloc(words.shape, dtype=dtype, device=words.device) if need_words else None
    if trivial:
        return grad_v, grad_w
    img_block, snt_block = _block_sizes(n_img, n_sent, n_reg, n_wrd, regions.element_size(), workspace_bytes)
    coef_all = grad_scores.to(dtype)[:, :, None]
    buffer = torch.empty(max(img_block * n_sent, snt_block * n_img) * n_reg * n_wrd, dtype=dtype,
                         device=regions.device)

    def onehot(ks: slice, ls: slice) -> torch.Tensor:
        top = argmax[ks, ls]
        coef = torch.where(top >= 0, coef_all[ks, ls], 0).unsqueeze(1)
        out = buffer[:top.numel() * n_reg].view(top.shape[0], n_reg, top.shape[1], n_wrd)
        return scatter_onehot(out, top.clamp(min=0).long().unsqueeze(1), coef)

    v_rows, w_rows = regions.reshape(-1, dim), words.reshape(-1, dim)
    if need_regions:
        dv_rows = grad_v.view(-1, dim)
        for start in range(0, n_img, img_block):
            ks = slice(start, min(start + img_block, n_img))
            p = onehot(ks, slice(None))
            torch.mm(p, w_rows, out=dv_rows[ks.start * n_reg:ks.stop * n_reg])
            if img_block == n_img and need_words:  # P holds every image: dW from the same block
                torch.mm(p.T, v_rows, out=grad_w.view(-1, dim))
                return grad_v, grad_w
    if need_words:
        dw_rows = grad_w.view(-1, dim)
        for start in range(0, n_sent, snt_block):
            ls = slice(start, min(start + snt_block, n_sent))
            torch.mm(onehot(slice(None), ls).T, v_rows, out=dw_rows[ls.start * n_wrd:ls.stop * n_wrd])
    return grad_v, grad_w
