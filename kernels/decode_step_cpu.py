"""The whole decode step of a GQA-family model (MHA, GQA, MQA) on CPU in one C++ call
(csrc/decode_step_cpu.cpp), built on first use.

    model = decode_model(embed, rope_cos, rope_sin, norms, weights, scales, n_heads, n_kv_heads, eps)
    logits, argmax = model.step(tokens, positions, slots, tables, starts, k_buf, v_buf)

`decode_model` takes the model's tensors once: the token embedding, the RoPE tables and the norms
(attn_norm and ffn_norm of each layer, then the final norm) by reference, and the linear weights [N, K]
(wqkv, wo, w13, w2 of each layer, then the LM head), each fp32 with an empty scale or int8 with its
per-channel scales. fp32 weights are copied once into a layout packed for streaming (csrc/linear.h:
tiles of 4 output channels interleaved vector by vector, so each thread reads one contiguous run);
int8 weights are used in place. `step` runs one token per sequence through every layer over the paged cache
(engine/kv_cache.py's buffers, which it writes at the slots) and returns logits [S, vocab] and their
argmax [S]. Its inputs are plain int lists: tokens, positions and slots (one per sequence; slot -1:
already cached) and the sequences' block tables one after another, sequence i's from starts[i].
engine/decode.py (CppDecode) builds it from a Transformer and the runner calls it.

Why: at batch 1 the eager step is ~250 small PyTorch ops whose dispatch costs more than their
arithmetic, and MKL's GEMV at one row uses one core; here the step is one call and every matrix is
streamed by all threads (csrc/linear.h, shared with the int8 kernel; attention is csrc/attention.h,
shared with the paged-attention kernel).

Built once per source, flags, torch version and CPU kind by kernels/_cpp_build.py.
`cpu_kernel_error()` says why it is unavailable (no compiler, build failure), or None.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._cpp_build import load_once

SOURCE = Path(__file__).parent / "csrc" / "decode_step_cpu.cpp"
_state: dict = {}  # "error": None once loaded, else the reason it could not be


def cpu_kernel_error() -> str | None:
    """Build (once per process, if not cached on disk) and load the kernel; the reason it is not
    available, or None."""
    return load_once(_state, SOURCE, "the CPU decode-step kernel", {})


def decode_model(embed: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor, norms: list[torch.Tensor],
                 weights: list[torch.Tensor], scales: list[torch.Tensor], n_heads: int, n_kv_heads: int,
                 eps: float):
    """The C++ model object (torch.classes.small_llm.DecodeModel); see the module docstring."""
    error = cpu_kernel_error()
    if error:
        raise RuntimeError(f"decode_model: the kernel is unavailable: {error}")
    return torch.classes.small_llm.DecodeModel(embed, rope_cos, rope_sin, norms, weights, scales, n_heads,
                                               n_kv_heads, eps)
