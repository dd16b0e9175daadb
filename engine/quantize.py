"""int8 weight-only quantization for CPU decoding: `quantize_int8(model)` -> a quantized copy.

What is quantized: the weight W [N, K] of every nn.Linear of the Transformer (attention projections,
SwiGLU, and by default the LM head), stored as int8 Wq [N, K] with one fp32 scale per output channel:

    scale[n] = max_k |W[n, k]| / 127        Wq[n, k] = round(W[n, k] / scale[n])   (in -127..127)
    y = (x @ Wq^T) * scale                  activations, products and sums stay fp32

Why: decoding a few tokens at a time is bound by reading the weights, and int8 reads a quarter of
fp32's bytes. Per output channel, because rows differ in range and one scale for the whole matrix
would waste the small rows' precision; symmetric (no zero point), because weights are centred on 0
and it keeps the kernel a plain dot product times one scale; the rounding error is then at most
scale / 2 per weight. The kernel is kernels/int8_linear_cpu.py; without a C++ compiler each layer
falls back to F.linear on its dequantized weight (the same numbers, slower than fp32).

Kept in fp32: the token embedding (a row lookup, not a matmul: int8 would save memory, no time), the
norms, and MLA's wkv_b (its decode path reads the matrix itself to absorb it into attention). The LM
head: int8 too by default (`head=True`). It is the largest matrix of a small model (vocab x dim, a
third of the linear weights at the README's shape), so it is much of the speed-up, and quantizing it
cost nothing measurable: on a model trained on the plays (the tiny shape, val 2.31 bits/byte),
scripts/quant_eval.py gave val loss 4.6442 fp32, 4.6442 int8 with an fp32 head, 4.6441 int8
throughout (bits/byte equal to 4 decimals), and 14 of 16 greedy 32-token continuations identical to
fp32 both with and without the head in int8. With tied embeddings the head gets its own int8 copy of
the embedding matrix and the lookup keeps the fp32 one.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.int8_linear_cpu import cpu_kernel_error


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (Wq int8 [N, K] contiguous, scale fp32 [N])."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # an all-zero row stays 0 with any scale
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return q, scale.contiguous()


class Int8Linear(nn.Module):
    """A bias-free linear layer with an int8 weight and per-output-channel fp32 scales (see the module
    docstring). fp32 CPU inputs go through the C++ kernel when it built; anything else through F.linear
    on the dequantized weight, which is also the reference the kernel is tested against."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scale = quantize_weight(weight)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.kernel = cpu_kernel_error() is None  # asked once here: forward stays free of Python checks

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight [N, K] this layer computes with: Wq * scale."""
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel and x.device.type == "cpu" and x.dtype == torch.float32:
            return torch.ops.small_llm.int8_linear(x, self.weight, self.scale)
        return F.linear(x, self.dequantized().to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module, head: bool = True) -> nn.Module:
    """A copy of the Transformer `model` with its nn.Linear layers replaced by Int8Linear (the LM head
    only if `head`); the caller's model is left untouched. Warns once (one line) when the C++ kernel
    is unavailable and the layers fall back to dequantized F.linear."""
    error = cpu_kernel_error()
    if error:
        import warnings

        warnings.warn(f"int8: the C++ kernel is unavailable ({error}); using dequantized F.linear, "
                      "which is slower than fp32", stacklevel=2)
    skip = {name for name, _ in model.named_modules() if name.endswith("attn.wkv_b")}  # MLA only: kept fp32
    if not head:
        skip.add("lm_head")
    quantized = copy.deepcopy(model)
    for name, module in list(quantized.named_modules()):
        if not isinstance(module, nn.Linear) or name in skip:
            continue
        if module.bias is not None:
            raise ValueError(f"quantize_int8: {name} has a bias; Int8Linear computes x @ W^T * scale only")
        quantized.set_submodule(name, Int8Linear(module.weight))
    return quantized
