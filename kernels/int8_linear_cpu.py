"""int8 weight-only linear on CPU: a C++ kernel (csrc/int8_linear_cpu.cpp) built on first use.

    y = int8_linear_cpu(x, weight, scale)    # y[..., N] = (x[..., K] @ weight[N, K]^T) * scale[N]

x float32 (any leading dims; rows may be strided), weight int8 [N, K] contiguous, scale float32 [N].
Made for decoding (1-64 rows): the weights are read once per call, a quarter of fp32's bytes.
engine/quantize.py builds the int8 weights and scales and uses this through `Int8Linear`.

Why a kernel of ours: torch's own `aten._weight_int8pack_mm` computes the same thing, but for fp32
activations it measured 5-50x slower than the fp32 F.linear it should beat (torch 2.13, AVX2 CPU,
1 and 16 rows, 256-8192 x 256 weights).

Built once per source, flags, torch version and CPU kind by kernels/_cpp_build.py and loaded as
torch.ops.small_llm.int8_linear, which torch.compile keeps as one call. `cpu_kernel_error()` says
why it is unavailable (no compiler, build failure), or None.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._cpp_build import load_once

SOURCE = Path(__file__).parent / "csrc" / "int8_linear_cpu.cpp"
_state: dict = {}  # "error": None once loaded, else the reason it could not be


def cpu_kernel_error() -> str | None:
    """Build (once per process, if not cached on disk) and load the kernel; the reason it is not
    available, or None."""
    return load_once(_state, SOURCE, "the CPU int8 linear kernel", {"small_llm::int8_linear": _fake})


def _fake(x, weight, scale):
    """Output shape for torch.compile's tracing."""
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def int8_linear_cpu(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(x @ weight.T) * scale with int8 `weight` [N, K] and per-output-channel fp32 `scale` [N]."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise ValueError(f"int8_linear_cpu: float32 CPU activations only, got {x.dtype} on {x.device}")
    if weight.dtype != torch.int8 or weight.dim() != 2 or scale.dtype != torch.float32 \
            or tuple(scale.shape) != (weight.shape[0],) or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"int8_linear_cpu: need x [..., K] float32, weight [N, K] int8, scale [N] float32; got "
                         f"x {tuple(x.shape)}, weight {weight.dtype} {tuple(weight.shape)}, "
                         f"scale {scale.dtype} {tuple(scale.shape)}")
    error = cpu_kernel_error()
    if error:
        raise RuntimeError(f"int8_linear_cpu: the kernel is unavailable: {error}")
    return torch.ops.small_llm.int8_linear(x, weight.contiguous(), scale)
