// int8 weight-only linear on CPU for decoding: y[M, N] = (x[M, K] @ Wq[N, K]^T) * scale[N].
//
// x is fp32 (any row stride, unit last-dim stride), Wq int8 [N, K] contiguous, scale fp32 [N] (one per
// output channel). At decode sizes (M = 1..64 rows) the cost is reading the weights, so each tile of
// NB weight rows is read from memory once and used for all M rows while it sits in L1; int8 halves to
// quarters the bytes an fp32 or bf16 weight would need. The int8 -> fp32 conversion is exact (|q| <=
// 127), products and sums are fp32, and the scale is applied once per output, after the dot product.
//
// Parallel over tiles of output channels (at::parallel_for); each (row block, channel tile) is a
// register-blocked micro-kernel: MB x NB vector accumulators over K, then one horizontal sum each.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// The vector type and the six operations the micro-kernel needs. -march=native picks the instruction
// set at build time (the library is cached per CPU kind): AVX-512 and AVX2 differ in the width W, the
// intrinsics' prefix, how W int8 weights are loaded and the horizontal sum; the scalar fallback is W = 1.
#if defined(__AVX512F__)
constexpr int W = 16, MB = 4;  // 32 registers: 4 x 4 accumulators, 4 weights, 1 input
using vec = __m512;
#define SIMD(op) _mm512_##op
inline __m128i load_bytes(const int8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int W = 8, MB = 3;  // 16 registers: 3 x 4 accumulators, 4 weights (the input from memory)
using vec = __m256;
#define SIMD(op) _mm256_##op
inline __m128i load_bytes(const int8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#ifdef SIMD
inline vec vzero() { return SIMD(setzero_ps)(); }
inline vec vload(const float* p) { return SIMD(loadu_ps)(p); }
inline vec vload(const int8_t* p) { return SIMD(cvtepi32_ps)(SIMD(cvtepi8_epi32)(load_bytes(p))); }  // exact
inline vec vfma(vec a, vec b, vec c) { return SIMD(fmadd_ps)(a, b, c); }
#else
constexpr int W = 1, MB = 4;
using vec = float;
inline vec vzero() { return 0.f; }
inline vec vload(const float* p) { return *p; }
inline vec vload(const int8_t* p) { return static_cast<float>(*p); }
inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
inline float vsum(vec a) { return a; }
#endif

constexpr int NB = 4;  // weight rows per tile

// y[m, n] = sum_k x[m, k] * w[n, k] * scale[n] for m < R, n < C: R rows of x (row stride ldx) against C
// weight rows (row stride K; int8, or fp32 already converted). The K % W tail is scalar.
template <int R, int C, typename T>
inline void micro(const float* x, int64_t ldx, const T* w, int64_t K, const float* scale, float* y, int64_t ldy) {
  vec acc[R][C];
  for (int m = 0; m < R; ++m)
    for (int n = 0; n < C; ++n) acc[m][n] = vzero();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    vec wv[C];
    for (int n = 0; n < C; ++n) wv[n] = vload(w + n * K + k);
    for (int m = 0; m < R; ++m) {
      const vec xv = vload(x + m * ldx + k);
      for (int n = 0; n < C; ++n) acc[m][n] = vfma(xv, wv[n], acc[m][n]);
    }
  }
  for (int m = 0; m < R; ++m)
    for (int n = 0; n < C; ++n) {
      float s = vsum(acc[m][n]);
      for (int64_t t = k; t < K; ++t) s += x[m * ldx + t] * static_cast<float>(w[n * K + t]);
      y[m * ldy + n] = s * scale[n];
    }
}

// The micro-kernel for r <= MB rows and c <= NB channels, both known at compile time.
template <typename T, int R = MB>
inline void dispatch(int r, int c, const float* x, int64_t ldx, const T* w, int64_t K, const float* scale, float* y,
                     int64_t ldy) {
  if constexpr (R > 0) {
    if (r != R) return dispatch<T, R - 1>(r, c, x, ldx, w, K, scale, y, ldy);
    switch (c) {
      case 4: return micro<R, 4>(x, ldx, w, K, scale, y, ldy);
      case 3: return micro<R, 3>(x, ldx, w, K, scale, y, ldy);
      case 2: return micro<R, 2>(x, ldx, w, K, scale, y, ldy);
      default: return micro<R, 1>(x, ldx, w, K, scale, y, ldy);
    }
  }
}
static_assert(NB == 4, "dispatch's switch lists the tile widths 1..NB");

// One tile of c <= NB weight rows for all M rows. With more rows than one register block, the tile is
// converted to fp32 once (into wf, L1-sized) rather than once per row block.
void tile(const float* x, int64_t ldx, int64_t M, const int8_t* w, int64_t K, int c, const float* scale, float* y,
          int64_t N, std::vector<float>& wf) {
  if (M <= MB) return dispatch<int8_t>(M, c, x, ldx, w, K, scale, y, N);
  wf.resize(c * K);
  for (int64_t i = 0; i < c * K; ++i) wf[i] = static_cast<float>(w[i]);
  for (int64_t m = 0; m < M; m += MB)
    dispatch<float>(std::min<int64_t>(MB, M - m), c, x + m * ldx, ldx, wf.data(), K, scale, y + m * N, N);
}

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scale) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weight.scalar_type() == at::kChar &&
                  scale.scalar_type() == at::kFloat,
              "int8_linear (CPU kernel): x float32, weight int8, scale float32");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "int8_linear: weight must be a contiguous [N, K] matrix");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == K, "int8_linear: x's last dim must be the weight's K = ", K);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == N, "int8_linear: scale must be [N] = [", N, "]");
  at::Tensor x = x_in.reshape({-1, K});  // a view when it can be (any row stride is fine)
  if (K > 1 && x.stride(1) != 1) x = x.contiguous();
  const at::Tensor sc = scale.contiguous();
  const int64_t M = x.size(0);
  std::vector<int64_t> out_shape = x_in.sizes().vec();
  out_shape.back() = N;
  at::Tensor out = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));

  const float* xp = x.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  const int64_t ldx = x.stride(0), tiles = (N + NB - 1) / NB;
  // About 16k multiply-adds per task before a second thread is worth waking.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, M * K * NB));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> wf;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t * NB;
      const int c = static_cast<int>(std::min<int64_t>(NB, N - n));
      tile(xp, ldx, M, wp + n * K, K, c, sp + n, yp + n, N, wf);
    }
  });
  return out.view(out_shape);
}

}  // namespace

// A fragment: the small_llm namespace is defined by the paged-attention library (TORCH_LIBRARY may
// appear once per namespace), and either may be loaded first.
TORCH_LIBRARY_FRAGMENT(small_llm, m) { m.def("int8_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor"); }

TORCH_LIBRARY_IMPL(small_llm, CPU, m) { m.impl("int8_linear", &int8_linear); }
