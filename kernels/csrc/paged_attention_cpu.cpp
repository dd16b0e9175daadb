// Decode-time attention over a paged KV cache on CPU: one new token per sequence.
//
// The same contract as kernels/paged_attention.py (logical cache layout [num_pages, page_size, Hkv, D],
// any strides with unit last-dim stride; v_cache absent = MLA latent mode, V is K's first v_dim
// channels), plus optional k_last/v_last [B, Hkv, D]: the K/V of each sequence's last position,
// read from there instead of the cache (the engine writes a decode step's new K/V after the step).
//
// Each (sequence, kv head) is one task (attention.h): it reads the sequence's pages in place.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "attention.h"

#include <algorithm>
#include <cstdint>
#include <optional>

namespace {

using namespace small_llm;

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
  const GroupFn group = group_for(Dk, Dv);
  at::parallel_for(0, B * Hkv, std::max<int64_t>(1, 16384 / work), [&](int64_t begin, int64_t end) {
    Scratch scratch(G, Dk, Dv, max_len);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      attend_paged(K, V, tab + b * max_pages, page_size, len[b], h, qp + b * q_seq, q_head, G, Dk, Dv, sc,
                   klp ? klp + b * kl_seq + h * kl_head : nullptr, klp ? vlp + b * vl_seq + h * vl_head : nullptr,
                   group, scratch, op + b * Hq * Dv + h * G * Dv);  // out is contiguous: the group's rows are adjacent
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
