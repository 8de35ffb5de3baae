// int8_linear, CPU: y = x @ (weight * scale[:, None])^T + bias for the few rows a draft step has,
// with int8 weights (one scale per output row) and fp32 accumulation.
//
// Why: a CPU drafting pass is bound by the bytes of weights it reads (a pass streams the whole
// drafter; the target's forward between steps evicts it from cache), so int8 weights halve the
// cost of bf16 ones. ATen's own int8 kernel (_weight_int8pack_mm) re-reads the weights for every
// row and loses to bf16 from 2 rows on; this one reads each weight row once for all of x's rows.
//
// CPU only: on a GPU, drafting reads HBM at terabytes per second and the drafter stays in bf16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "ops.h"

namespace falcon_ext {

void check_int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  FALCON_CHECK_FLOAT(x);
  TORCH_CHECK(x.dim() >= 1, "x must be [..., K], got a 0-dimensional tensor");
  FALCON_CHECK_DIM(weight, 2);
  TORCH_CHECK(weight.scalar_type() == at::kChar, "weight must be int8, got ", weight.scalar_type());
  TORCH_CHECK(scale.scalar_type() == at::kFloat, "scale must be float32, got ", scale.scalar_type());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(N >= 1 && K >= 1, "weight must be [N >= 1, K >= 1] int8, got shape ", weight.sizes());
  TORCH_CHECK(x.size(-1) == K, "x must be [..., K] with K = weight.size(1) = ", K, ", got shape ", x.sizes());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == N, "scale must be [N] = [", N, "] float32, got shape ",
              scale.sizes());
  FALCON_CHECK_SAME_DEVICE(x, weight);
  FALCON_CHECK_SAME_DEVICE(x, scale);
  if (bias) {
    FALCON_CHECK_FLOAT(*bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must be [N] = [", N, "], got shape ", bias->sizes());
    FALCON_CHECK_SAME_DEVICE(x, *bias);
  }
}

namespace {

// Rows [r0, r0 + RN) of y[:, n0:n1] (x [R, K] fp32, y [R, N] fp32, q [N, K] int8). The vector
// kernels take NB = 4 weight rows at a time: each step loads RN vectors of x and NB of weights
// for RN x NB independent FMAs (loads, not FMAs, are what a few-row matmul runs short of; one
// row alone keeps two sums per weight row so the FMA latency does not serialise it). The K tail
// past the last full vector runs scalar. One version per instruction set, picked at run time
// (`kernel_isa`); no vector load passes a row's end.
struct TileArgs {
  const float* x;
  int64_t K, N;
  const int8_t* q;
  const float* scale;
  const float* bias;
  float* y;
};

inline void finish_row(const TileArgs& a, int64_t r, int64_t n, float s, int64_t from) {
  const int8_t* w = a.q + n * a.K;
  const float* xr = a.x + r * a.K;
  for (int64_t k = from; k < a.K; ++k) s += float(w[k]) * xr[k];
  a.y[r * a.N + n] = s * a.scale[n] + (a.bias ? a.bias[n] : 0.f);
}

template <int RN>
void tile_scalar(const TileArgs& a, int64_t r0, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int r = 0; r < RN; ++r) finish_row(a, r0 + r, n, 0.f, 0);
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
#define FALCON_EXT_X86_KERNELS 1

// NB weight rows from n, RN rows of x from r0; U sums per (row, weight row).
template <int RN, int NB>
__attribute__((target("avx512f"))) void block_avx512(const TileArgs& a, int64_t r0, int64_t n) {
  constexpr int U = RN == 1 ? 2 : 1;
  constexpr int64_t kStep = U * 16;
  const int64_t K = a.K, body = K / kStep * kStep;
  __m512 acc[RN][NB][U];
  for (int r = 0; r < RN; ++r)
    for (int j = 0; j < NB; ++j)
      for (int u = 0; u < U; ++u) acc[r][j][u] = _mm512_setzero_ps();
  for (int64_t k = 0; k < body; k += kStep) {
    for (int u = 0; u < U; ++u) {
      __m512 xv[RN];
      for (int r = 0; r < RN; ++r) xv[r] = _mm512_loadu_ps(a.x + (r0 + r) * K + k + u * 16);
      for (int j = 0; j < NB; ++j) {
        const __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.q + (n + j) * K + k + u * 16))));
        for (int r = 0; r < RN; ++r) acc[r][j][u] = _mm512_fmadd_ps(wf, xv[r], acc[r][j][u]);
      }
    }
  }
  for (int r = 0; r < RN; ++r) {
    for (int j = 0; j < NB; ++j) {
      __m512 sum = acc[r][j][0];
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[r][j][u]);
      finish_row(a, r0 + r, n + j, _mm512_reduce_add_ps(sum), body);
    }
  }
}

template <int RN, int NB>
__attribute__((target("avx2,fma"))) void block_avx2(const TileArgs& a, int64_t r0, int64_t n) {
  constexpr int U = RN == 1 ? 2 : 1;
  constexpr int64_t kStep = U * 8;
  const int64_t K = a.K, body = K / kStep * kStep;
  __m256 acc[RN][NB][U];
  for (int r = 0; r < RN; ++r)
    for (int j = 0; j < NB; ++j)
      for (int u = 0; u < U; ++u) acc[r][j][u] = _mm256_setzero_ps();
  for (int64_t k = 0; k < body; k += kStep) {
    for (int u = 0; u < U; ++u) {
      __m256 xv[RN];
      for (int r = 0; r < RN; ++r) xv[r] = _mm256_loadu_ps(a.x + (r0 + r) * K + k + u * 8);
      for (int j = 0; j < NB; ++j) {
        const __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.q + (n + j) * K + k + u * 8))));
        for (int r = 0; r < RN; ++r) acc[r][j][u] = _mm256_fmadd_ps(wf, xv[r], acc[r][j][u]);
      }
    }
  }
  for (int r = 0; r < RN; ++r) {
    for (int j = 0; j < NB; ++j) {
      __m256 sum = acc[r][j][0];
      for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[r][j][u]);
      const __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
      const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
      finish_row(a, r0 + r, n + j, _mm_cvtss_f32(_mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1))), body);
    }
  }
}

template <int RN, void (*Block4)(const TileArgs&, int64_t, int64_t), void (*Block1)(const TileArgs&, int64_t, int64_t)>
void tile_vector(const TileArgs& a, int64_t r0, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) Block4(a, r0, n);
  for (; n < n1; ++n) Block1(a, r0, n);
}
#endif

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa kernel_isa() {
#ifdef FALCON_EXT_X86_KERNELS
  static const Isa isa = __builtin_cpu_supports("avx512f")                              ? Isa::kAvx512
                         : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::kAvx2
                                                                                         : Isa::kScalar;
  return isa;
#else
  return Isa::kScalar;
#endif
}

template <int RN>
void tile(Isa isa, const TileArgs& a, int64_t r0, int64_t n0, int64_t n1) {
#ifdef FALCON_EXT_X86_KERNELS
  if (isa == Isa::kAvx512) return tile_vector<RN, block_avx512<RN, 4>, block_avx512<RN, 1>>(a, r0, n0, n1);
  if (isa == Isa::kAvx2) return tile_vector<RN, block_avx2<RN, 4>, block_avx2<RN, 1>>(a, r0, n0, n1);
#endif
  tile_scalar<RN>(a, r0, n0, n1);
}

}  // namespace

at::Tensor int8_dense(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                      const c10::optional<at::Tensor>& bias) {
  const int64_t N = weight.size(0), K = weight.size(1);
  const at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const at::Tensor w = weight.contiguous(), s = scale.contiguous();
  const at::Tensor b = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t R = xf.size(0);
  at::Tensor y = at::empty({R, N}, xf.options());
  if (R == 0) return y;
  const TileArgs a{xf.const_data_ptr<float>(), K, N, w.const_data_ptr<int8_t>(), s.const_data_ptr<float>(),
                   b.defined() ? b.const_data_ptr<float>() : nullptr, y.mutable_data_ptr<float>()};
  const Isa isa = kernel_isa();
  // Output rows split across threads; every thread reads all of x (a few KB, from cache).
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) tile<4>(isa, a, r, n0, n1);
    switch (R - r) {
      case 3: tile<3>(isa, a, r, n0, n1); break;
      case 2: tile<2>(isa, a, r, n0, n1); break;
      case 1: tile<1>(isa, a, r, n0, n1); break;
      default: break;
    }
  });
  return y;
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                           const c10::optional<at::Tensor>& bias) {
  check_int8_linear(x, weight, scale, bias);
  auto sizes = x.sizes().vec();
  sizes.back() = weight.size(0);
  return int8_dense(x, weight, scale, bias).view(sizes).to(x.scalar_type());
}

}  // namespace falcon_ext
