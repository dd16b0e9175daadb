"""The paged KV cache: K/V buffers in fixed-size blocks, and the protocol one forward over them follows.

Logical layout (the cache contract, and what the paged decode kernels take):
    MHA/GQA/MQA   per layer K and V  [num_blocks, block_size, n_kv_heads, head_dim]
    MLA           per layer one K    [num_blocks, block_size, 1, kv_lora_rank + qk_rope_head_dim]
                  (the normalised latent c_kv and the shared RoPE key k_pe; the values are c_kv,
                  the first kv_lora_rank channels, so there is no V buffer)
Physical layout: one tensor for all layers, head-major inside a block,
    k_buf (and v_buf)  [n_layers, num_blocks, n_kv_heads, block_size, head_dim]
so `k_cache(layer)` is a strided view with the logical shape, a copy-on-write copies a block of every
layer in one op, and the gather path reads a sequence's context as whole (block, head) rows of
block_size * head_dim contiguous values, already in the order attention wants.

One forward over the cache, in four steps (the runner makes calls 1, 2 and 4; the model makes 3):
  1. `StepInputs` says what the step computes: each sequence's block table, context length and
     number of new tokens, and each new token's id, position and slot. ModelRunner builds it
     (`step_inputs`), the one place where a batch of sequences becomes indices.
  2. `cache.begin(step)` turns it into the tensors the forward and the attention backend read (the
     new tokens' ids and positions, which it returns; the write rows, the padded block tables, the
     backend's own plan: gather rows and masks, int32 tables), once per step rather than once per layer.
  3. The model's forward calls `cache.attend(layer, q, k, v, scale)` once per layer with the new
     tokens' projections, packed [T, heads, dim]. The new K/V go to their slots first, then every
     new token attends to its sequence's whole context, read back from the cache (a prefill's new
     tokens see each other there).
  4. A decode step whose backend `holds_back` (all but Triton) writes nothing during the forward:
     attend keeps the new K/V, and after the forward the runner writes every layer's in one op,
     `cache.commit(*cache.held_kv())`. The forward is then a pure function of its inputs and the
     cache, which torch.compile can fuse (see model_runner.py).

Backends, one file each. Prefill always runs on the gather path; decode on the one chosen here:
    attention_gather.py  PyTorch: copy the blocks out, SDPA. The readable reference.
    attention_cpu.py     CPU, float32: the C++ paged kernel, reading the blocks in place.
    attention_triton.py  CUDA: the Triton paged kernel, after its one-time self-check.

A slot of -1 in a step's slot mapping means "do not write": that token's K/V is already in a cached
block (the recomputed last token of a prompt that hit the prefix cache completely).
"""

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from kernels.paged_attention_cpu import cpu_kernel_error
from kernels.self_check import paged_decode_ok
from model import ModelConfig

from .attention_cpu import CpuKernelAttention
from .attention_gather import GatherAttention
from .attention_triton import TritonAttention
from .cpu_speed import long_tensor


@dataclass
class StepInputs:
    """One forward over the cache, as plain lists. The new tokens are packed sequence by sequence:
    sequence i contributes query_lens[i] tokens, at positions context_lens[i] - query_lens[i] ..
    context_lens[i] - 1 (a decode step: one token, at context_lens[i] - 1)."""
    is_prefill: bool
    token_ids: list[int]  # [T] the new tokens
    positions: list[int]  # [T] their positions
    slot_mapping: list[int]  # [T] block * block_size + offset their K/V go to; -1: cached already
    block_tables: list[list[int]]  # [S] position p of sequence i lives in block block_tables[i][p // block_size]
    context_lens: list[int]  # [S] cached + new tokens
    query_lens: list[int]  # [S] new tokens


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str, paged_kernel: bool = True):
        """paged_kernel=False decodes through the gather path (the reference) on any device."""
        self.cfg, self.num_blocks, self.block_size, self.paged_kernel = cfg, num_blocks, block_size, paged_kernel
        self.dtype, self.device = dtype, torch.device(device)
        L = cfg.n_layers
        if cfg.attention == "mla":
            self.n_kv_heads, self.k_dim, self.v_dim = 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank
        else:
            self.n_kv_heads, self.k_dim, self.v_dim = cfg.n_kv_heads, cfg.head_dim, cfg.head_dim
        self.n_q_heads = cfg.n_heads
        # Zeros, not empty: padded context positions are masked, but 0 * NaN garbage would still be NaN.
        self.k_buf = torch.zeros(L, num_blocks, self.n_kv_heads, block_size, self.k_dim, dtype=dtype, device=device)
        self.v_buf = None if cfg.attention == "mla" else torch.zeros(
            L, num_blocks, self.n_kv_heads, block_size, self.v_dim, dtype=dtype, device=device)
        self.gather = GatherAttention(self)
        self.decode_backend = self.gather if not paged_kernel else self._paged_decode_backend()
        # The current step (set by begin): its backend and plan, its write rows, the held-back K/V.
        self.backend, self.plan, self.hold_back = self.gather, None, False
        self.write_index: Optional[torch.Tensor] = None  # [W * Hkv] rows of the (token, head) view
        self.write_rows: Optional[torch.Tensor] = None  # [W] packed tokens that are written; None = all
        self._held_k: list[torch.Tensor] = []
        self._held_v: list[torch.Tensor] = []

    def _paged_decode_backend(self):
        """The paged kernel for this device and dtype, else the gather path (with a one-line warning
        when a kernel should have run but cannot: the self-check prints its own)."""
        if self.device.type == "cuda":
            return TritonAttention(self) if paged_decode_ok(self.device) else self.gather
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return self.gather
        error = cpu_kernel_error()  # no C++ compiler, a failed build
        if error:
            warnings.warn(f"CPU paged-attention kernel unavailable ({error}); decoding through the slower "
                          "PyTorch gather path")
            return self.gather
        return CpuKernelAttention(self)

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return cfg.kv_cache_bytes_per_token(torch.empty((), dtype=dtype).element_size()) * block_size

    @property
    def nbytes(self) -> int:
        return self.k_buf.nbytes + (0 if self.v_buf is None else self.v_buf.nbytes)

    def k_cache(self, layer: int) -> torch.Tensor:
        """Layer's K (MLA: the latent) in the logical layout [num_blocks, block_size, Hkv, Dqk] (a view)."""
        return self.k_buf[layer].transpose(1, 2)

    def v_cache(self, layer: int) -> Optional[torch.Tensor]:
        return None if self.v_buf is None else self.v_buf[layer].transpose(1, 2)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block src's K/V (every layer) into block dst, for each (src, dst)."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        self.k_buf[:, dst] = self.k_buf[:, src]
        if self.v_buf is not None:
            self.v_buf[:, dst] = self.v_buf[:, src]

    # ---- the protocol -----------------------------------------------------------------------------
    def begin(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Build the step's tensors: which buffer rows the new K/V go to, and the backend's plan. Returns the
        forward's inputs: the new tokens' ids and positions, [1, T] each."""
        bs, H, dev = self.block_size, self.n_kv_heads, self.device
        slots, self.write_rows = step.slot_mapping, None
        if min(slots) < 0:
            self.write_rows = long_tensor([i for i, s in enumerate(slots) if s >= 0], dev)
            slots = [s for s in slots if s >= 0]
        # Built in Python: a decode step writes a few dozen rows, and each small tensor op costs more.
        self.write_index = long_tensor([(s // bs * H + h) * bs + s % bs for s in slots for h in range(H)], dev)
        self.backend = self.gather if step.is_prefill else self.decode_backend
        self.hold_back = not step.is_prefill and self.backend.holds_back
        self.plan = self.backend.plan(step, self.block_tables(step))
        self._held_k, self._held_v = [], []
        return long_tensor(step.token_ids, dev).unsqueeze(0), long_tensor(step.positions, dev).unsqueeze(0)

    def block_tables(self, step: StepInputs) -> torch.Tensor:
        """The step's block tables [S, blocks of the longest context], padded with block 0 (masked, or
        never read by the kernels)."""
        nblk = -(-max(step.context_lens) // self.block_size)
        flat = []
        for t in step.block_tables:
            flat += t[:nblk] + [0] * (nblk - len(t[:nblk]))
        return long_tensor(flat, self.device).view(len(step.block_tables), nblk)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor],
               scale: float) -> torch.Tensor:
        """q [T, Hq, Dqk], k [T, Hkv, Dqk], v [T, Hkv, Dv] or None (MLA latent) -> [T, Hq, Dv]."""
        if self.hold_back:
            self._held_k.append(k)
            if v is not None:
                self._held_v.append(v)
        else:
            self._write(self.k_buf[layer], k)
            if v is not None:
                self._write(self.v_buf[layer], v)
        return self.backend.attend(layer, q, k, v, scale, self.plan)

    def held_kv(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The decode step's held-back K (and V) of every layer, [n_layers, S * Hkv, D], for commit."""
        k = torch.stack(self._held_k).flatten(1, 2)
        return k, torch.stack(self._held_v).flatten(1, 2) if self._held_v else None

    def commit(self, k: torch.Tensor, v: Optional[torch.Tensor]) -> None:
        """Write a decode step's new K/V (from held_kv) of all layers into the cache: one copy per buffer."""
        self.k_buf.view(self.k_buf.shape[0], -1, self.k_dim).index_copy_(1, self.write_index, k.to(self.dtype))
        if v is not None:
            self.v_buf.view(self.v_buf.shape[0], -1, self.v_dim).index_copy_(1, self.write_index, v.to(self.dtype))

    def _write(self, buf: torch.Tensor, new: torch.Tensor) -> None:
        """Store the written rows of new [T, Hkv, D] into one layer's buffer [num_blocks, Hkv, bs, D]."""
        if self.write_rows is not None:
            new = new.index_select(0, self.write_rows)
        buf.view(-1, buf.shape[-1]).index_copy_(0, self.write_index, new.reshape(-1, new.shape[-1]).to(buf.dtype))
