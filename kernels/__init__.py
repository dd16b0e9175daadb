"""Our kernels: training attention (FlashAttention-2, Triton) and decode-time paged attention
(Triton for CUDA, C++ for CPU).

CUDA tensors run compiled Triton kernels; CPU tensors run them in Triton's interpreter when
TRITON_INTERPRET=1 is set (checked at call time, slow, for tests). The CPU paged-attention kernel
is C++, compiled on first use (kernels/paged_attention_cpu.py).

Triton is optional (Linux only): `import kernels` does not import it. Before their first real use
on a device, callers ask kernels/self_check.py whether the Triton kernels agree with PyTorch there.
"""

from .flash_attention import flash_attention
from .paged_attention import paged_attention_decode, paged_attention_decode_torch
from .paged_attention_cpu import paged_attention_decode_cpu

__all__ = ["flash_attention", "paged_attention_decode", "paged_attention_decode_cpu", "paged_attention_decode_torch"]
