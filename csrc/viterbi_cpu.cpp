// CPU batched Potts-chain Viterbi. See viterbi.h for the recursion, the tie rule and the backpointer layout.
//
// Why it looks like this: the argmax over the regions of one sentence does not vectorise, so sentences are
// processed in groups of G = kUnroll * W with one SIMD lane per sentence. Within a group every (word, region)
// step is a branch-free elementwise update of a few vectors (the per-step top-2 becomes per-lane selects);
// rows of unaries are transposed 4x4 (2x2 for double) into lane order first. Groups are spread over threads
// with at::parallel_for, and on x86-64 an AVX2 build of the same code is picked at run time. Ragged groups run
// to the group's longest sentence and widest image: padded regions are masked out (value -inf, never pushed
// into the top-2) and each lane remembers its own last word. Backpointers live in per-thread scratch: one
// "stayed" mask word per (word, region, lane) plus the per-step top-2 indices.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "viterbi.h"

#if defined(__GNUC__) && !defined(__clang__)
// The vector helpers are internal and always inlined; the "ABI changes with AVX" note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define DSALIGN_ALWAYS_INLINE __attribute__((always_inline)) inline

// On x86-64 the kernel is compiled twice, for baseline SSE2 and for AVX2, and picked at run time.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DSALIGN_X86_AVX2_DISPATCH 1
#else
#define DSALIGN_X86_AVX2_DISPATCH 0
#endif

namespace dsalign {
namespace {

// 16-byte vectors are native everywhere (SSE2 on x86-64, NEON on arm64); wider ones would be split up and
// scalarised by the compiler without -mavx.
constexpr int kVectorBytes = 16;

// Same-width integer for indices, so index and value selects line up in SIMD registers.
template <typename T>
using Index = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;

template <typename T>
constexpr int kLanesOf = kVectorBytes / static_cast<int>(sizeof(T));

// W-lane vectors via GCC/Clang vector extensions (lowered to SSE2/NEON, no intrinsics). Comparisons give -1/0
// masks of the same-width integer type, and `mask ? a : b` selects per lane.
template <typename T>
struct Simd {
  static constexpr int W = kLanesOf<T>;
  using I = Index<T>;
  typedef T V __attribute__((vector_size(sizeof(T) * W)));
  typedef I VI __attribute__((vector_size(sizeof(I) * W)));
  static constexpr I kNone = std::numeric_limits<I>::max();

  static inline V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline VI load(const I* p) {
    VI v;
    std::memcpy(&v, p, sizeof(VI));
    return v;
  }
  static inline void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static inline void store(I* p, VI v) { std::memcpy(p, &v, sizeof(VI)); }
  static inline V splat(T x) { return V{} + x; }
  static inline VI splat(I x) { return VI{} + x; }
  // (a > b) ? a : b: exactly the semantics of x86 maxps/maxpd (b on NaN), so the compiler may use them.
  static inline V max(V a, V b) { return a > b ? a : b; }

  // out[i * stride + w] = rows[w][i] for i, w < W: a W x W transpose of W consecutive values of W rows.
  static inline void transpose(const T* const* rows, T* out, int64_t stride) {
#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
    if constexpr (W == 4) {
      const V a = load(rows[0]), b = load(rows[1]), c = load(rows[2]), d = load(rows[3]);
      const V ab_lo = __builtin_shufflevector(a, b, 0, 4, 1, 5);
      const V ab_hi = __builtin_shufflevector(a, b, 2, 6, 3, 7);
      const V cd_lo = __builtin_shufflevector(c, d, 0, 4, 1, 5);
      const V cd_hi = __builtin_shufflevector(c, d, 2, 6, 3, 7);
      store(out, __builtin_shufflevector(ab_lo, cd_lo, 0, 1, 4, 5));
      store(out + stride, __builtin_shufflevector(ab_lo, cd_lo, 2, 3, 6, 7));
      store(out + 2 * stride, __builtin_shufflevector(ab_hi, cd_hi, 0, 1, 4, 5));
      store(out + 3 * stride, __builtin_shufflevector(ab_hi, cd_hi, 2, 3, 6, 7));
      return;
    } else if constexpr (W == 2) {
      const V a = load(rows[0]), b = load(rows[1]);
      store(out, __builtin_shufflevector(a, b, 0, 2));
      store(out + stride, __builtin_shufflevector(a, b, 1, 3));
      return;
    }
#endif
    for (int i = 0; i < W; ++i) {
      for (int w = 0; w < W; ++w) out[i * stride + w] = rows[w][i];
    }
  }
};

// Independent vectors per group: the per-region top-2 update is a serial compare-select chain, so a few
// vectors in flight hide its latency. A group is kUnroll * W sentences.
constexpr int kUnroll = 2;

template <typename T>
constexpr int kGroupOf = kUnroll * kLanesOf<T>;

template <typename T>
struct Scratch {
  static constexpr int G = kGroupOf<T>;
  std::vector<T> delta;         // [M][G] delta_j of the group's sentences
  std::vector<T> row;           // [M][G] unary_j of the group's sentences (transposed)
  std::vector<Index<T>> stay;   // [N][M][G] "stayed" masks (-1/0; a word per flag keeps the store one instruction)
  std::vector<Index<T>> best;   // [N][2][G] top-2 indices of delta_{j-1}
  std::vector<T> zeros;         // [M] source row for idle lanes and finished sentences

  Scratch(int64_t N, int64_t M)
      : delta(M * G), row(M * G), stay(N * M * G), best(N * 2 * G), zeros(M, T(0)) {}
};

// Per-lane running top-2 under (value desc, index asc). Region 0 is pushed first with `first`, then regions in
// ascending order with `push`, so a later region wins only on a strictly larger value; the second slot can be
// empty (index kNone) and loses to any real region whatever the values (NaN included), so labels stay in range.
template <typename T, bool kTop2>
struct LaneTop {
  using S = Simd<T>;
  typename S::V v1, v2;
  typename S::VI k1, k2;

  inline void first(typename S::V d) {
    v1 = d;
    k1 = typename S::VI{};
    if constexpr (kTop2) {
      v2 = S::splat(-std::numeric_limits<T>::infinity());
      k2 = S::splat(S::kNone);
    }
  }

  template <bool kMasked>
  inline void push(typename S::VI valid, typename S::V d, typename S::VI m) {
    typename S::VI gt1 = d > v1;
    if constexpr (kMasked) gt1 &= valid;
    if constexpr (kTop2) {
      typename S::VI gt2 = ~gt1 & ((d > v2) | (k2 == S::splat(S::kNone)));
      if constexpr (kMasked) gt2 &= valid;
      v2 = gt1 ? v1 : (gt2 ? d : v2);
      k2 = gt1 ? k1 : (gt2 ? m : k2);
    }
    if constexpr (kMasked) {
      v1 = gt1 ? d : v1;
    } else {
      v1 = S::max(d, v1);  // same as gt1 ? d : v1
    }
    k1 = gt1 ? m : k1;
  }
};

// One group of G sentences. kMasked: the lanes have different region counts, so regions past a lane's count
// are masked out (value -inf, never pushed); without it every lane uses all r_max regions.
template <typename T, bool kTop2, bool kMasked>
DSALIGN_ALWAYS_INLINE void viterbi_group(const T* base, int64_t N, int64_t M, const int64_t* n_l,
                                         const int64_t* r_arr64, int lanes, int64_t n_max, int64_t r_max, T beta,
                                         Scratch<T>& scratch, int64_t* out) {
  constexpr int W = kLanesOf<T>;
  constexpr int G = kGroupOf<T>;
  constexpr int U = kUnroll;
  using S = Simd<T>;
  using I = typename S::I;
  using V = typename S::V;
  using VI = typename S::VI;

  I r_arr[G];
  I n_arr[G];
  for (int l = 0; l < G; ++l) {
    r_arr[l] = static_cast<I>(r_arr64[l]);
    n_arr[l] = static_cast<I>(n_l[l]);
  }
  VI r_v[U], n_v[U];
  std::memcpy(r_v, r_arr, sizeof(r_v));
  std::memcpy(n_v, n_arr, sizeof(n_v));

  T* delta = scratch.delta.data();
  T* row = scratch.row.data();
  I* stay = scratch.stay.data();
  I* best = scratch.best.data();
  const T* zeros = scratch.zeros.data();
  const V neg_inf = S::splat(-std::numeric_limits<T>::infinity());
  const V beta_v = S::splat(beta);
  const VI none = S::splat(S::kNone);

  // Transposes word j of every lane into row[m][lane]; finished sentences and idle lanes read zeros (unused).
  auto load_row = [&](int64_t j) {
    const T* src[G];
    for (int l = 0; l < G; ++l) src[l] = j < n_l[l] ? base + (l * N + j) * M : zeros;
    int64_t m = 0;
    for (; m + W <= r_max; m += W) {
      for (int u = 0; u < U; ++u) {
        const T* rows[W];
        for (int w = 0; w < W; ++w) rows[w] = src[u * W + w] + m;
        S::transpose(rows, row + m * G + u * W, G);
      }
    }
    for (; m < r_max; ++m) {
      for (int l = 0; l < G; ++l) row[m * G + l] = src[l][m];
    }
  };

  // Region m of word 0 for vector u (first: m == 0 starts the top-2).
  LaneTop<T, kTop2> top[U];
  auto init_cell = [&](int64_t m, int u, bool first) __attribute__((always_inline)) {
    const VI mv = S::splat(static_cast<I>(m));
    V d = S::load(row + m * G + u * W);
    VI valid{};
    if constexpr (kMasked) {
      valid = mv < r_v[u];
      d = valid ? d : neg_inf;
    }
    S::store(delta + m * G + u * W, d);
    if (first) {
      top[u].first(d);
    } else {
      top[u].template push<kMasked>(valid, d, mv);
    }
  };
  load_row(0);
  for (int u = 0; u < U; ++u) init_cell(0, u, true);
  for (int64_t m = 1; m < r_max; ++m) {
    for (int u = 0; u < U; ++u) init_cell(m, u, false);
  }
  VI last[U];  // argmax of delta at each lane's last word
  for (int u = 0; u < U; ++u) last[u] = top[u].k1;

  LaneTop<T, kTop2> next[U];
  // Region m of word j >= 1 for vector u: delta_j(m), its "stayed" flag, and the top-2 of delta_j.
  auto step_cell = [&](int64_t m, int u, I* st, bool first) __attribute__((always_inline)) {
    const VI mv = S::splat(static_cast<I>(m));
    T* dm = delta + m * G + u * W;
    const V s = S::load(dm) + beta_v;  // stay on m
    // Best jump: max over k != m of delta_{j-1}(k). For beta >= 0 (no kTop2) jumping from k1 == m gives the
    // same label and value as staying, so the top-1 is enough, and k1 is always a real region.
    V vo = top[u].v1;
    VI ko = top[u].k1;
    VI keep;
    if constexpr (kTop2) {
      const VI on_k1 = mv == top[u].k1;
      vo = on_k1 ? top[u].v2 : top[u].v1;
      ko = on_k1 ? top[u].k2 : top[u].k1;
      keep = (s > vo) | ((s == vo) & (mv < ko)) | (ko == none);
    } else {
      keep = (s > vo) | ((s == vo) & (mv < ko));
    }
    // keep ? s : vo; the two agree on ties, so a max gives the same sum.
    V d = S::load(row + m * G + u * W) + S::max(s, vo);
    VI valid{};
    if constexpr (kMasked) {
      valid = mv < r_v[u];
      d = valid ? d : neg_inf;
    }
    S::store(dm, d);
    S::store(st + m * G + u * W, keep);
    if (first) {
      next[u].first(d);
    } else {
      next[u].template push<kMasked>(valid, d, mv);
    }
  };

  for (int64_t j = 1; j < n_max; ++j) {
    I* bj = best + j * 2 * G;
    for (int u = 0; u < U; ++u) {
      S::store(bj + u * W, top[u].k1);
      if constexpr (kTop2) S::store(bj + G + u * W, top[u].k2);
    }
    load_row(j);
    I* st = stay + j * r_max * G;
    for (int u = 0; u < U; ++u) step_cell(0, u, st, true);
    for (int64_t m = 1; m < r_max; ++m) {
      for (int u = 0; u < U; ++u) step_cell(m, u, st, false);
    }
    const VI jv = S::splat(static_cast<I>(j + 1));
    for (int u = 0; u < U; ++u) {
      top[u] = next[u];
      last[u] = (n_v[u] == jv) ? top[u].k1 : last[u];
    }
  }

  I last_arr[G];
  std::memcpy(last_arr, last, sizeof(last));
  for (int l = 0; l < lanes; ++l) {
    const int64_t n = n_l[l];
    if (n == 0) continue;
    int64_t* o = out + l * N;
    I a = last_arr[l];
    o[n - 1] = a;
    for (int64_t j = n - 1; j > 0; --j) {
      if (!stay[(j * r_max + a) * G + l]) {
        const I* bj = best + j * 2 * G;
        a = (kTop2 && a == bj[l]) ? bj[G + l] : bj[l];
      }
      o[j - 1] = a;
    }
  }
}

// Pads a group to G lanes (idle lanes: no words, no regions), fills -1 past each sentence and picks the
// masked or unmasked kernel.
template <typename T, bool kTop2>
DSALIGN_ALWAYS_INLINE void viterbi_group_dispatch(const T* base, int64_t N, int64_t M, const int64_t* nw,
                                                  const int64_t* nr, int lanes, T beta, Scratch<T>& scratch,
                                                  int64_t* out) {
  constexpr int G = kGroupOf<T>;
  int64_t n_l[G];
  int64_t r_l[G];
  int64_t n_max = 0;
  int64_t r_max = 0;
  int64_t r_min = std::numeric_limits<int64_t>::max();
  for (int l = 0; l < G; ++l) {
    n_l[l] = l < lanes ? nw[l] : 0;
    r_l[l] = n_l[l] > 0 ? nr[l] : 0;
    n_max = std::max(n_max, n_l[l]);
    r_max = std::max(r_max, r_l[l]);
    r_min = std::min(r_min, r_l[l]);
  }
  for (int l = 0; l < lanes; ++l) std::fill(out + l * N + n_l[l], out + (l + 1) * N, int64_t{-1});
  if (n_max == 0) return;
  if (r_min == r_max) {
    viterbi_group<T, kTop2, false>(base, N, M, n_l, r_l, lanes, n_max, r_max, beta, scratch, out);
  } else {
    viterbi_group<T, kTop2, true>(base, N, M, n_l, r_l, lanes, n_max, r_max, beta, scratch, out);
  }
}

// One call's inputs; run_groups* process the groups [g_begin, g_end) with the whole kernel inlined.
template <typename T>
struct Batch {
  const T* base;
  const int64_t* n_words;
  const int64_t* n_regions;
  int64_t* out;
  int64_t B, N, M;
  T beta;
};

template <typename T, bool kTop2>
DSALIGN_ALWAYS_INLINE void run_groups_impl(const Batch<T>& x, int64_t g_begin, int64_t g_end,
                                           Scratch<T>& scratch) {
  constexpr int G = kGroupOf<T>;
  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t b = g * G;
    const int lanes = static_cast<int>(std::min<int64_t>(G, x.B - b));
    viterbi_group_dispatch<T, kTop2>(x.base + b * x.N * x.M, x.N, x.M, x.n_words + b, x.n_regions + b, lanes,
                                     x.beta, scratch, x.out + b * x.N);
  }
}

template <typename T, bool kTop2>
void run_groups(const Batch<T>& x, int64_t g_begin, int64_t g_end, Scratch<T>& scratch) {
  run_groups_impl<T, kTop2>(x, g_begin, g_end, scratch);
}

#if DSALIGN_X86_AVX2_DISPATCH
// The same code compiled for AVX2 (3-operand VEX forms, blends and max in one instruction: ~40% fewer
// instructions than baseline SSE2), chosen at run time.
template <typename T, bool kTop2>
__attribute__((target("avx2"))) void run_groups_avx2(const Batch<T>& x, int64_t g_begin, int64_t g_end,
                                                     Scratch<T>& scratch) {
  run_groups_impl<T, kTop2>(x, g_begin, g_end, scratch);
}

// DSALIGN_VITERBI_NO_AVX2=1 forces the baseline build (read on every call, so tests can cover both).
bool use_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  const char* off = std::getenv("DSALIGN_VITERBI_NO_AVX2");
  return has && !(off != nullptr && off[0] != '\0' && off[0] != '0');
}
#endif

template <typename T, bool kTop2>
void viterbi_batch(const at::Tensor& unary, const int64_t* n_words, const int64_t* n_regions, double beta,
                   at::Tensor& labels) {
  const Batch<T> x{unary.data_ptr<T>(), n_words,        n_regions,      labels.data_ptr<int64_t>(),
                          unary.size(0),       unary.size(1), unary.size(2), static_cast<T>(beta)};
  constexpr int G = kGroupOf<T>;
  const int64_t groups = (x.B + G - 1) / G;
  // At ~0.5 ns per cell, tasks of >= 512k cells (~0.25 ms) keep the fork/join cost small and leave small
  // batches on one thread, where waking a second one would cost more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 19) / std::max<int64_t>(1, x.N * x.M * G));
#if DSALIGN_X86_AVX2_DISPATCH
  const bool avx2 = use_avx2();
#endif

  at::parallel_for(0, groups, grain, [&](int64_t g_begin, int64_t g_end) {
    Scratch<T> scratch(x.N, x.M);
#if DSALIGN_X86_AVX2_DISPATCH
    if (avx2) {
      run_groups_avx2<T, kTop2>(x, g_begin, g_end, scratch);
      return;
    }
#endif
    run_groups<T, kTop2>(x, g_begin, g_end, scratch);
  });
}

}  // namespace

at::Tensor viterbi_cpu_impl(const at::Tensor& unary, const at::Tensor& n_words, const at::Tensor& n_regions,
                            double beta) {
  at::Tensor labels = at::empty({unary.size(0), unary.size(1)}, unary.options().dtype(at::kLong));
  if (labels.numel() == 0) return labels;
  const int64_t* nw = n_words.data_ptr<int64_t>();
  const int64_t* nr = n_regions.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(unary.scalar_type(), "dsalign_viterbi_cpu", [&] {
    if (beta >= 0.0) {
      viterbi_batch<scalar_t, false>(unary, nw, nr, beta, labels);
    } else {
      viterbi_batch<scalar_t, true>(unary, nw, nr, beta, labels);
    }
  });
  return labels;
}

}  // namespace dsalign
