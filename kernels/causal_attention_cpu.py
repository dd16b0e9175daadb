"""Causal self-attention for training on CPU: a C++ kernel (csrc/causal_attention_cpu.cpp), forward and
backward, built on first use.

    o = causal_attention_cpu(q, k, v, scale)   # q [B, Hq, T, Dqk], k [B, Hkv, T, Dqk], v [B, Hkv, T, Dv]

float32, any strides with a unit last one; MHA, GQA and MQA (Hq a multiple of Hkv), Dqk != Dv (MLA).
Differentiable, in eager mode and under torch.compile: the operators torch.ops.small_llm.causal_attention_fwd
and _bwd carry fake (shape-only) implementations and an autograd rule, so a compiled graph keeps each as one
call. The training attention backend "auto" runs it on CPU (model/attention.py); `cpu_kernel_error()` says
why it is unavailable (no compiler, a failed build, a torch without the BLAS symbol), or None.

Why a kernel of ours: torch's SDPA on CPU (its flash-attention kernel) took 16% of a training step at the
README's shape for about 6% of the step's FLOPs; with ours the compiled step is 7-8% faster
(`python -m scripts.bench_train --variants compiled compiled-sdpa hf`, README: Performance).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._cpp_build import load_once

SOURCE = Path(__file__).parent / "csrc" / "causal_attention_cpu.cpp"
_state: dict = {}  # "error": None once loaded, else the reason it could not be


def _fake_fwd(q, k, v, scale):
    B, Hq, T, _ = q.shape
    return q.new_empty(B, Hq, T, v.shape[-1]), q.new_empty(B, Hq, T)


def _fake_bwd(dout, q, k, v, o, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.small_llm.causal_attention_bwd(do, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


def cpu_kernel_error() -> str | None:
    """Build (once per process, if not cached on disk) and load the kernel; the reason it is not
    available, or None."""
    error = load_once(_state, SOURCE, "the CPU training attention kernel",
                      {"small_llm::causal_attention_fwd": _fake_fwd, "small_llm::causal_attention_bwd": _fake_bwd})
    if error is None and "autograd" not in _state:
        torch.library.register_autograd("small_llm::causal_attention_fwd", _backward, setup_context=_setup_context)
        _state["autograd"] = True
    return error


def causal_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * q k^T + causal mask) v, each query head on the key/value head of its group."""
    if _state.get("error", "not loaded") is not None:  # a plain dict lookup once loaded: torch.compile traces it
        error = cpu_kernel_error()
        if error:
            raise RuntimeError(f"causal_attention_cpu: the kernel is unavailable: {error}")
    q, k, v = [x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v)]
    return torch.ops.small_llm.causal_attention_fwd(q, k, v, scale)[0]
