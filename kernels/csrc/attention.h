// Decode attention over a paged KV cache on CPU, one (sequence, kv head) at a time: the loops of
// paged_attention_cpu.cpp (the operator) and decode_step_cpu.cpp (the whole decode step).
//
// A task reads the sequence's pages in place (no gathered copy), scores its G query heads against every
// key, softmaxes in fp32 and accumulates V: two passes over the keys and values (scores, then P @ V),
// each row loaded once for all G query heads.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace small_llm {

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

using GroupFn = void (*)(const float*, const float* const*, const float* const*, int64_t, int64_t, int64_t, int64_t,
                        float*, float*, float*, float*);

// attend_group with the head dims fixed at compile time where they are common.
inline GroupFn group_for(int64_t Dk, int64_t Dv) {
  return Dk == Dv && Dk == 32    ? attend_group<32, 32>
         : Dk == Dv && Dk == 64  ? attend_group<64, 64>
         : Dk == Dv && Dk == 128 ? attend_group<128, 128>
                                 : attend_group<0, 0>;
}

// Scratch of one thread: the group's scaled queries, scores, sums, accumulators and row pointers.
struct Scratch {
  std::vector<float> qs, s, sums, acc;
  std::vector<const float*> krow, vrow;
  Scratch(int64_t G, int64_t Dk, int64_t Dv, int64_t max_len)
      : qs(G * Dk), s(G * max_len), sums(G), acc(G * Dv), krow(max_len), vrow(max_len) {}
};

// One (sequence, kv head h) with n keys: its G query heads q (head stride q_head) -> out [G, Dv]
// (contiguous). Keys and values come from the pages listed in `pages`, the last one from k_last/v_last
// when given (a step that attends before writing its new K/V).
inline void attend_paged(const Rows& K, const Rows& V, const int64_t* pages, int64_t page_size, int64_t n, int64_t h,
                         const float* q, int64_t q_head, int64_t G, int64_t Dk, int64_t Dv, float scale,
                         const float* k_last, const float* v_last, GroupFn group, Scratch& sc, float* out) {
  if (n <= 0) {
    std::fill(out, out + G * Dv, 0.f);
    return;
  }
  const int64_t cached = k_last ? n - 1 : n;
  for (int64_t t = 0, page = 0, slot = 0; t < cached; ++t) {
    sc.krow[t] = K.at(pages[page], slot, h);
    sc.vrow[t] = V.at(pages[page], slot, h);
    if (++slot == page_size) slot = 0, ++page;
  }
  if (k_last) sc.krow[n - 1] = k_last, sc.vrow[n - 1] = v_last;
  for (int64_t g = 0; g < G; ++g)  // the group's queries, pre-scaled, in one contiguous tile
    for (int64_t d = 0; d < Dk; ++d) sc.qs[g * Dk + d] = q[(h * G + g) * q_head + d] * scale;
  group(sc.qs.data(), sc.krow.data(), sc.vrow.data(), n, G, Dk, Dv, sc.s.data(), sc.sums.data(), sc.acc.data(), out);
}

}  // namespace small_llm
