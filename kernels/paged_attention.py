"""Decode-time attention over a paged KV cache (PagedAttention style), one new token per sequence.

    o = paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, sm_scale)

q             [B, Hq, Dqk]                      the new token's queries (its K/V already cached)
k_cache       [num_pages, page_size, Hkv, Dqk]
v_cache       [num_pages, page_size, Hkv, Dv]   or None for MLA latent mode: V is then the first
                                                `v_dim` columns of k_cache (the latent is stored once)
block_tables  int [B, max_pages_per_seq]        page ids; entries past a sequence's pages are ignored
context_lens  int [B]                           valid tokens per sequence, the new one included
-> o          [B, Hq, Dv] in q's dtype

`paged_attention_decode_torch` is a pure PyTorch gather path (CPU serving, and the reference);
`paged_attention_decode` runs the Triton kernel on CUDA, or on CPU under TRITON_INTERPRET=1.
Query head h reads kv head h // (Hq // Hkv) (MHA, GQA, MQA).
"""

from __future__ import annotations

import math

import torch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int32, torch.int64)
MAX_HEAD_DIM = 1024  # the kernel keeps a [group, head_dim] tile of q in registers


def _validate(q, k_cache, v_cache, block_tables, context_lens, sm_scale, v_dim, triton_path):
    def fail(msg):
        raise ValueError(f"paged_attention_decode: {msg}")

    if q.dim() != 3:
        fail(f"q must be 3-D [B, Hq, Dqk], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        fail(f"k_cache must be 4-D [num_pages, page_size, Hkv, Dqk], got shape {tuple(k_cache.shape)}")
    B, Hq, Dqk = q.shape
    _, page_size, Hkv, Dk = k_cache.shape
    if Dk != Dqk:
        fail(f"q head dim {Dqk} != k_cache head dim {Dk}")
    if Hkv == 0 or Hq % Hkv:
        fail(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if page_size < 1:
        fail("page size must be >= 1")
    if v_cache is None:
        if v_dim is None or not 1 <= v_dim <= Dqk:
            fail(f"latent mode (v_cache=None) needs v_dim in [1, {Dqk}], got {v_dim}")
        Dv = int(v_dim)
    else:
        if v_cache.dim() != 4 or v_cache.shape[:3] != k_cache.shape[:3]:
            fail(f"v_cache must be [num_pages, page_size, Hkv, Dv] matching k_cache {tuple(k_cache.shape[:3])}, "
                 f"got {tuple(v_cache.shape)}")
        if v_dim is not None and v_dim != v_cache.shape[3]:
            fail(f"v_dim={v_dim} disagrees with v_cache head dim {v_cache.shape[3]}")
        Dv = v_cache.shape[3]
    caches = [k_cache] + ([] if v_cache is None else [v_cache])
    if any(t.dtype != q.dtype for t in caches):
        fail(f"q and the caches must share a dtype, got {q.dtype} and {[t.dtype for t in caches]}")
    if triton_path and q.dtype not in _DTYPES:
        fail(f"dtype {q.dtype} not supported; use float32, float16 or bfloat16")
    if not q.dtype.is_floating_point:
        fail(f"q must be floating point, got {q.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or block_tables.dtype not in _INT_DTYPES:
        fail(f"block_tables must be int32/int64 [B={B}, max_pages], "
             f"got {block_tables.dtype} {tuple(block_tables.shape)}")
    if context_lens.dim() != 1 or context_lens.shape[0] != B or context_lens.dtype not in _INT_DTYPES:
        fail(f"context_lens must be int32/int64 [B={B}], got {context_lens.dtype} {tuple(context_lens.shape)}")
    devices = {t.device for t in [q, block_tables, context_lens] + caches}
    if len(devices) != 1:
        fail(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if triton_path and max(Dqk, Dv) > MAX_HEAD_DIM:
        fail(f"head dims must be <= {MAX_HEAD_DIM}, got Dqk={Dqk}, Dv={Dv}")
    return Dv, (Dqk ** -0.5 if sm_scale is None else float(sm_scale))


# ------------------------------------------------------------------------------------------
# PyTorch path
# ------------------------------------------------------------------------------------------
def paged_attention_decode_torch(q, k_cache, v_cache, block_tables, context_lens,
                                 sm_scale=None, v_dim=None):
    """Gather each sequence's pages into a padded [B, L, Hkv, D] batch (L = longest context),
    then one batched masked softmax. Vectorised over batch, heads and tokens; fp32 math (fp64
    for fp64 inputs). sm_scale defaults to Dqk ** -0.5 (MLA callers pass their own)."""
    Dv, sm_scale = _validate(q, k_cache, v_cache, block_tables, context_lens, sm_scale, v_dim, False)
    B, Hq, Dqk = q.shape
    _, page_size, Hkv, _ = k_cache.shape
    if B == 0:
        return q.new_zeros(B, Hq, Dv)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    lens = context_lens.long()
    max_len = int(lens.max()) if B else 0
    n_pages = max(1, math.ceil(max_len / page_size))

    # Page ids of each sequence; entries past its last page may be garbage: send them to 0.
    pages = block_tables[:, :n_pages].long()
    needed = (lens + page_size - 1) // page_size
    pages = torch.where(torch.arange(n_pages, device=q.device) < needed[:, None], pages, 0)
    L = n_pages * page_size
    k = k_cache[pages].reshape(B, L, Hkv, Dqk)  # one gather for the whole batch
    v = k[..., :Dv] if v_cache is None else v_cache[pages].reshape(B, L, Hkv, Dv)

    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G, Dqk).to(compute)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k.to(compute)) * sm_scale  # [B, Hkv, G, L]
    valid = torch.arange(L, device=q.device) < lens[:, None]  # [B, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty context -> zeros, not NaN
    # Slots past a sequence's length hold stale data (maybe NaN from torch.empty); a zero
    # weight does not cancel a NaN (0 * NaN = NaN), so zero those V rows.
    v = v.to(compute).masked_fill(~valid[:, :, None, None], 0.0)
    o = torch.einsum("bhgl,blhd->bhgd", probs, v)
    return o.reshape(B, Hq, Dv).to(q.dtype)


# ------------------------------------------------------------------------------------------
# Triton path
# ------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _default_splits(device, programs, max_tokens, interp):
    """Split long contexts over more programs when (sequences x kv heads) cannot fill the GPU."""
    if interp or device.type != "cuda" or max_tokens <= 512:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(_cdiv(2 * sms, programs), _cdiv(max_tokens, 256), 32))


def _launch_meta(q, k_cache, block_tables, Dv, num_splits, interp) -> dict:
    """The kernel's named arguments (and `num_splits`). The split length is a multiple of 64 that
    follows the table width, so it changes every 64 tokens of context; the autotuner is keyed on
    its power-of-two bucket SPLIT_BUCKET instead, else a GPU would re-benchmark every config each
    time a sequence grew past another 64 tokens."""
    B, Hq, Dqk = q.shape
    _, page_size, Hkv, _ = k_cache.shape
    max_tokens = max(1, block_tables.shape[1] * page_size)
    if num_splits is None:
        num_splits = _default_splits(q.device, B * Hkv, max_tokens, interp)
    num_splits = max(1, min(int(num_splits), max_tokens))
    split_len = _cdiv(_cdiv(max_tokens, num_splits), 64) * 64  # whole tiles per split
    num_splits = _cdiv(max_tokens, split_len)
    fp32_precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return dict(
        num_splits=num_splits, GROUP=Hq // Hkv, SPLIT_LEN=split_len, SPLIT_BUCKET=_next_pow2(split_len),
        D_QK=Dqk, D_V=Dv, BLOCK_DQK=max(16, _next_pow2(Dqk)), BLOCK_DV=max(16, _next_pow2(Dv)),
        BLOCK_G=max(16, _next_pow2(Hq // Hkv)), PAGE_SIZE=page_size, SPLIT=num_splits > 1,
        UPCAST=bool(interp and q.dtype == torch.bfloat16),
        DOT_PRECISION=fp32_precision if q.dtype == torch.float32 else "tf32",
    )


def paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens,
                           sm_scale=None, v_dim=None, num_splits=None):
    """Triton paged decode attention; same contract as `paged_attention_decode_torch`.
    `num_splits` forces the split-K factor (default: chosen from the GPU size and the table
    width, which keeps it free of host syncs on context_lens)."""
    Dv, sm_scale = _validate(q, k_cache, v_cache, block_tables, context_lens, sm_scale, v_dim, True)
    from ._triton_loader import interpreting, load_kernel_module  # triton only on this path

    interp = interpreting()
    if q.device.type == "cpu" and not interp:
        raise ValueError("paged_attention_decode: got CPU tensors but Triton's interpreter is off. Set "
                         "TRITON_INTERPRET=1 (slow, for tests) or use paged_attention_decode_torch on CPU.")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"paged_attention_decode: unsupported device {q.device}")
    kern = load_kernel_module("_paged_attention_triton", interp)

    B, Hq = q.shape[:2]
    o = q.new_empty(B, Hq, Dv)
    if B == 0:
        return o
    meta = _launch_meta(q, k_cache, block_tables, Dv, num_splits, interp)
    num_splits, split = meta.pop("num_splits"), meta["SPLIT"]

    v_src = k_cache if v_cache is None else v_cache  # latent mode: V lives in the K buffer
    if split:
        o_part = torch.empty(B, Hq, num_splits, Dv, device=q.device, dtype=torch.float32)
        lse_part = torch.empty(B, Hq, num_splits, device=q.device, dtype=torch.float32)
    else:  # unused by the kernel (SPLIT=False); any tensor will do
        o_part, lse_part = o, o[..., 0]
    kern._paged_decode[(B, k_cache.shape[2], num_splits)](
        q, k_cache, v_src, block_tables, context_lens, o, o_part, lse_part, sm_scale,
        *q.stride(), *k_cache.stride(), *v_src.stride(), *block_tables.stride(), *o.stride(),
        *(o_part.stride() if split else (0, 0, 0, 0)), *(lse_part.stride()[:2] if split else (0, 0)),
        **meta,
    )
    if split:
        kern._paged_reduce[(B, Hq)](
            o_part, lse_part, o, *o_part.stride(), *lse_part.stride()[:2], *o.stride(),
            num_splits, D_V=Dv, BLOCK_DV=max(16, _next_pow2(Dv)),
            BLOCK_S=max(2, _next_pow2(num_splits)),
        )
    return o
