"""Decode on CUDA through the Triton paged-attention kernel (kernels/paged_attention.py).

The kernel reads the cache only, so the new token's K/V are written to their slots layer by layer
before it runs (`holds_back = False`). It takes int32 block tables and context lengths. Until a GPU
has confirmed the kernel, the engine runs a one-time self-check before choosing it and falls back to
the gather path (the check warns in one line) if it fails.
"""

import torch

from .attention_cpu import KernelPlan
from .cpu_speed import long_tensor


class TritonAttention:
    name = "triton"
    holds_back = False

    def __init__(self, cache):
        self.cache = cache

    def plan(self, step, tables: torch.Tensor) -> KernelPlan:
        assert not step.is_prefill, "prefill runs on the gather path"
        lens = long_tensor(step.context_lens, self.cache.device)
        return KernelPlan(tables.to(torch.int32), lens.to(torch.int32))

    def attend(self, layer: int, q, k, v, scale: float, plan: KernelPlan) -> torch.Tensor:
        from kernels import paged_attention_decode

        c = self.cache
        return paged_attention_decode(q, c.k_cache(layer), c.v_cache(layer), plan.block_tables, plan.context_lens,
                                      scale, v_dim=c.v_dim)
