// Causal self-attention for training on CPU, forward and backward, fp32: MHA, GQA and MQA, Dqk != Dv.
//
//   o, lse = causal_attention_fwd(q [B, Hq, T, Dqk], k [B, Hkv, T, Dqk], v [B, Hkv, T, Dv], scale)
//   dq, dk, dv = causal_attention_bwd(do, q, k, v, o, lse, scale)
//
// Any strides with a unit last one (the model's [B, T, H, D] views need no copy); o, dq, dk and dv are
// contiguous [B, H, T, D], lse [B, Hq, T] (the log of each softmax row's sum, for the backward).
//
// Why not torch's SDPA: its CPU flash kernel runs at a few per cent of the CPU's peak for the small head
// dims of small models (32 in the README's model): many tiny GEMMs and an online softmax per key block.
// Here each query block of BQ rows sees all its keys at once (a causal row ends at its own position), so
// the softmax is exact in one pass over a BQ x T score tile that stays in cache, and every product is
// one BLAS call (sgemm, MKL's in torch's wheels) of BQ rows against up to T keys.
//
// Parallel over (batch, kv head): a task owns the dk and dv rows of its kv head and adds the
// contributions of all its query heads and blocks in a fixed order, so results do not depend on the
// thread count. Memory beyond the outputs: one BQ x T tile (two in the backward) per thread.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "attention.h"  // small_llm::dot

// The Fortran BLAS entry point that libtorch_cpu exports (MKL, or OpenBLAS on other wheels). A wheel
// without it fails to load this library, and the caller falls back to SDPA.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

constexpr int64_t BQ = 32;  // query rows per block (16, 32, 64 and 128 measured at the README shape: 32 fastest)

// Row-major C[M, N] = alpha * op(A)[M, K] @ op(B)[K, N] + beta * C; lda/ldb/ldc are row strides.
// BLAS is column-major, where a row-major matrix reads as its transpose: C^T = op(B)^T op(A)^T.
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int m = N, n = M, k = K, la = ldb, lb = lda, lc = ldc;
  sgemm_(&tb, &ta, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

struct Head {  // one head's [T, D] matrix inside a 4-D tensor
  float* p;
  int64_t ld;
  float* row(int64_t t) const { return p + t * ld; }
};

Head head(const at::Tensor& x, int64_t b, int64_t h) {
  return {x.data_ptr<float>() + b * x.stride(0) + h * x.stride(1), x.stride(2)};
}

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 4 && t->stride(3) == 1,
                "causal_attention (CPU kernel): float32 [B, H, T, D] tensors with a unit last stride");
  }
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(2) == q.size(2) && v.size(2) == q.size(2) &&
                  k.size(1) == v.size(1) && q.size(1) % k.size(1) == 0 && k.size(3) == q.size(3),
              "causal_attention: q [B, Hq, T, Dqk], k [B, Hkv, T, Dqk], v [B, Hkv, T, Dv] with Hq a multiple of Hkv");
}

// P[r, :] = softmax over the keys 0..i0+r of scale * S[r, :] (zero beyond), in place; lse[r] = log-sum-exp.
// Built with -ffast-math (vectorised exp), so nothing here relies on inf or NaN: the max starts at a score.
void softmax_rows(float* S, int64_t ld, int64_t rows, int64_t i0, float scale, float* lse) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = S + r * ld;
    const int64_t n = i0 + r + 1;
    float mx = s[0];
    for (int64_t j = 1; j < n; ++j) mx = std::max(mx, s[j]);
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      s[j] = std::exp((s[j] - mx) * scale);
      sum += s[j];
    }
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < n; ++j) s[j] *= inv;
    std::fill(s + n, s + i0 + rows, 0.f);  // the block's product with V reads up to i0 + rows keys
    lse[r] = mx * scale + std::log(sum);
  }
}

std::tuple<at::Tensor, at::Tensor> causal_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        double scale_) {
  check(q, k, v);
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), Dv = v.size(3);
  const int64_t G = Hq / Hkv;
  const float scale = static_cast<float>(scale_);
  at::Tensor o = at::empty({B, Hq, T, Dv}, q.options());
  at::Tensor lse = at::empty({B, Hq, T}, q.options());
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(BQ * T);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, hk = task % Hkv;
      const Head K = head(k, b, hk), V = head(v, b, hk);
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        const Head Q = head(q, b, h), O = head(o, b, h);
        float* L = lse.data_ptr<float>() + (b * Hq + h) * T;
        for (int64_t i0 = 0; i0 < T; i0 += BQ) {
          const int64_t rows = std::min(BQ, T - i0), n = i0 + rows;  // keys 0..n-1
          gemm(false, true, rows, n, D, 1.f, Q.row(i0), Q.ld, K.p, K.ld, 0.f, S.data(), n);
          softmax_rows(S.data(), n, rows, i0, scale, L + i0);
          gemm(false, false, rows, Dv, n, 1.f, S.data(), n, V.p, V.ld, 0.f, O.row(i0), O.ld);
        }
      }
    }
  });
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                                    const at::Tensor& k, const at::Tensor& v,
                                                                    const at::Tensor& o, const at::Tensor& lse_,
                                                                    double scale_) {
  check(q, k, v);
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), Dv = v.size(3);
  const int64_t G = Hq / Hkv;
  const float scale = static_cast<float>(scale_);
  TORCH_CHECK(o.sizes() == dout.sizes() && o.size(3) == Dv && o.size(1) == Hq, "causal_attention_bwd: o and do are [B, Hq, T, Dv]");
  const at::Tensor d_o = dout.stride(3) == 1 ? dout : dout.contiguous();
  const at::Tensor out = o.stride(3) == 1 ? o : o.contiguous();
  const at::Tensor lse = lse_.contiguous();
  at::Tensor dq = at::empty({B, Hq, T, D}, q.options());
  at::Tensor dk = at::zeros({B, Hkv, T, D}, q.options());
  at::Tensor dv = at::zeros({B, Hkv, T, Dv}, q.options());
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> P(BQ * T), dP(BQ * T), delta(BQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, hk = task % Hkv;
      const Head K = head(k, b, hk), V = head(v, b, hk), dK = head(dk, b, hk), dV = head(dv, b, hk);
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        const Head Q = head(q, b, h), O = head(out, b, h), dO = head(d_o, b, h), dQ = head(dq, b, h);
        const float* L = lse.data_ptr<float>() + (b * Hq + h) * T;
        for (int64_t i0 = 0; i0 < T; i0 += BQ) {
          const int64_t rows = std::min(BQ, T - i0), n = i0 + rows;
          // P again from the scores and the forward's log-sum-exp, zero above the diagonal.
          gemm(false, true, rows, n, D, 1.f, Q.row(i0), Q.ld, K.p, K.ld, 0.f, P.data(), n);
          for (int64_t r = 0; r < rows; ++r) {
            float* p = P.data() + r * n;
            const int64_t len = i0 + r + 1;
            const float l = L[i0 + r];
            for (int64_t j = 0; j < len; ++j) p[j] = std::exp(p[j] * scale - l);
            std::fill(p + len, p + n, 0.f);
            delta[r] = small_llm::dot(dO.row(i0 + r), O.row(i0 + r), Dv);  // rowsum(dO * O) = rowsum(dP * P)
          }
          gemm(false, true, rows, n, Dv, 1.f, dO.row(i0), dO.ld, V.p, V.ld, 0.f, dP.data(), n);  // dP = dO V^T
          gemm(true, false, n, Dv, rows, 1.f, P.data(), n, dO.row(i0), dO.ld, 1.f, dV.p, dV.ld);  // dV += P^T dO
          for (int64_t r = 0; r < rows; ++r) {  // dS = P * (dP - delta), in dP
            float* ds = dP.data() + r * n;
            const float* p = P.data() + r * n;
            for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - delta[r]);
          }
          gemm(false, false, rows, D, n, scale, dP.data(), n, K.p, K.ld, 0.f, dQ.row(i0), dQ.ld);  // dQ = s dS K
          gemm(true, false, n, D, rows, scale, dP.data(), n, Q.row(i0), Q.ld, 1.f, dK.p, dK.ld);   // dK += s dS^T Q
        }
      }
    }
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(small_llm, m) {
  m.def("causal_attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("causal_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(small_llm, CPU, m) {
  m.impl("causal_attention_fwd", &causal_attention_fwd);
  m.impl("causal_attention_bwd", &causal_attention_bwd);
}
