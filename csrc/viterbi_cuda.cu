// CUDA batched Potts-chain Viterbi: one warp per sequence, lanes over regions (region m = c * 32 + lane for
// chunk c), per-step top-2 by warp-shuffle butterfly, backtrack by lane 0.
// See viterbi.h for the recursion, the tie rule and the backpointer layout.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "viterbi.h"

namespace dsalign {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr unsigned kFullMask = 0xffffffffu;

// Strict order (value desc, index asc); the "no index" sentinel loses to every real index, whatever the
// values (so NaN input cannot leave the sentinel in place and push a label out of range).
template <typename T>
__device__ __forceinline__ bool better(T x, int32_t i, T y, int32_t j) {
  if (i == kNoIndex) return false;
  if (j == kNoIndex) return true;
  return x > y || (x == y && i < j);
}

template <typename T>
struct Top2 {
  T v1, v2;
  int32_t k1, k2;

  __device__ __forceinline__ void reset() {
    v1 = v2 = -std::numeric_limits<T>::infinity();
    k1 = k2 = kNoIndex;
  }

  // Push one element (any index order).
  template <bool kTop2>
  __device__ __forceinline__ void push(T x, int32_t m) {
    if (better(x, m, v1, k1)) {
      if (kTop2) {
        v2 = v1;
        k2 = k1;
      }
      v1 = x;
      k1 = m;
    } else if (kTop2 && better(x, m, v2, k2)) {
      v2 = x;
      k2 = m;
    }
  }

  // Merge with the top-2 of a disjoint index set; after the butterfly every lane holds the warp's top-2.
  template <bool kTop2>
  __device__ __forceinline__ void warp_reduce() {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
      const T o1 = __shfl_xor_sync(kFullMask, v1, offset);
      const int32_t j1 = __shfl_xor_sync(kFullMask, k1, offset);
      T o2 = o1;
      int32_t j2 = kNoIndex;
      if (kTop2) {
        o2 = __shfl_xor_sync(kFullMask, v2, offset);
        j2 = __shfl_xor_sync(kFullMask, k2, offset);
      }
      if (better(o1, j1, v1, k1)) {
        if (kTop2) {
          // New second best: our old best or the other side's second, whichever is better.
          if (better(v1, k1, o2, j2)) {
            v2 = v1;
            k2 = k1;
          } else {
            v2 = o2;
            k2 = j2;
          }
        }
        v1 = o1;
        k1 = j1;
      } else if (kTop2 && better(o1, j1, v2, k2)) {
        v2 = o1;
        k2 = j1;
      }
    }
  }
};

// Per-step record in `rec` (int32 words): [k1, k2, stay bits of regions 0..31, 32..63, ...].
template <typename T, int kChunks, bool kTop2>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    viterbi_warp_kernel(const T* __restrict__ unary, const int64_t* __restrict__ n_words,
                        const int64_t* __restrict__ n_regions, int64_t B, int64_t N, int64_t M, T beta,
                        int32_t* __restrict__ scratch, int64_t rec_words, int64_t* __restrict__ labels) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; b < B;
       b += warps_total) {
    const int64_t n = n_words[b];
    const int32_t r = static_cast<int32_t>(n_regions[b]);
    int64_t* out = labels + b * N;
    for (int64_t j = n + lane; j < N; j += kWarp) out[j] = -1;
    if (n == 0) continue;  // warp-uniform

    const T* psi = unary + b * N * M;
    int32_t* rec = scratch + b * N * rec_words;
    const int chunks = (r + kWarp - 1) / kWarp;  // warp-uniform, <= kChunks
    T delta[kChunks];
    Top2<T> top;
    top.reset();
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      if (c >= chunks) break;
      const int32_t m = c * kWarp + lane;
      delta[c] = m < r ? psi[m] : -std::numeric_limits<T>::infinity();
      if (m < r) top.template push<kTop2>(delta[c], m);
    }
    top.template warp_reduce<kTop2>();

    for (int64_t j = 1; j < n; ++j) {
      const T* row = psi + j * M;
      int32_t* step = rec + j * rec_words;
      if (lane == 0) {
        step[0] = top.k1;
        step[1] = top.k2;
      }
      Top2<T> next;
      next.reset();
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        if (c >= chunks) break;
        const int32_t m = c * kWarp + lane;
        const bool valid = m < r;
        const T s = delta[c] + beta;
        const bool on_k1 = kTop2 && m == top.k1;
        const T vo = on_k1 ? top.v2 : top.v1;
        const int32_t ko = on_k1 ? top.k2 : top.k1;
        const bool keep = s > vo || (s == vo && m < ko) || ko == kNoIndex;
        const unsigned bits = __ballot_sync(kFullMask, valid && keep);
        if (lane == 0) step[2 + c] = static_cast<int32_t>(bits);
        if (valid) {
          const T d = row[m] + (keep ? s : vo);
          delta[c] = d;
          next.template push<kTop2>(d, m);
        }
      }
      next.template warp_reduce<kTop2>();
      top = next;
    }

    if (lane == 0) {
      int32_t a = top.k1;
      out[n - 1] = a;
      for (int64_t j = n - 1; j > 0; --j) {
        const int32_t* step = rec + j * rec_words;
        const unsigned bits = static_cast<unsigned>(step[2 + a / kWarp]);
        if (!((bits >> (a % kWarp)) & 1u)) {
          a = (kTop2 && a == step[0]) ? step[1] : step[0];
        }
        out[j - 1] = a;
      }
    }
  }
}

template <typename T, int kChunks>
void launch(const at::Tensor& unary, const at::Tensor& n_words, const at::Tensor& n_regions, double beta,
            at::Tensor& scratch, int64_t rec_words, at::Tensor& labels, cudaStream_t stream) {
  const int64_t B = unary.size(0);
  const int64_t blocks = std::min<int64_t>((B + kWarpsPerBlock - 1) / kWarpsPerBlock, int64_t{1} << 20);
  const dim3 grid(static_cast<unsigned>(blocks));
  const dim3 block(kWarp * kWarpsPerBlock);
  const T b = static_cast<T>(beta);
  if (beta >= 0.0) {
    viterbi_warp_kernel<T, kChunks, false><<<grid, block, 0, stream>>>(
        unary.data_ptr<T>(), n_words.data_ptr<int64_t>(), n_regions.data_ptr<int64_t>(), B, unary.size(1),
        unary.size(2), b, scratch.data_ptr<int32_t>(), rec_words, labels.data_ptr<int64_t>());
  } else {
    viterbi_warp_kernel<T, kChunks, true><<<grid, block, 0, stream>>>(
        unary.data_ptr<T>(), n_words.data_ptr<int64_t>(), n_regions.data_ptr<int64_t>(), B, unary.size(1),
        unary.size(2), b, scratch.data_ptr<int32_t>(), rec_words, labels.data_ptr<int64_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor viterbi_cuda_impl(const at::Tensor& unary, const at::Tensor& n_words, const at::Tensor& n_regions,
                             double beta) {
  const c10::cuda::CUDAGuard guard(unary.device());
  const int64_t B = unary.size(0);
  const int64_t N = unary.size(1);
  const int64_t M = unary.size(2);
  constexpr int64_t kMaxRegions = 32 * kWarp;
  TORCH_CHECK(M <= kMaxRegions, "dsalign::viterbi (CUDA): at most ", kMaxRegions, " regions per image, got M = ",
              M, "; run it on CPU tensors instead");
  at::Tensor labels = at::empty({B, N}, unary.options().dtype(at::kLong));
  if (B == 0 || N == 0) return labels;
  const int64_t chunks = std::max<int64_t>(1, (M + kWarp - 1) / kWarp);
  const int64_t rec_words = 2 + chunks;
  at::Tensor scratch = at::empty({B, N, rec_words}, unary.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(unary.device().index()).stream();

  AT_DISPATCH_FLOATING_TYPES(unary.scalar_type(), "dsalign_viterbi_cuda", [&] {
    if (chunks <= 1) {
      launch<scalar_t, 1>(unary, n_words, n_regions, beta, scratch, rec_words, labels, stream);
    } else if (chunks <= 2) {
      launch<scalar_t, 2>(unary, n_words, n_regions, beta, scratch, rec_words, labels, stream);
    } else if (chunks <= 4) {
      launch<scalar_t, 4>(unary, n_words, n_regions, beta, scratch, rec_words, labels, stream);
    } else if (chunks <= 8) {
      launch<scalar_t, 8>(unary, n_words, n_regions, beta, scratch, rec_words, labels, stream);
    } else {
      launch<scalar_t, 32>(unary, n_words, n_regions, beta, scratch, rec_words, labels, stream);
    }
  });
  return labels;
}

}  // namespace dsalign
