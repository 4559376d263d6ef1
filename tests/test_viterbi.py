"""Potts-chain Viterbi op (dsalign._C) against exhaustive search and O(N·M²) references, plus snippets.

Integer-valued unaries make every partial sum exact and create many exact ties, so agreement must be bit for
bit and the lowest-index tie rule is exercised everywhere (last word, stay-vs-jump, jump source).
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from viterbi_reference import viterbi_bruteforce, viterbi_python, viterbi_torch

from dsalign.ops import snippets, viterbi

# The module, not the function of the same name that dsalign.ops re-exports.
vmod = importlib.import_module("dsalign.ops.viterbi")

HAS_EXT = vmod.extension_available()
needs_ext = pytest.mark.skipif(
    not HAS_EXT, reason="dsalign._C is not built (pip install --no-build-isolation -e .); op tests skipped"
)
BETAS = [0.0, 0.5, 1.0, 2.0, 3.0, -1.0, -2.5]


def _ragged(g: torch.Generator, B: int, N: int, M: int, lo: int = -2, hi: int = 2, dtype=torch.float32):
    """Integer unaries in [lo, hi] with random n_words in [0, N] and n_regions in [1, M]."""
    unary = torch.randint(lo, hi + 1, (B, N, M), generator=g).to(dtype)
    n_words = torch.randint(0, N + 1, (B,), generator=g)
    n_regions = torch.randint(1, M + 1, (B,), generator=g)
    return unary, n_words, n_regions


def _lowest_argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum along the last dim, spelled out (no reliance on torch tie behaviour)."""
    idx = torch.arange(x.shape[-1]).expand_as(x)
    return torch.where(x == x.amax(-1, keepdim=True), idx, x.shape[-1]).amin(-1)


# ---------------------------------------------------------------- references agree with exhaustive search


@pytest.mark.parametrize("beta", [0.0, 1.0, -1.0, 1.5])
def test_references_match_bruteforce(beta: float) -> None:
    g = torch.Generator().manual_seed(1)
    unary, n_words, n_regions = _ragged(g, 60, 4, 3, dtype=torch.float64)
    ref = viterbi_torch(unary, n_words, n_regions, beta)
    assert torch.equal(viterbi_python(unary, n_words, n_regions, beta), ref)
    for b in range(unary.shape[0]):
        n, r = int(n_words[b]), int(n_regions[b])
        want = viterbi_bruteforce(unary[b, :n, :r].tolist(), beta)
        assert ref[b, :n].tolist() == want, b


# ---------------------------------------------------------------- the op


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", BETAS)
def test_matches_bruteforce_small(beta: float, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    unary, n_words, n_regions = _ragged(g, 70, 5, 4, dtype=dtype)
    out = viterbi(unary, n_words, n_regions, beta)
    assert out.dtype == torch.int64 and out.shape == (70, 5)
    for b in range(unary.shape[0]):
        n, r = int(n_words[b]), int(n_regions[b])
        assert out[b, :n].tolist() == viterbi_bruteforce(unary[b, :n, :r].tolist(), beta), b
        assert (out[b, n:] == -1).all()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", BETAS)
def test_matches_reference_many_ties(beta: float, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    # Ragged regions (masked kernel) and all-equal regions (unmasked kernel); B not a multiple of the group.
    unary, n_words, n_regions = _ragged(g, 1201, 12, 9, dtype=dtype)
    for nr in (n_regions, torch.full_like(n_regions, 9)):
        out = viterbi(unary, n_words, nr, beta)
        assert torch.equal(out, viterbi_torch(unary, n_words, nr, beta))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [0.0, 0.37, 1.3, -0.8])
def test_matches_reference_continuous(beta: float, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    B, N, M = 800, 15, 20
    unary = torch.randn(B, N, M, generator=g, dtype=dtype)
    n_words = torch.randint(0, N + 1, (B,), generator=g)
    n_regions = torch.randint(1, M + 1, (B,), generator=g)
    assert torch.equal(viterbi(unary, n_words, n_regions, beta), viterbi_torch(unary, n_words, n_regions, beta))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_baseline_simd_build_matches(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """x86-64 has an AVX2 and a baseline (SSE2) build of the CPU kernel; the switch forces the baseline one."""
    g = torch.Generator().manual_seed(15)
    unary, n_words, n_regions = _ragged(g, 601, 9, 7, dtype=dtype)
    monkeypatch.setenv("DSALIGN_VITERBI_NO_AVX2", "1")
    for nr in (n_regions, torch.full_like(n_regions, 7)):
        for beta in (0.0, 1.0, -1.0):
            assert torch.equal(viterbi(unary, n_words, nr, beta), viterbi_torch(unary, n_words, nr, beta))


@needs_ext
@pytest.mark.parametrize("M", [1, 2, 3, 5, 33])
def test_region_counts(M: int) -> None:
    g = torch.Generator().manual_seed(5)
    unary, n_words, n_regions = _ragged(g, 257, 7, M, lo=-1, hi=1)
    for beta in (0.0, 1.0, -1.0):
        assert torch.equal(viterbi(unary, n_words, n_regions, beta), viterbi_torch(unary, n_words, n_regions, beta))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_beta_zero_is_per_word_argmax(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(6)
    unary, n_words, n_regions = _ragged(g, 500, 10, 8, lo=0, hi=2, dtype=dtype)
    out = viterbi(unary, n_words, n_regions, 0.0)
    pad = torch.arange(8) >= n_regions[:, None, None]
    want = _lowest_argmax(unary.masked_fill(pad, float("-inf")))
    want = torch.where(torch.arange(10) < n_words[:, None], want, -1)
    assert torch.equal(out, want)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_beta_gives_one_region_per_sentence(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(7)
    # |unary| <= 3 and N = 10: switching can gain at most 60 < beta, and all sums stay exact in float32.
    unary, n_words, n_regions = _ragged(g, 500, 10, 8, lo=-3, hi=3, dtype=dtype)
    out = viterbi(unary, n_words, n_regions, 1000.0)
    word_ok = torch.arange(10) < n_words[:, None]
    totals = (unary * word_ok[:, :, None]).sum(1).masked_fill(torch.arange(8) >= n_regions[:, None], float("-inf"))
    want = torch.where(word_ok, _lowest_argmax(totals)[:, None], -1)
    assert torch.equal(out, want)


@needs_ext
def test_ragged_lengths_edge_cases() -> None:
    g = torch.Generator().manual_seed(8)
    N, M = 6, 5
    cases = [(n, r) for n in (0, 1, N) for r in (1, 2, M)]
    unary = torch.randint(-2, 3, (len(cases), N, M), generator=g).float()
    n_words = torch.tensor([c[0] for c in cases])
    n_regions = torch.tensor([c[1] for c in cases])
    for beta in (0.0, 2.0, -2.0):
        out = viterbi(unary, n_words, n_regions, beta)
        assert torch.equal(out, viterbi_torch(unary, n_words, n_regions, beta))
        for b, (n, r) in enumerate(cases):
            assert (out[b, n:] == -1).all()
            assert ((out[b, :n] >= 0) & (out[b, :n] < r)).all()


@needs_ext
def test_empty_shapes() -> None:
    none = torch.zeros(0, dtype=torch.long)
    assert viterbi(torch.zeros(0, 4, 3), none, none, 1.0).shape == (0, 4)
    out = viterbi(torch.zeros(2, 0, 3), [0, 0], [1, 1], 1.0)
    assert out.shape == (2, 0)
    out = viterbi(torch.zeros(2, 3, 0), [0, 0], [0, 0], 1.0)
    assert torch.equal(out, torch.full((2, 3), -1))


@needs_ext
def test_input_forms() -> None:
    g = torch.Generator().manual_seed(9)
    unary = torch.randn(16, 8, 5, generator=g, dtype=torch.float64)
    n_words = torch.randint(0, 9, (16,), generator=g)
    n_regions = torch.randint(1, 6, (16,), generator=g)
    want = viterbi_torch(unary, n_words, n_regions, 0.5)
    # Python lists, int32 lengths, a non-contiguous view, an input that requires grad.
    assert torch.equal(viterbi(unary, n_words.tolist(), n_regions.tolist(), 0.5), want)
    assert torch.equal(viterbi(unary, n_words.int(), n_regions.short(), 0.5), want)
    view = unary.transpose(1, 2).contiguous().transpose(1, 2)
    assert not view.is_contiguous()
    assert torch.equal(viterbi(view, n_words, n_regions, 0.5), want)
    assert torch.equal(viterbi(unary.clone().requires_grad_(), n_words, n_regions, 0.5), want)


@needs_ext
def test_thread_count_does_not_change_result() -> None:
    g = torch.Generator().manual_seed(10)
    unary, n_words, n_regions = _ragged(g, 4000, 10, 10)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = viterbi(unary, n_words, n_regions, 1.0)
        torch.set_num_threads(max(2, threads))
        many = viterbi(unary, n_words, n_regions, 1.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@needs_ext
def test_negative_infinity_unaries_match_reference() -> None:
    g = torch.Generator().manual_seed(11)
    unary, n_words, n_regions = _ragged(g, 1000, 8, 6, lo=-1, hi=1)
    unary[torch.rand(unary.shape, generator=g) < 0.3] = float("-inf")
    unary[:5] = float("-inf")  # whole sentences at -inf: every candidate ties
    for beta in (0.0, 1.0, -1.0):
        assert torch.equal(viterbi(unary, n_words, n_regions, beta), viterbi_torch(unary, n_words, n_regions, beta))


@needs_ext
def test_nan_unaries_keep_labels_in_range() -> None:
    g = torch.Generator().manual_seed(12)
    unary, n_words, n_regions = _ragged(g, 300, 8, 6)
    unary[torch.rand(unary.shape, generator=g) < 0.2] = float("nan")
    unary[:3] = float("nan")
    for beta in (0.0, 1.0, -1.0):
        out = viterbi(unary, n_words, n_regions, beta)
        word_ok = torch.arange(8) < n_words[:, None]
        assert torch.equal(out < 0, ~word_ok)
        assert (out < n_regions[:, None]).all()


@needs_ext
def test_meta_shape() -> None:
    out = torch.ops.dsalign.viterbi(
        torch.empty(3, 4, 5, device="meta"),
        torch.empty(3, dtype=torch.long, device="meta"),
        torch.empty(3, dtype=torch.long, device="meta"),
        1.0,
    )
    assert out.shape == (3, 4) and out.dtype == torch.int64


@needs_ext
@pytest.mark.parametrize(
    ("unary", "n_words", "n_regions", "beta", "match"),
    [
        (torch.zeros(2, 3), [1, 1], [1, 1], 1.0, r"unary must be 3-D"),
        (torch.zeros(2, 3, 4, dtype=torch.int32), [1, 1], [1, 1], 1.0, r"float32 or float64"),
        (torch.zeros(2, 3, 4, dtype=torch.float16), [1, 1], [1, 1], 1.0, r"float32 or float64"),
        (torch.zeros(2, 3, 4), [1, 1, 1], [1, 1], 1.0, r"n_words must be 1-D with B"),
        (torch.zeros(2, 3, 4), [1, 1], [[1, 1]], 1.0, r"n_regions must be 1-D with B"),
        (torch.zeros(2, 3, 4), torch.ones(2), [1, 1], 1.0, r"n_words must be an integer tensor"),
        (torch.zeros(2, 3, 4), [1, 4], [1, 1], 1.0, r"n_words\[1\] = 4 is outside \[0, N\] with N = 3"),
        (torch.zeros(2, 3, 4), [-1, 1], [1, 1], 1.0, r"n_words\[0\] = -1 is outside"),
        (torch.zeros(2, 3, 4), [1, 1], [1, 5], 1.0, r"n_regions\[1\] = 5 is outside \[0, M\] with M = 4"),
        (torch.zeros(2, 3, 4), [1, 2], [1, 0], 1.0, r"n_regions\[1\] = 0 but n_words\[1\] = 2"),
        (torch.zeros(2, 3, 4), [1, 1], [1, 1], float("inf"), r"beta must be finite"),
        (torch.zeros(2, 3, 4), [1, 1], [1, 1], float("nan"), r"beta must be finite"),
    ],
)
def test_bad_input_errors(unary, n_words, n_regions, beta, match) -> None:
    with pytest.raises(RuntimeError, match=match):
        viterbi(unary, n_words, n_regions, beta)


@needs_ext
@pytest.mark.parametrize("n_words", [[4.5, 2], [True, False], "ab"])
def test_lengths_must_be_integers(n_words) -> None:
    """4.5 words must not be truncated to 4 in silence."""
    with pytest.raises(TypeError, match="n_words must be an integer tensor or a sequence of ints"):
        viterbi(torch.zeros(2, 5, 3), n_words, [3, 3], 1.0)


@needs_ext
def test_zero_regions_allowed_for_empty_sentences() -> None:
    out = viterbi(torch.zeros(2, 3, 4), [0, 2], [0, 4], 1.0)
    assert out[0].tolist() == [-1, -1, -1] and out[1, 2] == -1


@pytest.mark.skipif(not (HAS_EXT and torch.cuda.is_available()), reason="needs a CUDA device and dsalign._C")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("M", [1, 20, 32, 33, 64, 100, 300])
def test_cuda_matches_cpu(M: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(13)
    unary, n_words, n_regions = _ragged(g, 1500, 17, M, dtype=dtype)
    for beta in BETAS:
        for nr in (n_regions, torch.full_like(n_regions, M)):
            cpu = viterbi(unary, n_words, nr, beta)
            gpu = viterbi(unary.cuda(), n_words.cuda(), nr.cuda(), beta)
            assert gpu.device.type == "cuda"
            assert torch.equal(gpu.cpu(), cpu), (beta, M)


# ---------------------------------------------------------------- without the extension


def test_missing_extension_error_says_how_to_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmod, "_ext_loaded", False)
    monkeypatch.setattr(vmod, "_ext_error", None)
    monkeypatch.setitem(sys.modules, "dsalign._C", None)  # makes `import dsalign._C` fail
    assert not vmod.extension_available()
    with pytest.raises(RuntimeError, match=r"dsalign\._C.*pip install --no-build-isolation"):
        viterbi(torch.zeros(1, 2, 3), [2], [3], 1.0)


# ---------------------------------------------------------------- snippets


def test_snippets_hand_made() -> None:
    labels = torch.tensor(
        [
            [0, 0, 1, 1, 1, 2, -1],
            [3, 3, 3, 3, 3, 3, 3],
            [-1, -1, -1, -1, -1, -1, -1],
            [1, 2, 1, 2, 2, -1, -1],
            [4, -1, -1, -1, -1, -1, -1],
        ]
    )
    want = [
        [(0, 0, 2), (1, 2, 5), (2, 5, 6)],
        [(3, 0, 7)],
        [],
        [(1, 0, 1), (2, 1, 2), (1, 2, 3), (2, 3, 5)],
        [(4, 0, 1)],
    ]
    assert snippets(labels, torch.tensor([6, 7, 0, 5, 1])) == want
    assert snippets(labels) == want  # lengths from the -1 padding
    assert snippets(labels, [2, 3, 0, 5, 1])[:2] == [[(0, 0, 2)], [(3, 0, 3)]]
    assert snippets(torch.zeros(0, 4, dtype=torch.long)) == []


def test_snippets_reassemble_labels() -> None:
    g = torch.Generator().manual_seed(14)
    labels = torch.randint(0, 3, (200, 9), generator=g)
    n_words = torch.randint(0, 10, (200,), generator=g)
    for row, n, runs in zip(labels.tolist(), n_words.tolist(), snippets(labels, n_words)):
        assert [a for a, s, e in runs for _ in range(s, e)] == row[:n]
        assert all(e0 == s1 and a0 != a1 for (a0, _, e0), (a1, s1, _) in zip(runs, runs[1:]))


def test_snippets_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        snippets(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="entries for 2 label rows"):
        snippets(torch.zeros(2, 3, dtype=torch.long), [1])
    with pytest.raises(ValueError, match="outside"):
        snippets(torch.zeros(2, 3, dtype=torch.long), [1, 4])
