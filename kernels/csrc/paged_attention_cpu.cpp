// Decode-time attention over a paged KV cache on CPU: one new token per sequence.
//
// The same contract as kernels/paged_attention.py (logical cache layout [num_pages, page_size, Hkv, D],
// any strides with unit last-dim stride; v_cache absent = MLA latent mode, V is K's first v_dim
// channels), plus optional k_last/v_last [B, Hkv, D]: the K/V of each sequence's last position,
// read from there instead of the cache (the engine writes a decode step's new K/V after the step).
//
// Each (sequence, kv head) is one task: it reads the sequence's pages in place (no gathered copy),
// scores its G query heads against every key, softmaxes in fp32 and accumulates V: two passes over
// the keys and values (scores, then P @ V), each row loaded once for all G query heads.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

struct Rows {  // a [pages, page_size, heads, dim] view: where row (page, slot, head) starts
  const float* base;
  int64_t page, slot, head;
  const float* at(int64_t p, int64_t s, int64_t h) const { return base + p * page + s * slot + h * head; }
};

// Keys and values go four rows at a time: four independent multiply-add chains hide the FMA latency
// that a single dot product of head_dim values is bound by, and each accumulator row of P @ V is
// loaded and stored once per four values.
inline void dot4(const float* q, const float* const* k, float* s, int64_t n) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
  const float *k0 = k[0], *k1 = k[1], *k2 = k[2], *k3 = k[3];
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t i = 0; i < n; ++i) {
    a0 += q[i] * k0[i];
    a1 += q[i] * k1[i];
    a2 += q[i] * k2[i];
    a3 += q[i] * k3[i];
  }
  s[0] = a0, s[1] = a1, s[2] = a2, s[3] = a3;
}

inline float dot(const float* q, const float* k, int64_t n) {
  float a = 0.f;
#pragma omp simd reduction(+ : a)
  for (int64_t i = 0; i < n; ++i) a += q[i] * k[i];
  return a;
}

inline void axpy4(float* y, const float* p, const float* const* v, int64_t n) {
  const float p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
  const float *v0 = v[0], *v1 = v[1], *v2 = v[2], *v3 = v[3];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += p0 * v0[i] + p1 * v1[i] + p2 * v2[i] + p3 * v3[i];
}

// Rows two steps ahead: a sequence's pages are scattered, so the hardware prefetcher, which follows
// runs of addresses, misses the first lines of every page.
inline void prefetch_rows(const float* const* rows, int64_t count, int64_t n) {
  for (int64_t r = 0; r < count; ++r)
    for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(rows[r] + i);
}

inline void axpy(float* y, float p, const float* v, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += p * v[i];
}

// One (sequence, kv head): its G query heads qs [G, dk] (pre-scaled) over the n keys and values the
// row pointers name -> out [G, dv]. s [G, n], sums [G] and acc [G, dv] are scratch. DK/DV > 0 fix
// the head dims at compile time (fully unrolled rows); 0 reads dk/dv. Keys go in the outer loop so
// each row is loaded from memory once and reused from L1 by the G query heads. Built with
// -ffast-math (vectorised exp), so nothing here relies on inf or NaN: the max starts at a score.
template <int DK, int DV>
void attend_group(const float* qs, const float* const* krow, const float* const* vrow, int64_t n, int64_t G,
                  int64_t dk_, int64_t dv_, float* s, float* sums, float* acc, float* out) {
  const int64_t dk = DK ? DK : dk_, dv = DV ? DV : dv_, n4 = n - n % 4;
  for (int64_t t = 0; t < n4; t += 4) {
    if (t + 8 < n) prefetch_rows(krow + t + 8, std::min<int64_t>(4, n - t - 8), dk);
    for (int64_t g = 0; g < G; ++g) dot4(qs + g * dk, krow + t, s + g * n + t, dk);
  }
  for (int64_t t = n4; t < n; ++t)
    for (int64_t g = 0; g < G; ++g) s[g * n + t] = dot(qs + g * dk, krow[t], dk);
  for (int64_t g = 0; g < G; ++g) {  // softmax numerators in place, and their sums
    float* sg = s + g * n;
    float mx = sg[0], sum = 0.f;
    for (int64_t t = 1; t < n; ++t) mx = std::max(mx, sg[t]);
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; ++t) sum += (sg[t] = std::exp(sg[t] - mx));
    sums[g] = sum;
  }
  std::fill(acc, acc + G * dv, 0.f);
  for (int64_t t = 0; t < n4; t += 4) {
    if (t + 8 < n) prefetch_rows(vrow + t + 8, std::min<int64_t>(4, n - t - 8), dv);
    for (int64_t g = 0; g < G; ++g) {
      const float p[4] = {s[g * n + t], s[g * n + t + 1], s[g * n + t + 2], s[g * n + t + 3]};
      axpy4(acc + g * dv, p, vrow + t, dv);
    }
  }
  for (int64_t t = n4; t < n; ++t)
    for (int64_t g = 0; g < G; ++g) axpy(acc + g * dv, s[g * n + t], vrow[t], dv);
  for (int64_t g = 0; g < G; ++g) {
    const float inv = 1.f / sums[g];
    for (int64_t d = 0; d < dv; ++d) out[g * dv + d] = acc[g * dv + d] * inv;
  }
}

at::Tensor paged_decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache,
                                  const std::optional<at::Tensor>& v_cache, const at::Tensor& block_tables_in,
                                  const at::Tensor& context_lens_in, const std::optional<at::Tensor>& k_last_in,
                                  const std::optional<at::Tensor>& v_last_in, double scale, int64_t v_dim) {
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat,
              "paged_decode_attention (CPU kernel): float32 only");
  TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 4, "q must be [B, Hq, D], k_cache [pages, page_size, Hkv, D]");
  TORCH_CHECK(k_cache.stride(3) == 1 && (!v_cache || v_cache->stride(3) == 1), "caches need a unit last-dim stride");
  TORCH_CHECK(v_last_in.has_value() == (k_last_in.has_value() && v_cache.has_value()),
              "pass v_last exactly when k_last and v_cache are given");
  const at::Tensor q = q_in.stride(2) == 1 ? q_in : q_in.contiguous();
  const at::Tensor tables = block_tables_in.to(at::kLong).contiguous();
  const at::Tensor lens = context_lens_in.to(at::kLong).contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), Dk = q.size(2);
  const int64_t page_size = k_cache.size(1), Hkv = k_cache.size(2), G = Hq / Hkv;
  const int64_t Dv = v_dim, max_pages = tables.size(1);
  TORCH_CHECK(k_cache.size(3) == Dk && Hq % Hkv == 0 && Dv >= 1 && Dv <= (v_cache ? v_cache->size(3) : Dk),
              "paged_decode_attention: inconsistent head counts or dims");

  at::Tensor k_last, v_last;
  if (k_last_in) {
    k_last = k_last_in->stride(2) == 1 ? *k_last_in : k_last_in->contiguous();
    v_last = v_last_in ? (v_last_in->stride(2) == 1 ? *v_last_in : v_last_in->contiguous()) : k_last;
  }
  at::Tensor out = at::empty({B, Hq, Dv}, q.options());
  const Rows K{k_cache.data_ptr<float>(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  const Rows V = v_cache ? Rows{v_cache->data_ptr<float>(), v_cache->stride(0), v_cache->stride(1), v_cache->stride(2)}
                         : K;
  const int64_t* tab = tables.data_ptr<int64_t>();
  const int64_t* len = lens.data_ptr<int64_t>();
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) max_len = std::max(max_len, len[b]);
  TORCH_CHECK(max_len <= max_pages * page_size, "context_lens exceed the block tables");

  const float* qp = q.data_ptr<float>();
  const int64_t q_seq = q.stride(0), q_head = q.stride(1);
  const float* klp = k_last.defined() ? k_last.data_ptr<float>() : nullptr;
  const float* vlp = k_last.defined() ? v_last.data_ptr<float>() : nullptr;
  const int64_t kl_seq = k_last.defined() ? k_last.stride(0) : 0, kl_head = k_last.defined() ? k_last.stride(1) : 0;
  const int64_t vl_seq = k_last.defined() ? v_last.stride(0) : 0, vl_head = k_last.defined() ? v_last.stride(1) : 0;
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  // About 16k multiply-adds per task before a second thread is worth waking.
  const int64_t work = std::max<int64_t>(1, G * max_len * (Dk + Dv));
  auto group = Dk == Dv && Dk == 32    ? attend_group<32, 32>
               : Dk == Dv && Dk == 64  ? attend_group<64, 64>
               : Dk == Dv && Dk == 128 ? attend_group<128, 128>
                                       : attend_group<0, 0>;
  at::parallel_for(0, B * Hkv, std::max<int64_t>(1, 16384 / work), [&](int64_t begin, int64_t end) {
    std::vector<float> qs(G * Dk), s(G * max_len), sums(G), acc(G * Dv);
    std::vector<const float*> krow(max_len), vrow(max_len);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv, n = len[b];
      float* o = op + b * Hq * Dv + h * G * Dv;  // out is contiguous: the group's G rows are adjacent
      if (n <= 0) {
        std::fill(o, o + G * Dv, 0.f);
        continue;
      }
      // Where each of the sequence's n keys and values lives: its page and slot, or k_last/v_last.
      const int64_t* pages = tab + b * max_pages;
      const int64_t cached = klp ? n - 1 : n;
      for (int64_t t = 0, page = 0, slot = 0; t < cached; ++t) {
        krow[t] = K.at(pages[page], slot, h);
        vrow[t] = V.at(pages[page], slot, h);
        if (++slot == page_size) slot = 0, ++page;
      }
      if (klp) {
        krow[n - 1] = klp + b * kl_seq + h * kl_head;
        vrow[n - 1] = vlp + b * vl_seq + h * vl_head;
      }
      for (int64_t g = 0; g < G; ++g)  // the group's queries, pre-scaled, in one contiguous tile
        for (int64_t d = 0; d < Dk; ++d) qs[g * Dk + d] = qp[b * q_seq + (h * G + g) * q_head + d] * sc;
      group(qs.data(), krow.data(), vrow.data(), n, G, Dk, Dv, s.data(), sums.data(), acc.data(), o);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(small_llm, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor? v_cache, Tensor block_tables, "
        "Tensor context_lens, Tensor? k_last, Tensor? v_last, float scale, int v_dim) -> Tensor");
}

TORCH_LIBRARY_IMPL(small_llm, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
