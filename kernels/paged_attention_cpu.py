"""Paged decode attention on CPU: a C++ kernel (csrc/paged_attention_cpu.cpp) built on first use.

    o = paged_attention_decode_cpu(q, k_cache, v_cache, block_tables, context_lens, sm_scale,
                                   v_dim=None, k_last=None, v_last=None)

The contract of kernels/paged_attention.py (float32 here), plus k_last/v_last [B, Hkv, D]: the K/V
of each sequence's last position (context_len - 1), read from there instead of the cache, so a
decode step can attend before it writes the new token (the engine writes every layer's at once).
It reads the pages in place, where the PyTorch gather path copies every sequence's context first.

The kernel is compiled once per source, flags, torch version and CPU kind with the C++ compiler in
$CXX (default c++), about 15 s, into $SMALL_LLM_CACHE (default ~/.cache/small-llm) by kernels/_cpp_build.py
and loaded as the operator torch.ops.small_llm.paged_decode_attention, which torch.compile keeps as one call.
`cpu_kernel_error()` says why it is unavailable (no compiler, build failure), or None.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._cpp_build import load_once
from .paged_attention import _validate

SOURCE = Path(__file__).parent / "csrc" / "paged_attention_cpu.cpp"
_state: dict = {}  # "error": None once loaded, else the reason it could not be


def cpu_kernel_error() -> str | None:
    """Build (once per process, if not cached on disk) and load the kernel; the reason it is not
    available, or None."""
    return load_once(_state, SOURCE, "the CPU paged-attention kernel",
                     {"small_llm::paged_decode_attention": _fake})


def _fake(q, k_cache, v_cache, block_tables, context_lens, k_last, v_last, scale, v_dim):
    """Output shape for torch.compile's tracing."""
    return q.new_empty(q.shape[0], q.shape[1], v_dim)


def paged_attention_decode_cpu(q, k_cache, v_cache, block_tables, context_lens, sm_scale=None, v_dim=None,
                               k_last=None, v_last=None):
    """The C++ kernel; the contract of `paged_attention_decode_torch` (float32), plus k_last/v_last."""
    Dv, sm_scale = _validate(q, k_cache, v_cache, block_tables, context_lens, sm_scale, v_dim, False)
    if q.device.type != "cpu" or q.dtype != torch.float32:
        raise ValueError(f"paged_attention_decode_cpu: float32 CPU tensors only, got {q.dtype} on {q.device}; "
                         "use paged_attention_decode_torch")
    B, _, Dqk = q.shape
    Hkv = k_cache.shape[2]
    for name, t, d in (("k_last", k_last, Dqk), ("v_last", v_last, Dv)):
        if t is not None and (tuple(t.shape) != (B, Hkv, d) or t.dtype != q.dtype):
            raise ValueError(f"paged_attention_decode_cpu: {name} must be float32 [{B}, {Hkv}, {d}], "
                             f"got {t.dtype} {tuple(t.shape)}")
    if (v_last is not None) != (k_last is not None and v_cache is not None):
        raise ValueError("paged_attention_decode_cpu: pass v_last exactly when k_last and v_cache are given")
    error = cpu_kernel_error()
    if error:
        raise RuntimeError(f"paged_attention_decode_cpu: the kernel is unavailable: {error}")
    return torch.ops.small_llm.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, k_last,
                                                      v_last, sm_scale, Dv)
