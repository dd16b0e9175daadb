// The whole decode step of a GQA-family Llama (MHA, GQA, MQA) on CPU in one call: one new token for
// each of S sequences -> the logits of their next token (and its argmax).
//
// Why one call: at batch 1 the eager step is ~250 small PyTorch ops, and dispatching them costs more
// than their arithmetic (d=256: ~3 of ~5 ms); MKL's GEMV at one row also leaves the second core idle.
// Here the same arithmetic runs as plain loops over the weights (linear.h, parallel over output
// channels) and the paged cache (attention.h), the per-step cost is one call.
//
// Per layer, for the S rows at once (the model/llama.py forward, op for op):
//   h = RMSNorm(x) * attn_norm;  qkv = h @ Wqkv^T;  RoPE on q and k (rotated halves, rope.py)
//   write k, v to their slots of the cache; att = softmax(q k^T / sqrt(D)) v over the sequence's pages
//   x += att @ Wo^T;  h = RMSNorm(x) * ffn_norm;  [g, u] = h @ W13^T;  x += (silu(g) * u) @ W2^T
// then logits = (RMSNorm(x) * norm) @ Whead^T. Each weight is fp32 or int8 with per-channel scales
// (engine/quantize.py). The cache layout is kv_cache.py's: [layers, blocks, kv heads, block size, D].
//
// Registered as the TorchScript class torch.classes.small_llm.DecodeModel: built once from the model's
// tensors (references to the embedding, norms and RoPE tables; a packed copy of each linear weight, see
// Weight), then `step` is called once per decode step.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "attention.h"
#include "linear.h"

namespace {

using namespace small_llm;

// y (+)= x @ w^T (* scale): w fp32, or int8 with scale [N]. fp32 weights are packed once here (linear.h's
// pack: each thread then streams one contiguous run of memory instead of NB interleaved rows; measured
// side by side at batch 1 on the README's shape: fp32 decode +17-38% in the step). int8 weights stay the
// model's own [N, K]: a quarter of the bytes, the loop is bound by converting them rather than by
// reading them, and packed they measured ~20% slower.
struct Weight {
  at::Tensor w, scale;  // w: fp32 packed (a copy), int8 row-major (the model's own)
  int64_t N, K;
  Weight(const at::Tensor& rows, const at::Tensor& scale) : scale(scale), N(rows.size(0)), K(rows.size(1)) {
    if (rows.scalar_type() == at::kChar) {
      w = rows;
    } else {
      w = at::empty({packed_size(N, K)}, rows.options());
      pack(rows.data_ptr<float>(), N, K, w.data_ptr<float>());
    }
  }
  void apply(const float* x, int64_t M, float* y, int64_t ldy, bool accumulate) const {
    if (w.scalar_type() == at::kChar)
      linear(x, K, M, w.data_ptr<int8_t>(), N, RowMajor{K}, Out{y, ldy, scale.data_ptr<float>(), accumulate});
    else
      linear(x, K, M, w.data_ptr<float>(), N, PackedTiles{K}, Out{y, ldy, nullptr, accumulate});
  }
};

// y[m] = x[m] / sqrt(mean(x[m]^2) + eps) * w, for S rows of d values (nn.RMSNorm).
void rms_norm(const float* x, const float* w, float eps, int64_t S, int64_t d, float* y) {
  for (int64_t m = 0; m < S; ++m) {
    const float* xm = x + m * d;
    float ss = 0.f;
    for (int64_t i = 0; i < d; ++i) ss += xm[i] * xm[i];
    const float r = 1.f / std::sqrt(ss / d + eps);
    for (int64_t i = 0; i < d; ++i) y[m * d + i] = xm[i] * r * w[i];
  }
}

// Rotate the two halves of each of n heads of D values by the position's cos/sin [D/2] (rope.py).
void rope(float* x, int64_t n, int64_t D, const float* cos, const float* sin) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < n; ++h) {
    float* x1 = x + h * D;
    float* x2 = x1 + half;
    for (int64_t i = 0; i < half; ++i) {
      const float a = x1[i], b = x2[i];
      x1[i] = a * cos[i] - b * sin[i];
      x2[i] = a * sin[i] + b * cos[i];
    }
  }
}

struct DecodeModel : torch::CustomClassHolder {
  at::Tensor embed, cos, sin;
  std::vector<at::Tensor> norms;  // attn_norm, ffn_norm of each layer, then the final norm
  std::vector<Weight> weights;    // wqkv, wo, w13, w2 of each layer, then the LM head
  int64_t L, Hq, Hkv, D, dim, ffn, vocab;
  float eps;

  // weights[i] with scales[i]: an empty scale for an fp32 weight, the per-channel scales for int8.
  DecodeModel(at::Tensor embed, at::Tensor cos, at::Tensor sin, std::vector<at::Tensor> norms,
              std::vector<at::Tensor> ws, std::vector<at::Tensor> scales, int64_t n_heads, int64_t n_kv_heads,
              double eps)
      : embed(embed), cos(cos), sin(sin), norms(norms), Hq(n_heads), Hkv(n_kv_heads), eps(static_cast<float>(eps)) {
    TORCH_CHECK(ws.size() % 4 == 1 && ws.size() == scales.size() && norms.size() == (ws.size() / 4) * 2 + 1,
                "DecodeModel: 4 weights and 2 norms per layer, then the head and the final norm");
    L = static_cast<int64_t>(ws.size() / 4);
    dim = embed.size(1), vocab = ws.back().size(0), D = dim / Hq, ffn = ws[3].size(1);
    TORCH_CHECK(embed.scalar_type() == at::kFloat && embed.is_contiguous() && cos.is_contiguous() &&
                    sin.is_contiguous() && cos.size(1) * 2 == D,
                "DecodeModel: float32 contiguous embedding and rope tables [max_seq_len, head_dim / 2]");
    for (size_t i = 0; i < ws.size(); ++i) {
      const bool int8 = ws[i].scalar_type() == at::kChar;
      TORCH_CHECK(ws[i].dim() == 2 && ws[i].is_contiguous() && (int8 || ws[i].scalar_type() == at::kFloat) &&
                      (int8 ? scales[i].numel() == ws[i].size(0) : scales[i].numel() == 0),
                  "DecodeModel: each weight contiguous float32, or int8 with one scale per output channel");
      weights.emplace_back(ws[i], scales[i].contiguous());
    }
    for (const auto& n : norms) TORCH_CHECK(n.is_contiguous() && n.numel() == dim, "DecodeModel: norms of dim values");
  }

  // tokens, positions, slots: one each per sequence (slot = block * block_size + offset of the new
  // token's K/V, -1: already cached); tables: the sequences' block tables one after another, sequence m's
  // from starts[m]. Plain int lists, not tensors: at batch 1, building four small tensors in Python cost
  // more than this call's arithmetic on the norms. k_buf, v_buf: the cache (written at the slots).
  std::tuple<at::Tensor, at::Tensor> step(const std::vector<int64_t>& tokens, const std::vector<int64_t>& positions,
                                          const std::vector<int64_t>& slots, const std::vector<int64_t>& tables,
                                          const std::vector<int64_t>& starts, at::Tensor k_buf, at::Tensor v_buf) {
    const int64_t S = tokens.size(), bs = k_buf.size(3);
    TORCH_CHECK(k_buf.is_contiguous() && v_buf.is_contiguous() && k_buf.scalar_type() == at::kFloat &&
                    k_buf.dim() == 5 && k_buf.size(0) == L && k_buf.size(2) == Hkv && k_buf.size(4) == D &&
                    v_buf.sizes() == k_buf.sizes(),
                "DecodeModel.step: float32 contiguous caches [layers, blocks, kv heads, block size, head dim]");
    TORCH_CHECK(positions.size() == tokens.size() && slots.size() == tokens.size() && starts.size() == tokens.size(),
                "DecodeModel.step: one position, slot and table start per token");
    const int64_t *tok = tokens.data(), *pos = positions.data(), *slot = slots.data();
    int64_t max_len = 0;
    for (int64_t m = 0; m < S; ++m) {
      const int64_t table_end = m + 1 < S ? starts[m + 1] : static_cast<int64_t>(tables.size());
      TORCH_CHECK(tok[m] >= 0 && tok[m] < embed.size(0) && pos[m] >= 0 && pos[m] < cos.size(0) && starts[m] >= 0 &&
                      pos[m] < (table_end - starts[m]) * bs && table_end <= static_cast<int64_t>(tables.size()),
                  "DecodeModel.step: token, position or block table out of range");
      for (int64_t i = starts[m]; i < table_end; ++i)
        TORCH_CHECK(tables[i] >= 0 && tables[i] < k_buf.size(1), "DecodeModel.step: block id out of range");
      max_len = std::max(max_len, pos[m] + 1);
    }
    const int64_t G = Hq / Hkv, qkv_w = (Hq + 2 * Hkv) * D;
    std::vector<float> x(S * dim), h(S * dim), qkv(S * qkv_w), att(S * Hq * D), gu(S * 2 * ffn), a(S * ffn);
    for (int64_t m = 0; m < S; ++m) std::memcpy(&x[m * dim], embed.data_ptr<float>() + tok[m] * dim, dim * sizeof(float));
    float *kb = k_buf.data_ptr<float>(), *vb = v_buf.data_ptr<float>();
    const int64_t layer_stride = k_buf.stride(0), page = k_buf.stride(1), head = k_buf.stride(2);
    const float scale = 1.f / std::sqrt(static_cast<float>(D));
    const GroupFn group = group_for(D, D);
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, G * max_len * 2 * D));

    for (int64_t l = 0; l < L; ++l) {
      const Weight* w = &weights[4 * l];
      rms_norm(x.data(), norms[2 * l].data_ptr<float>(), eps, S, dim, h.data());
      w[0].apply(h.data(), S, qkv.data(), qkv_w, false);
      float *kl = kb + l * layer_stride, *vl = vb + l * layer_stride;
      for (int64_t m = 0; m < S; ++m) {  // RoPE, then the new K/V into their slots
        float* row = &qkv[m * qkv_w];
        rope(row, Hq + Hkv, D, cos.data_ptr<float>() + pos[m] * (D / 2), sin.data_ptr<float>() + pos[m] * (D / 2));
        if (slot[m] < 0) continue;  // already cached
        const int64_t at = slot[m] / bs * page + slot[m] % bs * D;
        for (int64_t kh = 0; kh < Hkv; ++kh) {
          std::memcpy(kl + at + kh * head, row + (Hq + kh) * D, D * sizeof(float));
          std::memcpy(vl + at + kh * head, row + (Hq + Hkv + kh) * D, D * sizeof(float));
        }
      }
      const Rows K{kl, page, D, head}, V{vl, page, D, head};
      at::parallel_for(0, S * Hkv, grain, [&](int64_t begin, int64_t end) {
        Scratch scratch(G, D, D, max_len);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t m = task / Hkv, kh = task % Hkv;
          attend_paged(K, V, tables.data() + starts[m], bs, pos[m] + 1, kh, &qkv[m * qkv_w], D, G, D, D, scale, nullptr,
                       nullptr, group, scratch, &att[m * Hq * D + kh * G * D]);
        }
      });
      w[1].apply(att.data(), S, x.data(), dim, true);
      rms_norm(x.data(), norms[2 * l + 1].data_ptr<float>(), eps, S, dim, h.data());
      w[2].apply(h.data(), S, gu.data(), 2 * ffn, false);
      for (int64_t m = 0; m < S; ++m)
        for (int64_t i = 0; i < ffn; ++i) {
          const float g = gu[m * 2 * ffn + i];
          a[m * ffn + i] = g / (1.f + std::exp(-g)) * gu[m * 2 * ffn + ffn + i];
        }
      w[3].apply(a.data(), S, x.data(), dim, true);
    }
    rms_norm(x.data(), norms[2 * L].data_ptr<float>(), eps, S, dim, h.data());
    at::Tensor logits = at::empty({S, vocab}, embed.options());
    at::Tensor argmax = at::empty({S}, embed.options().dtype(at::kLong));
    float* lp = logits.data_ptr<float>();
    weights[4 * L].apply(h.data(), S, lp, vocab, false);
    for (int64_t m = 0; m < S; ++m)  // the first maximum, as torch.argmax
      argmax.data_ptr<int64_t>()[m] = std::max_element(lp + m * vocab, lp + (m + 1) * vocab) - (lp + m * vocab);
    return {logits, argmax};
  }
};

}  // namespace

// A fragment, like int8_linear_cpu.cpp's: the paged-attention library defines the namespace.
TORCH_LIBRARY_FRAGMENT(small_llm, m) {
  m.class_<DecodeModel>("DecodeModel")
      .def(torch::init<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, int64_t, int64_t, double>())
      .def("step", &DecodeModel::step);
}
