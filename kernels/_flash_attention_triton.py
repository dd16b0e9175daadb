"""Triton kernels for FlashAttention-2, forward and backward. Launched by kernels/flash_attention.py.

This file is executed by kernels/_triton_loader.py once per mode (GPU compiler or interpreter),
so `INTERPRET` below is the mode these kernels were built in.

Notation: one program owns a tile of BLOCK_M query rows or BLOCK_N key rows of one (batch, head).
Scores are kept in base 2: s2 = (q . k) * sm_scale * log2(e), so softmax uses exp2, which is a
single MUFU instruction on NVIDIA GPUs (exp would cost an extra multiply per element). The saved
log-sum-exp is in natural-log units, lse = ln(sum_j exp(sm_scale * q . k_j)), fp32.

Masking is paid only where needed. Key tiles that lie completely inside the sequence and, when
causal, completely left of the diagonal run with no mask at all; only the diagonal tiles and the
ragged tail tile (N not a multiple of the block) run the masked variant (the MASKED constexpr
compiles two copies of each inner loop). Head dims are padded to a power of two (>= 16, the
smallest tl.dot) and their column mask compiles away when the head dim already is one. A q/k
head dim that two power-of-two blocks cover more tightly is split instead of padded: MLA's
192 = 128 + 64 (BLOCK_DQK + BLOCK_DQK2), whose scores are then two accumulated dots, where
padding to 256 would waste a quarter of the QK^T work and of the dQ/dK accumulators.

Offsets: batch/head/tile-start offsets are int64 scalars (a [B, H, N, D] tensor can exceed 2^31
elements); the within-tile offsets (< BLOCK * stride) are loop-invariant int32 tiles. Carrying
64-bit pointer tiles through the loops instead costs registers and made the kernels spill.
"""

import triton
import triton.language as tl

from kernels._triton_loader import load_kernel_module

INTERPRET = bool(triton.knobs.runtime.interpret)

# log2(e), the tl.reduce combine functions and the decorator of device helpers, built in this
# module's mode (see _triton_common.py).
_common = load_kernel_module("_triton_common", INTERPRET)
LOG2E, _max_combine, _sum_combine, helper = _common.LOG2E, _common.max_combine, _common.sum_combine, _common.helper
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): converts base-2 log-sum-exp back


# --------------------------------------------------------------------------------------------
# Autotuning. The interpreter cannot benchmark (more than one config needs a GPU driver), so it
# gets one small fixed config; small tiles keep the interpreter fast and the unequal BLOCK_M /
# BLOCK_N exercise the multi-tile diagonal logic that the GPU configs use.
# Keys: sequence length bucket, head dims, GQA group size, causal; the autotuner appends the
# dtypes of the tensor arguments itself.
# --------------------------------------------------------------------------------------------
_KEY = ["N_BUCKET", "D_QK", "D_V", "GROUP", "CAUSAL"]


def _configs(block_m, block_n, warps, stages, interpreter_config):
    if INTERPRET:
        bm, bn = interpreter_config
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in block_m
        for bn in block_n
        for w in warps
        for s in stages
    ]


def _prune(outer):
    """Drop configs that break a tiling rule or cannot fit; `outer` is the tile that must be a
    multiple of the inner one (the diagonal split walks whole inner tiles across it)."""

    def prune(configs, nargs, **kwargs):
        args = {**nargs, **kwargs}
        head = max(args["BLOCK_DQK"] + args["BLOCK_DQK2"], args["BLOCK_DV"])
        kept = []
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            big, small = (bm, bn) if outer == "M" else (bn, bm)
            if big % small:
                continue
            # Wide heads: K/V tiles of 128 x 256 with deep pipelining overflow shared memory and
            # a 128-row fp32 accumulator of width 256 spills with 4 warps.
            if head >= 256 and (small > 64 or c.num_stages > 2 or (big >= 128 and c.num_warps < 8)):
                continue
            # Narrow heads: 8 warps on a 64-row tile leave each warp too little work.
            if head <= 64 and big == 64 and c.num_warps == 8:
                continue
            kept.append(c)
        return kept or configs[:1]

    return prune


# --------------------------------------------------------------------------------------------
# Load / store helpers: masks only on the dimensions that need them (decided at compile time).
# --------------------------------------------------------------------------------------------
@helper
def _load_tile(ptrs, rows, cols, n_rows, n_cols,
               CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr, UPCAST: tl.constexpr):
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
        else:
            x = tl.load(ptrs)
    if UPCAST:
        # The interpreter computes bf16 arithmetic wrongly (it stores bf16 as uint16 for numpy),
        # so interpreted bf16 runs are upcast right after loading. Never set on a GPU.
        x = x.to(tl.float32)
    return x


@helper
def _load_head_rows(row_ptrs, stride_d, rows, n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_D2: tl.constexpr, UPCAST: tl.constexpr):
    """A [rows, head dim] tile whose head dim may be split into two column blocks (192 = 128 + 64):
    (first block, second block, the second block's column offsets); without a second block, the
    first block and its offsets stand in (placeholders the kernels never use)."""
    offs = tl.arange(0, BLOCK_D)
    x = _load_tile(row_ptrs + offs[None, :] * stride_d, rows, offs, n_rows, D, True, D < BLOCK_D, UPCAST)
    offs2, x2 = offs, x
    if BLOCK_D2 > 0:
        offs2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        x2 = _load_tile(row_ptrs + offs2[None, :] * stride_d, rows, offs2, n_rows, D, True,
                        BLOCK_D + BLOCK_D2 > D, UPCAST)
    return x, x2, offs2


@helper
def _store_tile(ptrs, x, rows, cols, n_rows, n_cols,
                CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    x = x.to(ptrs.dtype.element_ty)
    if CHECK_ROWS:
        if CHECK_COLS:
            tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))
        else:
            tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        if CHECK_COLS:
            tl.store(ptrs, x, mask=cols[None, :] < n_cols)
        else:
            tl.store(ptrs, x)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@helper
def _fwd_inner(acc, l_i, m_i, q, q2, K_head, V_head,
               stride_kn, stride_kd, stride_vn, stride_vd,
               lo, hi, N_CTX, qk_scale, offs_m, offs_n, offs_dqk, offs_dqk2, offs_dv,
               D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DQK2: tl.constexpr,
               BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over key tiles [lo, hi). MASKED applies the key-bound and causal masks."""
    # K is read transposed ([D, BLOCK_N]) so the score tile is a plain q @ kT. The int32 tile
    # offsets are loop-invariant; only a scalar int64 base moves (cheaper in registers than
    # carrying 64-bit pointer tiles through the loop).
    kT_offs = offs_dqk[:, None] * stride_kd + offs_n[None, :] * stride_kn
    kT2_offs = offs_dqk2[:, None] * stride_kd + offs_n[None, :] * stride_kn
    v_offs = offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        K_tile = K_head + tl.cast(start_n, tl.int64) * stride_kn
        v_ptrs = V_head + tl.cast(start_n, tl.int64) * stride_vn + v_offs
        kT = _load_tile(K_tile + kT_offs, offs_dqk, cols, D_QK, N_CTX, D_QK < BLOCK_DQK, MASKED, UPCAST)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION)
        if BLOCK_DQK2 > 0:  # second column block of a split head dim (e.g. 192 = 128 + 64)
            kT2 = _load_tile(K_tile + kT2_offs, offs_dqk2, cols, D_QK, N_CTX,
                             BLOCK_DQK + BLOCK_DQK2 > D_QK, MASKED, UPCAST)
            s = tl.dot(q2, kT2, s, input_precision=DOT_PRECISION)
        s = s * qk_scale  # [BLOCK_M, BLOCK_N], base 2
        if MASKED:
            keep = cols[None, :] < N_CTX
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= cols[None, :])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))
        if MASKED:
            # A row whose keys so far are all masked keeps m = -inf; exponentiate against 0
            # instead so exp2(-inf - -inf) = NaN cannot happen (its alpha and p are 0 anyway).
            m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_base = m_new
        alpha = tl.math.exp2(m_i - m_base)  # rescales what was accumulated under the old max
        p = tl.math.exp2(s - m_base[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        acc = acc * alpha[:, None]
        v = _load_tile(v_ptrs, cols, offs_dv, N_CTX, D_V, MASKED, D_V < BLOCK_DV, UPCAST)
        # P is rounded to V's dtype (fp16/bf16) so the second matmul runs on tensor cores.
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_configs((64, 128), (32, 64, 128), (4, 8), (2, 3, 4), (64, 32)),
                 key=_KEY, prune_configs_by={"early_config_prune": _prune("M")})
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, sm_scale,
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_om, stride_od,
              stride_lb, stride_lh,
              N_CTX, GROUP, N_BUCKET,
              D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DQK2: tl.constexpr,
              BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid: (query tiles, query heads, batch). Neighbouring programs share one K/V head, which
    # keeps K/V in L2. Causal: launch the longest rows (last tiles) first so the short ones fill
    # the tail of the wave instead of leaving SMs idle.
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    kv_h = h // GROUP  # GQA/MQA: the query heads of one group read one K/V head in place
    start_m = pid_m * BLOCK_M

    K_head = K + b * stride_kb + kv_h * stride_kh
    V_head = V + b * stride_vb + kv_h * stride_vh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = tl.cast(start_m, tl.int64) + tl.arange(0, BLOCK_M)[:, None]

    Q_rows = Q + b * stride_qb + h * stride_qh + rows * stride_qm
    q, q2, offs_dqk2 = _load_head_rows(Q_rows, stride_qd, offs_m, N_CTX, D_QK, BLOCK_DQK, BLOCK_DQK2, UPCAST)

    # fp32 running max (base 2), running denominator and output accumulator.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)
    qk_scale = sm_scale * LOG2E

    # Stage 1: key tiles needing no mask. Causal: everything left of this query tile (BLOCK_M is
    # a multiple of BLOCK_N, so start_m is a tile boundary). Otherwise: all whole tiles.
    if CAUSAL:
        full_hi = start_m
    else:
        full_hi = (N_CTX // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q2, K_head, V_head,
                               stride_kn, stride_kd, stride_vn, stride_vd,
                               0, full_hi, N_CTX, qk_scale, offs_m, offs_n, offs_dqk, offs_dqk2, offs_dv,
                               D_QK, D_V, BLOCK_DQK, BLOCK_DQK2, BLOCK_DV, BLOCK_N, False, CAUSAL,
                               UPCAST, DOT_PRECISION)
    # Stage 2: the masked tiles, i.e. the diagonal (causal) or the ragged tail.
    if CAUSAL:
        masked_hi = tl.minimum(start_m + BLOCK_M, N_CTX)
    else:
        masked_hi = N_CTX
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q2, K_head, V_head,
                               stride_kn, stride_kd, stride_vn, stride_vd,
                               full_hi, masked_hi, N_CTX, qk_scale, offs_m, offs_n, offs_dqk, offs_dqk2, offs_dv,
                               D_QK, D_V, BLOCK_DQK, BLOCK_DQK2, BLOCK_DV, BLOCK_N, True, CAUSAL,
                               UPCAST, DOT_PRECISION)

    # Epilogue. l == 0 only for a row with no visible key (cannot happen for a real row, since
    # the key at its own position is visible); it yields o = 0 and lse = -inf, not NaN.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_safe)) * LN2
    o_ptrs = O + b * stride_ob + h * stride_oh + rows * stride_om + offs_dv[None, :] * stride_od
    _store_tile(o_ptrs, o, offs_m, offs_dv, N_CTX, D_V, True, D_V < BLOCK_DV)
    tl.store(LSE + b * stride_lb + h * stride_lh + offs_m, lse, mask=offs_m < N_CTX)


# --------------------------------------------------------------------------------------------
# Backward. With S = sm_scale * Q K^T, P = softmax(S), O = P V and upstream dO:
#   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta) with delta = rowsum(dO * O),
#   dQ = sm_scale * dS K,  dK = sm_scale * dS^T Q.
# P is recomputed from Q, K and the saved LSE, never stored.
# --------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA,
                         stride_ob, stride_oh, stride_om, stride_od,
                         stride_dob, stride_doh, stride_dom, stride_dod,
                         stride_deltab, stride_deltah,
                         N_CTX, D_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    rows = tl.cast(start_m, tl.int64) + tl.arange(0, BLOCK_M)[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + rows * stride_om + offs_d[None, :] * stride_od
    do_ptrs = DO + b * stride_dob + h * stride_doh + rows * stride_dom + offs_d[None, :] * stride_dod
    o = _load_tile(o_ptrs, offs_m, offs_d, N_CTX, D_V, True, D_V < BLOCK_DV, True)
    do = _load_tile(do_ptrs, offs_m, offs_d, N_CTX, D_V, True, D_V < BLOCK_DV, True)
    delta = tl.reduce(o * do, 1, _sum_combine)
    tl.store(DELTA + b * stride_deltab + h * stride_deltah + offs_m, delta, mask=offs_m < N_CTX)


@helper
def _bwd_dkdv_inner(dk, dk2, dv, k, k2, v, Q_head, DO_head, LSE_head, DELTA_head,
                    stride_qm, stride_qd, stride_dom, stride_dod,
                    lo, hi, N_CTX, qk_scale, keys, offs_m, offs_dqk, offs_dqk2, offs_dv,
                    D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DQK2: tl.constexpr,
                    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi) of one query head.
    Works on transposed tiles ([keys, queries]) so no transpose of P or dS is needed."""
    qT_offs = offs_dqk[:, None] * stride_qd + offs_m[None, :] * stride_qm
    qT2_offs = offs_dqk2[:, None] * stride_qd + offs_m[None, :] * stride_qm
    do_offs = offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        Q_tile = Q_head + tl.cast(start_m, tl.int64) * stride_qm
        qT = _load_tile(Q_tile + qT_offs, offs_dqk, rows, D_QK, N_CTX, D_QK < BLOCK_DQK, MASKED, UPCAST)
        sT = tl.dot(k, qT, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        qT2 = qT  # placeholder when the head dim is a single block
        if BLOCK_DQK2 > 0:
            qT2 = _load_tile(Q_tile + qT2_offs, offs_dqk2, rows, D_QK, N_CTX,
                             BLOCK_DQK + BLOCK_DQK2 > D_QK, MASKED, UPCAST)
            sT = tl.dot(k2, qT2, sT, input_precision=DOT_PRECISION)
        sT = sT * qk_scale
        if MASKED:
            # Mask before exp2: a hidden score can exceed the row's lse by a lot, and exp2 of
            # that would overflow. Real rows have finite lse, so exp2(-inf - lse) = 0.
            keep = rows[None, :] < N_CTX
            if CAUSAL:
                keep = keep & (rows[None, :] >= keys[:, None])
            sT = tl.where(keep, sT, float("-inf"))
            lse = tl.load(LSE_head + rows, mask=rows < N_CTX, other=0.0)
            delta = tl.load(DELTA_head + rows, mask=rows < N_CTX, other=0.0)
        else:
            lse = tl.load(LSE_head + rows)
            delta = tl.load(DELTA_head + rows)
        pT = tl.math.exp2(sT - lse[None, :] * LOG2E)
        do_ptrs = DO_head + tl.cast(start_m, tl.int64) * stride_dom + do_offs
        do = _load_tile(do_ptrs, rows, offs_dv, N_CTX, D_V, MASKED, D_V < BLOCK_DV, UPCAST)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = (pT * (dpT - delta[None, :])).to(qT.dtype)
        dk = tl.dot(dsT, tl.trans(qT), dk, input_precision=DOT_PRECISION)
        if BLOCK_DQK2 > 0:
            dk2 = tl.dot(dsT, tl.trans(qT2), dk2, input_precision=DOT_PRECISION)
    return dk, dk2, dv


@helper
def _bwd_dkdv_head(dk, dk2, dv, k, k2, v, Q_head, DO_head, LSE_head, DELTA_head,
                   stride_qm, stride_qd, stride_dom, stride_dod, start_n, N_CTX, qk_scale,
                   keys, offs_m, offs_dqk, offs_dqk2, offs_dv,
                   D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DQK2: tl.constexpr,
                   BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV of the key tile at start_n over all query tiles of one query head, each
    region of the query range with only the masks it needs."""
    full_end = (N_CTX // BLOCK_M) * BLOCK_M  # query tiles before this are whole
    if CAUSAL:
        # Queries [start_n, start_n + BLOCK_N) cross the diagonal of this key tile: masked.
        # Queries before start_n see none of these keys and are skipped entirely.
        dk, dk2, dv = _bwd_dkdv_inner(dk, dk2, dv, k, k2, v, Q_head, DO_head, LSE_head, DELTA_head,
                                      stride_qm, stride_qd, stride_dom, stride_dod,
                                      start_n, tl.minimum(start_n + BLOCK_N, N_CTX), N_CTX, qk_scale,
                                      keys, offs_m, offs_dqk, offs_dqk2, offs_dv,
                                      D_QK, D_V, BLOCK_DQK, BLOCK_DQK2, BLOCK_DV, BLOCK_M, True, CAUSAL,
                                      UPCAST, DOT_PRECISION)
        full_lo = start_n + BLOCK_N
    else:
        full_lo = 0
    # Whole query tiles below the diagonal: no mask.
    dk, dk2, dv = _bwd_dkdv_inner(dk, dk2, dv, k, k2, v, Q_head, DO_head, LSE_head, DELTA_head,
                                  stride_qm, stride_qd, stride_dom, stride_dod,
                                  full_lo, full_end, N_CTX, qk_scale,
                                  keys, offs_m, offs_dqk, offs_dqk2, offs_dv,
                                  D_QK, D_V, BLOCK_DQK, BLOCK_DQK2, BLOCK_DV, BLOCK_M, False, CAUSAL,
                                  UPCAST, DOT_PRECISION)
    # The ragged query tail (if any): row mask.
    return _bwd_dkdv_inner(dk, dk2, dv, k, k2, v, Q_head, DO_head, LSE_head, DELTA_head,
                           stride_qm, stride_qd, stride_dom, stride_dod,
                           tl.maximum(full_lo, full_end), N_CTX, N_CTX, qk_scale,
                           keys, offs_m, offs_dqk, offs_dqk2, offs_dv,
                           D_QK, D_V, BLOCK_DQK, BLOCK_DQK2, BLOCK_DV, BLOCK_M, True, CAUSAL,
                           UPCAST, DOT_PRECISION)


@triton.autotune(configs=_configs((16, 32, 64), (64, 128), (4, 8), (2, 3), (32, 64)),
                 key=_KEY, prune_configs_by={"early_config_prune": _prune("N")})
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                   stride_lb, stride_lh,
                   N_CTX, GROUP, N_BUCKET,
                   D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DQK2: tl.constexpr,
                   BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid: (key tiles, K/V heads, batch). Each program owns its dK/dV tile outright and sums
    # the contributions of all GROUP query heads itself, in a fixed order: deterministic and
    # free of atomics, and K/V are loaded once for the whole group.
    start_n = tl.program_id(0) * BLOCK_N
    kv_h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    keys = start_n + tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    key_rows = tl.cast(start_n, tl.int64) + tl.arange(0, BLOCK_N)[:, None]

    K_rows = K + b * stride_kb + kv_h * stride_kh + key_rows * stride_kn
    v_ptrs = V + b * stride_vb + kv_h * stride_vh + key_rows * stride_vn + offs_dv[None, :] * stride_vd
    k, k2, offs_dqk2 = _load_head_rows(K_rows, stride_kd, keys, N_CTX, D_QK, BLOCK_DQK, BLOCK_DQK2, UPCAST)
    v = _load_tile(v_ptrs, keys, offs_dv, N_CTX, D_V, True, D_V < BLOCK_DV, UPCAST)
    dk = tl.full([BLOCK_N, BLOCK_DQK], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, dtype=tl.float32)
    dk2 = dk  # placeholder when the head dim is a single block
    if BLOCK_DQK2 > 0:
        dk2 = tl.full([BLOCK_N, BLOCK_DQK2], 0.0, dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    for g in range(0, GROUP):
        h = kv_h * GROUP + g
        dk, dk2, dv = _bwd_dkdv_head(dk, dk2, dv, k, k2, v, Q + b * stride_qb + h * stride_qh,
                                     DO + b * stride_dob + h * stride_doh, LSE + b * stride_lb + h * stride_lh,
                                     DELTA + b * stride_lb + h * stride_lh,  # same [B, Hq, N] layout as LSE
                                     stride_qm, stride_qd, stride_dom, stride_dod, start_n, N_CTX, qk_scale,
                                     keys, offs_m, offs_dqk, offs_dqk2, offs_dv, D_QK, D_V, BLOCK_DQK, BLOCK_DQK2,
                                     BLOCK_DV, BLOCK_M, BLOCK_N, CAUSAL, UPCAST, DOT_PRECISION)

    DK_rows = DK + b * stride_dkb + kv_h * stride_dkh + key_rows * stride_dkn
    _store_tile(DK_rows + offs_dqk[None, :] * stride_dkd, dk * sm_scale, keys, offs_dqk, N_CTX, D_QK,
                True, D_QK < BLOCK_DQK)
    if BLOCK_DQK2 > 0:
        _store_tile(DK_rows + offs_dqk2[None, :] * stride_dkd, dk2 * sm_scale, keys, offs_dqk2, N_CTX, D_QK,
                    True, BLOCK_DQK + BLOCK_DQK2 > D_QK)
    dv_ptrs = DV + b * stride_dvb + kv_h * stride_dvh + key_rows * stride_dvn + offs_dv[None, :] * stride_dvd
    _store_tile(dv_ptrs, dv, keys, offs_dv, N_CTX, D_V, True, D_V < BLOCK_DV)


@helper
def _bwd_dq_inner(dq, dq2, q, q2, do, lse, delta, K_head, V_head,
                  stride_kn, stride_kd, stride_vn, stride_vd,
                  lo, hi, N_CTX, qk_scale, offs_m, offs_n, offs_dqk, offs_dqk2, offs_dv,
                  D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DQK2: tl.constexpr,
                  BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dQ of one query tile over key tiles [lo, hi)."""
    kT_offs = offs_dqk[:, None] * stride_kd + offs_n[None, :] * stride_kn
    kT2_offs = offs_dqk2[:, None] * stride_kd + offs_n[None, :] * stride_kn
    vT_offs = offs_dv[:, None] * stride_vd + offs_n[None, :] * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        K_tile = K_head + tl.cast(start_n, tl.int64) * stride_kn
        kT = _load_tile(K_tile + kT_offs, offs_dqk, cols, D_QK, N_CTX, D_QK < BLOCK_DQK, MASKED, UPCAST)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION)
        kT2 = kT  # placeholder when the head dim is a single block
        if BLOCK_DQK2 > 0:
            kT2 = _load_tile(K_tile + kT2_offs, offs_dqk2, cols, D_QK, N_CTX,
                             BLOCK_DQK + BLOCK_DQK2 > D_QK, MASKED, UPCAST)
            s = tl.dot(q2, kT2, s, input_precision=DOT_PRECISION)
        s = s * qk_scale
        if MASKED:  # mask before exp2 (see _bwd_dkdv_inner)
            keep = cols[None, :] < N_CTX
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= cols[None, :])
            s = tl.where(keep, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        vT_ptrs = V_head + tl.cast(start_n, tl.int64) * stride_vn + vT_offs
        vT = _load_tile(vT_ptrs, offs_dv, cols, D_V, N_CTX, D_V < BLOCK_DV, MASKED, UPCAST)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(kT.dtype)
        dq = tl.dot(ds, tl.trans(kT), dq, input_precision=DOT_PRECISION)
        if BLOCK_DQK2 > 0:
            dq2 = tl.dot(ds, tl.trans(kT2), dq2, input_precision=DOT_PRECISION)
    return dq, dq2


@triton.autotune(configs=_configs((64, 128), (32, 64), (4, 8), (2, 3), (64, 32)),
                 key=_KEY, prune_configs_by={"early_config_prune": _prune("M")})
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, sm_scale,
                 stride_qb, stride_qh, stride_qm, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_dob, stride_doh, stride_dom, stride_dod,
                 stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                 stride_lb, stride_lh,
                 N_CTX, GROUP, N_BUCKET,
                 D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DQK2: tl.constexpr,
                 BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid: (query tiles, query heads, batch), as in the forward; longest rows first if causal.
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    kv_h = h // GROUP
    start_m = pid_m * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = tl.cast(start_m, tl.int64) + tl.arange(0, BLOCK_M)[:, None]

    Q_rows = Q + b * stride_qb + h * stride_qh + rows * stride_qm
    do_ptrs = DO + b * stride_dob + h * stride_doh + rows * stride_dom + offs_dv[None, :] * stride_dod
    q, q2, offs_dqk2 = _load_head_rows(Q_rows, stride_qd, offs_m, N_CTX, D_QK, BLOCK_DQK, BLOCK_DQK2, UPCAST)
    do = _load_tile(do_ptrs, offs_m, offs_dv, N_CTX, D_V, True, D_V < BLOCK_DV, UPCAST)
    dq = tl.full([BLOCK_M, BLOCK_DQK], 0.0, dtype=tl.float32)
    dq2 = dq  # placeholder when the head dim is a single block
    if BLOCK_DQK2 > 0:
        dq2 = tl.full([BLOCK_M, BLOCK_DQK2], 0.0, dtype=tl.float32)
    # Rows past N load lse = delta = 0 with q = dO = 0: their p is at most 1 and their dS 0,
    # and they are never stored, so they need no mask.
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + offs_m, mask=offs_m < N_CTX, other=0.0) * LOG2E
    delta = tl.load(DELTA + b * stride_lb + h * stride_lh + offs_m, mask=offs_m < N_CTX, other=0.0)

    K_head = K + b * stride_kb + kv_h * stride_kh
    V_head = V + b * stride_vb + kv_h * stride_vh
    qk_scale = sm_scale * LOG2E

    if CAUSAL:
        full_hi = start_m
        masked_hi = tl.minimum(start_m + BLOCK_M, N_CTX)
    else:
        full_hi = (N_CTX // BLOCK_N) * BLOCK_N
        masked_hi = N_CTX
    dq, dq2 = _bwd_dq_inner(dq, dq2, q, q2, do, lse, delta, K_head, V_head,
                            stride_kn, stride_kd, stride_vn, stride_vd,
                            0, full_hi, N_CTX, qk_scale, offs_m, offs_n, offs_dqk, offs_dqk2, offs_dv,
                            D_QK, D_V, BLOCK_DQK, BLOCK_DQK2, BLOCK_DV, BLOCK_N, False, CAUSAL,
                            UPCAST, DOT_PRECISION)
    dq, dq2 = _bwd_dq_inner(dq, dq2, q, q2, do, lse, delta, K_head, V_head,
                            stride_kn, stride_kd, stride_vn, stride_vd,
                            full_hi, masked_hi, N_CTX, qk_scale, offs_m, offs_n, offs_dqk, offs_dqk2, offs_dv,
                            D_QK, D_V, BLOCK_DQK, BLOCK_DQK2, BLOCK_DV, BLOCK_N, True, CAUSAL,
                            UPCAST, DOT_PRECISION)

    DQ_rows = DQ + b * stride_dqb + h * stride_dqh + rows * stride_dqm
    _store_tile(DQ_rows + offs_dqk[None, :] * stride_dqd, dq * sm_scale, offs_m, offs_dqk, N_CTX, D_QK,
                True, D_QK < BLOCK_DQK)
    if BLOCK_DQK2 > 0:
        _store_tile(DQ_rows + offs_dqk2[None, :] * stride_dqd, dq2 * sm_scale, offs_m, offs_dqk2, N_CTX, D_QK,
                    True, BLOCK_DQK + BLOCK_DQK2 > D_QK)
