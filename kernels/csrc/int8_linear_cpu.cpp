// int8 weight-only linear on CPU for decoding: y[M, N] = (x[M, K] @ Wq[N, K]^T) * scale[N].
//
// x is fp32 (any row stride, unit last-dim stride), Wq int8 [N, K] contiguous, scale fp32 [N] (one per
// output channel). The loops are linear.h's (shared with the whole decode step, decode_step_cpu.cpp),
// on the row-major weight as the model holds it: each tile of weight rows is read once for all rows of
// x, int8 reads a quarter of fp32's bytes.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "linear.h"

namespace {

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
  std::vector<int64_t> out_shape = x_in.sizes().vec();
  out_shape.back() = N;
  at::Tensor out = at::empty({x.size(0), N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  small_llm::linear(x.data_ptr<float>(), x.stride(0), x.size(0), weight.data_ptr<int8_t>(), N,
                    small_llm::RowMajor{K},
                    small_llm::Out{out.data_ptr<float>(), N, sc.data_ptr<float>(), false});
  return out.view(out_shape);
}

}  // namespace

// A fragment: the small_llm namespace is defined by the paged-attention library (TORCH_LIBRARY may
// appear once per namespace), and either may be loaded first.
TORCH_LIBRARY_FRAGMENT(small_llm, m) { m.def("int8_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor"); }

TORCH_LIBRARY_IMPL(small_llm, CPU, m) { m.impl("int8_linear", &int8_linear); }
