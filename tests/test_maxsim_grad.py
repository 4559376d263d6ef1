"""The one-hot GEMM backward of MaxSim (the Triton backend's default backward) against the float64 reference,
whole and in blocks: a budget too small for one image's P must still give every gradient row."""

from __future__ import annotations

import pytest
import torch
from score_reference import ragged_inputs, reference

from dsalign.ops import word_region_similarity
from dsalign.ops.maxsim_grad import _block_sizes, onehot_gemm_grads


def argmax_of(regions, region_mask, words, word_mask) -> torch.Tensor:
    """[B_img, B_sent, T] best region per word, -1 where the term is not in S (what the kernel saves)."""
    n_img, n_sent = regions.shape[0], words.shape[0]
    pairs = [(k, j) for k in range(n_img) for j in range(n_sent)]
    best = word_region_similarity(regions, region_mask, words, word_mask, pairs).best_region
    return best.view(n_img, n_sent, -1).to(torch.int8)


def term_bytes(n_reg: int, elem: int) -> int:
    return (n_reg + 1) * elem + 9


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("images_per_block", [1, 3, None])  # None: one block for everything, P shared
def test_gradients_match_reference_whole_and_in_blocks(dtype, images_per_block):
    n_img, n_sent, n_reg, n_wrd, dim = 7, 6, 9, 5, 24
    regions, region_mask, words, word_mask = ragged_inputs(n_img, n_sent, n_reg, n_wrd, dim, dtype=dtype, seed=4)
    grad = torch.randn(n_img, n_sent, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    budget = (1 << 30) if images_per_block is None else (
        images_per_block * n_sent * n_wrd * term_bytes(n_reg, regions.element_size()))
    assert _block_sizes(n_img, n_sent, n_reg, n_wrd, regions.element_size(), budget)[0] == (
        images_per_block or n_img)
    argmax = argmax_of(regions, region_mask, words, word_mask)
    grad_v, grad_w = onehot_gemm_grads(regions, words, grad, argmax, budget)
    _, want_v, want_w = reference(regions, region_mask, words, word_mask, grad)
    # bf16: dL/dS rounded to bf16 in P and the gradients stored in bf16 (two roundings of <= 2^-8 each).
    tol = 1e-12 if dtype == torch.float64 else 2**-6
    for got, want in ((grad_v, want_v), (grad_w, want_w)):
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * max(want.abs().max().item(), 1.0))
    assert (grad_v[1] == 0).all() and (grad_w[-1] == 0).all()  # image without regions, sentence without words


def test_one_gradient_only_and_empty_inputs():
    regions, region_mask, words, word_mask = ragged_inputs(3, 4, 5, 6, 8, seed=1)
    argmax = argmax_of(regions, region_mask, words, word_mask)
    grad = torch.randn(3, 4, dtype=torch.float64)
    _, want_v, want_w = reference(regions, region_mask, words, word_mask, grad)
    grad_v, none = onehot_gemm_grads(regions, words, grad, argmax, 1, need_words=False)
    assert none is None and torch.allclose(grad_v, want_v)
    none, grad_w = onehot_gemm_grads(regions, words, grad, argmax, 1 << 20, need_regions=False)
    assert none is None and torch.allclose(grad_w, want_w)
    empty = torch.zeros(0, 5, 8, dtype=torch.float64)
    grad_v, grad_w = onehot_gemm_grads(empty, words, grad[:0], argmax[:0], 1 << 20)
    assert grad_v.shape == (0, 5, 8) and (grad_w == 0).all()


def test_each_one_hot_block_fits_the_budget(monkeypatch):
    """The P operand of every GEMM, as the BLAS receives it, stays within the budget unless one image's or one
    sentence's P alone exceeds it (the smallest unit of work), and the blocks cover every gradient row."""
    n_img, n_sent, n_reg, n_wrd, dim = 9, 7, 6, 5, 8
    regions, region_mask, words, word_mask = ragged_inputs(n_img, n_sent, n_reg, n_wrd, dim, seed=2)
    argmax = argmax_of(regions, region_mask, words, word_mask)
    grad = torch.randn(n_img, n_sent, dtype=torch.float64)
    _, want_v, want_w = reference(regions, region_mask, words, word_mask, grad)
    products = []
    real_mm = torch.mm

    def recording_mm(p, x, **kwargs):
        products.append(p.numel() * p.element_size())
        return real_mm(p, x, **kwargs)

    monkeypatch.setattr(torch, "mm", recording_mm)
    one_image, one_sentence = n_reg * n_sent * n_wrd * 8, n_img * n_reg * n_wrd * 8  # float64 P
    for budget in (1, one_image * 2 + 7, one_image * 5, 1 << 30):
        products.clear()
        grad_v, grad_w = onehot_gemm_grads(regions, words, grad, argmax, budget)
        assert torch.allclose(grad_v, want_v) and torch.allclose(grad_w, want_w)
        assert all(size <= max(budget, one_image, one_sentence) for size in products), (budget, products)
        assert len(products) >= (2 if budget == 1 << 30 else 3)
    assert len(products) == 2  # the whole P once, for both gradients
