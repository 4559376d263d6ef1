"""Fused Triton MaxSim kernels: S[k, l] = sum_t max_i v_{k,i} . s_{l,t} with masks, forward and backward.

Layout of a forward tile: the regions of ``BLOCK_M // R`` images packed R rows apart form the rows of one GEMM
operand and the words of ``BLOCK_N // T`` sentences packed T columns apart form the columns (a tile grows to
the next power of two above R or T when one image or sentence does not fit). A single ``tl.dot`` chain over
D-chunks gives every region-word similarity of the tile in registers; the max over each image's regions is a
masked column max (with the argmax when it is stored), gathered into one [images, words] tensor, and the sums
over each sentence's words are then one masked reduction for the whole tile. Nothing is padded to a
power of two per image or sentence, so at R = T = 20 a 128 x 128 tile spends 88% of its products on real
pairs (39% with 32 x 32 padding per pair). The 4-D similarity tensor never exists in memory. The tile can also
be computed transposed (``WORDS_AS_ROWS``: words x regions), which turns the max over regions into a reduction
within a warp instead of one across warps; the autotuner times both.
On sm_90+ the operands can also arrive by TMA (``USE_TMA``): host-made descriptors of the [B_img * R, D] and
[B_sent * T, D] row views, one block per tile starting at its first image / sentence (rows that run into the
next ones are masked like padding), so the main loop holds no per-element addresses. And the tile can place
images R_P rows apart (``PAD_REGIONS``): MMA work on the padding rows, but the per-image max becomes one
reduction over the middle axis of [images, R_P, words] instead of one masked pass over the tile per image.

Masking: padded/unreal regions are -inf before the max; padded words and images without any real region
contribute 0 after it (so such pairs score 0 and get zero gradient).

Backward uses the argmax region per (image, sentence, word) -- saved by the forward in a compact integer
dtype (int8 when R <= 128) with -1 for "contributes nothing", or recomputed -- and forms the one-hot matrix
``P[(k,i), (l,t)] = G[k,l] * [argmax(k,l,t) == i]``, so that ``dV = P @ W`` and ``dW = P^T @ V`` are ordinary
GEMMs. By default P is written a block of images (sentences) at a time within a workspace budget
(``DSALIGN_MAXSIM_WORKSPACE_MB``, default 1024) and each block's GEMM runs in cuBLAS
(``dsalign.ops.maxsim_grad``). With the budget at 0 the fused backward kernels below run instead: they form P
tile by tile in registers and need no workspace. dL/dS is then laid out like the argmax ([B_img, B_sent, T] in
the input dtype, so both are read with vector loads along the words); one kernel owns an (image tile, D-chunk)
block of dV and loops over all sentences, the other a (sentence tile, D-chunk) block of dW and loops over all
images. Wide D-chunks amortise building P. With ``PAD_REGIONS`` the backward places images R_P rows apart
instead, so P is expanded in registers from the argmax and dL/dS of each (image, word), read once, at the cost
of MMA work on the padding rows; the autotuner times both layouts. Neither path uses atomics: the fused kernels
are bitwise deterministic run to run, and so is cuBLAS on one GPU model (its documented guarantee).

Accumulation is fp32 for fp32/fp16/bf16 inputs and S is returned in fp32; the gradients come back in the
input dtype (in the 16-bit backward the one-hot operand carries G rounded to that dtype). Under
``TRITON_INTERPRET=1`` (CPU tests) 16-bit operands are upcast to fp32 before ``tl.dot`` because the
interpreter has no bf16 dot.
"""

# No `from __future__ import annotations`: Triton reads the kernels' `tl.constexpr` annotations at runtime.
import contextlib
import os

import torch
import triton
import triton.language as tl

if not hasattr(triton, "constexpr_function"):  # an ImportError, so the score op's automatic choice skips triton
    raise ImportError(f"dsalign's Triton kernels need triton >= 3.5 (found {triton.__version__})")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402  (TMA descriptors built on the host)

from dsalign.ops.maxsim_grad import onehot_gemm_grads  # noqa: E402

AUTOTUNE_ENV = "DSALIGN_TRITON_AUTOTUNE"
EPILOGUE_LIMIT = 1 << 14  # values of the forward's gathered word sums per tile; beyond, per-image sums
WORKSPACE_ENV = "DSALIGN_MAXSIM_WORKSPACE_MB"
DEFAULT_WORKSPACE_MB = 1024


@triton.constexpr_function
def _tile_side(block: int, padded: int) -> int:
    """Tile height (width): BLOCK_M (BLOCK_N), grown to R_P (T_P) when one image (sentence) does not fit (both
    powers of two). One function for the kernels' ``M`` / ``N`` and the host's grids and TMA block shapes."""
    return max(block, padded)


@triton.constexpr_function
def _epilogue_elems(M: int, N: int, R_P: int, T_P: int, padded: bool) -> int:
    """Elements of the forward's one-reduction sum over words, [images, sentences, word columns] per tile: what
    must fit in registers for the tile's maxima to be gathered (images R_P rows apart when ``padded``, else
    packed R > R_P / 2 apart)."""
    return (M // R_P if padded else 2 * M // R_P) * (2 * N // T_P) * N


@triton.constexpr_function
def _gathers_maxima(M: int, N: int, R_P: int, T_P: int) -> bool:
    """Packed forward tiles gather their per-image maxima for one sum over words when that stays within 64
    fp32 values per thread of 8 warps (R = T = 20: 128 x 128 and 256 x 128 tiles, not 128 x 256)."""
    return _epilogue_elems(M, N, R_P, T_P, False) <= EPILOGUE_LIMIT


@triton.jit
def _region_rows(M: tl.constexpr, R, R_P: tl.constexpr, PAD_REGIONS: tl.constexpr):
    """Tile row -> (image within the tile, region index, images per tile, row holds a region): images R rows
    apart (packed), or R_P rows apart with ``PAD_REGIONS``."""
    rows = tl.arange(0, M)
    if PAD_REGIONS:
        local_img = rows // R_P
        reg = rows % R_P
        return local_img, reg, M // R_P, reg < R
    local_img = rows // R
    return local_img, rows - local_img * R, M // R, local_img < M // R


@triton.jit
def _maxsim_fwd_kernel(
    V, VM, VH, W, WM, S, A, V_DESC, W_DESC,
    n_img, n_sent, R, T, D,
    s_vb, s_vr, s_vd, s_wb, s_wt, s_wd, s_sb, s_ss,
    R_P: tl.constexpr, T_P: tl.constexpr,
    STORE_ARGMAX: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WORDS_AS_ROWS: tl.constexpr = False,
    USE_TMA: tl.constexpr = False, PAD_REGIONS: tl.constexpr = False, GROUP: tl.constexpr = 8,
):
    tl.static_assert(not (PAD_REGIONS and (WORDS_AS_ROWS or USE_TMA)), "PAD_REGIONS tiles: regions as rows, no TMA")
    M: tl.constexpr = _tile_side(BLOCK_M, R_P)
    N: tl.constexpr = _tile_side(BLOCK_N, T_P)
    SPT_P: tl.constexpr = 2 * N // T_P  # a power of two >= N // T
    local_img, reg, ipt, row_in = _region_rows(M, R, R_P, PAD_REGIONS)  # ipt: images per tile
    spt = N // T  # sentences per tile, T columns apart
    # 1-D grid walked in groups of GROUP image tiles x all sentence tiles, so programs running together share
    # their region and word tiles in L2 (the usual GEMM swizzle).
    pid = tl.program_id(0)
    n_tiles_s = tl.cdiv(n_sent, spt)
    in_group = GROUP * n_tiles_s
    first_i = (pid // in_group) * GROUP
    group_rows = tl.minimum(tl.cdiv(n_img, ipt) - first_i, GROUP)
    pid_i = first_i + (pid % in_group) % group_rows
    pid_s = (pid % in_group) // group_rows

    img = pid_i * ipt + local_img
    row_ok = row_in & (img < n_img)
    cols = tl.arange(0, N)
    local_snt = cols // T
    snt = pid_s * spt + local_snt
    wrd = cols - local_snt * T
    col_ok = (local_snt < spt) & (snt < n_sent)

    v_ptr = V + img.to(tl.int64)[:, None] * s_vb + reg[:, None] * s_vr  # [M, 1]
    w_ptr = W + snt.to(tl.int64)[:, None] * s_wb + wrd[:, None] * s_wt  # [N, 1]
    # WORDS_AS_ROWS computes the transposed tile (words x regions): the max over an image's regions is then a
    # reduction along a row, within a warp, instead of one across the warps that hold the tile's rows. The
    # autotuner measures both orientations.
    acc = tl.zeros((N, M), dtype=tl.float32) if WORDS_AS_ROWS else tl.zeros((M, N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        if USE_TMA:  # tensor-memory-accelerator copies of [rows, D] views: no per-element addresses in registers
            # The blocks start at the tile's first image / sentence and may run into the next ones; those rows
            # are masked below like padding (the hardware fills rows and columns past the end with zeros).
            v_blk = V_DESC.load([pid_i * ipt * R, d0])
            w_blk = W_DESC.load([pid_s * spt * T, d0])
            a = w_blk if WORDS_AS_ROWS else v_blk
            b = tl.trans(v_blk if WORDS_AS_ROWS else w_blk)
        elif WORDS_AS_ROWS:  # words [N, BLOCK_D] @ regions^T [BLOCK_D, M]
            a = tl.load(w_ptr + dd[None, :] * s_wd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            b = tl.load(tl.trans(v_ptr) + dd[:, None] * s_vd, mask=d_ok[:, None] & row_ok[None, :], other=0.0)
        else:  # regions [M, BLOCK_D] @ words^T [BLOCK_D, N]
            a = tl.load(v_ptr + dd[None, :] * s_vd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            b = tl.load(tl.trans(w_ptr) + dd[:, None] * s_wd, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    real_r = tl.load(VM + img.to(tl.int64) * R + reg, mask=row_ok, other=0) != 0
    real_w = tl.load(WM + snt.to(tl.int64) * T + wrd, mask=col_ok, other=0) != 0
    s_local = tl.arange(0, SPT_P)
    ts = pid_s * spt + s_local
    s_ok = (s_local < spt) & (ts < n_sent)
    acc = tl.where(real_r[None, :] if WORDS_AS_ROWS else real_r[:, None], acc, float("-inf"))
    # best[i, n]: the best real region of the tile's image i for word column n; an image without a real region
    # (has_region False) contributes 0 whatever best holds. The argmax is tracked only when it is stored: a max
    # with indices does twice the work of a plain one.
    member = (local_snt[None, :] == s_local[:, None]) & real_w[None, :]  # [SPT_P, N]: word column in sentence
    if PAD_REGIONS:  # images R_P rows apart: one max over the middle axis serves every image of the tile
        IPT: tl.constexpr = M // R_P
        tiled = tl.reshape(acc, (IPT, R_P, N))
        if STORE_ARGMAX:
            best, arg = tl.max(tiled, axis=1, return_indices=True)  # [IPT, N]
        else:
            best = tl.max(tiled, axis=1)
        i_local = tl.arange(0, IPT)
        if STORE_ARGMAX:
            k = pid_i * IPT + i_local
            has_img = tl.load(VH + k, mask=k < n_img, other=0) != 0
            tl.store(A + (k.to(tl.int64)[:, None] * n_sent + snt[None, :]) * T + wrd[None, :],
                     tl.where(real_w[None, :] & has_img[:, None], arg, -1).to(A.dtype.element_ty),
                     mask=(k < n_img)[:, None] & col_ok[None, :])
    else:
        # Images packed R apart (no padding to a power of two): a masked max per image of the tile, gathered into
        # one [images, words] tensor so that the sum over each sentence's words is one reduction for the tile --
        # unless tiny R and T put so many images x sentences in a tile that the gathered sums would not fit in
        # registers; each image's sums are then taken in turn.
        IPT: tl.constexpr = 2 * M // R_P  # a power of two >= M // R, as R > R_P / 2
        GATHER: tl.constexpr = _gathers_maxima(M, N, R_P, T_P)
        i_local = tl.arange(0, IPT)
        best = tl.full((IPT, N), float("-inf"), tl.float32)
        for j in range(0, tl.minimum(ipt, n_img - pid_i * ipt)):
            mine = local_img == j
            masked = tl.where(mine[None, :], acc, float("-inf")) if WORDS_AS_ROWS else tl.where(
                mine[:, None], acc, float("-inf"))
            k = (pid_i * ipt + j).to(tl.int64)
            if STORE_ARGMAX or not GATHER:
                has_j = tl.load(VH + k) != 0
            if STORE_ARGMAX:
                best_j, arg = tl.max(masked, axis=1 if WORDS_AS_ROWS else 0, return_indices=True)
                tl.store(A + (k * n_sent + snt) * T + wrd,
                         tl.where(real_w & has_j, arg - j * R, -1).to(A.dtype.element_ty), mask=col_ok)
            else:
                best_j = tl.max(masked, axis=1 if WORDS_AS_ROWS else 0)
            if GATHER:
                best = tl.where(i_local[:, None] == j, best_j[None, :], best)
            else:
                score = tl.sum(tl.where(member & has_j, best_j[None, :], 0.0), axis=1)
                tl.store(S + k * s_sb + ts * s_ss, score.to(S.dtype.element_ty), mask=s_ok)
    if PAD_REGIONS or GATHER:  # S[image, sentence]: one sum over the words of the tile
        k = pid_i * ipt + i_local
        k_ok = (i_local < ipt) & (k < n_img)
        # read per image, not reduced from the tile's region mask (which triton 3.6 lays out replicated over
        # the lanes of the sum below: twice the epilogue's instructions, and spills)
        has_region = tl.load(VH + k, mask=k_ok, other=0) != 0
        score = tl.sum(tl.where(member[None, :, :] & has_region[:, None, None], best[:, None, :], 0.0), axis=2)
        tl.store(S + k.to(tl.int64)[:, None] * s_sb + ts[None, :] * s_ss, score.to(S.dtype.element_ty),
                 mask=k_ok[:, None] & s_ok[None, :])


@triton.jit
def _maxsim_bwd_dv_kernel(
    W, C, A, DV,
    n_img, n_sent, R, T, D,
    s_wb, s_wt, s_wd, s_db, s_dr, s_dd,
    R_P: tl.constexpr, T_P: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PAD_REGIONS: tl.constexpr = False,
):
    M: tl.constexpr = _tile_side(BLOCK_M, R_P)
    N: tl.constexpr = _tile_side(BLOCK_N, T_P)
    spt = N // T  # sentences per tile, T columns apart
    pid_i = tl.program_id(0)
    pid_d = tl.program_id(1)
    local_img, reg, ipt, row_in = _region_rows(M, R, R_P, PAD_REGIONS)
    img = pid_i * ipt + local_img
    row_ok = row_in & (img < n_img)
    if PAD_REGIONS:  # the argmax and dL/dS are read once per (image, word) and expanded in registers
        tile_img = pid_i * ipt + tl.arange(0, M // R_P)
        tile_ok = tile_img < n_img
        a_row = tile_img.to(tl.int64) * n_sent * T
    else:  # one argmax and dL/dS read per (region, word), from cache
        a_row = img.to(tl.int64) * n_sent * T
    cols = tl.arange(0, N)
    local_snt = cols // T
    wrd = cols - local_snt * T
    col_in = local_snt < spt
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    acc = tl.zeros((M, BLOCK_D), dtype=tl.float32)
    for s0 in range(0, n_sent, spt):
        snt = s0 + local_snt
        col_ok = col_in & (snt < n_sent)
        # P[(k, i), (l, t)] = G[k, l] if word t of sentence l took region i of image k, else 0.
        offs = a_row[:, None] + (s0 * T + cols)[None, :]
        if PAD_REGIONS:
            ok = tile_ok[:, None] & col_ok[None, :]
            a = tl.load(A + offs, mask=ok, other=-1).to(tl.int32)
            c = tl.load(C + offs, mask=ok, other=0.0)
            p = tl.where(a[:, None, :] == tl.arange(0, R_P)[None, :, None], c[:, None, :], 0.0)
            p = tl.reshape(p, (M, N))
        else:
            ok = row_ok[:, None] & col_ok[None, :]
            a = tl.load(A + offs, mask=ok, other=-1).to(tl.int32)
            p = tl.where(a == reg[:, None], tl.load(C + offs, mask=ok, other=0.0), 0.0)
        w = tl.load(W + snt.to(tl.int64)[:, None] * s_wb + wrd[:, None] * s_wt + dd[None, :] * s_wd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            p = p.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(p, w, acc, input_precision=PRECISION)

    tl.store(DV + img.to(tl.int64)[:, None] * s_db + reg[:, None] * s_dr + dd[None, :] * s_dd,
             acc.to(DV.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _maxsim_bwd_dw_kernel(
    V, C, A, DW,
    n_img, n_sent, R, T, D,
    s_vb, s_vr, s_vd, s_db, s_dt, s_dd,
    R_P: tl.constexpr, T_P: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PAD_REGIONS: tl.constexpr = False,
):
    M: tl.constexpr = _tile_side(BLOCK_M, R_P)
    N: tl.constexpr = _tile_side(BLOCK_N, T_P)
    spt = N // T  # sentences per tile, T columns apart
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)

    cols = tl.arange(0, N)
    local_snt = cols // T
    snt = pid_s * spt + local_snt
    wrd = cols - local_snt * T
    col_ok = (local_snt < spt) & (snt < n_sent)
    a_col = snt.to(tl.int64) * T + wrd
    local_img, reg, ipt, row_in = _region_rows(M, R, R_P, PAD_REGIONS)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    acc = tl.zeros((N, BLOCK_D), dtype=tl.float32)
    for i0 in range(0, n_img, ipt):
        img = i0 + local_img
        row_ok = row_in & (img < n_img)
        if PAD_REGIONS:
            tile_img = i0 + tl.arange(0, M // R_P)
            ok = col_ok[:, None] & (tile_img < n_img)[None, :]
            offs = tile_img.to(tl.int64)[None, :] * n_sent * T + a_col[:, None]
            a = tl.load(A + offs, mask=ok, other=-1).to(tl.int32)
            c = tl.load(C + offs, mask=ok, other=0.0)
            pt = tl.where(a[:, :, None] == tl.arange(0, R_P)[None, None, :], c[:, :, None], 0.0)
            pt = tl.reshape(pt, (N, M))
        else:
            ok = col_ok[:, None] & row_ok[None, :]
            offs = img.to(tl.int64)[None, :] * n_sent * T + a_col[:, None]
            a = tl.load(A + offs, mask=ok, other=-1).to(tl.int32)
            pt = tl.where(a == reg[None, :], tl.load(C + offs, mask=ok, other=0.0), 0.0)
        v = tl.load(V + img.to(tl.int64)[:, None] * s_vb + reg[:, None] * s_vr + dd[None, :] * s_vd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            pt = pt.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(pt, v, acc, input_precision=PRECISION)

    tl.store(DW + snt.to(tl.int64)[:, None] * s_db + wrd[:, None] * s_dt + dd[None, :] * s_dd,
             acc.to(DW.dtype.element_ty), mask=col_ok[:, None] & d_ok[None, :])


def interpreted() -> bool:
    """True when triton was imported with TRITON_INTERPRET=1: the kernels then run on CPU tensors (numpy)."""
    return isinstance(_maxsim_fwd_kernel, InterpretedFunction)


# GPU search spaces as (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages, flags..., [register cap]): BLOCK_M
# rows of regions, BLOCK_N columns of words; the autotuner measures every config. The forward is a GEMM over D
# with a max/sum epilogue, in either orientation (WORDS_AS_ROWS), its operands read through pointers (cp.async)
# or TMA descriptors (USE_TMA: no per-element address arithmetic; dropped when the inputs cannot have
# descriptors). The backward kernels rebuild their one-hot operand for every D-chunk they own, so wide D-chunks
# amortise it; for dV the tile is BLOCK_M rows x BLOCK_D and the loop runs over BLOCK_N words, for dW it is
# BLOCK_N rows x BLOCK_D over BLOCK_M regions. PAD_REGIONS (both passes) places images R_P (a power of two) rows
# apart instead of R: the MMA wastes the padding rows (37% at R = 20), but in the forward the per-image max
# becomes one reduction for all images of the tile instead of a masked pass per image, and in the backward the
# one-hot operand is expanded in registers from one argmax and dL/dS load per (image, word) instead of one per
# (region, word).
# Where the forward's time goes, from its sm_90 code (triton 3.8's ptxas, R = T = 20, D = 1024, bf16; no GPU):
# a 128 x 128 tile's MMA takes ~8.9k cycles of one SM and its main loop issues ~100 instructions per D-chunk
# (tensor-bound); its epilogue, as first written, took ~25k issue cycles for 8 warps with regions as rows (two
# reductions across warps per image: the max, then the sum over each sentence's words) -- which predicts the
# 25% of the matmul measured on an H200 -- and ~7.6k with words as rows. It now gathers the per-image maxima
# into one [images, words] tensor and sums each sentence's words once per tile (8k and 4.5k issue cycles
# without the argmax, which only training stores). Blocks that share an SM overlap one's epilogue with the
# other's MMA: three 8-warp tiles cap registers at 128 per thread for that (without the argmax, packed regions as
# rows then spill nothing with triton 3.8 and ~50 B with 3.6, the padded one ~40 B; all three spill with the
# argmax), and the 4-warp 128 x 64 tiles with words as rows get there at 130-210 registers (their model: epilogue
# plus main-loop issue about equal to the MMA time). benchmarks/kernel_code.py reports all of this per config,
# for the installed triton or another (docs/benchmarks.md has 3.8 and 3.6).
FORWARD_SPACE = [  # ..., WORDS_AS_ROWS, USE_TMA, PAD_REGIONS
    (64, 64, 64, 4, 3, False, False, False), (64, 128, 64, 4, 4, False, False, False),
    (128, 64, 64, 4, 4, False, False, False), (128, 128, 64, 8, 3, False, False, False),
    (128, 128, 64, 8, 4, False, False, False), (128, 256, 64, 8, 3, False, False, False),
    (128, 128, 128, 8, 2, False, False, False), (256, 128, 64, 8, 3, False, False, False),
    (128, 64, 64, 4, 4, True, False, False), (128, 128, 64, 8, 3, True, False, False),
    (128, 128, 64, 8, 4, True, False, False), (256, 128, 64, 8, 3, True, False, False),
    (128, 256, 64, 8, 3, True, False, False),
    (128, 128, 64, 8, 3, False, True, False), (128, 128, 64, 8, 4, False, True, False),
    (128, 128, 64, 8, 3, True, True, False), (128, 64, 64, 4, 3, True, True, False),
    (128, 64, 128, 4, 2, True, True, False),
    (128, 128, 64, 8, 3, False, False, True), (128, 128, 64, 8, 4, False, False, True),
    (128, 256, 64, 8, 3, False, False, True), (256, 128, 64, 8, 3, False, False, True),
    (128, 128, 64, 8, 3, False, False, False, 128), (128, 128, 64, 8, 3, False, True, False, 128),
    (128, 128, 64, 8, 3, False, False, True, 128),
]
BACKWARD_SPACE = [
    (64, 64, 64, 4, 3, False), (64, 64, 128, 4, 3, False), (128, 64, 128, 8, 3, False), (64, 128, 128, 8, 3, False),
    (128, 64, 256, 8, 3, False), (64, 128, 256, 8, 3, False), (128, 128, 128, 8, 3, False), (64, 64, 256, 8, 4, False),
    (128, 128, 64, 8, 3, True), (128, 64, 128, 8, 3, True), (128, 128, 64, 8, 4, True),
    (128, 128, 128, 8, 3, True), (128, 64, 256, 8, 3, True),
]
FORWARD_FLAGS = ("WORDS_AS_ROWS", "USE_TMA", "PAD_REGIONS")
BACKWARD_FLAGS = ("PAD_REGIONS",)


def _configs(space: list[tuple], flags: tuple[str, ...] = ()) -> list[triton.Config]:
    """The autotuner's configs (``flags`` name the constexprs after the five sizes): one large tile under the
    interpreter (few big programs run fastest), and one GPU config when ``DSALIGN_TRITON_AUTOTUNE=0``
    (correctness runs over many shapes would otherwise compile and time every config for each)."""
    hook = _tma_block_shapes if "USE_TMA" in flags else None
    if interpreted():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32}, pre_hook=hook)]
    if os.environ.get(AUTOTUNE_ENV, "1") == "0":
        space = space[:1]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, **dict(zip(flags, rest))},
                          num_warps=w, num_stages=st, maxnreg=rest[len(flags)] if len(rest) > len(flags) else None,
                          pre_hook=hook)
            for bm, bn, bd, w, st, *rest in space]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """TMA configs go when the inputs got no descriptors. Exact fp32 ("ieee") dots run on the FMA units and
    compile slowly at large tiles, which buy nothing there: search only the tiles of at most 64 x 64 x 128."""
    if named_args.get("V_DESC") is None:
        configs = [c for c in configs if not c.kwargs.get("USE_TMA")]
    if kwargs.get("PRECISION", named_args.get("PRECISION")) != "ieee":
        return configs
    small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_D"] <= 64 * 64 * 128]
    return small or configs[:1]


def _tma_block_shapes(nargs: dict) -> None:
    """Autotune pre-hook: a TMA descriptor's block is the config's tile side by BLOCK_D, known only once the
    config is."""
    if nargs.get("USE_TMA"):
        nargs["V_DESC"].block_shape = [_tile_side(nargs["BLOCK_M"], nargs["R_P"]), nargs["BLOCK_D"]]
        nargs["W_DESC"].block_shape = [_tile_side(nargs["BLOCK_N"], nargs["T_P"]), nargs["BLOCK_D"]]


def _tma_operands(regions: torch.Tensor, words: torch.Tensor, r_p: int, t_p: int) -> tuple:
    """(regions, words, their TMA descriptors): each input as its [B * L, D] rows, made contiguous and 16-byte
    aligned if need be (a copy of the inputs, small beside the B^2 work). Descriptors are None where TMA cannot
    apply or no config would use them: a GPU before sm_90, rows whose bytes are not a multiple of 16, a tile
    side (R_P or T_P) above the 256 rows a TMA block may have, or a search space without TMA configs
    (``DSALIGN_TRITON_AUTOTUNE=0``). Their block shape is set per config by the pre-hook."""
    dim_bytes = regions.shape[2] * regions.element_size()
    if (dim_bytes % 16 or max(r_p, t_p) > 256
            or not any(c.kwargs.get("USE_TMA") for c in _fwd.configs)
            or (not interpreted() and (regions.device.type != "cuda"
                                       or torch.cuda.get_device_capability(regions.device)[0] < 9))):
        return regions, words, None, None
    regions, words = (x if x.is_contiguous() and x.data_ptr() % 16 == 0
                      else x.clone(memory_format=torch.contiguous_format) for x in (regions, words))
    return regions, words, *(TensorDescriptor(base=x, shape=[x.shape[0] * x.shape[1], x.shape[2]],
                                              strides=[x.shape[2], 1], block_shape=[16, 16])
                             for x in (regions, words))


def _prune_forward_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """``_prune_configs``, and forward tiles with images padded to R_P rows go when their one sum over words
    would not fit in registers (tiny R and T; packed tiles then sum per image)."""
    r_p, t_p = kwargs["R_P"], kwargs["T_P"]
    return _prune_configs([c for c in configs if not c.kwargs.get("PAD_REGIONS") or _epilogue_elems(
        _tile_side(c.kwargs["BLOCK_M"], r_p), _tile_side(c.kwargs["BLOCK_N"], t_p), r_p, t_p, True) <= EPILOGUE_LIMIT],
        named_args, **kwargs)


_PRUNE = {"early_config_prune": _prune_configs}
# Batch sizes are part of the key: the best tile for a 64 x 64 check differs from a 4096 x 4096 batch, and a
# training run sees only a few distinct sizes. Caption lengths are keyed by their power of two (T_P, which fixes
# the tile shapes): a training batch is trimmed to its longest caption, and keying on T itself re-timed every
# config for each new length, tens of times early in a run.
_KEY = ["n_img", "n_sent", "R", "T_P", "D", "UPCAST", "PRECISION"]
_fwd = triton.autotune(configs=_configs(FORWARD_SPACE, FORWARD_FLAGS), key=[*_KEY, "STORE_ARGMAX"],
                       prune_configs_by={"early_config_prune": _prune_forward_configs})(_maxsim_fwd_kernel)
_bwd_dv = triton.autotune(configs=_configs(BACKWARD_SPACE, BACKWARD_FLAGS), key=_KEY, prune_configs_by=_PRUNE)(
    _maxsim_bwd_dv_kernel)
_bwd_dw = triton.autotune(configs=_configs(BACKWARD_SPACE, BACKWARD_FLAGS), key=_KEY, prune_configs_by=_PRUNE)(
    _maxsim_bwd_dw_kernel)


_TUNERS = {"forward": _fwd, "backward_dv": _bwd_dv, "backward_dw": _bwd_dw}


def tuned_configs() -> dict[str, str | None]:
    """The config each kernel ran with in its latest autotuned launch (None before one, or since
    ``clear_tuning_report``): what a benchmark records beside its timings, to tell which tile and layout won
    on that GPU."""
    return {name: (str(tuner.best_config) if getattr(tuner, "best_config", None) else None)
            for name, tuner in _TUNERS.items()}


def tuning_timings() -> dict[str, list[tuple[str, float]]]:
    """Per kernel tuned since ``clear_tuning_report``: every config the autotuner timed and its median ms,
    fastest first (the data for pruning a search space)."""
    return {name: sorted(((str(config), float(ms[0] if isinstance(ms, list | tuple) else ms))
                          for config, ms in tuner.configs_timings.items()), key=lambda item: item[1])
            for name, tuner in _TUNERS.items() if getattr(tuner, "configs_timings", None)}


def clear_tuning_report() -> None:
    """Forget which configs ran and what tuning measured (the tuned choices stay cached), so that the next
    reports cover only the launches after this call."""
    for tuner in _TUNERS.values():
        tuner.best_config = None
        tuner.configs_timings = None


def _per_tile(block: int, padded: int, count: int, pad: bool = False) -> int:
    """Images (sentences) per tile: the tile height over R (width over T), or over R_P when images are padded
    (``PAD_REGIONS``)."""
    return _tile_side(block, padded) // (padded if pad else count)


def _argmax_dtype(n_regions: int) -> torch.dtype:
    """Smallest signed dtype holding region indices and the -1 sentinel (int8 covers R <= 128)."""
    if n_regions <= 128:
        return torch.int8
    return torch.int16 if n_regions <= 32768 else torch.int32


def _matmul_allows_tf32() -> bool:
    """Whether torch's fp32 matmuls may use TF32. Read through ``fp32_precision`` (torch >= 2.9), which reflects
    the legacy ``allow_tf32`` too: reading ``allow_tf32`` raises once the new API has set the precision."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # an older torch
        return bool(matmul.allow_tf32)
    if precision == "none":  # inherits the global setting
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def _launch_flags(dtype: torch.dtype) -> dict:
    """Interpreter upcast and fp32 dot precision (tf32 only when torch's matmul would use it too)."""
    fp32_exact = dtype == torch.float32 and not _matmul_allows_tf32()
    return {
        "UPCAST": interpreted() and dtype != torch.float32,
        "PRECISION": "ieee" if fp32_exact else "tf32",
    }


def _check(regions: torch.Tensor, region_mask: torch.Tensor, words: torch.Tensor,
           word_mask: torch.Tensor) -> None:
    if regions.dim() != 3 or words.dim() != 3 or regions.shape[2] != words.shape[2]:
        raise ValueError(f"expected regions [B_img, R, D] and words [B_sent, T, D] with equal D; got "
                         f"{tuple(regions.shape)} and {tuple(words.shape)}")
    if region_mask.shape != regions.shape[:2] or word_mask.shape != words.shape[:2]:
        raise ValueError("region_mask must be [B_img, R] and word_mask [B_sent, T]")
    if regions.dtype != words.dtype or regions.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"regions and words must share one of fp32/fp16/bf16; got {regions.dtype}, "
                        f"{words.dtype}")
    if not (regions.device == words.device == region_mask.device == word_mask.device):
        raise ValueError("all inputs must be on one device")
    if regions.device.type != "cuda" and not interpreted():
        raise RuntimeError("the Triton MaxSim kernel needs CUDA tensors; to run it on CPU (tests only, slow) "
                           "set TRITON_INTERPRET=1 before triton is first imported")


def maxsim_forward(regions: torch.Tensor, region_mask: torch.Tensor, words: torch.Tensor,
                   word_mask: torch.Tensor, return_argmax: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Score every image against every sentence without autograd.

    Returns S [B_img, B_sent] in fp32 for every input dtype (a margin-1 ranking loss on bf16 scores of
    magnitude ~100 would be rounding noise) and, if asked, the argmax region per (image, sentence, word) as
    [B_img, B_sent, T] in a compact signed dtype, -1 where the word is padded or the image has no real region.
    Pairs with a non-finite real region or word score NaN (``_mark_non_finite``).
    """
    _check(regions, region_mask, words, word_mask)
    scores, argmax = _run_forward_kernel(regions, region_mask, words, word_mask, return_argmax)
    _mark_non_finite(scores, regions, region_mask, words, word_mask)
    return scores, argmax


def _run_forward_kernel(regions: torch.Tensor, region_mask: torch.Tensor, words: torch.Tensor,
                        word_mask: torch.Tensor, return_argmax: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The forward kernel's scores and argmax for checked inputs; non-finite features not yet marked (the
    backward's argmax recompute discards the scores)."""
    n_img, n_reg, dim = regions.shape
    n_sent, n_wrd, _ = words.shape
    r_p = triton.next_power_of_2(max(n_reg, 1))
    t_p = triton.next_power_of_2(max(n_wrd, 1))
    scores = torch.empty(n_img, n_sent, device=regions.device, dtype=torch.float32)
    argmax = (torch.empty(n_img, n_sent, n_wrd, device=regions.device, dtype=_argmax_dtype(n_reg))
              if return_argmax else torch.empty(1, device=regions.device, dtype=torch.int8))
    if scores.numel() == 0 or n_reg == 0 or n_wrd == 0:  # no pair has a term: every score is 0
        return scores.zero_(), (argmax.fill_(-1) if return_argmax else None)
    vm = region_mask.to(torch.uint8).contiguous()
    wm = word_mask.to(torch.uint8).contiguous()
    vh = vm.amax(1)  # per image: has a real region (else its pairs score 0)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n_img, _per_tile(meta["BLOCK_M"], r_p, n_reg, meta.get("PAD_REGIONS", False)))
                * triton.cdiv(n_sent, _per_tile(meta["BLOCK_N"], t_p, n_wrd)),)

    regions, words, v_desc, w_desc = _tma_operands(regions, words, r_p, t_p)
    with _launch_device(regions):
        _fwd[grid](
            regions, vm, vh, words, wm, scores, argmax, v_desc, w_desc,
            n_img, n_sent, n_reg, n_wrd, dim,
            *regions.stride(), *words.stride(), *scores.stride(),
            R_P=r_p, T_P=t_p, STORE_ARGMAX=return_argmax, **_launch_flags(regions.dtype),
        )
    return scores, (argmax if return_argmax else None)


def _launch_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the inputs' own, or a model on cuda:1 in a process
    whose current device is 0 (inference with ``device="cuda:1"``) would run the kernels on GPU 0 with pointers
    into GPU 1."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _mark_non_finite(scores: torch.Tensor, regions: torch.Tensor, region_mask: torch.Tensor,
                     words: torch.Tensor, word_mask: torch.Tensor) -> None:
    """NaN for every pair that has a term and a non-finite real region or word: the kernel's max skips NaN,
    and features that stopped being finite (a diverging model) must not leave its loss finite. Stricter than
    the torch backends, whose arithmetic may still give a finite score (an inf that only ever meets negative
    words loses the max). A few elementwise passes over the inputs, no host sync. Overflow inside the dot
    products of finite features is not detected."""
    region_mask, word_mask = region_mask.bool(), word_mask.bool()
    bad_img = (~regions.isfinite().all(-1) & region_mask).any(-1)
    bad_sent = (~words.isfinite().all(-1) & word_mask).any(-1)
    has_img, has_sent = region_mask.any(-1), word_mask.any(-1)
    scores.masked_fill_((bad_img[:, None] & has_sent[None, :]) | (has_img[:, None] & bad_sent[None, :]), float("nan"))


def maxsim_backward(regions: torch.Tensor, words: torch.Tensor, grad_scores: torch.Tensor,
                    argmax: torch.Tensor, need_regions: bool = True, need_words: bool = True
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of S w.r.t. regions and words from grad_scores [B_img, B_sent] and the forward's argmax."""
    n_img, n_reg, dim = regions.shape
    n_sent, n_wrd, _ = words.shape
    r_p = triton.next_power_of_2(max(n_reg, 1))
    t_p = triton.next_power_of_2(max(n_wrd, 1))
    flags = _launch_flags(regions.dtype)
    grad_v = torch.zeros_like(regions) if need_regions else None
    grad_w = torch.zeros_like(words) if need_words else None
    if not (n_img and n_sent and n_reg and n_wrd):
        return grad_v, grad_w
    # dL/dS laid out like the argmax, in the operand dtype: the kernels then read both with contiguous
    # (vector) loads along the words instead of one scalar dL/dS per word.
    coef = grad_scores.to(regions.dtype)[:, :, None].expand(n_img, n_sent, n_wrd).contiguous()

    def dv_grid(meta: dict) -> tuple[int, int]:
        images = _per_tile(meta["BLOCK_M"], r_p, n_reg, meta.get("PAD_REGIONS", False))
        return triton.cdiv(n_img, images), triton.cdiv(dim, meta["BLOCK_D"])

    def dw_grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(n_sent, _per_tile(meta["BLOCK_N"], t_p, n_wrd)), triton.cdiv(dim, meta["BLOCK_D"])

    with _launch_device(regions):
        if need_regions:
            _bwd_dv[dv_grid](
                words, coef, argmax, grad_v,
                n_img, n_sent, n_reg, n_wrd, dim,
                *words.stride(), *grad_v.stride(),
                R_P=r_p, T_P=t_p, **flags,
            )
        if need_words:
            _bwd_dw[dw_grid](
                regions, coef, argmax, grad_w,
                n_img, n_sent, n_reg, n_wrd, dim,
                *regions.stride(), *grad_w.stride(),
                R_P=r_p, T_P=t_p, **flags,
            )
    return grad_v, grad_w


def backward_workspace_bytes() -> int:
    """The one-hot GEMM backward's budget from ``DSALIGN_MAXSIM_WORKSPACE_MB`` (MiB, default 1024), read at
    each backward; 0 selects the fused backward kernels, which need no workspace."""
    raw = os.environ.get(WORKSPACE_ENV, str(DEFAULT_WORKSPACE_MB))
    try:
        mib = int(raw)
    except ValueError:
        mib = -1
    if mib < 0:
        raise ValueError(f"${WORKSPACE_ENV} must be a whole number of MiB >= 0 (0: fused backward kernels, no "
                         f"workspace); got {raw!r}")
    return mib << 20


class _MaxSimFunction(torch.autograd.Function):
    """Autograd wrapper; the argmax is saved (compact) or recomputed in backward when save_argmax=False."""

    @staticmethod
    def forward(ctx, regions: torch.Tensor, region_mask: torch.Tensor, words: torch.Tensor,
                word_mask: torch.Tensor, save_argmax: bool) -> torch.Tensor:
        scores, argmax = maxsim_forward(regions, region_mask, words, word_mask, return_argmax=save_argmax)
        ctx.save_for_backward(regions, region_mask, words, word_mask, argmax)
        return scores

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_scores: torch.Tensor):
        regions, region_mask, words, word_mask, argmax = ctx.saved_tensors
        workspace = backward_workspace_bytes()
        if argmax is None:
            _, argmax = _run_forward_kernel(regions, region_mask, words, word_mask, return_argmax=True)
        needs = {"need_regions": ctx.needs_input_grad[0], "need_words": ctx.needs_input_grad[2]}
        if workspace:
            grad_v, grad_w = onehot_gemm_grads(regions, words, grad_scores, argmax, workspace, **needs)
        else:
            grad_v, grad_w = maxsim_backward(regions, words, grad_scores, argmax, **needs)
        return grad_v, None, grad_w, None, None


def maxsim_score(regions: torch.Tensor, region_mask: torch.Tensor, words: torch.Tensor,
                 word_mask: torch.Tensor, save_argmax: bool = True) -> torch.Tensor:
    """Differentiable S [B_img, B_sent]; the argmax is only computed when a gradient will be needed.

    save_argmax=False trades a second forward pass in backward for not keeping B_img*B_sent*T bytes alive
    between forward and backward. The backward's path and workspace: ``DSALIGN_MAXSIM_WORKSPACE_MB``.
    """
    if torch.is_grad_enabled() and (regions.requires_grad or words.requires_grad):
        return _MaxSimFunction.apply(regions, region_mask, words, word_mask, save_argmax)
    return maxsim_forward(regions, region_mask, words, word_mask)[0]
