"""Decode on CPU through the C++ paged-attention kernel (kernels/paged_attention_cpu.py).

The kernel reads each sequence's blocks in place through its block table (the gather path copies
them out first) and takes the new token's K/V beside the cache, so like the gather path the forward
only reads the cache and the runner writes the new K/V after it. float32 only.
"""

from dataclasses import dataclass

import torch

from .cpu_speed import long_tensor


@dataclass
class KernelPlan:
    """The two per-step tensors a paged decode kernel reads: tables padded with block 0 (never read)."""
    block_tables: torch.Tensor  # [S, max_blocks]
    context_lens: torch.Tensor  # [S] cached + new tokens

    def dynamic_dims(self):
        """The sizes that change step to step (batch, blocks), for torch.compile."""
        return ((self.block_tables, (0, 1)), (self.context_lens, (0,)))


class CpuKernelAttention:
    name = "cpu"
    holds_back = True  # the forward reads the cache only; the runner writes the new K/V after it

    def __init__(self, cache):
        self.cache = cache

    def plan(self, step, tables: torch.Tensor) -> KernelPlan:
        assert not step.is_prefill, "prefill runs on the gather path"
        return KernelPlan(tables, long_tensor(step.context_lens, self.cache.device))

    def attend(self, layer: int, q, k, v, scale: float, plan: KernelPlan) -> torch.Tensor:
        # The operator itself rather than its Python wrapper: torch.compile keeps it as one call, and
        # the inputs are well-formed by construction here.
        c = self.cache
        return torch.ops.small_llm.paged_decode_attention(q, c.k_cache(layer), c.v_cache(layer), plan.block_tables,
                                                          plan.context_lens, k, v, scale, c.v_dim)
