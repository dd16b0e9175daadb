"""Our Triton kernels: training attention (FlashAttention-2) and decode-time paged attention.

CUDA tensors run compiled kernels; CPU tensors run them in Triton's interpreter when
TRITON_INTERPRET=1 is set (checked at call time, slow, for tests).
"""

from .flash_attention import flash_attention
from .paged_attention import paged_attention_decode, paged_attention_decode_torch

__all__ = ["flash_attention", "paged_attention_decode", "paged_attention_decode_torch"]
