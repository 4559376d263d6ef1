"""The fused Triton MaxSim kernel against the float64 loop reference (under TRITON_INTERPRET=1 on CPU).

Tolerances, relative to the largest reference magnitude: fp32 inputs 1e-5 for S and both gradients (fp32
accumulation; on a GPU with TF32 enabled expect ~1e-3). bf16 inputs are compared with the reference evaluated
on the same bf16-rounded values: S is fp32 (exact bf16 products, fp32 sums) so 1e-5; the gradients are built
from dL/dS rounded to bf16 and stored in bf16, two roundings of at most 2^-8 each, so 2^-6. The backward runs
both ways: the one-hot GEMMs (the default) and the fused kernels (``DSALIGN_MAXSIM_WORKSPACE_MB=0``).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton or dsalign.kernels is first imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from dsalign.kernels import interpreted, maxsim_forward, maxsim_score  # noqa: E402
from dsalign.kernels.maxsim import _argmax_dtype  # noqa: E402
from score_reference import ragged_inputs, reference  # noqa: E402

from dsalign.ops import score, word_region_similarity  # noqa: E402

DEVICE = "cpu" if interpreted() or not torch.cuda.is_available() else "cuda"
# (B_img, B_sent, R, T, D). The interpreter config tiles 64 rows x 64 columns, images packed R rows apart and
# sentences T columns apart: R = T = 20 gives 3 images x 3 sentences per tile and a 2 x 2 grid for (5, 6);
# (13, 11, 9, 13) gives 7 images x 4 sentences per tile with part-filled last tiles both ways; D = 70 is not a
# multiple of the 32-wide D-chunk; R = T = 64 fills a tile with one pair; (20, 19, 3, 3) packs 21 per tile;
# R = 100 exceeds the 64-row tile, which then grows to 128 rows holding one image.
SHAPES = [(3, 4, 5, 7, 40), (1, 3, 1, 1, 16), (5, 6, 20, 20, 70), (13, 11, 9, 13, 20), (2, 3, 64, 64, 24),
          (20, 19, 3, 3, 33), (2, 2, 100, 3, 16)]
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 2**-6)}
BACKWARDS = {"fused": "0", "gemm": "1024"}  # DSALIGN_MAXSIM_WORKSPACE_MB per backward path


@pytest.fixture
def fused_backward(monkeypatch):
    """The fused Triton backward kernels instead of the one-hot GEMMs, for the tests of their tiles."""
    from dsalign.kernels import maxsim

    monkeypatch.setenv(maxsim.WORKSPACE_ENV, BACKWARDS["fused"])


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=0, atol=rel * scale)


def run(regions, region_mask, words, word_mask, grad, save_argmax=True):
    v = regions.to(DEVICE).detach().requires_grad_()  # a fresh leaf: .grad never carries over
    w = words.to(DEVICE).detach().requires_grad_()
    s = maxsim_score(v, region_mask.to(DEVICE), w, word_mask.to(DEVICE), save_argmax=save_argmax)
    s.backward(grad.to(DEVICE, torch.float32))
    return s, v.grad, w.grad


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(monkeypatch, shape, dtype, backward):
    from dsalign.kernels import maxsim

    monkeypatch.setenv(maxsim.WORKSPACE_ENV, BACKWARDS[backward])
    regions, region_mask, words, word_mask = ragged_inputs(*shape, dtype=dtype, seed=sum(shape))
    grad = torch.randn(shape[0], shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    s, gv, gw = run(regions, region_mask, words, word_mask, grad)
    ref_s, ref_gv, ref_gw = reference(regions, region_mask, words, word_mask, grad)
    s_tol, g_tol = TOLERANCES[dtype]
    assert s.dtype == torch.float32 and gv.dtype == gw.dtype == dtype
    close(s, ref_s, s_tol)
    close(gv, ref_gv, g_tol)
    close(gw, ref_gw, g_tol)
    assert (s[:, -1] == 0).all() and (gw[-1] == 0).all()
    if shape[0] > 1:
        assert (s[1] == 0).all() and (gv[1] == 0).all()


@pytest.mark.parametrize("backward", BACKWARDS)
def test_argmax_saved_or_recomputed_and_deterministic(monkeypatch, backward):
    from dsalign.kernels import maxsim

    monkeypatch.setenv(maxsim.WORKSPACE_ENV, BACKWARDS[backward])
    regions, region_mask, words, word_mask = ragged_inputs(4, 5, 6, 7, 40, dtype=torch.float32)
    grad = torch.randn(4, 5, dtype=torch.float64)
    first = run(regions, region_mask, words, word_mask, grad, save_argmax=True)
    again = run(regions, region_mask, words, word_mask, grad, save_argmax=True)
    recomputed = run(regions, region_mask, words, word_mask, grad, save_argmax=False)
    for a, b, c in zip(first, again, recomputed):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_malformed_workspace_setting_is_one_clear_error(monkeypatch):
    from dsalign.kernels import maxsim

    regions, region_mask, words, word_mask = ragged_inputs(2, 3, 4, 5, 8, dtype=torch.float32)
    for bad in ("lots", "-1", "1.5"):
        monkeypatch.setenv(maxsim.WORKSPACE_ENV, bad)
        with pytest.raises(ValueError, match="DSALIGN_MAXSIM_WORKSPACE_MB must be a whole number"):
            run(regions, region_mask, words, word_mask, torch.ones(2, 3, dtype=torch.float64))


def test_argmax_matches_word_region_similarity():
    regions, region_mask, words, word_mask = ragged_inputs(3, 4, 9, 6, 20, dtype=torch.float32)
    _, argmax = maxsim_forward(regions.to(DEVICE), region_mask.to(DEVICE), words.to(DEVICE),
                               word_mask.to(DEVICE), return_argmax=True)
    assert argmax.dtype == torch.int8 and argmax.shape == (3, 4, 6)
    pairs = [(k, j) for k in range(3) for j in range(4)]
    best = word_region_similarity(regions, region_mask, words, word_mask, pairs).best_region
    assert torch.equal(argmax.cpu().long().reshape(12, 6), best)


def test_strided_inputs_and_dispatch():
    regions, region_mask, words, word_mask = ragged_inputs(3, 2, 4, 5, 36, dtype=torch.float32)
    strided_words = words.transpose(1, 2).contiguous().transpose(1, 2)  # D is not the innermost stride
    s = score(regions.to(DEVICE), region_mask.to(DEVICE), strided_words.to(DEVICE), word_mask.to(DEVICE),
              backend="triton")
    grad = torch.zeros(3, 2, dtype=torch.float64)
    close(s, reference(regions, region_mask, words, word_mask, grad)[0], 1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy dot
def test_non_finite_real_features_make_their_pairs_nan_like_the_torch_backend():
    """The kernel's max would skip a NaN region; a diverging model must not get a finite loss from it."""
    regions, region_mask, words, word_mask = ragged_inputs(4, 5, 6, 7, 16, dtype=torch.float32)
    real_region = region_mask[2].nonzero()[0, 0]
    regions[2, real_region, 3] = float("nan")
    words[0, word_mask[0].nonzero()[0, 0], 1] = float("inf")
    regions[3, (~region_mask[3]).nonzero()[0, 0]] = float("nan")  # padded: ignored
    got = score(regions.to(DEVICE), region_mask.to(DEVICE), words.to(DEVICE), word_mask.to(DEVICE),
                backend="triton").cpu()
    want = score(regions, region_mask, words, word_mask, backend="torch")
    assert torch.equal(got.isfinite(), want.isfinite())
    assert got[2, :-1].isnan().all() and got[[0, 2, 3], 0].isnan().all()  # sentence 4 has no word, image 1 no region
    assert (got[2, -1] == 0) and (got[1] == 0).all()
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite].float())


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy dot
def test_overflowing_similarities_and_integer_masks():
    """Finite features whose every similarity overflows to -inf score -inf like the torch backend (an image
    has a real region by its mask, not by a finite maximum), and 0/1 integer masks act like bool ones."""
    regions, words = torch.full((2, 3, 4), 1e20), torch.full((2, 2, 4), -1e20)
    regions[1] = 1.0
    masks = torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool)
    want = score(regions, masks[0], words, masks[1], backend="torch")
    got, argmax = maxsim_forward(regions.to(DEVICE), masks[0].to(DEVICE), words.to(DEVICE), masks[1].to(DEVICE),
                                 return_argmax=True)
    assert torch.equal(got.cpu(), want.float()) and torch.isinf(got[0]).all() and (argmax >= 0).all()
    as_int = maxsim_forward(regions.to(DEVICE), masks[0].to(DEVICE, torch.uint8), words.to(DEVICE),
                            masks[1].to(DEVICE, torch.uint8))[0]
    assert torch.equal(as_int, got)


@pytest.mark.parametrize(("api", "value", "precision"), [("fp32_precision", "tf32", "tf32"),
                                                         ("fp32_precision", "ieee", "ieee"),
                                                         ("allow_tf32", True, "tf32"), ("allow_tf32", False, "ieee")])
def test_fp32_dot_precision_follows_torch_matmul_setting(api, value, precision):
    """TF32 set with torch's new API made the kernel's check of the legacy flag raise for every fp32 call."""
    from dsalign.kernels.maxsim import _launch_flags

    matmul = torch.backends.cuda.matmul
    legacy, before = torch.get_float32_matmul_precision(), matmul.fp32_precision
    try:
        setattr(matmul, api, value)
        assert _launch_flags(torch.float32)["PRECISION"] == precision
        assert _launch_flags(torch.bfloat16)["PRECISION"] == "tf32"  # 16-bit dots are never "ieee"
    finally:  # both APIs back: one alone leaves them mixed, and every later fp32 cuBLAS GEMM would raise
        torch.set_float32_matmul_precision(legacy)
        matmul.fp32_precision = before
    assert matmul.allow_tf32 == (legacy != "highest")  # readable again


def test_empty_batch_and_argmax_dtypes():
    s, argmax = maxsim_forward(torch.zeros(0, 3, 16, device=DEVICE), torch.zeros(0, 3, dtype=torch.bool,
                               device=DEVICE), torch.zeros(2, 4, 16, device=DEVICE),
                               torch.ones(2, 4, dtype=torch.bool, device=DEVICE), return_argmax=True)
    assert s.shape == (0, 2) and argmax.shape == (0, 2, 4)
    assert [_argmax_dtype(r) for r in (1, 128, 129, 32768, 40000)] == [
        torch.int8, torch.int8, torch.int16, torch.int16, torch.int32]


def force_config(monkeypatch, tuner, config) -> None:
    """Make an autotuned kernel run one config (its cache of choices emptied, both restored after the test)."""
    monkeypatch.setattr(tuner, "configs", [config])
    monkeypatch.setattr(tuner, "cache", {})


@pytest.mark.usefixtures("fused_backward")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tile_layouts_agree(monkeypatch, dtype):
    """Every tile layout the autotuner may pick must give the reference scores and gradients: the forward's
    tile as regions x words or transposed (WORDS_AS_ROWS), its operands read through pointers or TMA
    descriptors (USE_TMA), images R or R_P rows apart in either pass (PAD_REGIONS; R = 13 pads to 16, four
    images per interpreter tile; R = 40 pads to 64, one image per tile); R = 3, T = 2 packs 21 images x 32
    sentences per tile, so packed tiles sum per image (the autotuner would prune the padded ones there; forced
    as the only config they are not pruned, and still right)."""
    import triton
    from dsalign.kernels import maxsim

    def with_flags(config: triton.Config, **flags: bool) -> triton.Config:
        return triton.Config({**config.kwargs, **flags}, num_warps=config.num_warps,
                             num_stages=config.num_stages, pre_hook=config.pre_hook)

    forward = maxsim._configs(maxsim.FORWARD_SPACE, maxsim.FORWARD_FLAGS)[0]
    backward = maxsim._configs(maxsim.BACKWARD_SPACE, maxsim.BACKWARD_FLAGS)[0]
    s_tol, g_tol = TOLERANCES[dtype]
    for n_regions, n_words in ((13, 13), (40, 13), (3, 2)):  # (3, 2): too many pairs per tile to gather
        regions, region_mask, words, word_mask = ragged_inputs(13, 11, n_regions, n_words, 40, dtype=dtype, seed=5)
        grad = torch.randn(13, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
        want = reference(regions, region_mask, words, word_mask, grad)
        for rows, tma, pad_forward, pad_backward in ((True, False, False, False), (False, True, False, True),
                                                     (True, True, False, True), (False, False, True, True)):
            force_config(monkeypatch, maxsim._fwd,
                         with_flags(forward, WORDS_AS_ROWS=rows, USE_TMA=tma, PAD_REGIONS=pad_forward))
            for tuner in (maxsim._bwd_dv, maxsim._bwd_dw):
                force_config(monkeypatch, tuner, with_flags(backward, PAD_REGIONS=pad_backward))
            for actual, expected, tol in zip(run(regions, region_mask, words, word_mask, grad), want,
                                             (s_tol, g_tol, g_tol)):
                close(actual, expected, tol)


def test_tma_only_where_descriptors_can_be_made(monkeypatch):
    """TMA needs 16-byte rows and a tile side of at most 256 rows: otherwise no descriptor is made and the
    autotuner drops the TMA configs (a non-contiguous input gets a contiguous copy and keeps TMA). Without a
    TMA config in the search space no descriptor (and no copy) is made at all."""
    import triton
    from dsalign.kernels import maxsim

    names = ("BLOCK_M", "BLOCK_N", "BLOCK_D", *maxsim.FORWARD_FLAGS)
    configs = [triton.Config(dict(zip(names, (bm, bn, bd, *flags))))
               for bm, bn, bd, _, _, *flags in maxsim.FORWARD_SPACE]
    for descriptor, has_tma in ((None, False), (object(), True)):
        kept = maxsim._prune_configs(configs, {"V_DESC": descriptor, "PRECISION": "tf32"})
        assert kept and any(c.kwargs["USE_TMA"] for c in kept) == has_tma
    strided = torch.randn(2, 3, 16, device=DEVICE)[:, :, :8]
    force_config(monkeypatch, maxsim._fwd, configs[0])  # no TMA
    assert maxsim._tma_operands(strided, strided, 4, 4)[0] is strided
    assert maxsim._tma_operands(strided, strided, 4, 4)[2:] == (None, None)
    force_config(monkeypatch, maxsim._fwd, next(c for c in configs if c.kwargs["USE_TMA"]))
    rows_of_24_bytes = torch.randn(2, 3, 12, dtype=torch.bfloat16, device=DEVICE)
    assert maxsim._tma_operands(rows_of_24_bytes, rows_of_24_bytes, 4, 4)[2:] == (None, None)
    assert maxsim._tma_operands(strided, strided, 512, 4)[2:] == (None, None)
    regions, words, v_desc, w_desc = maxsim._tma_operands(strided, strided, 4, 4)
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        assert v_desc is None and w_desc is None  # TMA came with sm_90
        return
    assert v_desc is not None and w_desc is not None
    assert regions.is_contiguous() and torch.equal(regions, strided) and v_desc.shape == [6, 8]


def test_caption_lengths_of_one_power_of_two_share_their_tuning():
    """Training trims each batch to its longest caption: keyed on T, the autotuner re-timed every config for
    each new length; its key holds the padded length (which fixes the tiles), for all three kernels."""
    from dsalign.kernels import maxsim

    for tuner in (maxsim._fwd, maxsim._bwd_dv, maxsim._bwd_dw):
        assert "T_P" in tuner.keys and "T" not in tuner.keys and "R" in tuner.keys


def test_epilogue_fits_registers_for_any_region_and_word_count():
    """Tiny R and T pack hundreds of images x sentences into a tile: the padded-image forward configs, whose sum
    over words is one [images, sentences, words] reduction, are pruned there, and packed tiles sum per image
    (the interpreter tests above cover both packed paths: R = T = 20 gathers, R = T = 1 or 3 does not)."""
    from dsalign.kernels import maxsim

    names = ("BLOCK_M", "BLOCK_N", "BLOCK_D", *maxsim.FORWARD_FLAGS)  # the GPU space, also under the interpreter
    configs = [SimpleNamespace(kwargs=dict(zip(names, (bm, bn, bd, *flags))))
               for bm, bn, bd, _, _, *flags in maxsim.FORWARD_SPACE]
    padded = sum(bool(c.kwargs["PAD_REGIONS"]) for c in configs)
    for (r_p, t_p), kept_padded in (((32, 32), padded), ((1, 1), 0), ((4, 4), 0)):
        kept = maxsim._prune_forward_configs(configs, {"V_DESC": object()}, R_P=r_p, T_P=t_p, PRECISION="tf32")
        assert sum(bool(c.kwargs["PAD_REGIONS"]) for c in kept) == kept_padded
        assert len(kept) == len(configs) - padded + kept_padded
    assert maxsim._gathers_maxima(128, 128, 32, 32) and not maxsim._gathers_maxima(128, 128, 1, 1)


@pytest.mark.skipif(DEVICE != "cuda", reason="the GPU search space only compiles for a CUDA device")
@pytest.mark.usefixtures("fused_backward")
def test_every_gpu_config_matches_reference(monkeypatch):
    """Each block-size config the autotuner may pick, forced in turn: a miscompiled tile shape must not hide
    behind the autotuner choosing another one on the test's shapes."""
    from dsalign.kernels import maxsim

    regions, region_mask, words, word_mask = ragged_inputs(48, 32, 20, 20, 96, dtype=torch.float64, seed=3)
    # Multiples of 1/8: every similarity is exact in fp32 whatever the order of accumulation, so the argmax
    # regions (and with them the gradients) cannot differ from the reference by a near-tie.
    regions, words = ((x * 8).round() / 8 for x in (regions, words))
    regions, words = regions.to(torch.bfloat16), words.to(torch.bfloat16)
    grad = torch.randn(48, 32, dtype=torch.float64)
    want = reference(regions, region_mask, words, word_mask, grad)
    s_tol, g_tol = TOLERANCES[torch.bfloat16]
    failures = []
    n_configs = max(len(maxsim.FORWARD_SPACE), len(maxsim.BACKWARD_SPACE))
    for i in range(n_configs):
        fwd_space = maxsim.FORWARD_SPACE[i % len(maxsim.FORWARD_SPACE)]
        bwd_space = maxsim.BACKWARD_SPACE[i % len(maxsim.BACKWARD_SPACE)]
        force_config(monkeypatch, maxsim._fwd, maxsim._configs([fwd_space], maxsim.FORWARD_FLAGS)[0])
        force_config(monkeypatch, maxsim._bwd_dv, maxsim._configs([bwd_space], maxsim.BACKWARD_FLAGS)[0])
        force_config(monkeypatch, maxsim._bwd_dw, maxsim._configs([bwd_space], maxsim.BACKWARD_FLAGS)[0])
        got = run(regions, region_mask, words, word_mask, grad)
        errors = [((a.double().cpu() - e).abs().max() / max(e.abs().max().item(), 1.0)).item()
                  for a, e in zip(got, want)]
        if any(err > tol for err, tol in zip(errors, (s_tol, g_tol, g_tol))):
            failures.append((fwd_space, bwd_space, errors))
    assert not failures, f"(forward config, backward config, relative errors of S, dV, dW): {failures}"
