"""Reference Potts-chain Viterbi solvers for tests and benchmarks (no compiled code).

All three follow the tie rule of ``dsalign.ops.viterbi``: the backpointer of (j, m) is the lowest k among the
predecessors achieving ``max_k delta_{j-1}(k) + beta * 1[k == m]``, and the last label is the lowest argmax.
"""

from __future__ import annotations

import itertools

import torch


def viterbi_torch(unary: torch.Tensor, n_words: torch.Tensor, n_regions: torch.Tensor, beta: float) -> torch.Tensor:
    """Vectorised O(N·M²) max-sum over the batch: builds every (m, k) candidate explicitly.

    ``torch.max(dim)`` returns the first maximal index, i.e. the lowest k. Padded regions are set to -inf;
    being the highest indices they never win a tie against a real region.
    """
    B, N, M = unary.shape
    labels = torch.full((B, N), -1, dtype=torch.int64)
    if B == 0 or N == 0 or M == 0:
        return labels
    n_words = n_words.to(torch.int64)
    n_regions = n_regions.to(torch.int64)
    beta_t = torch.tensor(beta, dtype=unary.dtype)
    pad = torch.arange(M) >= n_regions[:, None]
    psi = unary.masked_fill(pad[:, None, :], float("-inf"))
    bonus = torch.zeros(M, M, dtype=unary.dtype)
    bonus.diagonal().fill_(beta_t)  # bonus[m, k] = beta * 1[k == m]

    delta = psi[:, 0]
    last = delta.clone()  # delta at position n_words - 1
    backptrs = [torch.empty(0)]
    for j in range(1, N):
        cand = delta[:, None, :] + bonus  # [B, m, k]
        best, arg = cand.max(dim=-1)
        backptrs.append(arg.to(torch.int32))
        delta = psi[:, j] + best
        ends_here = (n_words - 1 == j)[:, None]
        last = torch.where(ends_here, delta, last)

    cur = last.max(dim=-1).indices
    for j in range(N - 1, -1, -1):
        active = j < n_words
        labels[:, j] = torch.where(active, cur, -1)
        if j > 0:
            cur = torch.where(active, backptrs[j].gather(1, cur[:, None]).squeeze(1).long(), cur)
    return labels


def viterbi_python(unary: torch.Tensor, n_words: torch.Tensor, n_regions: torch.Tensor, beta: float) -> torch.Tensor:
    """Plain per-sequence O(N·M²) loops over Python floats (float64 arithmetic).

    Matches the float32 solvers exactly only when every partial sum is exact in float32 (e.g. small
    dyadic-valued unaries and beta), which is how the benchmark draws its data.
    """
    B, N, M = unary.shape
    labels = torch.full((B, N), -1, dtype=torch.int64)
    rows = unary.tolist()
    nws = n_words.tolist()
    nrs = n_regions.tolist()
    for b in range(B):
        n, r, psi = nws[b], nrs[b], rows[b]
        if n == 0:
            continue
        delta = psi[0][:r]
        backptrs: list[list[int]] = [[]]
        for j in range(1, n):
            new_delta = []
            bp = []
            for m in range(r):
                best_v, best_k = delta[0] + (beta if m == 0 else 0.0), 0
                for k in range(1, r):
                    v = delta[k] + (beta if k == m else 0.0)
                    if v > best_v:
                        best_v, best_k = v, k
                new_delta.append(psi[j][m] + best_v)
                bp.append(best_k)
            delta = new_delta
            backptrs.append(bp)
        a = max(range(r), key=lambda m: (delta[m], -m))
        out = labels[b]
        seq = [a]
        for j in range(n - 1, 0, -1):
            a = backptrs[j][a]
            seq.append(a)
        out[:n] = torch.tensor(seq[::-1])
    return labels


def viterbi_bruteforce(psi: list[list[float]], beta: float) -> list[int]:
    """Exhaustive search over all r**n label sequences of one sentence (psi is [n][r]).

    Among equal energies it returns the sequence that is smallest read from the last word backwards, which
    is exactly what the lowest-index tie rule of Viterbi picks. Exact only for exactly summable values.
    """
    n = len(psi)
    if n == 0:
        return []
    r = len(psi[0])
    best_key = None
    best_seq: tuple[int, ...] = ()
    for seq in itertools.product(range(r), repeat=n):
        energy = sum(psi[j][a] for j, a in enumerate(seq))
        energy += beta * sum(seq[j] == seq[j + 1] for j in range(n - 1))
        key = (-energy, seq[::-1])
        if best_key is None or key < best_key:
            best_key, best_seq = key, seq
    return list(best_seq)
