"""Our kernels: training attention (FlashAttention-2, Triton) and decode-time paged attention
(Triton for CUDA, C++ for CPU).

CUDA tensors run compiled Triton kernels; CPU tensors run them in Triton's interpreter when
TRITON_INTERPRET=1 is set (checked at call time, slow, for tests). The CPU kernels are C++,
compiled on first use: training attention (causal_attention_cpu.py, forward and backward, on BLAS
calls), paged attention (paged_attention_cpu.py), the int8 linear layer
(int8_linear_cpu.py) and the whole decode step of an MHA/GQA/MQA model (decode_step_cpu.py); their
loops live in csrc/linear.h and csrc/attention.h.

Triton is optional (Linux only): `import kernels` does not import it. Before their first real use
on a device, callers ask kernels/self_check.py whether the Triton kernels agree with PyTorch there.
"""

from .flash_attention import flash_attention
from .paged_attention import paged_attention_decode, paged_attention_decode_torch
from .paged_attention_cpu import paged_attention_decode_cpu

__all__ = ["flash_attention", "paged_attention_decode", "paged_attention_decode_cpu", "paged_attention_decode_torch"]
