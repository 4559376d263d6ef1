// Registration of the dsalign operator library and the Python module `dsalign._C`.
//
// `import dsalign._C` only loads this shared library; the static registrations below then make the ops
// available as torch.ops.dsalign.*. This file owns the `dsalign` namespace (TORCH_LIBRARY); other C++ ops
// should add themselves with TORCH_LIBRARY_FRAGMENT(dsalign, m).
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "viterbi.h"

namespace dsalign {
namespace {

// Exact, index-precise range checks on CPU copies of the lengths (also the error path for CUDA inputs).
void check_lengths_cpu(const at::Tensor& n_words, const at::Tensor& n_regions, int64_t N, int64_t M) {
  const int64_t* nw = n_words.data_ptr<int64_t>();
  const int64_t* nr = n_regions.data_ptr<int64_t>();
  const int64_t B = n_words.numel();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(nw[b] >= 0 && nw[b] <= N, "dsalign::viterbi: n_words[", b, "] = ", nw[b],
                " is outside [0, N] with N = ", N, " (unary.size(1))");
    TORCH_CHECK(nr[b] >= 0 && nr[b] <= M, "dsalign::viterbi: n_regions[", b, "] = ", nr[b],
                " is outside [0, M] with M = ", M, " (unary.size(2))");
    TORCH_CHECK(nw[b] == 0 || nr[b] >= 1, "dsalign::viterbi: n_regions[", b, "] = 0 but n_words[", b, "] = ",
                nw[b], "; a sentence with words needs at least one region");
  }
}

at::Tensor check_length_tensor(const at::Tensor& t, const char* name, const at::Tensor& unary) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == unary.size(0), "dsalign::viterbi: ", name,
              " must be 1-D with B = unary.size(0) = ", unary.size(0), " entries, got shape ", t.sizes());
  TORCH_CHECK(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), "dsalign::viterbi: ", name,
              " must be an integer tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == unary.device(), "dsalign::viterbi: ", name, " is on ", t.device(),
              " but unary is on ", unary.device(), "; put them on the same device");
  return t.to(at::kLong).contiguous();
}

// Validates everything and returns contiguous (unary, n_words int64, n_regions int64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> validate(const at::Tensor& unary, const at::Tensor& n_words,
                                                        const at::Tensor& n_regions, double beta) {
  TORCH_CHECK(unary.dim() == 3, "dsalign::viterbi: unary must be 3-D [B, N, M] (batch, words, regions), got shape ",
              unary.sizes());
  TORCH_CHECK(unary.scalar_type() == at::kFloat || unary.scalar_type() == at::kDouble,
              "dsalign::viterbi: unary must be float32 or float64, got ", unary.scalar_type());
  TORCH_CHECK(std::isfinite(beta), "dsalign::viterbi: beta must be finite, got ", beta);
  const int64_t N = unary.size(1);
  const int64_t M = unary.size(2);
  TORCH_CHECK(M < static_cast<int64_t>(kNoIndex), "dsalign::viterbi: too many regions (M = ", M, ")");
  at::Tensor nw = check_length_tensor(n_words, "n_words", unary);
  at::Tensor nr = check_length_tensor(n_regions, "n_regions", unary);
  if (nw.numel() > 0) {
    if (nw.is_cpu()) {
      check_lengths_cpu(nw, nr, N, M);
    } else {
      // One reduction and one host sync; only on failure copy to the host for a precise message.
      const at::Tensor ok = nw.ge(0).logical_and_(nw.le(N)).logical_and_(nr.ge(0)).logical_and_(nr.le(M))
                                .logical_and_(nw.eq(0).logical_or_(nr.ge(1)));
      if (!ok.all().item<bool>()) {
        check_lengths_cpu(nw.cpu(), nr.cpu(), N, M);
      }
    }
  }
  return {unary.contiguous(), nw, nr};
}

at::Tensor viterbi_cpu(const at::Tensor& unary, const at::Tensor& n_words, const at::Tensor& n_regions,
                       double beta) {
  auto [u, nw, nr] = validate(unary, n_words, n_regions, beta);
  return viterbi_cpu_impl(u, nw, nr, beta);
}

#ifdef WITH_CUDA
at::Tensor viterbi_cuda(const at::Tensor& unary, const at::Tensor& n_words, const at::Tensor& n_regions,
                        double beta) {
  auto [u, nw, nr] = validate(unary, n_words, n_regions, beta);
  return viterbi_cuda_impl(u, nw, nr, beta);
}
#endif

// Shape-only kernel so the op can be traced (torch.compile / fake tensors).
at::Tensor viterbi_meta(const at::Tensor& unary, const at::Tensor& n_words, const at::Tensor& n_regions,
                        double beta) {
  TORCH_CHECK(unary.dim() == 3, "dsalign::viterbi: unary must be 3-D [B, N, M], got shape ", unary.sizes());
  TORCH_CHECK(std::isfinite(beta), "dsalign::viterbi: beta must be finite, got ", beta);
  (void)n_words;
  (void)n_regions;
  return at::empty({unary.size(0), unary.size(1)}, unary.options().dtype(at::kLong));
}

}  // namespace
}  // namespace dsalign

TORCH_LIBRARY(dsalign, m) {
  m.def("viterbi(Tensor unary, Tensor n_words, Tensor n_regions, float beta) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsalign, CPU, m) { m.impl("viterbi", &dsalign::viterbi_cpu); }

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(dsalign, CUDA, m) { m.impl("viterbi", &dsalign::viterbi_cuda); }
#endif

TORCH_LIBRARY_IMPL(dsalign, Meta, m) { m.impl("viterbi", &dsalign::viterbi_meta); }

// Minimal Python module: importing it loads the library (and so the registrations above).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "dsalign._C",
      "Compiled dsalign ops; importing registers torch.ops.dsalign.viterbi.",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
