"""Triton kernels for decode-time attention over a paged KV cache. Launched by
kernels/paged_attention.py; executed by kernels/_triton_loader.py once per mode.

Cache layout: k_cache [num_pages, PAGE_SIZE, Hkv, Dqk], v_cache [num_pages, PAGE_SIZE, Hkv, Dv];
block_tables[b, j] is the physical page holding tokens [j * PAGE_SIZE, (j + 1) * PAGE_SIZE) of
sequence b. In MLA latent mode V is the first Dv columns of the K cache (V points at the K
buffer with K's strides), so the latent is stored once.

One program per (sequence, kv head, split). It packs the GROUP query heads that share this kv
head into the rows of one tile, so each K/V byte is read once per group (decode is bound by
memory traffic, not FLOPs). The tile is padded to >= 16 rows, the smallest tl.dot; on a GPU the
idle MMA rows are free next to the memory time. A token tile of BLOCK_N positions may span
several pages: each position looks up its page in the block table, so BLOCK_N is independent of
the page size. Long contexts are split across programs (split-K, "flash decoding"); each split
writes a normalised partial output and its base-2 log-sum-exp, merged by `_paged_reduce`.
"""

import triton
import triton.language as tl

from kernels._triton_loader import load_kernel_module

INTERPRET = bool(triton.knobs.runtime.interpret)

# log2(e), the tl.reduce combine functions and the decorator of device helpers, built in this
# module's mode (see _triton_common.py).
_common = load_kernel_module("_triton_common", INTERPRET)
LOG2E, _max_combine, _sum_combine, helper = _common.LOG2E, _common.max_combine, _common.sum_combine, _common.helper


def _configs():
    if INTERPRET:  # the interpreter cannot benchmark: one fixed config
        return [triton.Config({"BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn in (16, 32, 64)
        for w in (2, 4, 8)
        for s in (1, 2, 3)
    ]


@helper
def _load_kv_tile(K_head, V_head, table, tok, t_mask, offs_dqk, offs_dv, stride_btj,
                  stride_kp, stride_kt, stride_kd, stride_vp, stride_vt, stride_vd,
                  D_QK: tl.constexpr, D_V: tl.constexpr, PAGE_SIZE: tl.constexpr, UPCAST: tl.constexpr):
    """(K^T [D_QK, tokens], V [tokens, D_V]) of the tokens `tok` of one sequence and kv head, each
    position read from the page its block table names (masked positions read as 0)."""
    # Only table entries of real tokens are read: padded entries may hold anything.
    page = tl.load(table + (tok // PAGE_SIZE) * stride_btj, mask=t_mask, other=0).to(tl.int64)
    slot = tok % PAGE_SIZE
    kT_ptrs = K_head + page[None, :] * stride_kp + slot[None, :] * stride_kt + offs_dqk[:, None] * stride_kd
    kT = tl.load(kT_ptrs, mask=t_mask[None, :] & (offs_dqk[:, None] < D_QK), other=0.0)
    v_ptrs = V_head + page[:, None] * stride_vp + slot[:, None] * stride_vt + offs_dv[None, :] * stride_vd
    # Latent mode: these are the same bytes as kT's first D_V rows, an L1/L2 hit.
    v = tl.load(v_ptrs, mask=t_mask[:, None] & (offs_dv[None, :] < D_V), other=0.0)
    if UPCAST:  # interpreter only: its bf16 arithmetic is wrong, so compute in fp32
        kT = kT.to(tl.float32)
        v = v.to(tl.float32)
    return kT, v


@helper
def _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """Fold one tile of base-2 scores s [rows, tokens] and its values v [tokens, D_V] into the running
    row max m_i, normaliser l_i and unnormalised output acc; returns the three updated."""
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))
    alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# SPLIT_BUCKET (a power of two >= SPLIT_LEN), not SPLIT_LEN: the split length changes every 64
# tokens of context, and each new key value re-benchmarks all configs.
@triton.autotune(configs=_configs(), key=["SPLIT_BUCKET", "D_QK", "D_V", "GROUP", "PAGE_SIZE", "SPLIT"])
@triton.jit
def _paged_decode(Q, K, V, BLOCK_TABLES, CONTEXT_LENS, O, O_PART, LSE_PART, sm_scale,
                  stride_qb, stride_qh, stride_qd,
                  stride_kp, stride_kt, stride_kh, stride_kd,
                  stride_vp, stride_vt, stride_vh, stride_vd,
                  stride_btb, stride_btj,
                  stride_ob, stride_oh, stride_od,
                  stride_pb, stride_ph, stride_ps, stride_pd,
                  stride_lb, stride_lh,
                  GROUP, SPLIT_LEN, SPLIT_BUCKET,
                  D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_G: tl.constexpr, PAGE_SIZE: tl.constexpr, SPLIT: tl.constexpr,
                  UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kv_h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    ctx_len = tl.load(CONTEXT_LENS + b)
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, ctx_len)

    offs_g = tl.arange(0, BLOCK_G)
    heads = kv_h * GROUP + offs_g  # the query heads that read this kv head
    g_mask = offs_g < GROUP
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)

    q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + offs_dqk[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=g_mask[:, None] & (offs_dqk[None, :] < D_QK), other=0.0)
    if UPCAST:  # interpreter only: its bf16 arithmetic is wrong, so compute in fp32
        q = q.to(tl.float32)

    K_head = K + kv_h * stride_kh
    V_head = V + kv_h * stride_vh
    table = BLOCK_TABLES + b * stride_btb
    qk_scale = sm_scale * LOG2E

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_G, BLOCK_DV], 0.0, dtype=tl.float32)
    # Every tile below holds at least one valid token, so m_i is finite after the first one.
    for t0 in range(start, end, BLOCK_N):
        tok = t0 + offs_n
        t_mask = tok < end
        kT, v = _load_kv_tile(K_head, V_head, table, tok, t_mask, offs_dqk, offs_dv, stride_btj,
                              stride_kp, stride_kt, stride_kd, stride_vp, stride_vt, stride_vd,
                              D_QK, D_V, PAGE_SIZE, UPCAST)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N], base 2
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

    # An empty split (or context length 0) has l = 0: output 0 and lse = -inf, never NaN.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    o_mask = g_mask[:, None] & (offs_dv[None, :] < D_V)
    if SPLIT:
        p_ptrs = O_PART + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_dv[None, :] * stride_pd
        tl.store(p_ptrs, o, mask=o_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        tl.store(LSE_PART + b * stride_lb + heads * stride_lh + split, lse, mask=g_mask)
    else:
        o_ptrs = O + b * stride_ob + heads[:, None] * stride_oh + offs_dv[None, :] * stride_od
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=o_mask)


@triton.jit
def _paged_reduce(O_PART, LSE_PART, O,
                  stride_pb, stride_ph, stride_ps, stride_pd,
                  stride_lb, stride_lh,
                  stride_ob, stride_oh, stride_od,
                  NUM_SPLITS, D_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge the splits of one (sequence, query head): o = sum_s w_s o_s / sum_s w_s with
    w_s = 2^(lse_s - max lse)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_DV)
    s_mask = offs_s < NUM_SPLITS
    lse = tl.load(LSE_PART + b * stride_lb + h * stride_lh + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.reduce(lse, 0, _max_combine)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: weights 0, output 0
    w = tl.math.exp2(lse - m)
    parts = tl.load(O_PART + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :] * stride_pd,
                    mask=s_mask[:, None] & (offs_d[None, :] < D_V), other=0.0)
    total = tl.reduce(w, 0, _sum_combine)
    o = tl.reduce(parts * w[:, None], 0, _sum_combine) / tl.where(total == 0.0, 1.0, total)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d * stride_od, o.to(O.dtype.element_ty), mask=offs_d < D_V)
