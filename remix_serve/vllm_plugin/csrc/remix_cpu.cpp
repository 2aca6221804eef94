// Fused CPU kernels for the ReMix plugin's decode path (see cpu_kernels.py).
//
// On a small CPU every extra PyTorch op between two GEMMs costs 10-20 us, far more than its arithmetic, so the
// per-layer routing (float32 router logits, stable top-k, selection mask) and the "mask the shrink output and
// append it to the GEMM input" step each run as one op here. remix_serve/routing.py and bank.py define the math;
// tests/test_cpu_kernels.py checks these kernels against them, ties included.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <vector>

namespace {

constexpr int kLanes = 16;
// Rows per thread chunk: below this a kernel runs inline, since waking a thread costs more than the work.
constexpr int64_t kRoutedRowsPerChunk = 64, kConcatRowsPerChunk = 256;

// x . p in float32 with kLanes independent partial sums: one running sum is a single add-latency chain that the
// compiler may not reorder; separate sums vectorise. The summation order differs from BLAS only by rounding.
// Cloned for AVX-512, AVX2 and baseline x86-64; the loader picks the best the CPU runs.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
float dot(const float* x, const float* p, int64_t D) {
  float acc[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[d + l] * p[d + l];
  float sum = 0.f;
  for (; d < D; ++d) sum += x[d] * p[d];
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  return sum;
}

// mask [T, n] (x's dtype, 1 on the k selected LoRAs), ids [T, k] (int64, by descending logit, ties to the lowest
// index): routing.topk_ids(routing.router_logits(x, router), k) and routing.selection_mask(ids, n).
std::vector<torch::Tensor> route(const torch::Tensor& x, const torch::Tensor& router, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "route: x must be [T, D] with contiguous rows");
  TORCH_CHECK(router.dim() == 2 && router.is_contiguous() && router.scalar_type() == at::kFloat,
              "route: router must be a contiguous float32 [n, D]");
  const int64_t T = x.size(0), D = x.size(1), n = router.size(0);
  TORCH_CHECK(router.size(1) == D, "route: router width ", router.size(1), " != x width ", D);
  TORCH_CHECK(k >= 1 && k <= n, "route: k=", k, " must be in [1, ", n, "]");
  auto mask = torch::zeros({T, n}, x.options());
  auto ids = torch::empty({T, k}, x.options().dtype(at::kLong));
  const float* P = router.data_ptr<float>();
  int64_t* id = ids.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "remix_route", [&] {
    const scalar_t* X = x.data_ptr<scalar_t>();
    scalar_t* M = mask.data_ptr<scalar_t>();
    const int64_t row = x.stride(0);
    at::parallel_for(0, T, kRoutedRowsPerChunk, [&](int64_t begin, int64_t end) {
      std::vector<float> xf(D), logits(n);
      std::vector<char> taken(n);
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t d = 0; d < D; ++d) xf[d] = static_cast<float>(X[t * row + d]);
        for (int64_t j = 0; j < n; ++j) {
          logits[j] = dot(xf.data(), P + j * D, D);
          taken[j] = 0;
        }
        for (int64_t s = 0; s < k; ++s) {
          int64_t best = -1;
          for (int64_t j = 0; j < n; ++j)  // strict '>': on equal logits the lowest index stays
            if (!taken[j] && (best < 0 || logits[j] > logits[best])) best = j;
          taken[best] = 1;
          id[t * k + s] = best;
          M[t * n + best] = static_cast<scalar_t>(1.f);
        }
      }
    });
  });
  return {mask, ids};
}

// [x | h * w] as one [T, D + m*n*r] tensor: bank.mask_blocks(h, w, r) appended to x (the fused GEMM's input).
torch::Tensor masked_concat(const torch::Tensor& x, const torch::Tensor& h, const torch::Tensor& w, int64_t rank) {
  TORCH_CHECK(x.dim() == 2 && h.dim() == 2 && w.dim() == 2, "masked_concat: x, h, w must be 2-D");
  TORCH_CHECK(x.stride(1) == 1 && h.stride(1) == 1 && w.is_contiguous(), "masked_concat: rows must be contiguous");
  TORCH_CHECK(x.scalar_type() == h.scalar_type() && h.scalar_type() == w.scalar_type(),
              "masked_concat: x, h and w must share a dtype");
  const int64_t T = x.size(0), D = x.size(1), NR = h.size(1), n = w.size(1);
  TORCH_CHECK(h.size(0) == T && w.size(0) == T && rank > 0 && NR % (n * rank) == 0,
              "masked_concat: h must be [T, m*n*r] for w [T, n] and rank r");
  auto out = torch::empty({T, D + NR}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "remix_masked_concat", [&] {
    const scalar_t *X = x.data_ptr<scalar_t>(), *H = h.data_ptr<scalar_t>(), *W = w.data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    const int64_t xrow = x.stride(0), hrow = h.stride(0);
    at::parallel_for(0, T, kConcatRowsPerChunk, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        scalar_t* o = O + t * (D + NR);
        std::copy(X + t * xrow, X + t * xrow + D, o);
        for (int64_t i = 0; i < NR / rank; ++i) {  // block i belongs to LoRA i % n of bank i / n
          const float wi = static_cast<float>(W[t * n + i % n]);
          const scalar_t* hi = H + t * hrow + i * rank;
          scalar_t* oi = o + D + i * rank;
          for (int64_t c = 0; c < rank; ++c) oi[c] = static_cast<scalar_t>(static_cast<float>(hi[c]) * wi);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(remix_cpu, m) {
  m.def("route(Tensor x, Tensor router, int k) -> Tensor[]");
  m.def("masked_concat(Tensor x, Tensor h, Tensor w, int rank) -> Tensor");
}

TORCH_LIBRARY_IMPL(remix_cpu, CPU, m) {
  m.impl("route", &route);
  m.impl("masked_concat", &masked_concat);
}
