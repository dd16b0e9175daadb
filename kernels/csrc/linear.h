// The weight-streaming linear layer of our CPU kernels: y[M, N] (+)= (x[M, K] @ W[N, K]^T) * scale[N].
//
// W is fp32 or int8 (int8 with one fp32 scale per output channel; fp32 with none), in one of two
// layouts (Layout below): row-major [N, K], as the model stores it, or packed once at load (pack()):
// tiles of NB output channels whose values are interleaved vector by vector, so that the tiles a
// thread owns are one contiguous stream of memory (the decode step packs its fp32 weights; int8
// weights, converted vector by vector and so less bound by memory, are read as the model's own
// [N, K]). At decode sizes (M = 1..64 rows) the cost is reading the weights, so each tile of
// NB weight rows is read from memory once and used for all M rows while it sits in L1. int8 -> fp32
// conversion is exact (|q| <= 127), products and sums are fp32, and the scale is applied once per
// output, after the dot product. Parallel over tiles of output channels (at::parallel_for): unlike
// MKL's GEMV at M = 1, every thread streams its share of the matrix. Each (row block, channel tile) is
// a register-blocked micro-kernel: MB x NB vector accumulators over K, then one horizontal sum each.
//
// Used by int8_linear_cpu.cpp (the int8 operator) and decode_step_cpu.cpp (the whole decode step).

#pragma once

#include <ATen/Parallel.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace small_llm {

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

// Where weight (n, k) of a tile is. Row-major [N, K]: w[n * K + k]. Packed (pack()): each tile is
// ceil(K / W) groups of NB x W values, group j holding elements jW..jW+W-1 of each of its NB rows (zeros
// past K and past N), so the micro-kernel reads the tile front to back. The layout is a template
// argument: the packed strides are compile-time constants, which matters where the loop is not
// memory-bound (int8, converted vector by vector).
template <bool Packed>
struct Layout {
  int64_t K;
  int64_t vector_at(int n, int64_t j) const { return Packed ? (j * NB + n) * W : n * K + j * W; }  // vector j of row n
  int64_t at(int n, int64_t k) const { return vector_at(n, k / W) + k % W; }
  int64_t tile() const { return Packed ? NB * ((K + W - 1) / W) * W : NB * K; }  // values from one tile to the next
  // Whether vector j of row n starts a cache line (V vectors to a line; row-major rows taken as aligned),
  // so the micro-kernel prefetches each line once. Known at compile time where the loop is unrolled.
  template <typename T>
  bool line_start(int n, int64_t j) const {
    constexpr int V = 64 / (W * sizeof(T)) > 0 ? 64 / (W * sizeof(T)) : 1;
    return (Packed ? j * NB + n : j) % V == 0;
  }
};
using RowMajor = Layout<false>;
using PackedTiles = Layout<true>;

// The packed copy of w [N, K] (row-major) into out, which holds packed_size(N, K) values.
inline int64_t packed_size(int64_t N, int64_t K) { return (N + NB - 1) / NB * PackedTiles{K}.tile(); }
template <typename T>
void pack(const T* w, int64_t N, int64_t K, T* out) {
  const PackedTiles L{K};
  std::fill(out, out + packed_size(N, K), T(0));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) out[n / NB * L.tile() + L.at(n % NB, k)] = w[n * K + k];
}

// Where a linear layer writes: y[m * ldy + n] = s * scale[n] (no scale: s), or += with accumulate
// (the decode step adds attention and MLP outputs straight into the residual stream).
struct Out {
  float* y;
  int64_t ldy;
  const float* scale;  // nullptr: fp32 weights
  bool accumulate;
};

// R rows of x (row stride ldx) against C weight rows of a tile (layout L) -> y. The K % W tail is
// scalar. One row (batch-1 decoding) keeps U = 2 accumulators per output over alternate vectors:
// R x C = 4 multiply-add chains alone would wait on the FMA latency. Every cache line of this tile is
// matched by a prefetch of the same place in the next tile, one tile ahead of the loads (the hardware
// prefetcher is slow to pick up C short interleaved rows of the row-major layout).
template <int R, int C, typename T, typename Lay>
inline void micro(const float* x, int64_t ldx, const T* w, Lay L, Out o) {
  constexpr int U = R == 1 ? 2 : 1;
  const int64_t K = L.K, ahead = L.tile();
  vec acc[U][R][C];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < R; ++m)
      for (int n = 0; n < C; ++n) acc[u][m][n] = vzero();
  int64_t j = 0;  // vectors of K done
  for (; (j + U) * W <= K; j += U)
    for (int u = 0; u < U; ++u) {
      vec wv[C];
      for (int n = 0; n < C; ++n) {
        const T* p = w + L.vector_at(n, j + u);
        wv[n] = vload(p);
        if (L.template line_start<T>(n, j + u)) __builtin_prefetch(p + ahead);
      }
      for (int m = 0; m < R; ++m) {
        const vec xv = vload(x + m * ldx + (j + u) * W);
        for (int n = 0; n < C; ++n) acc[u][m][n] = vfma(xv, wv[n], acc[u][m][n]);
      }
    }
  if constexpr (U == 2)  // one vector may be left
    for (; (j + 1) * W <= K; ++j)
      for (int n = 0; n < C; ++n) acc[0][0][n] = vfma(vload(x + j * W), vload(w + L.vector_at(n, j)), acc[0][0][n]);
  for (int m = 0; m < R; ++m)
    for (int n = 0; n < C; ++n) {
      float s = vsum(acc[0][m][n]);
      if constexpr (U == 2) s += vsum(acc[1][m][n]);
      for (int64_t t = j * W; t < K; ++t) s += x[m * ldx + t] * static_cast<float>(w[L.at(n, t)]);
      if (o.scale) s *= o.scale[n];
      float& y = o.y[m * o.ldy + n];
      y = o.accumulate ? y + s : s;
    }
}

// The micro-kernel for r <= MB rows and c <= NB channels, both known at compile time.
template <typename T, typename Lay, int R = MB>
inline void dispatch(int r, int c, const float* x, int64_t ldx, const T* w, Lay L, Out o) {
  if constexpr (R > 0) {
    if (r != R) return dispatch<T, Lay, R - 1>(r, c, x, ldx, w, L, o);
    switch (c) {
      case 4: return micro<R, 4>(x, ldx, w, L, o);
      case 3: return micro<R, 3>(x, ldx, w, L, o);
      case 2: return micro<R, 2>(x, ldx, w, L, o);
      default: return micro<R, 1>(x, ldx, w, L, o);
    }
  }
}
static_assert(NB == 4, "dispatch's switch lists the tile widths 1..NB");

// One tile of c <= NB weight rows for all M rows. With more rows than one register block, an int8
// tile is converted to fp32 once (into wf, L1-sized, same layout) rather than once per row block.
template <typename T, typename Lay>
void tile(const float* x, int64_t ldx, int64_t M, const T* w, Lay L, int c, Out o, std::vector<float>& wf) {
  if (M <= MB) return dispatch<T>(M, c, x, ldx, w, L, o);
  const float* wt;
  if constexpr (std::is_same_v<T, float>) {
    wt = w;
  } else {
    const int64_t size = L.at(c - 1, L.K - 1) + 1;  // the tile's values, up to its last one
    wf.resize(size);
    for (int64_t i = 0; i < size; ++i) wf[i] = static_cast<float>(w[i]);
    wt = wf.data();
  }
  for (int64_t m = 0; m < M; m += MB)
    dispatch<float>(std::min<int64_t>(MB, M - m), c, x + m * ldx, ldx, wt, L,
                    Out{o.y + m * o.ldy, o.ldy, o.scale, o.accumulate});
}

// y (+)= (x @ w^T) * scale for x [M, K] (row stride ldx), w [N, K] in layout L (L.K = K), y [M, N] (row
// stride o.ldy).
template <typename T, typename Lay>
void linear(const float* x, int64_t ldx, int64_t M, const T* w, int64_t N, Lay L, Out o) {
  const int64_t K = L.K;
  const int64_t tiles = (N + NB - 1) / NB;
  // About 16k multiply-adds per task before a second thread is worth waking.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, M * K * NB));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> wf;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t * NB;
      const int c = static_cast<int>(std::min<int64_t>(NB, N - n));
      tile(x, ldx, M, w + t * L.tile(), L, c, Out{o.y + n, o.ldy, o.scale ? o.scale + n : nullptr, o.accumulate}, wf);
    }
  });
}

}  // namespace small_llm
