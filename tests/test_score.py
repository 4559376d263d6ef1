"""Score op: the torch backends against a loop-level float64 reference, bounded memory, and backend dispatch.

Tolerances: float64 inputs must match the reference to 1e-10 (same maths, different summation order); fp32
inputs to 1e-5 relative to the largest magnitude; bf16 inputs are compared with the reference evaluated on the
same bf16-rounded values, so S (fp32 arithmetic) keeps 1e-5 and only the bf16 gradients get 2^-7.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from score_reference import naive_score, ragged_inputs, reference

from dsalign.ops import resolve_backend, score, score_matrix, word_region_similarity

# The package re-exports the function `score`, which shadows the submodule of the same name as an attribute.
score_mod = importlib.import_module("dsalign.ops.score")

TORCH_BACKENDS = ["torch", "torch_chunked"]
# (B_img, B_sent, R, T, D): B_img != B_sent, single region/word, one image and one sentence all-masked.
SHAPES = [(4, 6, 5, 7, 9), (1, 3, 1, 1, 4), (5, 2, 8, 3, 17), (3, 3, 20, 20, 33)]


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=rel * scale)


def run(backend: str, regions, region_mask, words, word_mask, grad_scores, **kwargs):
    v = regions.clone().requires_grad_()
    w = words.clone().requires_grad_()
    s = score(v, region_mask, w, word_mask, backend=backend, **kwargs)
    s.backward(grad_scores.to(s.dtype))
    return s, v.grad, w.grad


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_torch_backends_match_reference(backend, shape, dtype, rel):
    regions, region_mask, words, word_mask = ragged_inputs(*shape, dtype=dtype)
    grad = torch.randn(shape[0], shape[1], dtype=torch.float64)
    # A tiny chunk budget forces several blocks along both the image and the sentence axis.
    chunk = 2 * shape[2] * shape[3]
    s, gv, gw = run(backend, regions, region_mask, words, word_mask, grad, chunk_elems=chunk)
    ref_s, ref_gv, ref_gw = reference(regions, region_mask, words, word_mask, grad)
    assert s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert gv.dtype == gw.dtype == dtype
    close(s, ref_s, rel)
    close(gv, ref_gv, rel)
    close(gw, ref_gw, rel)
    assert (s[:, -1] == 0).all() and (gw[-1] == 0).all()  # the sentence without a real word
    if shape[0] > 1:
        assert (s[1] == 0).all() and (gv[1] == 0).all()  # the image without a real region


def test_chunked_bf16_inputs():
    regions, region_mask, words, word_mask = ragged_inputs(4, 5, 6, 7, 24, dtype=torch.bfloat16)
    grad = torch.randn(4, 5, dtype=torch.float64)
    s, gv, gw = run("torch_chunked", regions, region_mask, words, word_mask, grad)
    ref_s, ref_gv, ref_gw = reference(regions, region_mask, words, word_mask, grad)
    assert s.dtype == torch.float32 and gv.dtype == gw.dtype == torch.bfloat16
    close(s, ref_s, 1e-5)
    close(gv, ref_gv, 2**-7)
    close(gw, ref_gw, 2**-7)


@settings(max_examples=25, deadline=None)
@given(n_img=st.integers(1, 5), n_sent=st.integers(1, 5), n_reg=st.integers(1, 6), n_wrd=st.integers(1, 6),
       dim=st.integers(1, 8), chunk=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_chunked_matches_torch_random(n_img, n_sent, n_reg, n_wrd, dim, chunk, seed):
    regions, region_mask, words, word_mask = ragged_inputs(n_img, n_sent, n_reg, n_wrd, dim, seed=seed)
    grad = torch.randn(n_img, n_sent, dtype=torch.float64)
    s, gv, gw = run("torch_chunked", regions, region_mask, words, word_mask, grad, chunk_elems=chunk)
    ref_s, ref_gv, ref_gw = run("torch", regions, region_mask, words, word_mask, grad)
    close(s, ref_s, 1e-10)
    close(gv, ref_gv, 1e-10)
    close(gw, ref_gw, 1e-10)


def test_chunked_never_builds_the_full_similarity_tensor(monkeypatch):
    """Every block's [b_img, b_sent, T, R] tensor stays within chunk_elems, forward and backward."""
    sizes = []
    block_sim = score_mod._block_sim

    def recording(*args):
        sim = block_sim(*args)
        sizes.append(sim.numel())
        return sim

    monkeypatch.setattr(score_mod, "_block_sim", recording)
    n_img, n_sent, n_reg, n_wrd = 30, 40, 6, 5
    regions, region_mask, words, word_mask = ragged_inputs(n_img, n_sent, n_reg, n_wrd, 8, seed=3,
                                                           dtype=torch.float32)
    grad = torch.randn(n_img, n_sent, dtype=torch.float64)
    budget = 600
    s, gv, gw = run("torch_chunked", regions, region_mask, words, word_mask, grad, chunk_elems=budget)
    assert sizes and max(sizes) <= budget < n_img * n_sent * n_reg * n_wrd
    monkeypatch.setattr(score_mod, "_block_sim", block_sim)
    ref = run("torch", regions, region_mask, words, word_mask, grad)
    for got, want in zip((s, gv, gw), ref):
        close(got, want.double(), 1e-5)


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
@pytest.mark.parametrize("n_reg, n_wrd", [(0, 3), (3, 0)])
def test_no_region_or_word_slots(backend, n_reg, n_wrd):
    regions = torch.randn(2, n_reg, 4, requires_grad=True)
    words = torch.randn(3, n_wrd, 4, requires_grad=True)
    s = score(regions, None, words, None, backend=backend)
    s.sum().backward()
    assert s.shape == (2, 3) and not s.any() and not regions.grad.any() and not words.grad.any()


def test_masks_default_to_all_real():
    regions, _, words, _ = ragged_inputs(3, 4, 5, 6, 7, empty_rows=False)
    ones_r, ones_w = torch.ones(3, 5, dtype=torch.bool), torch.ones(4, 6, dtype=torch.bool)
    torch.testing.assert_close(score(regions, None, words, None), naive_score(regions, ones_r, words, ones_w))


def test_word_region_similarity():
    regions, region_mask, words, word_mask = ragged_inputs(3, 4, 5, 6, 7)
    regions.requires_grad_()
    pairs = [(0, 0), (1, 2), (2, 3), (2, 0)]
    out = word_region_similarity(regions, region_mask, words, word_mask, pairs)
    assert out.similarity.shape == (4, 6, 5) and out.best_region.shape == (4, 6)
    for p, (k, j) in enumerate(pairs):
        sim = words[j] @ regions[k].T
        valid = word_mask[j][:, None] & region_mask[k][None, :]
        torch.testing.assert_close(out.similarity[p][valid], sim[valid])
        assert torch.isneginf(out.similarity[p][~valid]).all()
        for t in range(6):
            if word_mask[j, t] and region_mask[k].any():
                real = torch.nonzero(region_mask[k]).flatten()
                assert out.best_region[p, t] == real[sim[t, real].argmax()]
            else:
                assert out.best_region[p, t] == -1
    # The sum of the per-word maxima is the score of the pair.
    best = out.similarity.amax(-1).masked_fill(out.best_region < 0, 0).sum(-1)
    s = naive_score(regions.detach(), region_mask, words, word_mask)
    torch.testing.assert_close(best.detach(), torch.stack([s[k, j] for k, j in pairs]))
    best.sum().backward()
    assert regions.grad is not None


@pytest.mark.parametrize("backend", [None, "torch"])
def test_score_matrix_blocks_and_no_grad(backend):
    regions, region_mask, words, word_mask = ragged_inputs(7, 11, 4, 5, 6, dtype=torch.float32)
    regions.requires_grad_()
    s = score_matrix(regions, region_mask, words, word_mask, backend, block_images=3, block_sentences=4)
    assert not s.requires_grad and s.shape == (7, 11)
    torch.testing.assert_close(s.double(), naive_score(regions.detach().double(), region_mask,
                                                        words.double(), word_mask), rtol=0, atol=1e-4)


def test_shape_errors():
    with pytest.raises(ValueError, match="same D"):
        score(torch.zeros(2, 3, 4), None, torch.zeros(2, 3, 5), None)
    with pytest.raises(ValueError, match="region_mask"):
        score(torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 3, 4), None)
    with pytest.raises(TypeError, match="regions must be a torch.Tensor, got ndarray"):
        score(np.zeros((2, 3, 4), dtype=np.float32), None, torch.zeros(2, 3, 4), None)


def test_masks_may_be_lists_or_arrays_and_d_may_be_zero():
    regions, words = torch.randn(2, 3, 4), torch.randn(3, 2, 4)
    masks = [[1, 1, 0], [1, 0, 0]], np.array([[1, 0], [1, 1], [0, 0]], dtype=bool)
    want = score(regions, torch.tensor(masks[0], dtype=torch.bool), words, torch.from_numpy(masks[1]))
    torch.testing.assert_close(score(regions, *masks[:1], words, masks[1]), want)
    empty = score(torch.randn(2, 3, 0, requires_grad=True), None, torch.randn(3, 2, 0), None)
    assert empty.shape == (2, 3) and not empty.any()


@pytest.mark.parametrize("kwargs", [{"block_images": 0}, {"block_sentences": -1}, {"block_images": 2.5}])
def test_score_matrix_rejects_bad_block_sizes(kwargs):
    with pytest.raises(ValueError, match="expected an integer >= 1"):
        score_matrix(torch.randn(2, 3, 4), None, torch.randn(3, 5, 4), None, **kwargs)


@pytest.mark.parametrize("pairs, match", [([(-1, 0)], "image index -1"),
                                          ([(0, 3)], r"sentence index 3 is outside \[0, 3\)")])
def test_word_region_similarity_rejects_out_of_range_pairs(pairs, match):
    with pytest.raises(ValueError, match=match):
        word_region_similarity(torch.randn(2, 3, 4), None, torch.randn(3, 5, 4), None, pairs)


# --- backend selection: explicit argument > $DSALIGN_SCORE_BACKEND > device type ---

def test_default_backend_by_device(monkeypatch):
    monkeypatch.delenv("DSALIGN_SCORE_BACKEND", raising=False)
    assert resolve_backend(None, torch.device("cpu")) == "torch_chunked"
    monkeypatch.setattr(score_mod, "_triton_importable", lambda: True)
    capability = (9, 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_backend(None, torch.device("cuda"), torch.bfloat16) == "triton"
    assert resolve_backend(None, torch.device("cuda"), torch.float16) == "triton"
    # exact fp32 on the FMA units measured 3x slower than cuBLAS blocks; float64 has no kernel
    assert resolve_backend(None, torch.device("cuda"), torch.float32) == "torch_chunked"
    assert resolve_backend(None, torch.device("cuda"), torch.float64) == "torch_chunked"
    assert resolve_backend("triton", torch.device("cuda"), torch.float32) == "triton"
    capability = (7, 5)  # a T4: no bf16 tensor cores, and the kernel's tiles assume sm_80+
    assert resolve_backend(None, torch.device("cuda"), torch.bfloat16) == "torch_chunked"
    capability = (8, 0)
    monkeypatch.setattr(score_mod, "_triton_importable", lambda: False)
    assert resolve_backend(None, torch.device("cuda"), torch.bfloat16) == "torch_chunked"


def test_env_var_and_explicit_argument(monkeypatch):
    monkeypatch.setenv("DSALIGN_SCORE_BACKEND", "torch")
    assert resolve_backend(None, torch.device("cpu")) == "torch"
    assert resolve_backend("torch_chunked", torch.device("cpu")) == "torch_chunked"
    calls = []
    monkeypatch.setattr(score_mod, "_score_torch", lambda *a: calls.append("torch") or torch.zeros(1, 1))
    score(torch.zeros(1, 1, 2), None, torch.zeros(1, 1, 2), None)
    assert calls == ["torch"]


def test_unknown_backend(monkeypatch):
    with pytest.raises(ValueError, match="unknown score backend 'cuda_magic'.*torch_chunked"):
        score(torch.zeros(1, 1, 2), None, torch.zeros(1, 1, 2), None, backend="cuda_magic")
    monkeypatch.setenv("DSALIGN_SCORE_BACKEND", "nope")
    with pytest.raises(ValueError, match="DSALIGN_SCORE_BACKEND"):
        resolve_backend(None, torch.device("cpu"))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    kernels = pytest.importorskip("dsalign.kernels")
    monkeypatch.setattr(kernels, "interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        score(torch.zeros(1, 1, 2), None, torch.zeros(1, 1, 2), None, backend="triton")


def test_triton_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "dsalign.kernels", None)
    with pytest.raises(ImportError, match="needs the triton package"):
        score(torch.zeros(1, 1, 2), None, torch.zeros(1, 1, 2), None, backend="triton")
