// Fused CPU kernels for the ReMix plugin's decode path (see cpu_kernels.py).
//
// On a small CPU every extra PyTorch op between two GEMMs costs 10-20 us, far more than its arithmetic, so the
// per-layer routing (float32 router logits, stable top-k, selection mask) runs as one op here, and so does
// building a fused GEMM's input `[x | masked shrink]`: from a dense shrink's output (masked_concat, prefill) or
// with the shrink of the selected LoRAs computed in place (shrink_concat, decode; for the down projection with
// LlamaMLP's SiLU-and-mul computed in the same pass). remix_serve/routing.py and bank.py define the math;
// tests/plugin/test_cpu_kernels.py checks these kernels against them, ties included.
#include <torch/extension.h>

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <vector>

namespace {

constexpr int kLanes = 16;
constexpr int kRouteRun = 4;  // tokens of one slot routed per pass over its router (pool_route)
// Rows per thread chunk: below this a kernel runs inline, since waking a thread costs more than the work.
constexpr int64_t kRoutedRowsPerChunk = 64, kConcatRowsPerChunk = 256;
// Multiply-adds of a shrink_concat call from which it runs on all threads.
constexpr int64_t kShrinkParallelMacs = 1 << 17;

// A new CPU tensor, allocated without a trip through the dispatcher (at::empty's dispatch, cold after a layer's
// GEMM has gone through the caches, costs several microseconds per call on a small CPU).
torch::Tensor new_cpu(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_cpu(sizes, dtype, /*pin_memory=*/false);
}

void check_cpu(const char* op, std::initializer_list<const torch::Tensor*> tensors) {
  for (const auto* t : tensors) TORCH_CHECK(t->device().is_cpu(), op, ": tensors must be on the CPU, got ", t->device());
}

// out[i] = p_i . x for the `rows` rows p_i = p + i * D, in float32, four rows at a time: each load of x serves
// four rows, and two kLanes-wide partial sums per row give eight independent multiply-add chains, enough to hide
// the FMA latency. Every row is summed in the same order, so equal rows give equal sums (routing ties stay ties)
// and a token's result does not depend on the batch around it. Cloned for AVX-512, AVX2 and baseline x86-64; the
// loader picks the best the CPU runs.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void dot_rows(const float* x, const float* p, int64_t rows, int64_t D, float* out) {
  constexpr int64_t kStep = 2 * kLanes;
  for (int64_t i = 0; i < rows; i += 4) {
    // A last group of fewer than four rows repeats its last row and drops the copies.
    const float* q[4];
    for (int g = 0; g < 4; ++g) q[g] = p + std::min(i + g, rows - 1) * D;
    float a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
    float b0[kLanes] = {}, b1[kLanes] = {}, b2[kLanes] = {}, b3[kLanes] = {};
    int64_t d = 0;
    for (; d + kStep <= D; d += kStep) {
      for (int l = 0; l < kLanes; ++l) {
        const float xv = x[d + l];
        a0[l] += xv * q[0][d + l];
        a1[l] += xv * q[1][d + l];
        a2[l] += xv * q[2][d + l];
        a3[l] += xv * q[3][d + l];
      }
      for (int l = 0; l < kLanes; ++l) {
        const float xv = x[d + kLanes + l];
        b0[l] += xv * q[0][d + kLanes + l];
        b1[l] += xv * q[1][d + kLanes + l];
        b2[l] += xv * q[2][d + kLanes + l];
        b3[l] += xv * q[3][d + kLanes + l];
      }
    }
    float s[4] = {};
    for (; d < D; ++d)
      for (int g = 0; g < 4; ++g) s[g] += x[d] * q[g][d];
    for (int l = 0; l < kLanes; ++l) {
      s[0] += a0[l] + b0[l];
      s[1] += a1[l] + b1[l];
      s[2] += a2[l] + b2[l];
      s[3] += a3[l] + b3[l];
    }
    for (int g = 0; g < 4 && i + g < rows; ++g) out[i + g] = s[g];
  }
}

// dst[0 .. D) = float(src[0 .. D)). bfloat16 is the upper half of a float32: a shift the compiler vectorises,
// where the element-wise c10 conversion does not.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void bf16_to_float(const uint16_t* src, float* dst, int64_t D) {
  auto* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<uint32_t>(src[d]) << 16;
}

template <typename scalar_t>
void to_float(const scalar_t* src, float* dst, int64_t D) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>)
    bf16_to_float(reinterpret_cast<const uint16_t*>(src), dst, D);
  else
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]);
}

// dst[0 .. D) = src[0 .. D) rounded to bfloat16 (to nearest, ties to even; NaN stays a quiet NaN), as
// c10::BFloat16's conversion rounds, in a loop the compiler vectorises.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void float_to_bf16(const float* src, uint16_t* dst, int64_t D) {
  const auto* in = reinterpret_cast<const uint32_t*>(src);
  for (int64_t d = 0; d < D; ++d) {
    const uint32_t u = in[d];
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    dst[d] = src[d] != src[d] ? uint16_t{0x7FC0} : rounded;
  }
}

template <typename scalar_t>
void from_float(const float* src, scalar_t* dst, int64_t D) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>)
    float_to_bf16(src, reinterpret_cast<uint16_t*>(dst), D);
  else
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(src[d]);
}

// out[i] = silu(g[i]) * u[i] = g[i] / (1 + exp(-g[i])) * u[i], in float32: LlamaMLP's SiLU-and-mul.
void silu_mul_scalar(const float* g, const float* u, float* out, int64_t D) {
  for (int64_t d = 0; d < D; ++d) out[d] = g[d] / (1.f + std::exp(-g[d])) * u[d];
}

#if defined(__x86_64__) && defined(__GNUC__)
// exp(x) = 2^n exp(f), n = round(x / ln 2), |f| <= ln 2 / 2, exp(f) by Cephes' degree-6 polynomial (relative
// error about 1e-7); scalef gives 2^n without overflow tricks (inf above 88.7, 0 below -103.9). NaN stays NaN.
__attribute__((target("avx512f"))) inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(89.f), _mm512_max_ps(_mm512_set1_ps(-104.f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, f), f, _mm512_add_ps(f, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

__attribute__((target("avx512f"))) void silu_mul_avx512(const float* g, const float* u, float* out, int64_t D) {
  const __m512 one = _mm512_set1_ps(1.f);
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    const __m512 gv = _mm512_loadu_ps(g + d);
    // sigmoid(g) = 1 / (1 + exp(-g)): rcp14 plus one Newton step (relative error about 2^-28; a divide is
    // several times slower)
    const __m512 den = _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
    __m512 s = _mm512_rcp14_ps(den);
    s = _mm512_mul_ps(s, _mm512_fnmadd_ps(den, s, _mm512_set1_ps(2.f)));
    s = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(den, _mm512_set1_ps(INFINITY), _CMP_LT_OQ), s);  // 1/inf = 0
    _mm512_storeu_ps(out + d, _mm512_mul_ps(_mm512_mul_ps(gv, s), _mm512_loadu_ps(u + d)));
  }
  silu_mul_scalar(g + d, u + d, out + d, D - d);
}
#endif

void silu_mul(const float* g, const float* u, float* out, int64_t D) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return silu_mul_avx512(g, u, out, D);
#endif
  silu_mul_scalar(g, u, out, D);
}

// mask [T, n] (x's dtype, 1 on the k selected LoRAs), ids [T, k] (int64, by descending logit, ties to the lowest
// index): routing.topk_ids(routing.router_logits(x, router), k) and routing.selection_mask(ids, n).
std::vector<torch::Tensor> route(const torch::Tensor& x, const torch::Tensor& router, int64_t k) {
  check_cpu("route", {&x, &router});
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "route: x must be [T, D] with contiguous rows");
  TORCH_CHECK(router.dim() == 2 && router.is_contiguous() && router.scalar_type() == at::kFloat,
              "route: router must be a contiguous float32 [n, D]");
  const int64_t T = x.size(0), D = x.size(1), n = router.size(0);
  TORCH_CHECK(router.size(1) == D, "route: router width ", router.size(1), " != x width ", D);
  TORCH_CHECK(k >= 1 && k <= n, "route: k=", k, " must be in [1, ", n, "]");
  auto mask = new_cpu({T, n}, x.scalar_type());
  auto ids = new_cpu({T, k}, at::kLong);
  const float* P = router.data_ptr<float>();
  int64_t* id = ids.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "remix_route", [&] {
    const scalar_t* X = x.data_ptr<scalar_t>();
    scalar_t* M = mask.data_ptr<scalar_t>();
    const int64_t row = x.stride(0);
    at::parallel_for(0, T, kRoutedRowsPerChunk, [&](int64_t begin, int64_t end) {
      std::vector<float> xf(D), logits(n);
      std::vector<char> taken(n);
      std::fill(M + begin * n, M + end * n, static_cast<scalar_t>(0.f));
      for (int64_t t = begin; t < end; ++t) {
        to_float(X + t * row, xf.data(), D);
        dot_rows(xf.data(), P, n, D, logits.data());
        std::fill(taken.begin(), taken.end(), 0);
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
  check_cpu("masked_concat", {&x, &h, &w});
  TORCH_CHECK(x.dim() == 2 && h.dim() == 2 && w.dim() == 2, "masked_concat: x, h, w must be 2-D");
  TORCH_CHECK(x.stride(1) == 1 && h.stride(1) == 1 && w.is_contiguous(), "masked_concat: rows must be contiguous");
  TORCH_CHECK(x.scalar_type() == h.scalar_type() && h.scalar_type() == w.scalar_type(),
              "masked_concat: x, h and w must share a dtype");
  const int64_t T = x.size(0), D = x.size(1), NR = h.size(1), n = w.size(1);
  TORCH_CHECK(h.size(0) == T && w.size(0) == T && rank > 0 && NR % (n * rank) == 0,
              "masked_concat: h must be [T, m*n*r] for w [T, n] and rank r");
  auto out = new_cpu({T, D + NR}, x.scalar_type());
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


#if defined(__x86_64__) && defined(__GNUC__)
#define REMIX_HAS_BF16_DOT 1
// dot_rows for bfloat16 x and p with AVX512-BF16 (vdpbf16ps: 32 products per instruction, float32 sums), the
// way a bf16 GEMM multiplies: exact products, float32 accumulation. Rows go four at a time, as in dot_rows.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void dot_rows_bf16(const at::BFloat16* x,
                                                                           const at::BFloat16* p, int64_t rows,
                                                                           int64_t D, float* out) {
  constexpr int64_t kStep = 32;  // bf16 values per 512-bit register
  for (int64_t i = 0; i < rows; i += 4) {
    const at::BFloat16* q[4];
    for (int g = 0; g < 4; ++g) q[g] = p + std::min(i + g, rows - 1) * D;
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    __m512 b[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t d = 0;
    for (; d + 2 * kStep <= D; d += 2 * kStep) {
      const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + d), x1 = (__m512bh)_mm512_loadu_si512(x + d + kStep);
      for (int g = 0; g < 4; ++g) {
        a[g] = _mm512_dpbf16_ps(a[g], x0, (__m512bh)_mm512_loadu_si512(q[g] + d));
        b[g] = _mm512_dpbf16_ps(b[g], x1, (__m512bh)_mm512_loadu_si512(q[g] + d + kStep));
      }
    }
    for (; d < D; d += kStep) {  // masked loads read zeros past D
      const __mmask32 m = D - d >= kStep ? ~__mmask32(0) : (__mmask32(1) << (D - d)) - 1;
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + d);
      for (int g = 0; g < 4; ++g) a[g] = _mm512_dpbf16_ps(a[g], xv, (__m512bh)_mm512_maskz_loadu_epi16(m, q[g] + d));
    }
    for (int g = 0; g < 4 && i + g < rows; ++g) out[i + g] = _mm512_reduce_add_ps(_mm512_add_ps(a[g], b[g]));
  }
}

bool cpu_has_bf16_dot() {
  static const bool has = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return has;
}
#endif

// [x | h], h = [h_0 | ... | h_{m-1}] for m stacked banks: h_b holds, in the r-block of each of a token's k
// selected LoRAs j, w[t, j] * (A_b[j] x_t), and zeros elsewhere. That is bank.masked_concat(x, x A^T, w, r), with
// the shrink computed for the selected LoRAs only: a gather, k/n of the dense GEMM's work, and no GEMM call.
// A is [m*n*r, D] in x's dtype or float32, LoRA j of bank b in rows (b*n + j)*r ... +r-1; w is [T, n] in x's
// dtype. The shrink output is rounded to x's dtype before it is weighted, as after a GEMM. For decode-sized
// batches: at prefill sizes a dense GEMM on the matrix units wins (cpu_kernels.GATHER_MAX_TOKENS).
// With silu_and_mul, the input is a gate/up GEMM's output [T, 2D] and x = silu(gate) * up (float32, rounded once
// to the input's dtype) is computed here, so the down projection's input takes one op instead of two.
torch::Tensor shrink_concat(const torch::Tensor& x_, const torch::Tensor& A, const torch::Tensor& ids_,
                            const torch::Tensor& w_, int64_t rank, bool silu_and_mul) {
  check_cpu("shrink_concat", {&x_, &A, &ids_, &w_});
  TORCH_CHECK(x_.dim() == 2 && x_.stride(1) == 1, "shrink_concat: x must be [T, D] with contiguous rows");
  TORCH_CHECK(!silu_and_mul || x_.size(1) % 2 == 0, "shrink_concat: silu_and_mul needs an even width, got ",
              x_.size(1));
  TORCH_CHECK(A.dim() == 2 && A.is_contiguous() && (A.scalar_type() == x_.scalar_type() || A.scalar_type() == at::kFloat),
              "shrink_concat: A must be a contiguous [m*n*r, D] in x's dtype or float32");
  TORCH_CHECK(ids_.dim() == 2 && ids_.scalar_type() == at::kLong, "shrink_concat: ids must be an int64 [T, k]");
  TORCH_CHECK(w_.dim() == 2 && w_.scalar_type() == x_.scalar_type(), "shrink_concat: w must be a [T, n] in x's dtype");
  const auto ids = ids_.contiguous(), w = w_.contiguous();  // no copy when they already are (the route kernel's)
  const int64_t T = x_.size(0), D = silu_and_mul ? x_.size(1) / 2 : x_.size(1), n = w.size(1), k = ids.size(1),
                nr = n * rank;
  TORCH_CHECK(ids.size(0) == T && w.size(0) == T, "shrink_concat: x, ids and w must have the same tokens");
  TORCH_CHECK(rank > 0 && A.size(0) > 0 && A.size(0) % nr == 0 && A.size(1) == D, "shrink_concat: A is [",
              A.size(0), ", ", A.size(1), "], expected [m*", nr, ", ", D, "] for banks of ", n, " LoRAs of rank ",
              rank);
  const int64_t banks = A.size(0) / nr, width = D + banks * nr;
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * k; ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < n, "shrink_concat: LoRA id ", id[i], " out of range for n=", n);
  auto out = new_cpu({T, width}, x_.scalar_type());
  bool bf16_dot = false;
#ifdef REMIX_HAS_BF16_DOT
  bf16_dot = x_.scalar_type() == at::kBFloat16 && A.scalar_type() == at::kBFloat16 && cpu_has_bf16_dot();
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_.scalar_type(), "remix_shrink_concat", [&] {
    const scalar_t *X = x_.data_ptr<scalar_t>(), *W = w.data_ptr<scalar_t>();
    const bool a_float = A.scalar_type() == at::kFloat;
    const int64_t row = x_.stride(0), tasks = banks * n;
    scalar_t* O = out.data_ptr<scalar_t>();
    std::vector<float> xf(bf16_dot ? 0 : T * D);  // each token's x in float32 for dot_rows
    // The two loops share out the work when called in a parallel region, and run whole in the caller otherwise.
    auto work = [&] {
      std::vector<float> h(rank), block(bf16_dot || a_float ? 0 : rank * D);
      std::vector<float> g(silu_and_mul ? 3 * D : 0);  // gate, up, silu(gate) * up
      _Pragma("omp for schedule(static)")
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* xt = X + t * row;
        scalar_t* ot = O + t * width;
        if (silu_and_mul) {
          to_float(xt, g.data(), 2 * D);
          silu_mul(g.data(), g.data() + D, g.data() + 2 * D, D);
          from_float(g.data() + 2 * D, ot, D);
        } else {
          std::copy(xt, xt + D, ot);
        }
        std::fill(ot + D, ot + width, static_cast<scalar_t>(0.f));
        if (!bf16_dot)
          to_float(ot, xf.data() + t * D, D);  // the dots see x as rounded to its dtype, as a GEMM would
      }
      // LoRA-major: one LoRA's r rows of A stay in L1 while the tokens that selected it go by.
      _Pragma("omp for schedule(static)")
      for (int64_t task = 0; task < tasks; ++task) {
        const int64_t b = task / n, j = task % n;
        const float* Af = nullptr;
        if (!bf16_dot) {
          if (a_float) {
            Af = A.data_ptr<float>() + task * rank * D;
          } else {
            const scalar_t* Aj = A.data_ptr<scalar_t>() + task * rank * D;
            to_float(Aj, block.data(), rank * D);
            Af = block.data();
          }
        }
        for (int64_t t = 0; t < T; ++t) {
          if (std::find(id + t * k, id + (t + 1) * k, j) == id + (t + 1) * k) continue;
#ifdef REMIX_HAS_BF16_DOT
          if (bf16_dot)
            dot_rows_bf16(reinterpret_cast<const at::BFloat16*>(O + t * width),
                          A.data_ptr<at::BFloat16>() + task * rank * D, rank, D, h.data());
          else
#endif
            dot_rows(xf.data() + t * D, Af, rank, D, h.data());
          const float wj = static_cast<float>(W[t * n + j]);
          scalar_t* o = O + t * width + D + (b * n + j) * rank;
          for (int64_t c = 0; c < rank; ++c)
            o[c] = static_cast<scalar_t>(static_cast<float>(static_cast<scalar_t>(h[c])) * wj);
        }
      }
    };
    // Threads pay off from about a decode batch of a small model; below that, or with one thread (vLLM's CPU
    // worker serves with one), no parallel region is opened at all.
    if (T * k * banks * rank * D >= kShrinkParallelMacs && at::get_num_threads() > 1) {
      _Pragma("omp parallel") work();
    } else {
      work();
    }
  });
  return out;
}

// acc[0 .. N) += sum_j h[j] * b_j for the `rows` rows b_j = b + j * ld (float32), four rows per pass over acc.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void axpy_rows(const float* h, const float* b, int64_t rows, int64_t N, int64_t ld, float* acc) {
  int64_t j = 0;
  for (; j + 4 <= rows; j += 4) {
    const float h0 = h[j], h1 = h[j + 1], h2 = h[j + 2], h3 = h[j + 3];
    const float *b0 = b + j * ld, *b1 = b0 + ld, *b2 = b1 + ld, *b3 = b2 + ld;
    for (int64_t d = 0; d < N; ++d) acc[d] += h0 * b0[d] + h1 * b1[d] + h2 * b2[d] + h3 * b3[d];
  }
  for (; j < rows; ++j) {
    const float hj = h[j];
    const float* bj = b + j * ld;
    for (int64_t d = 0; d < N; ++d) acc[d] += hj * bj[d];
  }
}

// axpy_rows for bfloat16 rows, widened to float32 as they are read (no float32 copy of the page).
void axpy_rows_bf16_scalar(const float* h, const at::BFloat16* b, int64_t rows, int64_t N, int64_t ld, float* acc) {
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t d = 0; d < N; ++d) acc[d] += h[j] * static_cast<float>(b[j * ld + d]);
}

#if defined(__x86_64__) && defined(__GNUC__)
// 16 bfloat16 values widened to float32 (a zero-extend and a shift: bfloat16 is a float32's upper half).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load_bf16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// load_bf16 of the lanes in m (zeros elsewhere, nothing read past them).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load_bf16_masked(const at::BFloat16* p,
                                                                                    __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void axpy_rows_bf16_avx512(const float* h, const at::BFloat16* b,
                                                                                 int64_t rows, int64_t N, int64_t ld,
                                                                                 float* acc) {
  int64_t j = 0;
  for (; j + 4 <= rows; j += 4) {
    const __m512 h0 = _mm512_set1_ps(h[j]), h1 = _mm512_set1_ps(h[j + 1]), h2 = _mm512_set1_ps(h[j + 2]),
                 h3 = _mm512_set1_ps(h[j + 3]);
    const at::BFloat16 *b0 = b + j * ld, *b1 = b0 + ld, *b2 = b1 + ld, *b3 = b2 + ld;
    int64_t d = 0;
    for (; d + kLanes <= N; d += kLanes) {
      __m512 a = _mm512_loadu_ps(acc + d);
      a = _mm512_fmadd_ps(h0, load_bf16(b0 + d), a);
      a = _mm512_fmadd_ps(h1, load_bf16(b1 + d), a);
      a = _mm512_fmadd_ps(h2, load_bf16(b2 + d), a);
      a = _mm512_fmadd_ps(h3, load_bf16(b3 + d), a);
      _mm512_storeu_ps(acc + d, a);
    }
    if (d < N) {
      const __mmask16 m = (__mmask16(1) << (N - d)) - 1;
      __m512 a = _mm512_maskz_loadu_ps(m, acc + d);
      a = _mm512_fmadd_ps(h0, load_bf16_masked(b0 + d, m), a);
      a = _mm512_fmadd_ps(h1, load_bf16_masked(b1 + d, m), a);
      a = _mm512_fmadd_ps(h2, load_bf16_masked(b2 + d, m), a);
      a = _mm512_fmadd_ps(h3, load_bf16_masked(b3 + d, m), a);
      _mm512_mask_storeu_ps(acc + d, m, a);
    }
  }
  axpy_rows_bf16_scalar(h + j, b + j * ld, rows - j, N, ld, acc);
}
#endif

void axpy_rows_bf16(const float* h, const at::BFloat16* b, int64_t rows, int64_t N, int64_t ld, float* acc) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  if (avx512) return axpy_rows_bf16_avx512(h, b, rows, N, ld, acc);
#endif
  axpy_rows_bf16_scalar(h, b, rows, N, ld, acc);
}

// h = coef * (A x) as every pool_lora_add path hands it to the expand: in a bf16 call, rounded to bf16, as a LoRA
// GEMM's output is (PEFT, vLLM's LoRA kernels), so that the tiled expand multiplies bf16 pairs; float32 and float16
// calls keep float32 h. pool/delta.py's reference rounds the same way.
template <typename scalar_t>
inline float round_h(float h) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>)
    return static_cast<float>(static_cast<at::BFloat16>(h));
  else
    return h;
}

// Tokens from which pool_lora_add works page by page (pool_lora_add_by_page), and the output columns one expand
// block holds: a page's B rows of one block (r_page * 128 values) stay in L1 while every token that picked the page
// adds them. Below kPageMajorMinTokens a token's own loop over its pages is as fast and needs no sort.
constexpr int64_t kPageMajorMinTokens = 4, kPageMajorMaxTokens = 256, kExpandColumns = 128;
// Multiply-adds per thread chunk of pool_lora_add: fewer tokens than this much work run inline.
constexpr int64_t kPoolMacsPerChunk = 1 << 17;

// A call's entries grouped by unit: an entry is (token t, unit u), a unit `unit` consecutive pages of t's list
// (one page, or one pick's pages), keyed by its first page; entries[starts[g], starts[g + 1]) all share a key, in
// token order, the groups in the order their keys first appear; tokens lists the tokens with at least one entry.
// A counting sort through a page -> group table (O(entries), where a sort of a prefill's thousands of entries cost
// as much as its tile multiplies).
struct PageGroups {
  int64_t K = 0;
  std::vector<std::pair<int64_t, int64_t>> entries;  // (key page, t * K + first page's index), grouped by key
  std::vector<int64_t> starts, tokens, slot_of;  // group starts (and the end); tokens; token -> its index in tokens
  std::vector<int64_t> group_of, keys, fill;  // page -> group (-1 between calls); group -> its first entry; cursor

  // False (for unit > 1) where a unit's first page is -1 with a later one set, or two units with one key list
  // different pages: the caller then groups single pages.
  bool build(const int64_t* pg, int64_t T, int64_t K_, int64_t P, int64_t unit = 1) {
    K = K_;
    tokens.clear();
    keys.clear();
    starts.clear();
    slot_of.assign(T, -1);
    if (static_cast<int64_t>(group_of.size()) < P) group_of.resize(P, -1);
    bool consistent = true;
    for (int64_t t = 0; t < T && consistent; ++t)
      for (int64_t q = 0; q < K; q += unit) {
        const int64_t i = t * K + q, p = pg[i];
        if (p < 0) {
          for (int64_t c = 1; c < unit; ++c) consistent &= pg[i + c] < 0;
          continue;
        }
        if (group_of[p] < 0) {
          group_of[p] = static_cast<int64_t>(keys.size());
          keys.push_back(i);
          starts.push_back(0);
        }
        const int64_t* first = pg + keys[group_of[p]];
        for (int64_t c = 1; c < unit; ++c) consistent &= pg[i + c] == first[c];
        ++starts[group_of[p]];
        if (slot_of[t] < 0) {
          slot_of[t] = static_cast<int64_t>(tokens.size());
          tokens.push_back(t);
        }
      }
    const int64_t G = static_cast<int64_t>(keys.size());
    if (consistent) {
      int64_t total = 0;
      for (int64_t g = 0; g < G; ++g) std::swap(total, starts[g]), total += starts[g];  // counts -> starts
      starts.push_back(total);
      fill.assign(starts.begin(), starts.end() - 1);
      entries.resize(total);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t q = 0; q < K; q += unit) {
          const int64_t i = t * K + q;
          if (pg[i] >= 0) entries[fill[group_of[pg[i]]]++] = {pg[i], i};
        }
    }
    for (const int64_t i : keys) group_of[pg[i]] = -1;
    return consistent;
  }
};

// fn(g, e0, e1) for each group g's entries [e0, e1) within the entry range [a, b), in order.
template <typename F>
void for_entries(const std::vector<int64_t>& starts, int64_t a, int64_t b, F&& fn) {
  int64_t g = std::upper_bound(starts.begin(), starts.end(), a) - starts.begin() - 1;
  for (; a < b; ++g) {
    const int64_t e1 = std::min(b, starts[g + 1]);
    fn(g, a, e1);
    a = e1;
  }
}

// A shrink over grouped entries on every thread, each taking an equal share of the entries (for_entries over its
// share): at::parallel_for's equal split of the groups left one thread with 7/8 of a prefill's entries, since top-k
// routing sends most tokens to a few LoRAs, and those come first in group order.
template <typename F>
void parallel_entries(const std::vector<int64_t>& starts, bool inline_only, F&& fn) {
  const int64_t E = starts.back(), parts = inline_only ? 1 : std::max(1, at::get_num_threads());
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) for_entries(starts, E * p / parts, E * (p + 1) / parts, fn);
  });
}

// pool_lora_add's math, page by page: the (token, pick) entries sorted by page, each page's A and B read once for
// all the tokens that picked it (a batch's tokens mostly share their checkpoints' pages), the expand split into
// column blocks so that threads never write the same float32 accumulator. The token loop's result up to the order
// of the float32 sum over a token's picks (group order here, pick order there), with the same one rounding into out.
void pool_lora_add_by_page(const torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& A,
                           const torch::Tensor& B, const int64_t* pg, const float* cf, int64_t K, bool bf16_dot) {
  const int64_t T = out.size(0), N = out.size(1), D = x.size(1), R = A.size(1);
  // Scratch kept per thread across calls: a fresh allocation (and its page faults) per call cost more than the
  // arithmetic of a decode step's call.
  // (The lambdas below run on other threads: they must see these through references, not by their names, which
  // would name those threads' own copies.)
  thread_local PageGroups groups_tl;
  thread_local std::vector<float> h_tl, acc_tl;
  auto& groups = groups_tl;
  auto &h = h_tl, &acc = acc_tl;
  groups.build(pg, T, K, A.size(0));
  const auto& entries = groups.entries;
  const auto &starts = groups.starts, &tokens = groups.tokens, &slot_of = groups.slot_of;
  if (entries.empty()) return;
  const int64_t G = static_cast<int64_t>(starts.size()) - 1;
  const int64_t U = static_cast<int64_t>(tokens.size());
  if (static_cast<int64_t>(h.size()) < T * K * R) h.resize(T * K * R);
  if (static_cast<int64_t>(acc.size()) < U * N) acc.resize(U * N);
  // Small calls (decode) run on the calling thread: waking the pool costs more than their work.
  const int64_t macs = static_cast<int64_t>(entries.size()) * R * (D + N);
  const bool inline_only = macs < 8 * kPoolMacsPerChunk;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "remix_pool_lora_add_by_page", [&] {
    const scalar_t *X = x.data_ptr<scalar_t>(), *Ap = A.data_ptr<scalar_t>(), *Bp = B.data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    const int64_t xrow = x.stride(0), orow = out.stride(0);
    constexpr bool is_float = std::is_same_v<scalar_t, float>, is_bf16 = std::is_same_v<scalar_t, at::BFloat16>;
    // Shrink: h[t, q] = coef[t, q] * A[p] x[t], page by page
    thread_local std::vector<float> xf_tl, a_tl;  // float32 copies of x rows and A pages where no bf16 dot
    parallel_entries(starts, inline_only, [&](int64_t g, int64_t e0, int64_t e1) {
      auto &xf = xf_tl, &a_page = a_tl;
      const scalar_t* Aq = Ap + entries[starts[g]].first * R * D;
      const float* Af = nullptr;
      if constexpr (is_float) {
        Af = reinterpret_cast<const float*>(Aq);
      } else if (!bf16_dot) {
        xf.resize(D);
        a_page.resize(R * D);
        to_float(Aq, a_page.data(), R * D);
        Af = a_page.data();
      }
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t idx = entries[e].second;
        const scalar_t* xt = X + (idx / K) * xrow;
        float* he = h.data() + idx * R;
#ifdef REMIX_HAS_BF16_DOT
        if (bf16_dot) {
          dot_rows_bf16(reinterpret_cast<const at::BFloat16*>(xt), reinterpret_cast<const at::BFloat16*>(Aq), R, D,
                        he);
        } else
#endif
        {
          const float* xt_f;
          if constexpr (is_float) {
            xt_f = reinterpret_cast<const float*>(xt);
          } else {
            to_float(xt, xf.data(), D);
            xt_f = xf.data();
          }
          dot_rows(xt_f, Af, R, D, he);
        }
        for (int64_t j = 0; j < R; ++j) he[j] = round_h<scalar_t>(he[j] * cf[idx]);
      }
    });
    // Expand: acc[t, block] += h[t, q] B[p][:, block], a column block per task, each page's block read once
    const int64_t blocks = (N + kExpandColumns - 1) / kExpandColumns;
    at::parallel_for(0, blocks, inline_only ? blocks : 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> b_block(is_float || is_bf16 ? 0 : R * kExpandColumns);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t c0 = blk * kExpandColumns, n = std::min(kExpandColumns, N - c0);
        for (int64_t u = 0; u < U; ++u) std::fill_n(acc.data() + u * N + c0, n, 0.f);
        for (int64_t g = 0; g < G; ++g) {
          const scalar_t* Bq = Bp + entries[starts[g]].first * R * N + c0;
          if constexpr (!is_float && !is_bf16)
            for (int64_t j = 0; j < R; ++j) to_float(Bq + j * N, b_block.data() + j * n, n);
          for (int64_t e = starts[g]; e < starts[g + 1]; ++e) {
            const int64_t idx = entries[e].second;
            float* a = acc.data() + slot_of[idx / K] * N + c0;
            if constexpr (is_float) {
              axpy_rows(h.data() + idx * R, reinterpret_cast<const float*>(Bq), R, n, N, a);
            } else if constexpr (is_bf16) {
              axpy_rows_bf16(h.data() + idx * R, reinterpret_cast<const at::BFloat16*>(Bq), R, n, N, a);
            } else {
              axpy_rows(h.data() + idx * R, b_block.data(), R, n, n, a);
            }
          }
        }
      }
    });
    // out[t] = round(out[t] + delta), the one rounding, for the tokens with a page
    at::parallel_for(0, U, inline_only ? U : 16, [&](int64_t u0, int64_t u1) {
      std::vector<float> out_f(is_float ? 0 : N);
      for (int64_t u = u0; u < u1; ++u) {
        scalar_t* ot = O + tokens[u] * orow;
        const float* a = acc.data() + u * N;
        if constexpr (is_float) {
          for (int64_t d = 0; d < N; ++d) ot[d] = static_cast<float>(ot[d]) + a[d];
        } else {
          to_float(ot, out_f.data(), N);
          for (int64_t d = 0; d < N; ++d) out_f[d] += a[d];
          from_float(out_f.data(), ot, N);
        }
      }
    });
  });
}



inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define REMIX_HAS_AMX 1
// pool_lora_add on the AMX-BF16 matrix units (Sapphire Rapids and later), for prefill-sized bf16 calls. The
// AVX-512 loops above multiply-add 10-20x slower than the base model's GEMMs on these units, so at 480-token prompts
// the delta cost about as much as the base model's own layers. Here the work is grouped by unit: one pick's pages
// (pages_per_pick of them, a LoRA of rank up to pages_per_pick * r_page, taken as one matrix of up to 16 ranks) or
// else one page. The tokens that picked a unit are the rows of tile multiplies: the shrink is x rows [16, in]
// (gathered) x A_u^T [in, ranks], the expand h [16, ranks] x B_u [ranks, 32 columns] into one float32 row per (token,
// unit), which are summed per token in pick order and rounded once into out. The expand's h is split exactly into
// bfloat16 parts (h = hi + mid + lo by truncation, 8 significant bits each) stacked along the contraction against
// B_u once per part. That kept float32 h at no extra cost below 11 ranks; since h is rounded to bf16 first (round_h,
// the contract), mid and lo are zero, and taking hi alone would save a tile multiply past 10 ranks (left for a
// machine with AMX to test). The result is the AVX-512 paths' up to the order of the float32 sums (and where that
// order moves an h across a bf16 rounding boundary, one bf16 spacing of it).

// Whether the CPU has AMX-BF16 and Linux let this process use the tile state (each process must ask once).
bool cpu_has_amx_bf16() {
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22))) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtileData) == 0 && cpu_has_bf16_dot();
  }();
  return has;
}

// Off: pool_lora_add keeps to the AVX-512 paths (REMIX_CPU_AMX=0 at load time, or set_amx(False); tests compare).
bool amx_allowed = [] {
  const char* v = std::getenv("REMIX_CPU_AMX");
  return v == nullptr || std::string(v) != "0";
}();

constexpr int64_t kAmxRows = 16, kAmxDepth = 32;  // a tile multiply: [16, 32] bf16 x [32, 16] bf16 -> [16, 16] f32
constexpr int64_t kAmxMaxRanks = 16;  // of a unit: the shrink's product is one [16, ranks] float32 tile
constexpr int64_t kAmxCols = 32;  // the expand's column block: two product tiles
constexpr int64_t kOutPrefetch = 16;  // tokens ahead, in the expand's final sum
// A bf16 call runs on the matrix units from kAmxMinTokens tokens and kAmxMinEntriesPerUnit (token, unit) entries per
// distinct unit on average: a unit costs a repacking of its pages, and fewer tokens fill too little of a tile (a
// decode step's tokens spread over many checkpoints' LoRAs). About where the two paths break even on SmolLM2-135M
// shapes (bench/micro/cpu_pool_lora.py --one-layer).
constexpr int64_t kAmxMinTokens = 32, kAmxMinEntriesPerUnit = 8;
// Tokens per chunk of the AMX path: a unit's repacking is paid once per chunk (at n=64 a 480-token prompt's LoRAs
// are picked by about 15 tokens each), and a chunk's float32 rows per (token, unit) and column block stay in L2
// (1024 tokens x 4 units x 32 columns x 4 bytes).
constexpr int64_t kAmxMaxTokens = 1024;

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The compiler does not know that a tile load reads memory: stores before one must not move past it.
#define REMIX_TILE_FENCE() __asm__ volatile("" ::: "memory")

// The tile shapes: every tile [16 rows, 64 bytes], except, for the shrink of a unit of `ranks` columns, tiles 1
// and 7 (repacked A chunks) and 2, 4, 5, 6 (the [16, ranks] float32 products); its left operands are tiles 0 and 3.
// The thread's previous configuration (oneDNN's, between its GEMMs) is saved here and restored by amx_restore.
__attribute__((target("amx-tile"))) void amx_configure(int64_t shrink_ranks, TileConfig* saved) {
  _tile_storeconfig(saved);
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = kAmxRows;
    cfg.colsb[i] = 64;
  }
  if (shrink_ranks > 0)
    for (const int i : {1, 2, 4, 5, 6, 7}) cfg.colsb[i] = static_cast<uint16_t>(shrink_ranks * 4);
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) void amx_restore(const TileConfig& saved) {
  if (saved.palette != 0)
    _tile_loadconfig(&saved);
  else
    _tile_release();
}

// The AMX path's work for one chunk: units grouped (PageGroups over units), each unit's pages and shapes.
struct AmxCall {
  const PageGroups* gr;
  const int64_t* pg;  // pages [T, K]
  const float* cf;  // coef [T, K]
  int64_t unit, R, ranks, D, N;  // pages per unit, r_page, unit * r_page
  int64_t KH;  // an entry's row of h's three parts, zero past them: 32 (up to 10 ranks) or 64
};

// p rounded up to a multiple of 64 bytes (a buffer allocated 64 bytes longer than it needs).
template <typename T>
T* align64(T* p) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
}

// r[i] = column i of the 16 x 16 matrix of 32-bit values whose rows are r[0..15].
__attribute__((target("avx512f"))) inline void transpose16x16_epi32(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {  // pairs of rows interleaved
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // quads: each 128-bit lane now holds a 4 x 4 block's column
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int h = 0; h < 2; ++h)  // then the 128-bit lanes
    for (int m = 0; m < 4; ++m) {
      t[8 * h + m] = _mm512_shuffle_i32x4(r[8 * h + m], r[8 * h + 4 + m], 0x88);
      t[8 * h + 4 + m] = _mm512_shuffle_i32x4(r[8 * h + m], r[8 * h + 4 + m], 0xdd);
    }
  for (int m = 0; m < 8; ++m) {
    r[m] = _mm512_shuffle_i32x4(t[m], t[8 + m], 0x88);
    r[8 + m] = _mm512_shuffle_i32x4(t[m], t[8 + m], 0xdd);
  }
}

// Shrink of groups [g0, g1): H[e] = (x[t] A_u^T) * coef, split into bf16 parts, for entry e = (t, unit u). The
// unit's A rows (its pages' rows in order; zeros for a -1 page) are repacked once per group into the tile's pair
// layout, apk[c][i][j] = (A_u[j][32c+2i], A_u[j][32c+2i+1]).
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl"))) void amx_shrink(
    const AmxCall& call, int64_t g0, int64_t g1, const uint16_t* X, int64_t xrow, const uint16_t* Ap, uint16_t* H) {
  const PageGroups& gr = *call.gr;
  const int64_t R = call.R, ranks = call.ranks, D = call.D, K = gr.K;
  const int64_t chunks = (D + kAmxDepth - 1) / kAmxDepth, Dp = chunks * kAmxDepth;
  thread_local std::vector<uint32_t> xbuf_tl, apk_tl, zeros_tl;  // [16, Dp] pairs; [chunks, 16, ranks] pairs; [D / 2]
  auto& xbuf = xbuf_tl;
  auto& apk = apk_tl;
  auto& zeros = zeros_tl;
  zeros.assign(D / 2, 0);
  xbuf.assign(kAmxRows * Dp / 2 + 16, 0);  // zero columns past D: 0 x (A's zero padding) must not meet a NaN
  apk.assign(chunks * 16 * ranks + 16, 0);
  uint32_t* const xb = align64(xbuf.data());  // tile rows on cache-line boundaries (as align64 says)
  uint32_t* const ap = align64(apk.data());
  alignas(64) float prod[4 * kAmxRows * kAmxMaxRanks];
  const int64_t tile = kAmxRows * ranks;
  const __mmask16 rank_mask = static_cast<__mmask16>((1u << ranks) - 1);
  TileConfig saved;
  amx_configure(ranks, &saved);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t* unit_pages = call.pg + gr.entries[gr.starts[g]].second;
    const uint32_t* rows[kAmxMaxRanks];  // the unit's A rows as D / 2 pairs (D even); a -1 page's read as zeros
    for (int64_t j = 0; j < ranks; ++j) {
      const int64_t page = unit_pages[j / R];
      rows[j] = page < 0 ? zeros.data() : reinterpret_cast<const uint32_t*>(Ap + (page * R + j % R) * D);
    }
    const int64_t W = D / 2;
    int64_t w0 = 0;
    for (; w0 + 16 <= W; w0 += 16) {  // 16 pairs of each row at a time: one 16 x 16 transpose
      __m512i blk[16];
      for (int64_t j = 0; j < 16; ++j) blk[j] = j < ranks ? _mm512_loadu_si512(rows[j] + w0) : _mm512_setzero_si512();
      transpose16x16_epi32(blk);
      for (int64_t i = 0; i < 16; ++i) _mm512_mask_storeu_epi32(ap + (w0 + i) * ranks, rank_mask, blk[i]);
    }
    for (int64_t w = w0; w < W; ++w)
      for (int64_t j = 0; j < ranks; ++j) ap[w * ranks + j] = rows[j][w];
    for (int64_t e0 = gr.starts[g]; e0 < gr.starts[g + 1]; e0 += kAmxRows) {
      const int64_t m = std::min(kAmxRows, gr.starts[g + 1] - e0);
      for (int64_t r = 0; r < m; ++r)
        std::memcpy(xb + r * Dp / 2, X + (gr.entries[e0 + r].second / K) * xrow, D * 2);
      // The next tile's x rows, scattered over a buffer larger than L2: fetched while this tile multiplies.
      for (int64_t e = e0 + kAmxRows; e < std::min(e0 + 2 * kAmxRows, gr.starts[g + 1]); ++e) {
        const char* row = reinterpret_cast<const char*>(X + (gr.entries[e].second / K) * xrow);
        for (int64_t b = 0; b < D * 2; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
      }
      REMIX_TILE_FENCE();
      // Four accumulators in turn: a multiply into the tile the previous one wrote would wait out its latency.
#define REMIX_SHRINK_STEP(a, b, acc, c)                   \
  _tile_loadd(a, xb + (c) * 16, Dp * 2);                  \
  _tile_loadd(b, ap + (c) * 16 * ranks, ranks * 4);        \
  _tile_dpbf16ps(acc, a, b);
      _tile_zero(2);
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
      int64_t c = 0;
      for (; c + 4 <= chunks; c += 4) {
        REMIX_SHRINK_STEP(0, 1, 2, c)
        REMIX_SHRINK_STEP(3, 7, 4, c + 1)
        REMIX_SHRINK_STEP(0, 1, 5, c + 2)
        REMIX_SHRINK_STEP(3, 7, 6, c + 3)
      }
      if (c < chunks) { REMIX_SHRINK_STEP(0, 1, 2, c) }
      if (c + 1 < chunks) { REMIX_SHRINK_STEP(3, 7, 4, c + 1) }
      if (c + 2 < chunks) { REMIX_SHRINK_STEP(0, 1, 5, c + 2) }
#undef REMIX_SHRINK_STEP
      _tile_stored(2, prod, ranks * 4);
      _tile_stored(4, prod + tile, ranks * 4);
      _tile_stored(5, prod + 2 * tile, ranks * 4);
      _tile_stored(6, prod + 3 * tile, ranks * 4);
      for (int64_t r = 0; r < m; ++r) {
        const int64_t idx = gr.entries[e0 + r].second;
        uint16_t* he = H + (e0 + r) * call.KH;
        for (int64_t j = 0; j < ranks; ++j) {  // exact split by truncation
          const int64_t i = r * ranks + j;
          float h = round_h<at::BFloat16>(((prod[i] + prod[tile + i]) + (prod[2 * tile + i] + prod[3 * tile + i])) *
                                          call.cf[idx + j / R]);
          for (int64_t part = 0; part < 3; ++part) {
            const uint32_t top = float_bits(h) & 0xffff0000u;
            he[part * ranks + j] = static_cast<uint16_t>(top >> 16);
            h -= bits_to_float(top);
          }
        }
      }
    }
  }
  amx_restore(saved);
}

// 16 floats rounded to bfloat16 as float_to_bf16 rounds (to nearest even, NaN to 0x7FC0).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m256i round_bf16x16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// Expand of column blocks [b0, b1) (kAmxCols columns each): E[e] = H[e] B_u[:, block] for every entry, then each
// token's out row += the sum of its entries' rows, rounded once. B_u's block is repacked per group into pair rows,
// (B_u[2i][c], B_u[2i+1][c]), written once per part of h, zero past them: 16 pair rows, two tiles that stay loaded
// while the group's entries go through two tiles at a time, each pair's products stored while the next pair's
// multiply (a store waits for its multiply, tens of cycles; two sets of product tiles hide that wait).
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl"))) void amx_expand(
    const AmxCall& call, int64_t b0, int64_t b1, const uint16_t* Bp, const uint16_t* H, const int64_t* pos,
    uint16_t* O, int64_t orow) {
  const PageGroups& gr = *call.gr;
  const int64_t R = call.R, ranks = call.ranks, N = call.N, K = gr.K, unit = call.unit;
  const int64_t E = static_cast<int64_t>(gr.entries.size()), G = static_cast<int64_t>(gr.starts.size()) - 1;
  const int64_t half = ranks / 2, KH = call.KH, ld = KH * 2;
  thread_local std::vector<uint32_t> bpk_tl;  // [KH / 2, kAmxCols] pairs
  thread_local std::vector<float> e_tl;  // [E + 32, kAmxCols]
  auto& bpk = bpk_tl;
  auto& Eb = e_tl;
  bpk.assign(KH / 2 * kAmxCols + 16, 0);
  uint32_t* const bp = align64(bpk.data());
  if (static_cast<int64_t>(Eb.size()) < (E + 2 * kAmxRows + 16) * kAmxCols) Eb.resize((E + 2 * kAmxRows + 16) * kAmxCols);
  // Rows on cache-line boundaries: a tile row's store then writes whole lines (a vector's 16-byte alignment
  // split each 64-byte row over two lines).
  float* const E_rows = align64(Eb.data());
  const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                          37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  constexpr int64_t ecol = kAmxCols * 4;  // bytes per E row
  TileConfig saved;
  amx_configure(0, &saved);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t c0 = blk * kAmxCols, n = std::min(kAmxCols, N - c0);
    const __mmask32 m = n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1;
    int64_t pending = -1;  // the first entry of the tile whose products wait in 4, 5 (odd) or 6, 7 (even)
    bool odd = false;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t* unit_pages = call.pg + gr.entries[gr.starts[g]].second;
      for (int64_t i = 0; i < half; ++i) {  // pair row i from the unit's rows 2i and 2i+1 (one page: R is even)
        const int64_t page = unit_pages[2 * i / R];
        __m512i lo = _mm512_setzero_si512(), hi = lo;
        if (page >= 0) {
          const uint16_t* r0 = Bp + (page * R + (2 * i) % R) * N + c0;
          const __m512i a = _mm512_maskz_loadu_epi16(m, r0), b = _mm512_maskz_loadu_epi16(m, r0 + N);
          lo = _mm512_permutex2var_epi16(a, lo_idx, b);
          hi = _mm512_permutex2var_epi16(a, hi_idx, b);
        }
        for (int64_t part = 0; part < 3; ++part) {
          uint32_t* dst = bp + (part * half + i) * kAmxCols;
          _mm512_storeu_si512(dst, lo);
          _mm512_storeu_si512(dst + 16, hi);
        }
      }
      REMIX_TILE_FENCE();
      // A group's last tiles run past it into the next group's rows (or the padding): those rows of Eb are written
      // again when their own group comes, later in this same loop.
      const int64_t e_end = gr.starts[g + 1];
      if (KH == kAmxDepth) {  // B: tiles 2, 3 (two column tiles); h tiles 0 and 1 in turn, into products 4, 5 / 6, 7
        _tile_loadd(2, bp, kAmxCols * 4);
        _tile_loadd(3, bp + 16, kAmxCols * 4);
        // Software-pipelined: each tile's products are stored after the next tile's multiplies are issued, and the
        // previous group's last tile after this group's first (its rows past that group are then written again).
        for (int64_t e0 = gr.starts[g]; e0 < e_end; e0 += kAmxRows, odd = !odd) {
          if (!odd) {
            _tile_loadd(0, H + e0 * KH, ld);
            _tile_zero(4);
            _tile_zero(5);
            _tile_dpbf16ps(4, 0, 2);
            _tile_dpbf16ps(5, 0, 3);
            if (pending >= 0) {
              _tile_stored(6, E_rows + pending * kAmxCols, ecol);
              _tile_stored(7, E_rows + pending * kAmxCols + 16, ecol);
            }
          } else {
            _tile_loadd(1, H + e0 * KH, ld);
            _tile_zero(6);
            _tile_zero(7);
            _tile_dpbf16ps(6, 1, 2);
            _tile_dpbf16ps(7, 1, 3);
            _tile_stored(4, E_rows + pending * kAmxCols, ecol);
            _tile_stored(5, E_rows + pending * kAmxCols + 16, ecol);
          }
          pending = e0;
        }
      } else {  // two contraction chunks: B tiles 2, 3 (first), 4, 5 (second); h tiles 0, 1; products 6, 7
        _tile_loadd(2, bp, kAmxCols * 4);
        _tile_loadd(3, bp + 16, kAmxCols * 4);
        _tile_loadd(4, bp + 16 * kAmxCols, kAmxCols * 4);
        _tile_loadd(5, bp + 16 * kAmxCols + 16, kAmxCols * 4);
        for (int64_t e0 = gr.starts[g]; e0 < e_end; e0 += kAmxRows) {
          float* er = E_rows + e0 * kAmxCols;
          _tile_loadd(0, H + e0 * KH, ld);
          _tile_loadd(1, H + e0 * KH + kAmxDepth, ld);
          _tile_zero(6);
          _tile_zero(7);
          _tile_dpbf16ps(6, 0, 2);
          _tile_dpbf16ps(7, 0, 3);
          _tile_dpbf16ps(6, 1, 4);
          _tile_dpbf16ps(7, 1, 5);
          _tile_stored(6, er, ecol);
          _tile_stored(7, er + 16, ecol);
        }
      }
    }
    if (pending >= 0 && KH == kAmxDepth) {  // the last tile's products
      if (odd) {
        _tile_stored(4, E_rows + pending * kAmxCols, ecol);
        _tile_stored(5, E_rows + pending * kAmxCols + 16, ecol);
      } else {
        _tile_stored(6, E_rows + pending * kAmxCols, ecol);
        _tile_stored(7, E_rows + pending * kAmxCols + 16, ecol);
      }
    }
    const __mmask16 m_lo = static_cast<__mmask16>(m), m_hi = static_cast<__mmask16>(m >> 16);
    const int64_t U = static_cast<int64_t>(gr.tokens.size());
    for (int64_t u = 0; u < U; ++u) {  // out[t] = round(out[t] + the sum over t's units, in pick order)
      // out's rows are N * 2 bytes apart, a stride the hardware prefetchers do not follow: fetch ahead by hand.
      if (u + kOutPrefetch < U)
        _mm_prefetch(reinterpret_cast<const char*>(O + gr.tokens[u + kOutPrefetch] * orow + c0), _MM_HINT_T0);
      const int64_t t = gr.tokens[u];
      __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
      for (int64_t q = 0; q < K; q += unit) {
        const int64_t e = pos[t * K + q];
        if (e < 0) continue;
        const float* er = E_rows + e * kAmxCols;
        s0 = _mm512_add_ps(s0, _mm512_loadu_ps(er));
        s1 = _mm512_add_ps(s1, _mm512_loadu_ps(er + 16));
      }
      uint16_t* ot = O + t * orow + c0;
      const __m512 o0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m_lo, ot)), 16));
      const __m512 o1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m_hi, ot + 16)), 16));
      _mm256_mask_storeu_epi16(ot, m_lo, round_bf16x16(_mm512_add_ps(o0, s0)));
      _mm256_mask_storeu_epi16(ot + 16, m_hi, round_bf16x16(_mm512_add_ps(o1, s1)));
    }
  }
  amx_restore(saved);
}

// pool_lora_add on the matrix units for one chunk of a bf16 call: units grouped, shrink, expand; false (nothing
// done) where the units' tokens are too few to fill tiles. A unit is a pick's pages_per_pick pages when they fit
// one tile (unit * r_page <= 16) and every unit with the same first page lists the same pages (as the pool's page
// tables do; else one page per unit).
bool pool_lora_add_amx(const torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& A, const torch::Tensor& B,
                       const int64_t* pg, const float* cf, int64_t K, int64_t pages_per_pick) {
  const int64_t T = out.size(0), N = out.size(1), D = x.size(1), R = A.size(1);
  thread_local PageGroups groups_tl;
  thread_local std::vector<uint16_t> h_tl;
  thread_local std::vector<int64_t> pos_tl;
  auto& groups = groups_tl;
  auto& H = h_tl;
  auto& pos = pos_tl;
  int64_t unit = pages_per_pick > 1 && pages_per_pick * R <= kAmxMaxRanks ? pages_per_pick : 1;
  if (!groups.build(pg, T, K, A.size(0), unit)) {
    unit = 1;
    groups.build(pg, T, K, A.size(0), unit);
  }
  const int64_t E = static_cast<int64_t>(groups.entries.size()), G = static_cast<int64_t>(groups.starts.size()) - 1;
  if (E == 0) return true;
  if (E < kAmxMinEntriesPerUnit * G) return false;
  const int64_t ranks = unit * R;
  const AmxCall call{&groups, pg, cf, unit, R, ranks, D, N, 3 * ranks <= kAmxDepth ? kAmxDepth : 2 * kAmxDepth};
  H.assign((E + 2 * kAmxRows) * call.KH + 32, 0);  // h's parts, zero past them, per entry
  uint16_t* const Hr = align64(H.data());
  pos.assign(T * K, -1);
  for (int64_t e = 0; e < E; ++e) pos[groups.entries[e].second] = e;
  const auto* X = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* Ap = reinterpret_cast<const uint16_t*>(A.data_ptr<at::BFloat16>());
  const auto* Bp = reinterpret_cast<const uint16_t*>(B.data_ptr<at::BFloat16>());
  auto* O = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  // Small calls (a decode step's) run on the calling thread, as in pool_lora_add_by_page: waking the pool costs more.
  const bool inline_only = E * ranks * (D + N) < 8 * kPoolMacsPerChunk;
  const int64_t blocks = (N + kAmxCols - 1) / kAmxCols;
  if (inline_only) {
    amx_shrink(call, 0, G, X, x.stride(0), Ap, Hr);
    amx_expand(call, 0, blocks, Bp, Hr, pos.data(), O, out.stride(0));
    return true;
  }
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) { amx_shrink(call, g0, g1, X, x.stride(0), Ap, Hr); });
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    amx_expand(call, b0, b1, Bp, Hr, pos.data(), O, out.stride(0));
  });
  return true;
}
#endif

#ifdef REMIX_HAS_BF16_DOT
// pool_lora_add for prefill-sized bf16 calls on AVX512-BF16 without usable tiles (AMD Zen 4 and later; AMX off).
// The page-by-page path reads a token's x row, and widens and re-reads B rows and the float32 accumulator, once per
// (token, page): at a 480-token prompt the delta cost a third of the base model's layers. Here the work is grouped
// by unit as on AMX (one pick's pages, up to kTiledMaxRanks rank rows, else one page) and a unit's tokens go four at
// a time, so that each load serves four products. Shrink: 4 tokens x 4 rank rows, 16 vdpbf16ps accumulators along
// `in` (exact products, float32 sums), summed across lanes by one shuffle tree, h rounded to bf16 (round_h). Expand:
// the unit's B rows of a kTiledCols-column block packed into rank pairs once per call, then 4 tokens x kTiledCols
// columns held in 16 registers over the unit's rank pairs (vdpbf16ps: two ranks' exact products per instruction, half
// the instructions of float32 FMAs), added into the token's float32 row; each row is rounded once into out when every
// unit of its block is done. The by-page path's result up to the order of float32 sums (and where that order moves an
// h across a bf16 rounding boundary, one bf16 spacing of it).
constexpr int64_t kTiledCols = 64, kTiledMaxRanks = 32;
// Tokens per call chunk: a unit's B rows are read and widened once per chunk (at n=64 a 480-token prompt's LoRAs are
// picked by about 15 tokens each, so larger chunks read B less often), and a block's float32 rows (chunk x kTiledCols x
// 4 bytes, 512 KiB) stay in L2. 2048 against 1024: the gate delta of 3840 prefill tokens at n=64 r=16 in 9.6 ms
// against 9.9.
constexpr int64_t kTiledMaxTokens = 2048, kOutAhead = 8, kAPrefetchBytes = 512;
// Below this many (token, unit) entries per unit on average the page-by-page path is as fast: about where the two
// break even for a 32-token decode step of one checkpoint (bench/micro/cpu_pool_lora.py shapes).
constexpr int64_t kTiledMinEntriesPerUnit = 4;

// Off: pool_lora_add keeps to the page-by-page path (REMIX_CPU_TILED=0 at load time, or set_tiled(False)).
bool tiled_allowed = [] {
  const char* v = std::getenv("REMIX_CPU_TILED");
  return v == nullptr || std::string(v) != "0";
}();

// Lane i of the result = the sum of v[i]'s 16 lanes: pairs, then quads within each 128-bit lane, then across them.
__attribute__((target("avx512f,avx512dq"), always_inline)) inline __m512 sum_lanes16(const __m512* v) {
  __m512 w[8], z[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of v[4i .. 4i+3]
    const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
    z[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
  const __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], 0x88), _mm512_shuffle_f32x4(z[2], z[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, 0x88), _mm512_shuffle_f32x4(y01, y23, 0xDD));
}

// out[4i + j] = x_i . a_j over D bf16 values, for four x rows and four A rows.
__attribute__((target("avx512f,avx512bw,avx512dq,avx512bf16"))) void dot4x4_bf16(const uint16_t* const* xs,
                                                                                  const uint16_t* const* as,
                                                                                  int64_t D, float* out) {
  constexpr int64_t kStep = 32;
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + kStep <= D; d += kStep) {
    __m512bh a[4];
    for (int j = 0; j < 4; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(as[j] + d) + kAPrefetchBytes, _MM_HINT_T0);
      a[j] = (__m512bh)_mm512_loadu_si512(as[j] + d);
    }
    for (int i = 0; i < 4; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xs[i] + d);
      for (int j = 0; j < 4; ++j) acc[4 * i + j] = _mm512_dpbf16_ps(acc[4 * i + j], xv, a[j]);
    }
  }
  if (d < D) {  // masked loads read zeros past D
    const __mmask32 m = (__mmask32(1) << (D - d)) - 1;
    __m512bh a[4];
    for (int j = 0; j < 4; ++j) a[j] = (__m512bh)_mm512_maskz_loadu_epi16(m, as[j] + d);
    for (int i = 0; i < 4; ++i) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, xs[i] + d);
      for (int j = 0; j < 4; ++j) acc[4 * i + j] = _mm512_dpbf16_ps(acc[4 * i + j], xv, a[j]);
    }
  }
  _mm512_storeu_ps(out, sum_lanes16(acc));
}

// ds[i][0 .. kTiledCols) += sum_r hs[i][r] * bb[r] for four tokens i, over rank pairs: hs[i][p] holds h's ranks 2p
// and 2p+1 as a bf16 pair, bb[p] the unit's B rows 2p and 2p+1 of the block as bf16 pairs, column by column, so
// that one vdpbf16ps adds two ranks' exact products into 16 float32 columns (half the instructions of float32 FMAs).
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void expand4(const uint32_t* const* hs, const uint32_t* bb,
                                                                    int64_t pairs, float* const* ds, int64_t m) {
  constexpr int V = kTiledCols / kLanes;
  __m512 acc[4][V];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh b[V];
    for (int v = 0; v < V; ++v) b[v] = (__m512bh)_mm512_load_si512(bb + p * kTiledCols + v * kLanes);
    for (int i = 0; i < 4; ++i) {
      const __m512bh h = (__m512bh)_mm512_set1_epi32(static_cast<int>(hs[i][p]));
      for (int v = 0; v < V; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], h, b[v]);
    }
  }
  for (int64_t i = 0; i < m; ++i)  // in order: two entries of one token (a page listed twice) add to the same row
    for (int v = 0; v < V; ++v)
      _mm512_storeu_ps(ds[i] + v * kLanes, _mm512_add_ps(_mm512_loadu_ps(ds[i] + v * kLanes), acc[i][v]));
}

// bb[p][c] = (row 2p's column c0 + c, row 2p+1's) as a bf16 pair (low half, high half), for c < kTiledCols: zeros
// past n columns and in the high half past nrows rows.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void pack_pairs(const uint16_t* const* rows, int64_t nrows,
                                                                      int64_t c0, int64_t n, uint32_t* bb) {
  for (int64_t r = 0; r < nrows; r += 2)
    for (int64_t v = 0; v < kTiledCols; v += kLanes) {
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(kLanes, n - v));
      const __mmask16 m = left == kLanes ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      __m512i pair = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, rows[r] + c0 + v));
      if (r + 1 < nrows) {
        const __m512i high = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, rows[r + 1] + c0 + v));
        pair = _mm512_or_si512(pair, _mm512_slli_epi32(high, 16));
      }
      _mm512_store_si512(bb + (r / 2) * kTiledCols + v, pair);
    }
}

// ot[0 .. n) = bf16(float(ot) + dl), rounded to nearest even as float_to_bf16 rounds (NaN to 0x7FC0).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m256i add_round16(__m512 o, __m512 dl) {
  const __m512 v = _mm512_add_ps(o, dl);
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void add_round_bf16(const float* dl, at::BFloat16* ot,
                                                                          int64_t n) {
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ot + d), add_round16(load_bf16(ot + d), _mm512_loadu_ps(dl + d)));
  if (d < n) {
    const __mmask16 m = __mmask16((1u << (n - d)) - 1);
    _mm256_mask_storeu_epi16(ot + d, m, add_round16(load_bf16_masked(ot + d, m), _mm512_maskz_loadu_ps(m, dl + d)));
  }
}

// One chunk of a bf16 call, tiled (see above); false (nothing done) where its units average fewer than
// kTiledMinEntriesPerUnit tokens (a decode step spread over many LoRAs: four-token tiles would run mostly empty).
// Rows of a unit's -1 pages are left out.
bool pool_lora_add_tiled(const torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& A,
                         const torch::Tensor& B, const int64_t* pg, const float* cf, int64_t K, int64_t pages_per_pick) {
  const int64_t T = out.size(0), N = out.size(1), D = x.size(1), R = A.size(1);
  thread_local PageGroups groups_tl;
  thread_local std::vector<uint16_t> h_tl;
  auto& groups = groups_tl;
  auto& H = h_tl;
  int64_t unit = pages_per_pick > 1 && pages_per_pick * R <= kTiledMaxRanks ? pages_per_pick : 1;
  if (!groups.build(pg, T, K, A.size(0), unit)) {
    unit = 1;
    groups.build(pg, T, K, A.size(0), unit);
  }
  const auto& entries = groups.entries;
  const auto &starts = groups.starts, &tokens = groups.tokens, &slot_of = groups.slot_of;
  const int64_t E = static_cast<int64_t>(entries.size()), G = static_cast<int64_t>(starts.size()) - 1;
  if (E == 0) return true;
  if (E < kTiledMinEntriesPerUnit * G) return false;
  // H: each entry's h, bf16, rank pairs (an odd unit's last pair zero-padded)
  const int64_t HR = unit * R, HP = (HR + 1) / 2, U = static_cast<int64_t>(tokens.size());
  const int64_t blocks = (N + kTiledCols - 1) / kTiledCols;
  if (static_cast<int64_t>(H.size()) < E * 2 * HP) H.resize(E * 2 * HP);
  // Each entry's float32 row in a block's buffer (its token's index in tokens), once per call rather than by a 64-bit
  // division per entry and column block in the expand's inner loop.
  thread_local std::vector<int64_t> row_tl;
  auto& row_of = row_tl;
  row_of.resize(E);
  for (int64_t e = 0; e < E; ++e) row_of[e] = slot_of[entries[e].second / K] * kTiledCols;
  const auto* X = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* Ap = reinterpret_cast<const uint16_t*>(A.data_ptr<at::BFloat16>());
  const auto* Bp = reinterpret_cast<const uint16_t*>(B.data_ptr<at::BFloat16>());
  auto* O = out.data_ptr<at::BFloat16>();
  const int64_t xrow = x.stride(0), orow = out.stride(0);
  // A unit's rank rows: A and B rows of its set pages, and each row's offset in the pick (for its coefficient).
  const auto unit_rows = [&](int64_t g, const uint16_t** a, const uint16_t** b, int64_t* off) {
    const int64_t i0 = entries[starts[g]].second;
    int64_t rows = 0;
    for (int64_t c = 0; c < unit; ++c) {
      const int64_t p = pg[i0 + c];
      for (int64_t j = 0; p >= 0 && j < R; ++j, ++rows) {
        if (a) a[rows] = Ap + (p * R + j) * D;
        if (b) b[rows] = Bp + (p * R + j) * N;
        off[rows] = c;
      }
    }
    return rows;
  };
  const bool inline_only = E * HR * (D + N) < 8 * kPoolMacsPerChunk;
  // Shrink: H[e, row] = bf16(coef * (A_row . x[t])) for entry e = (t, unit), rounded as the contract says
  parallel_entries(starts, inline_only, [&](int64_t g, int64_t s, int64_t s_end) {
    const uint16_t* a[kTiledMaxRanks];
    int64_t off[kTiledMaxRanks];
    const int64_t rows = unit_rows(g, a, nullptr, off);
    for (int64_t e0 = s; e0 < s_end; e0 += 4) {
      const uint16_t* xs[4];
      for (int64_t i = 0; i < 4; ++i) xs[i] = X + (entries[std::min(e0 + i, s_end - 1)].second / K) * xrow;
      for (int64_t r0 = 0; r0 < rows; r0 += 4) {
        const uint16_t* as[4];
        float sums[16];
        for (int64_t j = 0; j < 4; ++j) as[j] = a[std::min(r0 + j, rows - 1)];
        dot4x4_bf16(xs, as, D, sums);
        for (int64_t i = 0; i < 4 && e0 + i < s_end; ++i) {
          const int64_t idx = entries[e0 + i].second;
          for (int64_t j = 0; j < 4 && r0 + j < rows; ++j)
            H[(e0 + i) * 2 * HP + r0 + j] = at::BFloat16(sums[4 * i + j] * cf[idx + off[r0 + j]]).x;  // round_h
        }
      }
      if (rows % 2 == 1)  // the last pair's high half (its B row is zero too, but garbage could be a NaN)
        for (int64_t i = 0; i < 4 && e0 + i < s_end; ++i) H[(e0 + i) * 2 * HP + rows] = 0;
    }
  });
  // Expand, a column block per task: delta rows += h B, then out = round(out + delta), the one rounding
  at::parallel_for(0, blocks, inline_only ? blocks : 1, [&](int64_t b0, int64_t b1) {
    const uint16_t* b[kTiledMaxRanks];
    int64_t off[kTiledMaxRanks];
    alignas(64) uint32_t bb[kTiledMaxRanks / 2 * kTiledCols];
    // The block's float32 rows, token after token: one buffer per task, reused block after block, so that it
    // stays in L2 (one per block was the whole [tokens, N] delta, megabytes, streamed through L3 per call).
    thread_local std::vector<float> delta_tl;
    if (static_cast<int64_t>(delta_tl.size()) < U * kTiledCols) delta_tl.resize(U * kTiledCols);
    float* const dblk = delta_tl.data();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t c0 = blk * kTiledCols, n = std::min(kTiledCols, N - c0);
      std::memset(dblk, 0, U * kTiledCols * sizeof(float));
      int64_t rows = G > 0 ? unit_rows(0, nullptr, b, off) : 0;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t s = starts[g], s_end = starts[g + 1], cur = rows;
        pack_pairs(b, cur, c0, n, bb);
        if (g + 1 < G) {  // the next unit's rows of this block are scattered over the pool: fetch them meanwhile
          rows = unit_rows(g + 1, nullptr, b, off);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < n * 2; c += 64)
              _mm_prefetch(reinterpret_cast<const char*>(b[r] + c0) + c, _MM_HINT_T0);
        }
        for (int64_t e0 = s; e0 < s_end; e0 += 4) {
          const uint32_t* hs[4];
          float* ds[4];
          for (int64_t i = 0; i < 4; ++i) {
            const int64_t e = std::min(e0 + i, s_end - 1);
            hs[i] = reinterpret_cast<const uint32_t*>(H.data() + e * 2 * HP);
            ds[i] = dblk + row_of[e];
          }
          expand4(hs, bb, (cur + 1) / 2, ds, std::min<int64_t>(4, s_end - e0));
        }
      }
      for (int64_t u = 0; u < U; ++u) {  // out's rows are far apart: fetch a few tokens ahead
        if (u + kOutAhead < U) {
          const char* next = reinterpret_cast<const char*>(O + tokens[u + kOutAhead] * orow + c0);
          for (int64_t c = 0; c < n * 2; c += 64) _mm_prefetch(next + c, _MM_HINT_T0);
        }
        add_round_bf16(dblk + u * kTiledCols, O + tokens[u] * orow + c0, n);
      }
    }
  });
  return true;
}
#endif

// out[t] += sum_q coef[t, q] * (x[t] A[p]^T) B[p], p = pages[t, q], page -1 skipped: pool/delta.py's
// lora_add_reference, the contract (in a bf16 call h = coef * (x A^T) rounded to bf16, round_h; float32
// accumulation, one rounding into out per token). A token reads only
// its own listed pages, K * r_page * (in + N) values, whatever the pool's size; a token whose pages are all -1 is
// not touched. out and x may be column slices (contiguous rows at any stride). bf16 dots use AVX512-BF16 on x and
// A as they are; otherwise x[t] is widened once per token and A pages not in float32 once per page. bf16 calls of
// kAmxMinTokens or more run on AMX where the CPU has it; else, from kPageMajorMinTokens, tiled on AVX512-BF16
// where the CPU has that (pool_lora_add_tiled). pages_per_pick (dividing K) says that each run of that many pages
// in a token's list is one pick's LoRA (as pool_route lists them), which the AMX and tiled paths then take as one
// matrix; the result does not depend on it.
void pool_lora_add(const torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& A, const torch::Tensor& B,
                   const torch::Tensor& pages_, const torch::Tensor& coef_, int64_t pages_per_pick) {
  check_cpu("pool_lora_add", {&out, &x, &A, &B, &pages_, &coef_});
  TORCH_CHECK(out.dim() == 2 && out.stride(1) == 1, "pool_lora_add: out must be [T, N] with contiguous rows");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "pool_lora_add: x must be [T, in] with contiguous rows");
  TORCH_CHECK(A.dim() == 3 && A.is_contiguous(), "pool_lora_add: A must be a contiguous [P, r_page, in]");
  TORCH_CHECK(B.dim() == 3 && B.is_contiguous(), "pool_lora_add: B must be a contiguous [P, r_page, N]");
  const auto dtype = out.scalar_type();
  TORCH_CHECK(x.scalar_type() == dtype && A.scalar_type() == dtype && B.scalar_type() == dtype,
              "pool_lora_add: out, x, A and B must share a dtype, got ", dtype, ", ", x.scalar_type(), ", ",
              A.scalar_type(), ", ", B.scalar_type());
  TORCH_CHECK(pages_.dim() == 2 && pages_.scalar_type() == at::kLong, "pool_lora_add: pages must be an int64 [T, K]");
  TORCH_CHECK(coef_.dim() == 2 && coef_.scalar_type() == at::kFloat, "pool_lora_add: coef must be a float32 [T, K]");
  const int64_t T = out.size(0), N = out.size(1), D = x.size(1), P = A.size(0), R = A.size(1), K = pages_.size(1);
  TORCH_CHECK(x.size(0) == T && pages_.size(0) == T && coef_.size(0) == T && coef_.size(1) == K,
              "pool_lora_add: out, x, pages and coef must have the same tokens (and pages, coef the same K)");
  TORCH_CHECK(A.size(2) == D && B.size(0) == P && B.size(1) == R && B.size(2) == N, "pool_lora_add: A is [",
              A.size(0), ", ", A.size(1), ", ", A.size(2), "] and B [", B.size(0), ", ", B.size(1), ", ", B.size(2),
              "], expected [P, r_page, ", D, "] and [P, r_page, ", N, "] for x [T, ", D, "] and out [T, ", N, "]");
  TORCH_CHECK(pages_per_pick >= 1 && K % pages_per_pick == 0, "pool_lora_add: pages_per_pick=", pages_per_pick,
              " must be at least 1 and divide the pages per token, K=", K);
  const auto pages = pages_.contiguous(), coef = coef_.contiguous();
  const int64_t* pg = pages.data_ptr<int64_t>();
  const float* cf = coef.data_ptr<float>();
  for (int64_t i = 0; i < T * K; ++i)  // before any write: a bad id leaves out as it was
    TORCH_CHECK(pg[i] >= -1 && pg[i] < P, "pool_lora_add: page id ", pg[i], " (token ", i / K,
                ") out of range for a pool of P=", P, " pages (-1 skips)");
  if (T == 0 || K == 0 || R == 0 || N == 0) return;
  bool bf16_dot = false;
#ifdef REMIX_HAS_BF16_DOT
  bf16_dot = dtype == at::kBFloat16 && cpu_has_bf16_dot();
#endif
  // Tokens [start, start + n) page by page, in chunks of kPageMajorMaxTokens tokens, so that the chunk's float32
  // accumulator stays in L2 (a whole prefill's is megabytes: 2.0 us per token at 4096 tokens against 1.1 at 127,
  // bench/micro/cpu_pool_lora.py).
  const auto page_major = [&](int64_t start, int64_t n) {
    for (int64_t s = start; s < start + n; s += kPageMajorMaxTokens) {
      const int64_t m = std::min(kPageMajorMaxTokens, start + n - s);
      pool_lora_add_by_page(out.narrow(0, s, m), x.narrow(0, s, m), A, B, pg + s * K, cf + s * K, K, bf16_dot);
    }
  };
  if (T >= kPageMajorMinTokens) {
#ifdef REMIX_HAS_AMX
    if (dtype == at::kBFloat16 && T >= kAmxMinTokens && R % 2 == 0 && R <= 16 && D % 2 == 0 && amx_allowed &&
        cpu_has_amx_bf16()) {
      for (int64_t start = 0; start < T; start += kAmxMaxTokens) {
        const int64_t n = std::min(kAmxMaxTokens, T - start);
        if (!pool_lora_add_amx(out.narrow(0, start, n), x.narrow(0, start, n), A, B, pg + start * K, cf + start * K,
                               K, pages_per_pick))
          page_major(start, n);
      }
      return;
    }
#endif
#ifdef REMIX_HAS_BF16_DOT
    if (bf16_dot && tiled_allowed && R <= kTiledMaxRanks) {
      for (int64_t start = 0; start < T; start += kTiledMaxTokens) {
        const int64_t n = std::min(kTiledMaxTokens, T - start);
        if (!pool_lora_add_tiled(out.narrow(0, start, n), x.narrow(0, start, n), A, B, pg + start * K, cf + start * K,
                                 K, pages_per_pick))
          page_major(start, n);
      }
      return;
    }
#endif
    page_major(0, T);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kPoolMacsPerChunk / std::max<int64_t>(1, K * R * (D + N)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "remix_pool_lora_add", [&] {
    const scalar_t *X = x.data_ptr<scalar_t>(), *Ap = A.data_ptr<scalar_t>(), *Bp = B.data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    const int64_t xrow = x.stride(0), orow = out.stride(0);
    // (A lambda is no template: the branches not taken still compile, hence the casts to the type they run on.)
    constexpr bool is_float = std::is_same_v<scalar_t, float>, is_bf16 = std::is_same_v<scalar_t, at::BFloat16>;
    at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> xf(bf16_dot || is_float ? 0 : D), acc(N), h(R), out_f(is_float ? 0 : N);
      std::vector<float> a_page(bf16_dot || is_float ? 0 : R * D), b_page(is_float || is_bf16 ? 0 : R * N);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t* pt = pg + t * K;
        if (std::all_of(pt, pt + K, [](int64_t p) { return p < 0; })) continue;  // a base token: out stays
        const scalar_t* xt = X + t * xrow;
        const float* xt_f = nullptr;
        if constexpr (is_float) {
          xt_f = reinterpret_cast<const float*>(xt);
        } else if (!bf16_dot) {
          to_float(xt, xf.data(), D);
          xt_f = xf.data();
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t q = 0; q < K; ++q) {
          const int64_t p = pt[q];
          if (p < 0) continue;
          const scalar_t *Aq = Ap + p * R * D, *Bq = Bp + p * R * N;
#ifdef REMIX_HAS_BF16_DOT
          if (bf16_dot) {
            dot_rows_bf16(reinterpret_cast<const at::BFloat16*>(xt), reinterpret_cast<const at::BFloat16*>(Aq), R, D,
                          h.data());
          } else
#endif
          {
            const float* Af;
            if constexpr (is_float) {
              Af = reinterpret_cast<const float*>(Aq);
            } else {
              to_float(Aq, a_page.data(), R * D);
              Af = a_page.data();
            }
            dot_rows(xt_f, Af, R, D, h.data());
          }
          const float c = cf[t * K + q];
          for (int64_t j = 0; j < R; ++j) h[j] = round_h<scalar_t>(h[j] * c);
          if constexpr (is_float) {
            axpy_rows(h.data(), reinterpret_cast<const float*>(Bq), R, N, N, acc.data());
          } else if constexpr (is_bf16) {
            axpy_rows_bf16(h.data(), reinterpret_cast<const at::BFloat16*>(Bq), R, N, N, acc.data());
          } else {
            to_float(Bq, b_page.data(), R * N);
            axpy_rows(h.data(), b_page.data(), R, N, N, acc.data());
          }
        }
        // out[t] = round(out[t] + delta), the one rounding
        scalar_t* ot = O + t * orow;
        if constexpr (is_float) {
          for (int64_t d = 0; d < N; ++d) ot[d] = static_cast<float>(ot[d]) + acc[d];
        } else {
          to_float(ot, out_f.data(), N);
          for (int64_t d = 0; d < N; ++d) out_f[d] += acc[d];
          from_float(out_f.data(), ot, N);
        }
      }
    });
  });
}

}  // namespace

// logits[i * rows + j] = x_i . p_j (float32) for m <= kRouteRun token rows x_i of one slot and its router rows p_j.
// With AVX-512, four router rows and up to four tokens at a time: every router load serves the run's tokens (a
// prefill's tokens all share one router, which is re-read from L2 per token otherwise). Each (token, row) sum
// is formed in the same order whatever m (16-lane chains over D, then sum_lanes16), so equal rows give equal logits
// (ties stay ties) and a token's logits do not depend on the batch around it. Else dot_rows per token.
#if defined(__x86_64__) && defined(__GNUC__)
template <int M>
__attribute__((target("avx512f,avx512dq"))) void dot_block_f32(const float* const* xs, const float* const* ps, int64_t D,
                                                               float* out) {
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  // Whole vectors, then one masked step: with the mask in the main loop GCC kept acc on the stack (a store and a
  // reload per FMA, 3x slower); the tail's zeros past D add nothing, so the sums are the same.
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    __m512 p[4];
    for (int j = 0; j < 4; ++j) p[j] = _mm512_loadu_ps(ps[j] + d);
    for (int i = 0; i < M; ++i) {
      const __m512 xv = _mm512_loadu_ps(xs[i] + d);
      for (int j = 0; j < 4; ++j) acc[4 * i + j] = _mm512_fmadd_ps(xv, p[j], acc[4 * i + j]);
    }
  }
  if (d < D) {
    const __mmask16 m = __mmask16((1u << (D - d)) - 1);
    __m512 p[4];
    for (int j = 0; j < 4; ++j) p[j] = _mm512_maskz_loadu_ps(m, ps[j] + d);
    for (int i = 0; i < M; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, xs[i] + d);
      for (int j = 0; j < 4; ++j) acc[4 * i + j] = _mm512_fmadd_ps(xv, p[j], acc[4 * i + j]);
    }
  }
  _mm512_storeu_ps(out, sum_lanes16(acc));
}
#endif

void router_logits(const float* x, int64_t m, const float* P, int64_t rows, int64_t D, float* logits) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  if (avx512) {
    const float* xs[kRouteRun];
    for (int64_t i = 0; i < kRouteRun; ++i) xs[i] = x + std::min(i, m - 1) * D;
    float sums[16];
    for (int64_t j0 = 0; j0 < rows; j0 += 4) {
      const float* ps[4];
      for (int64_t j = 0; j < 4; ++j) ps[j] = P + std::min(j0 + j, rows - 1) * D;
      if (m == 1)
        dot_block_f32<1>(xs, ps, D, sums);
      else
        dot_block_f32<kRouteRun>(xs, ps, D, sums);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < 4 && j0 + j < rows; ++j) logits[i * rows + j0 + j] = sums[4 * i + j];
    }
    return;
  }
#endif
  for (int64_t i = 0; i < m; ++i) dot_rows(x + i * D, P, rows, D, logits + i * rows);
}

// A plain Python module rather than torch.ops: a call through the dispatcher costs about 20 us more the first time
// after a GEMM has evicted its code and tables, and the plugin calls these in every layer of every decode step.
// The adapter pool's routing for one layer (pool/model.py AdapterPool.route), every token against its own slot's
// router: logits = routers[s] x + bias[s] (bias -inf past the checkpoint's n), the first k[s] picks by descending
// logit (ties to the lowest index), weights 1 or the renormalised softmax over the picks (softmax[s]), and each
// pick's pages from tables[s]. Returns pages [T, 3, k_max * ppl] (int64, -1 = none), coef [T, k_max * ppl]
// (float32, each pick's weight on its pages), ids [T, k_max] (int64, -1 past k[s]). A token with k[s] = 0 (a base
// token, or a layer its checkpoint does not adapt) gets no pick and costs nothing.
// routing.per_token_selection defines the math; tests/plugin/test_pool_kernels.py checks this against it.
std::vector<torch::Tensor> pool_route(const torch::Tensor& x, const torch::Tensor& routers, const torch::Tensor& bias,
                                      const torch::Tensor& k_, const torch::Tensor& softmax_,
                                      const torch::Tensor& slots_, const torch::Tensor& tables, int64_t k_max) {
  check_cpu("pool_route", {&x, &routers, &bias, &k_, &softmax_, &slots_, &tables});
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "pool_route: x must be [T, D] with contiguous rows");
  TORCH_CHECK(routers.dim() == 3 && routers.is_contiguous() && routers.scalar_type() == at::kFloat,
              "pool_route: routers must be a contiguous float32 [S, n_max, D]");
  const int64_t T = x.size(0), D = x.size(1), S = routers.size(0), n_max = routers.size(1);
  TORCH_CHECK(routers.size(2) == D, "pool_route: router width ", routers.size(2), " != x width ", D);
  TORCH_CHECK(bias.is_contiguous() && bias.scalar_type() == at::kFloat && bias.numel() == S * n_max,
              "pool_route: bias must be a contiguous float32 [S, n_max]");
  TORCH_CHECK(k_.is_contiguous() && k_.scalar_type() == at::kLong && k_.numel() == S, "pool_route: k must be int64 [S]");
  TORCH_CHECK(softmax_.is_contiguous() && softmax_.scalar_type() == at::kBool && softmax_.numel() == S,
              "pool_route: softmax must be bool [S]");
  TORCH_CHECK(slots_.is_contiguous() && slots_.scalar_type() == at::kLong && slots_.numel() == T,
              "pool_route: slots must be int64 [T]");
  TORCH_CHECK(tables.dim() == 4 && tables.is_contiguous() && tables.scalar_type() == at::kLong &&
                  tables.size(0) == S && tables.size(2) == n_max,
              "pool_route: tables must be a contiguous int64 [S, P, n_max, ppl]");
  const int64_t projs = tables.size(1), ppl = tables.size(3), K = k_max * ppl;
  const int64_t* kk = k_.data_ptr<int64_t>();
  const int64_t* slot = slots_.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < S, "pool_route: slot ", slot[t], " of token ", t, " is outside [0, ", S, ")");
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(kk[s] >= 0 && kk[s] <= std::min(k_max, n_max), "pool_route: k=", kk[s], " of slot ", s,
                " is outside [0, ", std::min(k_max, n_max), "]");
  auto pages = new_cpu({T, projs, K}, at::kLong);
  auto coef = new_cpu({T, K}, at::kFloat);
  auto ids = new_cpu({T, k_max}, at::kLong);
  const float *P = routers.data_ptr<float>(), *bs = bias.data_ptr<float>();
  const bool* soft = softmax_.data_ptr<bool>();
  const int64_t* tab = tables.data_ptr<int64_t>();
  int64_t *pg = pages.data_ptr<int64_t>(), *id = ids.data_ptr<int64_t>();
  float* cf = coef.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "remix_pool_route", [&] {
    const scalar_t* X = x.data_ptr<scalar_t>();
    const int64_t row = x.stride(0);
    at::parallel_for(0, T, kRoutedRowsPerChunk, [&](int64_t begin, int64_t end) {
      std::vector<float> xf(kRouteRun * D), run_logits(kRouteRun * n_max), logits(n_max), w(k_max);
      std::vector<char> taken(n_max);
      int64_t run_start = begin, run_end = begin;  // tokens whose logits are in run_logits
      for (int64_t t = begin; t < end; ++t) {
        const int64_t s = slot[t], k = kk[s];
        std::fill(pg + t * projs * K, pg + (t + 1) * projs * K, int64_t{-1});
        std::fill(cf + t * K, cf + (t + 1) * K, 0.f);
        std::fill(id + t * k_max, id + (t + 1) * k_max, int64_t{-1});
        if (k == 0) continue;
        if (t >= run_end) {  // the next run of up to kRouteRun tokens of this slot: one pass over its router
          run_start = t;
          run_end = t + 1;
          while (run_end < end && run_end - t < kRouteRun && slot[run_end] == s) ++run_end;
          for (int64_t i = t; i < run_end; ++i) to_float(X + i * row, xf.data() + (i - t) * D, D);
          router_logits(xf.data(), run_end - t, P + s * n_max * D, n_max, D, run_logits.data());
        }
        std::copy_n(run_logits.data() + (t - run_start) * n_max, n_max, logits.data());
        for (int64_t j = 0; j < n_max; ++j) logits[j] += bs[s * n_max + j];
        std::fill(taken.begin(), taken.end(), 0);
        for (int64_t q = 0; q < k; ++q) {
          int64_t best = -1;
          for (int64_t j = 0; j < n_max; ++j)  // strict '>': on equal logits the lowest index stays
            if (!taken[j] && (best < 0 || logits[j] > logits[best])) best = j;
          taken[best] = 1;
          id[t * k_max + q] = best;
        }
        if (soft[s]) {  // q_i = softmax(logits)_i over the valid LoRAs (exp(-inf) = 0), renormalised over the picks
          const float top = logits[id[t * k_max]];
          float total = 0.f, picked = 0.f;
          for (int64_t j = 0; j < n_max; ++j) total += std::exp(logits[j] - top);
          for (int64_t q = 0; q < k; ++q) picked += (w[q] = std::exp(logits[id[t * k_max + q]] - top) / total);
          for (int64_t q = 0; q < k; ++q) w[q] /= picked;
        } else {
          std::fill(w.begin(), w.begin() + k, 1.f);
        }
        for (int64_t q = 0; q < k; ++q) {
          const int64_t lora = id[t * k_max + q];
          for (int64_t c = 0; c < ppl; ++c) {
            cf[t * K + q * ppl + c] = w[q];
            for (int64_t p = 0; p < projs; ++p)
              pg[(t * projs + p) * K + q * ppl + c] = tab[((s * projs + p) * n_max + lora) * ppl + c];
          }
        }
      }
    });
  });
  return {pages, coef, ids};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("route", &route, "mask [T, n] and ids [T, k] of deterministic top-k routing", py::arg("x"),
        py::arg("router"), py::arg("k"));
  m.def("masked_concat", &masked_concat, "[x | h * w]", py::arg("x"), py::arg("h"), py::arg("w"), py::arg("rank"));
  m.def("shrink_concat", &shrink_concat, "[x | masked shrink of the selected LoRAs]", py::arg("x"), py::arg("A"),
        py::arg("ids"), py::arg("w"), py::arg("rank"), py::arg("silu_and_mul") = false);
  m.def("pool_route", &pool_route, "pages, coef and ids of the adapter pool's per-token routing for one layer",
        py::arg("x"), py::arg("routers"), py::arg("bias"), py::arg("k"), py::arg("softmax"), py::arg("slots"),
        py::arg("tables"), py::arg("k_max"));
  m.def("amx_available", [] {
#ifdef REMIX_HAS_AMX
    return cpu_has_amx_bf16();
#else
    return false;
#endif
  }, "whether pool_lora_add can use the AMX-BF16 matrix units here");
  m.def("set_amx", [](bool on) {
#ifdef REMIX_HAS_AMX
    const bool was = amx_allowed;
    amx_allowed = on;
    return was;
#else
    return false;
#endif
  }, "allow (or not) pool_lora_add's AMX path; returns the previous setting", py::arg("on"));
  m.def("tiled_available", [] {
#ifdef REMIX_HAS_BF16_DOT
    return cpu_has_bf16_dot();
#else
    return false;
#endif
  }, "whether pool_lora_add has its tiled AVX512-BF16 path for bf16 calls here");
  m.def("set_tiled", [](bool on) {
#ifdef REMIX_HAS_BF16_DOT
    const bool was = tiled_allowed;
    tiled_allowed = on;
    return was;
#else
    return false;
#endif
  }, "allow (or not) pool_lora_add's tiled AVX512-BF16 path; returns the previous setting", py::arg("on"));
  m.def("pool_lora_add", &pool_lora_add, "out += the pool's per-token page delta, in place", py::arg("out"),
        py::arg("x"), py::arg("A"), py::arg("B"), py::arg("pages"), py::arg("coef"), py::arg("pages_per_pick") = 1);
}
