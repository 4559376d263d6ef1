"""Fused Triton MaxSim kernels: S[k, l] = sum_t max_i v_{k,i} . s_{l,t} with masks, forward and backward.

Layout of a forward tile: ``BLOCK_I`` images x ``BLOCK_S`` sentences. The regions of the tile's images are
stacked into the rows of one GEMM operand (``BLOCK_I * R_P`` rows, each image padded to ``R_P`` = next power
of two >= R) and the words of its sentences into the columns (``BLOCK_S * T_P``), so a single ``tl.dot``
chain over D-chunks gives every region-word similarity of the tile in registers. The max over regions and
the sum over words are reductions of that accumulator reshaped to ``[BLOCK_I, R_P, N]`` and
``[BLOCK_I, BLOCK_S, T_P]``; the 4-D similarity tensor never exists in memory.

Masking: padded/unreal regions are -inf before the max; padded words and images without any real region
contribute 0 after it (so such pairs score 0 and get zero gradient).

Backward uses the argmax region per (image, sentence, word) -- saved by the forward in a compact integer
dtype (int8 when R <= 128) with -1 for "contributes nothing", or recomputed -- and forms the one-hot matrix
``P[(k,i), (l,t)] = G[k,l] * [argmax(k,l,t) == i]`` tile by tile in registers. Then ``dV = P @ W`` and
``dW = P^T @ V`` are ordinary GEMMs: one kernel owns a (image tile, D-chunk) block of dV and loops over all
sentences, the other owns a (sentence tile, D-chunk) block of dW and loops over all images. No atomics, so
gradients are bitwise deterministic run to run.

Accumulation is fp32 for fp32/fp16/bf16 inputs and S is returned in fp32; the gradients come back in the
input dtype (in the 16-bit backward the one-hot operand carries G rounded to that dtype). Under
``TRITON_INTERPRET=1`` (CPU tests) 16-bit operands are upcast to fp32 before ``tl.dot`` because the
interpreter has no bf16 dot.
"""

# No `from __future__ import annotations`: Triton reads the kernels' `tl.constexpr` annotations at runtime.
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _maxsim_fwd_kernel(
    V, VM, W, WM, S, A,
    n_img, n_sent, R, T, D,
    s_vb, s_vr, s_vd, s_wb, s_wt, s_wd, s_sb, s_ss,
    R_P: tl.constexpr, T_P: tl.constexpr,
    STORE_ARGMAX: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr = 8,
):
    # Images/sentences per tile; at least one even when R_P > BLOCK_M (rounding up keeps powers of two).
    BLOCK_I: tl.constexpr = (BLOCK_M + R_P - 1) // R_P
    BLOCK_S: tl.constexpr = (BLOCK_N + T_P - 1) // T_P
    M: tl.constexpr = BLOCK_I * R_P
    N: tl.constexpr = BLOCK_S * T_P
    # 1-D grid walked in groups of GROUP image tiles x all sentence tiles, so programs running together share
    # their region and word tiles in L2 (the usual GEMM swizzle).
    pid = tl.program_id(0)
    n_tiles_s = tl.cdiv(n_sent, BLOCK_S)
    in_group = GROUP * n_tiles_s
    first_i = (pid // in_group) * GROUP
    group_rows = tl.minimum(tl.cdiv(n_img, BLOCK_I) - first_i, GROUP)
    pid_i = first_i + (pid % in_group) % group_rows
    pid_s = (pid % in_group) // group_rows

    rows = tl.arange(0, M)
    img = pid_i * BLOCK_I + rows // R_P
    reg = rows % R_P
    row_ok = (img < n_img) & (reg < R)
    cols = tl.arange(0, N)
    snt = pid_s * BLOCK_S + cols // T_P
    wrd = cols % T_P
    col_ok = (snt < n_sent) & (wrd < T)

    v_ptr = V + img.to(tl.int64)[:, None] * s_vb + reg[:, None] * s_vr
    w_ptr = W + snt.to(tl.int64)[None, :] * s_wb + wrd[None, :] * s_wt
    acc = tl.zeros((M, N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        v = tl.load(v_ptr + dd[None, :] * s_vd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + dd[:, None] * s_wd, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(v, w, acc, input_precision=PRECISION)

    real_r = tl.load(VM + img.to(tl.int64) * R + reg, mask=row_ok, other=0) != 0
    acc = tl.where(real_r[:, None], acc, float("-inf"))
    best, arg = tl.max(tl.reshape(acc, (BLOCK_I, R_P, N)), axis=1, return_indices=True)
    img_ok = tl.max(tl.reshape(real_r.to(tl.int32), (BLOCK_I, R_P)), axis=1) > 0
    real_w = tl.load(WM + snt.to(tl.int64) * T + wrd, mask=col_ok, other=0) != 0
    keep = img_ok[:, None] & real_w[None, :]
    score = tl.sum(tl.reshape(tl.where(keep, best, 0.0), (BLOCK_I, BLOCK_S, T_P)), axis=2)

    ti = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    ts = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    tl.store(S + ti[:, None] * s_sb + ts[None, :] * s_ss, score.to(S.dtype.element_ty),
             mask=(ti < n_img)[:, None] & (ts < n_sent)[None, :])
    if STORE_ARGMAX:
        a_ptr = A + (ti.to(tl.int64)[:, None] * n_sent + snt[None, :]) * T + wrd[None, :]
        tl.store(a_ptr, tl.where(keep, arg, -1).to(A.dtype.element_ty),
                 mask=(ti < n_img)[:, None] & col_ok[None, :])


@triton.jit
def _maxsim_bwd_dv_kernel(
    W, G, A, DV,
    n_img, n_sent, R, T, D,
    s_wb, s_wt, s_wd, s_gb, s_gs, s_db, s_dr, s_dd,
    R_P: tl.constexpr, T_P: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    BLOCK_I: tl.constexpr = (BLOCK_M + R_P - 1) // R_P
    BLOCK_S: tl.constexpr = (BLOCK_N + T_P - 1) // T_P
    M: tl.constexpr = BLOCK_I * R_P
    N: tl.constexpr = BLOCK_S * T_P
    pid_i = tl.program_id(0)
    pid_d = tl.program_id(1)

    ti = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = ti < n_img
    reg3 = tl.arange(0, R_P)[None, :, None]
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    cols = tl.arange(0, N)
    wrd = cols % T_P
    acc = tl.zeros((M, BLOCK_D), dtype=tl.float32)
    for s0 in range(0, n_sent, BLOCK_S):
        snt = s0 + cols // T_P
        col_ok = (snt < n_sent) & (wrd < T)
        ok = i_ok[:, None] & col_ok[None, :]
        a = tl.load(A + (ti.to(tl.int64)[:, None] * n_sent + snt[None, :]) * T + wrd[None, :],
                    mask=ok, other=-1).to(tl.int32)
        g = tl.load(G + ti[:, None] * s_gb + snt[None, :] * s_gs, mask=ok, other=0.0).to(tl.float32)
        p = tl.reshape(tl.where(a[:, None, :] == reg3, g[:, None, :], 0.0), (M, N))
        w = tl.load(W + snt.to(tl.int64)[:, None] * s_wb + wrd[:, None] * s_wt + dd[None, :] * s_wd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
        else:
            p = p.to(w.dtype)
        acc = tl.dot(p, w, acc, input_precision=PRECISION)

    rows = tl.arange(0, M)
    img = pid_i * BLOCK_I + rows // R_P
    reg = rows % R_P
    tl.store(DV + img.to(tl.int64)[:, None] * s_db + reg[:, None] * s_dr + dd[None, :] * s_dd,
             acc.to(DV.dtype.element_ty), mask=((img < n_img) & (reg < R))[:, None] & d_ok[None, :])


@triton.jit
def _maxsim_bwd_dw_kernel(
    V, G, A, DW,
    n_img, n_sent, R, T, D,
    s_vb, s_vr, s_vd, s_gb, s_gs, s_db, s_dt, s_dd,
    R_P: tl.constexpr, T_P: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    BLOCK_I: tl.constexpr = (BLOCK_M + R_P - 1) // R_P
    BLOCK_S: tl.constexpr = (BLOCK_N + T_P - 1) // T_P
    M: tl.constexpr = BLOCK_I * R_P
    N: tl.constexpr = BLOCK_S * T_P
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)

    cols = tl.arange(0, N)
    snt = pid_s * BLOCK_S + cols // T_P
    wrd = cols % T_P
    col_ok = (snt < n_sent) & (wrd < T)
    reg3 = tl.arange(0, R_P)[None, None, :]
    ic = tl.arange(0, BLOCK_I)
    rows = tl.arange(0, M)
    reg = rows % R_P
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    acc = tl.zeros((N, BLOCK_D), dtype=tl.float32)
    for i0 in range(0, n_img, BLOCK_I):
        ti = i0 + ic
        ok = col_ok[:, None] & (ti < n_img)[None, :]
        a = tl.load(A + (ti.to(tl.int64)[None, :] * n_sent + snt[:, None]) * T + wrd[:, None],
                    mask=ok, other=-1).to(tl.int32)
        g = tl.load(G + ti[None, :] * s_gb + snt[:, None] * s_gs, mask=ok, other=0.0).to(tl.float32)
        pt = tl.reshape(tl.where(a[:, :, None] == reg3, g[:, :, None], 0.0), (N, M))
        img = i0 + rows // R_P
        v = tl.load(V + img.to(tl.int64)[:, None] * s_vb + reg[:, None] * s_vr + dd[None, :] * s_vd,
                    mask=((img < n_img) & (reg < R))[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        else:
            pt = pt.to(v.dtype)
        acc = tl.dot(pt, v, acc, input_precision=PRECISION)

    tl.store(DW + snt.to(tl.int64)[:, None] * s_db + wrd[:, None] * s_dt + dd[None, :] * s_dd,
             acc.to(DW.dtype.element_ty), mask=col_ok[:, None] & d_ok[None, :])


def interpreted() -> bool:
    """True when triton was imported with TRITON_INTERPRET=1: the kernels then run on CPU tensors (numpy)."""
    return isinstance(_maxsim_fwd_kernel, InterpretedFunction)


def _configs() -> list[triton.Config]:
    """Block-size search space; a single large tile under the interpreter (few big programs run fastest)."""
    if interpreted():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32})]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=st)
        for bm, bn, bd, w, st in [
            (64, 64, 64, 4, 3),
            (64, 128, 64, 4, 3),
            (128, 64, 64, 4, 3),
            (128, 128, 32, 8, 3),
            (128, 128, 64, 8, 3),
            (128, 128, 64, 8, 4),
            (64, 64, 128, 4, 3),
            (128, 128, 128, 8, 2),
        ]
    ]


# Batch sizes are part of the key: the best tile for a 64 x 64 check differs from a 4096 x 4096 batch, and a
# training run sees only a few distinct sizes.
_KEY = ["n_img", "n_sent", "R_P", "T_P", "D", "UPCAST", "PRECISION"]
_fwd = triton.autotune(configs=_configs(), key=[*_KEY, "STORE_ARGMAX"])(_maxsim_fwd_kernel)
_bwd_dv = triton.autotune(configs=_configs(), key=_KEY)(_maxsim_bwd_dv_kernel)
_bwd_dw = triton.autotune(configs=_configs(), key=_KEY)(_maxsim_bwd_dw_kernel)


def _per_tile(block: int, padded: int) -> int:
    """Items (images or sentences) per tile; mirrors the kernels' constexpr arithmetic."""
    return max(block // padded, 1)


def _argmax_dtype(n_regions: int) -> torch.dtype:
    """Smallest signed dtype holding region indices and the -1 sentinel (int8 covers R <= 128)."""
    if n_regions <= 128:
        return torch.int8
    return torch.int16 if n_regions <= 32768 else torch.int32


def _launch_flags(dtype: torch.dtype) -> dict:
    """Interpreter upcast and fp32 dot precision (tf32 only when torch's matmul would use it too)."""
    fp32_exact = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
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
    """
    _check(regions, region_mask, words, word_mask)
    n_img, n_reg, dim = regions.shape
    n_sent, n_wrd, _ = words.shape
    r_p = triton.next_power_of_2(max(n_reg, 1))
    t_p = triton.next_power_of_2(max(n_wrd, 1))
    scores = torch.empty(n_img, n_sent, device=regions.device, dtype=torch.float32)
    argmax = (torch.empty(n_img, n_sent, n_wrd, device=regions.device, dtype=_argmax_dtype(n_reg))
              if return_argmax else torch.empty(1, device=regions.device, dtype=torch.int8))
    if scores.numel() == 0:
        return scores, (argmax if return_argmax else None)
    vm = region_mask.to(torch.uint8).contiguous()
    wm = word_mask.to(torch.uint8).contiguous()

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n_img, _per_tile(meta["BLOCK_M"], r_p))
                * triton.cdiv(n_sent, _per_tile(meta["BLOCK_N"], t_p)),)

    _fwd[grid](
        regions, vm, words, wm, scores, argmax,
        n_img, n_sent, n_reg, n_wrd, dim,
        *regions.stride(), *words.stride(), *scores.stride(),
        R_P=r_p, T_P=t_p, STORE_ARGMAX=return_argmax, **_launch_flags(regions.dtype),
    )
    return scores, (argmax if return_argmax else None)


def maxsim_backward(regions: torch.Tensor, words: torch.Tensor, grad_scores: torch.Tensor,
                    argmax: torch.Tensor, need_regions: bool = True, need_words: bool = True
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of S w.r.t. regions and words from grad_scores [B_img, B_sent] and the forward's argmax."""
    n_img, n_reg, dim = regions.shape
    n_sent, n_wrd, _ = words.shape
    r_p = triton.next_power_of_2(max(n_reg, 1))
    t_p = triton.next_power_of_2(max(n_wrd, 1))
    flags = _launch_flags(regions.dtype)
    grad_v = grad_w = None
    if need_regions:
        grad_v = torch.zeros_like(regions)
        if grad_v.numel() and n_sent * n_wrd:
            _bwd_dv[lambda meta: (triton.cdiv(n_img, _per_tile(meta["BLOCK_M"], r_p)),
                                  triton.cdiv(dim, meta["BLOCK_D"]))](
                words, grad_scores, argmax, grad_v,
                n_img, n_sent, n_reg, n_wrd, dim,
                *words.stride(), *grad_scores.stride(), *grad_v.stride(),
                R_P=r_p, T_P=t_p, **flags,
            )
    if need_words:
        grad_w = torch.zeros_like(words)
        if grad_w.numel() and n_img * n_reg:
            _bwd_dw[lambda meta: (triton.cdiv(n_sent, _per_tile(meta["BLOCK_N"], t_p)),
                                  triton.cdiv(dim, meta["BLOCK_D"]))](
                regions, grad_scores, argmax, grad_w,
                n_img, n_sent, n_reg, n_wrd, dim,
                *regions.stride(), *grad_scores.stride(), *grad_w.stride(),
                R_P=r_p, T_P=t_p, **flags,
            )
    return grad_v, grad_w


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
        if argmax is None:
            _, argmax = maxsim_forward(regions, region_mask, words, word_mask, return_argmax=True)
        grad_v, grad_w = maxsim_backward(regions, words, grad_scores, argmax,
                                         need_regions=ctx.needs_input_grad[0],
                                         need_words=ctx.needs_input_grad[2])
        return grad_v, None, grad_w, None, None


def maxsim_score(regions: torch.Tensor, region_mask: torch.Tensor, words: torch.Tensor,
                 word_mask: torch.Tensor, save_argmax: bool = True) -> torch.Tensor:
    """Differentiable S [B_img, B_sent]; the argmax is only computed when a gradient will be needed.

    save_argmax=False trades a second forward pass in backward for not keeping B_img*B_sent*T bytes alive
    between forward and backward.
    """
    if torch.is_grad_enabled() and (regions.requires_grad or words.requires_grad):
        return _MaxSimFunction.apply(regions, region_mask, words, word_mask, save_argmax)
    return maxsim_forward(regions, region_mask, words, word_mask)[0]
