"""FlashAttention-2 in Triton: forward and backward, MHA / GQA / MQA, Dqk != Dv (MLA).

    from kernels import flash_attention
    o = flash_attention(q, k, v, causal=True)   # q [B,Hq,N,Dqk], k [B,Hkv,N,Dqk], v [B,Hkv,N,Dv]

Any strides are accepted (e.g. `x.view(B, N, H, D).transpose(1, 2)` needs no copy), and the output
follows q's memory layout, so a [B, N, H, D]-ordered q gives an output whose `.transpose(1, 2)`
is contiguous. Differentiable in eager mode through `FlashAttentionFunction` (an
autograd.Function) and under torch.compile through the custom op
`torch.ops.llm_kernels.flash_attention_fwd` (with autograd and fake-tensor rules registered).

Devices: CUDA runs the compiled kernels. CPU tensors run the same kernels in Triton's interpreter
when TRITON_INTERPRET=1 is set; this is slow and meant for tests. The variable is read at each
call (see _triton_loader.py), so it may be set after triton was imported. `import kernels` does
not import triton at all.
The kernels themselves are in kernels/_flash_attention_triton.py.
"""

from __future__ import annotations

import torch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


# ------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------
def _validate(q, k, v, sm_scale):
    """Raise ValueError naming what is wrong; return the softmax scale to use."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"flash_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"flash_attention: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, N, Dqk = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"flash_attention: batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[2] != N or v.shape[2] != N:
        raise ValueError(f"flash_attention: sequence lengths differ: q {N}, k {k.shape[2]}, v {v.shape[2]} "
                         "(only self-attention with equal lengths is supported)")
    Hkv = k.shape[1]
    if v.shape[1] != Hkv:
        raise ValueError(f"flash_attention: k has {Hkv} heads but v has {v.shape[1]}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"flash_attention: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if k.shape[3] != Dqk:
        raise ValueError(f"flash_attention: q head dim {Dqk} != k head dim {k.shape[3]}")
    Dv = v.shape[3]
    for name, d in (("q/k", Dqk), ("v", Dv)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"flash_attention: {name} head dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    if sm_scale is None:
        return Dqk ** -0.5
    return float(sm_scale)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _kernels(device: torch.device):
    """The kernel module for this device and the interpreter switch as it is now. Triton is
    imported here, not at `import kernels`, so the other backends never need it."""
    from ._triton_loader import interpreting, load_kernel_module

    interp = interpreting()
    if device.type == "cpu" and not interp:
        raise ValueError("flash_attention: got CPU tensors but Triton's interpreter is off. Set "
                         "TRITON_INTERPRET=1 to run the kernel on CPU (slow, for tests), or use "
                         "another attention backend (e.g. sdpa) on CPU.")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"flash_attention: unsupported device {device}; use CUDA (or CPU with TRITON_INTERPRET=1)")
    return load_kernel_module("_flash_attention_triton", interp), interp


def _empty_like_layout(q: torch.Tensor, last_dim: int) -> torch.Tensor:
    """[B, H, N, last_dim] in q's memory order: [B, N, H, D]-ordered if q's heads are inner to
    its sequence (a transposed view), so the caller's transpose back costs nothing."""
    B, H, N, _ = q.shape
    if H > 1 and N > 1 and q.stride(1) < q.stride(2):
        return q.new_empty(B, N, H, last_dim).transpose(1, 2)
    return q.new_empty(B, H, N, last_dim)


def _head_dim_blocks(d: int) -> tuple[int, int]:
    """Column blocks (powers of two, >= 16 = the smallest tl.dot) covering a q/k head dim:
    (padded, 0) normally, or two blocks when they are narrower than padding, e.g.
    192 -> (128, 64) instead of 256, 48 -> (32, 16), 130 -> (128, 16)."""
    padded = max(16, _next_pow2(d))
    first = max(16, _next_pow2(d) // 2)
    if d > first:
        second = max(16, _next_pow2(d - first))
        if first + second < padded:
            return first, second
    return padded, 0


def _meta_args(q, k, v, causal, interp):
    Dqk, Dv = q.shape[3], v.shape[3]
    block_dqk, block_dqk2 = _head_dim_blocks(Dqk)
    fp32_precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return dict(
        N_BUCKET=_next_pow2(q.shape[2]),  # autotune key: re-tune per length bucket
        D_QK=Dqk, D_V=Dv,
        BLOCK_DQK=block_dqk, BLOCK_DQK2=block_dqk2,
        BLOCK_DV=max(16, _next_pow2(Dv)),  # padded (MLA's Dv = 128 needs no split)
        CAUSAL=bool(causal),
        UPCAST=bool(interp and q.dtype == torch.bfloat16),
        # fp32 inputs follow torch's TF32 switch, like torch.matmul does.
        DOT_PRECISION=fp32_precision if q.dtype == torch.float32 else "tf32",
    )


# ------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------
def _forward(q, k, v, causal: bool, sm_scale: float):
    """Returns (o [B,Hq,N,Dv], lse [B,Hq,N] fp32, natural log)."""
    B, Hq, N, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    o = _empty_like_layout(q, Dv)
    lse = torch.empty((B, Hq, N), device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse.fill_(float("-inf"))
    kern, interp = _kernels(q.device)
    meta = _meta_args(q, k, v, causal, interp)

    def grid(cfg):
        return (_cdiv(N, cfg["BLOCK_M"]), Hq, B)

    kern._attn_fwd[grid](
        q, k, v, o, lse, sm_scale,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        lse.stride(0), lse.stride(1),
        N, Hq // Hkv, **meta,
    )
    return o, lse


def _backward(do, q, k, v, o, lse, causal: bool, sm_scale: float):
    """Returns (dq, dk, dv) with the shapes and (where dense) the strides of q, k, v."""
    B, Hq, N, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    kern, interp = _kernels(q.device)
    meta = _meta_args(q, k, v, causal, interp)

    delta = torch.empty_like(lse)  # rowsum(dO * O), [B, Hq, N] fp32
    pre_block = 16 if interp else 64
    kern._attn_bwd_preprocess[(_cdiv(N, pre_block), Hq, B)](
        o, do, delta, *o.stride(), *do.stride(), delta.stride(0), delta.stride(1),
        N, D_V=Dv, BLOCK_DV=meta["BLOCK_DV"], BLOCK_M=pre_block,
    )
    common = (lse.stride(0), lse.stride(1), N, Hq // Hkv)
    kern._attn_bwd_dkdv[lambda cfg: (_cdiv(N, cfg["BLOCK_N"]), Hkv, B)](
        q, k, v, do, lse, delta, dk, dv, sm_scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        *common, **meta,
    )
    kern._attn_bwd_dq[lambda cfg: (_cdiv(N, cfg["BLOCK_M"]), Hq, B)](
        q, k, v, do, lse, delta, dq, sm_scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        *common, **meta,
    )
    return dq, dk, dv


# ------------------------------------------------------------------------------------------
# Eager autograd
# ------------------------------------------------------------------------------------------
class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale):
        o, lse = _forward(q, k, v, causal, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale)
        return dq, dk, dv, None, None


# ------------------------------------------------------------------------------------------
# Custom ops, so torch.compile graphs hold the kernel as one opaque node
# ------------------------------------------------------------------------------------------
@torch.library.custom_op("llm_kernels::flash_attention_fwd", mutates_args=())
def _flash_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            causal: bool, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, causal, sm_scale)


@_flash_attention_fwd_op.register_fake
def _(q, k, v, causal, sm_scale):
    B, Hq, N, _ = q.shape
    return _empty_like_layout(q, v.shape[3]), q.new_empty((B, Hq, N), dtype=torch.float32)


@torch.library.custom_op("llm_kernels::flash_attention_bwd", mutates_args=())
def _flash_attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            o: torch.Tensor, lse: torch.Tensor, causal: bool,
                            sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, causal, sm_scale)


@_flash_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, causal, sm_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, sm_scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.sm_scale = causal, sm_scale
    ctx.mark_non_differentiable(lse)


def _op_backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _flash_attention_bwd_op(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale)
    return dq, dk, dv, None, None


_flash_attention_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    causal: bool = True, sm_scale: float | None = None) -> torch.Tensor:
    """softmax(sm_scale * q k^T [+ causal mask]) v, per head; query head h uses K/V head
    h // (Hq // Hkv). q [B,Hq,N,Dqk], k [B,Hkv,N,Dqk], v [B,Hkv,N,Dv] -> [B,Hq,N,Dv].
    sm_scale defaults to Dqk ** -0.5. Head dims up to 256; fp32, fp16 or bf16."""
    sm_scale = _validate(q, k, v, sm_scale)
    if torch.compiler.is_compiling():
        return torch.ops.llm_kernels.flash_attention_fwd(q, k, v, bool(causal), sm_scale)[0]
    return FlashAttentionFunction.apply(q, k, v, bool(causal), sm_scale)


def _flash_attention_forward(q, k, v, causal: bool = True, sm_scale: float | None = None):
    """Forward only, also returning the fp32 log-sum-exp [B, Hq, N] (natural log). For tests."""
    sm_scale = _validate(q, k, v, sm_scale)
    return _forward(q, k, v, bool(causal), sm_scale)
