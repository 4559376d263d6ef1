// Batched Potts-chain Viterbi (max-sum) shared declarations.
//
// Model (Karpathy & Fei-Fei 2015, Eqs. 10-12), per sequence b with n = n_words[b] words and
// r = n_regions[b] regions:
//   E(a) = sum_j unary[b, j, a_j] + beta * sum_j 1[a_j == a_{j+1}],   a_j in [0, r),  maximised.
//
// Recursion, O(n * r) per sequence instead of O(n * r^2):
//   delta_j(m) = unary_j(m) + max_k cand_j(m, k),  cand_j(m, k) = delta_{j-1}(k) + beta * 1[k == m]
//   max_k cand_j(m, k) = max(delta_{j-1}(m) + beta, max_{k != m} delta_{j-1}(k))
// The max over k != m is the best of delta_{j-1} unless m is its argmax, in which case it is the second best,
// so a per-step top-2 (value desc, index asc) makes the recursion exact for any finite beta; for beta >= 0 the
// second best is never needed (staying on the argmax always wins) and a top-1 suffices.
//
// Tie rule (identical to an O(n * r^2) reference): the backpointer of (j, m) is the lowest k among all k that
// achieve max_k cand_j(m, k); the last label is the lowest m achieving max_m delta_{n-1}(m). With this rule the
// result is, among all optimal label sequences, the one that is smallest when compared from the last word
// backwards.
//
// Backpointers are stored compactly as one "stayed" flag per (j, m) plus the per-step top-2 indices (k1, k2)
// of delta_{j-1}: bp(j, m) = stayed ? m : (m == k1 ? k2 : k1). On CUDA the flags are bits (one warp ballot per
// 32 regions); on CPU they are mask words in per-thread scratch, sized for one group of sentences.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <limits>

namespace dsalign {

// "No index" sentinel in top-2 bookkeeping: worse than any real index.
constexpr int32_t kNoIndex = std::numeric_limits<int32_t>::max();

// CPU kernel. Inputs already validated: unary contiguous [B, N, M] float/double, n_words/n_regions contiguous
// int64 [B] on CPU. Returns int64 [B, N] labels, -1 past n_words.
at::Tensor viterbi_cpu_impl(const at::Tensor& unary, const at::Tensor& n_words, const at::Tensor& n_regions,
                            double beta);

#ifdef WITH_CUDA
// CUDA kernel, same contract with all tensors on one CUDA device.
at::Tensor viterbi_cuda_impl(const at::Tensor& unary, const at::Tensor& n_words, const at::Tensor& n_regions,
                             double beta);
#endif

}  // namespace dsalign
