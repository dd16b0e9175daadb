"""The PyTorch attention backend: copy each sequence's blocks out of the cache, then SDPA (in fp32).

Every prefill step runs here, whatever the decode backend; decode runs here when no paged kernel is
chosen (paged_kernel=False, a dtype other than float32 on CPU, no C++ compiler, a failed Triton
self-check). It is the readable reference the kernels are tested against.

The gather reads whole (block, head) rows of block_size * head_dim contiguous values from the
head-major buffers, already in the [seqs, heads, tokens, dim] order SDPA wants, padded to whole blocks
(the padding is masked). K/V are never repeated per query head: a kv head's group of query heads
becomes extra query rows (or SDPA's enable_gqa, for the unmasked causal case).

  prefill  each sequence's new tokens attend to its whole context (cached prefix + new tokens),
           causally: with context length C and n new tokens, new token i sits at position C - n + i
           and sees keys 0 .. C - n + i. Sequences are grouped by length (`_group`); each group is
           gathered into a padded batch and run through SDPA with an explicit mask, or with none
           when it holds whole prompts of one length (plain causal attention).
  decode   one new token per sequence. The forward only reads the cache (the runner writes the new
           K/V after it): the new token's K/V go into the gathered copy at its position, so a
           compiled step can fuse the gathers into one pass over the context.
"""

from dataclasses import dataclass, field
from itertools import accumulate
from typing import Optional

import torch
import torch.nn.functional as F

from .cpu_speed import long_tensor


@dataclass
class AttnGroup:
    """Sequences attended together as one padded batch of S sequences x Q query slots x L keys."""
    S: int
    Q: int
    L: int  # padded context: whole blocks
    gather: torch.Tensor  # [S * Hkv * L / bs] rows of the (block, head) view of the buffers
    bias: Optional[torch.Tensor]  # [S, 1, G * Q or 1, L] float: 0 = may attend, -inf = may not
    causal: bool = False  # no cached prefix and all Q equal: plain causal attention, no mask (bias None)
    q_rows: Optional[torch.Tensor] = None  # [S * Q] packed token of each query slot (padding: 0); None = identity
    out_sel: Optional[torch.Tensor] = None  # [n] valid query slots, in packed order; None = all
    out_rows: Optional[torch.Tensor] = None  # [n] packed rows they produce; None = all, in order


@dataclass
class GatherPlan:
    groups: list[AttnGroup] = field(default_factory=list)
    new_pos: Optional[torch.Tensor] = None  # decode: [S] position of each sequence's new token
    new_rows: Optional[torch.Tensor] = None  # decode: [S * Hkv] rows of the gathered context holding it

    def dynamic_dims(self):
        """Decode: the sizes that change step to step (batch, context), for torch.compile."""
        g = self.groups[0]
        return ((self.new_pos, (0,)), (g.gather, (0,)), (g.bias, (0, 3)))


class GatherAttention:
    name = "gather"
    holds_back = True  # decode reads the cache only; the runner writes the new K/V after the forward

    def __init__(self, cache):
        self.cache = cache
        self._arange = torch.arange(max(1024, cache.n_kv_heads), device=cache.device)  # 0..n-1, grown on demand

    def plan(self, step, tables: torch.Tensor) -> GatherPlan:
        return self._plan_prefill(step, tables) if step.is_prefill else self._plan_decode(step, tables)

    def attend(self, layer: int, q, k, v, scale: float, plan: GatherPlan) -> torch.Tensor:
        c = self.cache
        kb, vb = c.k_buf[layer], None if c.v_buf is None else c.v_buf[layer]
        if plan.new_pos is not None:
            g = plan.groups[0]
            return decode_attend(q, k, v, kb, vb, g.gather, plan.new_pos, plan.new_rows, g.bias, scale, c.v_dim)
        if len(plan.groups) == 1 and plan.groups[0].out_rows is None:
            return self._attend_group(q, kb, vb, scale, plan.groups[0])
        out = q.new_empty(q.shape[0], q.shape[1], c.v_dim)
        for g in plan.groups:
            out.index_copy_(0, g.out_rows, self._attend_group(q, kb, vb, scale, g))
        return out

    # ---- per-step indices -------------------------------------------------------------------------
    def _rows(self, tables: torch.Tensor) -> torch.Tensor:
        """(block, head) rows for tables [S, nblk] (int64), ordered [S, Hkv, nblk]."""
        H = self.cache.n_kv_heads
        return (tables[:, None, :] * H + self._arange[:H, None]).reshape(-1)

    def _plan_decode(self, step, tables: torch.Tensor) -> GatherPlan:
        """Per-sequence indices built in Python, per-block ones (the gather rows, the mask) by
        whole-batch tensor ops."""
        H, dev, lens = self.cache.n_kv_heads, self.cache.device, step.context_lens
        B, L = len(lens), tables.shape[1] * self.cache.block_size
        new_rows = [(i * H + h) * L + n - 1 for i, n in enumerate(lens) for h in range(H)]
        if self._arange.numel() < L:
            self._arange = torch.arange(2 * L, device=dev)
        new_pos = long_tensor(lens, dev) - 1
        bias = torch.zeros(B, 1, 1, L, device=dev).masked_fill_(self._arange[:L] > new_pos.view(B, 1, 1, 1),
                                                                float("-inf"))
        return GatherPlan([AttnGroup(B, 1, L, self._rows(tables), bias)], new_pos, long_tensor(new_rows, dev))

    def _plan_prefill(self, step, tables: torch.Tensor) -> GatherPlan:
        q_lens, ctx_lens = step.query_lens, step.context_lens
        starts = list(accumulate(q_lens, initial=0))  # sequence i's tokens are rows starts[i]..starts[i + 1] - 1
        plan = GatherPlan([self._prefill_group(m, tables, q_lens, ctx_lens, starts) for m in _group(q_lens, ctx_lens)])
        if len(plan.groups) == 1:  # one group covering every token in order: no scatter needed
            g = plan.groups[0]
            if torch.equal(g.out_rows, torch.arange(starts[-1], device=self.cache.device)):
                g.out_rows = None
                if g.causal:
                    g.q_rows = None
        return plan

    def _prefill_group(self, members, tables, q_lens, ctx_lens, starts) -> AttnGroup:
        bs, dev = self.cache.block_size, self.cache.device
        G = self.cache.n_q_heads // self.cache.n_kv_heads
        S = len(members)
        idx = torch.tensor(members, device=dev)
        ql = torch.tensor([q_lens[i] for i in members], device=dev)
        cl = torch.tensor([ctx_lens[i] for i in members], device=dev)
        st = torch.tensor([starts[i] for i in members], device=dev)
        Q = max(q_lens[i] for i in members)
        nblk = -(-max(ctx_lens[i] for i in members) // bs)
        L = nblk * bs
        gather = self._rows(tables.index_select(0, idx)[:, :nblk])
        if all(q_lens[i] == ctx_lens[i] == Q for i in members):
            # Whole prompts of one length: top-left causal attention over the first Q keys (the padded
            # keys past Q are never visible), no mask to build or read.
            rows = torch.cat([torch.arange(starts[i], starts[i] + Q, device=dev) for i in members])
            return AttnGroup(S, Q, L, gather, None, causal=True, q_rows=rows, out_rows=rows)
        qi = torch.arange(Q, device=dev)
        q_valid = qi < ql[:, None]  # [S, Q]
        q_rows = torch.where(q_valid, st[:, None] + qi, 0).reshape(-1)
        out_sel = q_valid.reshape(-1).nonzero().squeeze(1)
        out_rows = q_rows.index_select(0, out_sel)
        kj = torch.arange(L, device=dev)
        last_visible = (cl - ql)[:, None] + qi  # [S, Q]: query i sees keys j <= C - n + i
        allowed = kj <= last_visible[:, :, None]  # [S, Q, L]
        allowed |= ~q_valid[:, :, None] & (kj == 0)  # padded query slots see key 0: no NaN rows
        bias = torch.zeros(S, Q, L, device=dev).masked_fill_(~allowed, float("-inf"))
        bias = bias[:, None].expand(S, G, Q, L).reshape(S, 1, G * Q, L)
        return AttnGroup(S, Q, L, gather, bias, q_rows=q_rows, out_sel=out_sel, out_rows=out_rows)

    # ---- attention --------------------------------------------------------------------------------
    def _attend_group(self, q, kb, vb, scale, g: AttnGroup) -> torch.Tensor:
        c = self.cache
        H, D, Dv = c.n_kv_heads, c.k_dim, c.v_dim
        Hq = q.shape[1]
        G = Hq // H
        S, Q, L = g.S, g.Q, g.L
        if g.q_rows is not None:
            q = q.index_select(0, g.q_rows)
        k, v = _gather(kb, vb, g.gather, S, L, Dv)
        if g.causal:
            o = _sdpa(q.view(S, Q, Hq, D).transpose(1, 2), k, v, None, scale)  # [S, Hq, Q, Dv]
            return o.transpose(1, 2).reshape(S * Q, Hq, Dv)
        # Query rows of one kv head: its G query heads x Q positions.
        qg = q.view(S, Q, H, G, D).permute(0, 2, 3, 1, 4).reshape(S, H, G * Q, D)
        o = _sdpa(qg, k, v, g.bias, scale)  # [S, H, G * Q, Dv]
        o = o.view(S, H, G, Q, Dv).permute(0, 3, 1, 2, 4).reshape(S * Q, Hq, Dv)
        if g.out_sel is not None:
            o = o.index_select(0, g.out_sel)
        return o


def _group(q_lens, ctx_lens) -> list[list[int]]:
    """Sequences by decreasing context; a new group whenever padding would more than double the work."""
    order = sorted(range(len(q_lens)), key=lambda i: (-ctx_lens[i], -q_lens[i]))
    groups, cur, work, qmax, lmax = [], [], 0, 0, 0
    for i in order:
        q, c = q_lens[i], ctx_lens[i]
        nq, nl, nw = max(qmax, q), max(lmax, c), work + q * c
        if cur and (len(cur) + 1) * nq * nl > 2 * nw + 4096:
            groups.append(cur)
            cur, work, nq, nl, nw = [], 0, q, c, q * c
        cur.append(i)
        qmax, lmax, work = nq, nl, nw
    groups.append(cur)
    return groups


def _gather(kb, vb, gather, S, L, v_dim):
    """Context K and V [S, Hkv, L, D] from one layer's buffers: whole (block, head) rows."""
    H, bs, D = kb.shape[1:]
    k = kb.reshape(-1, bs * D).index_select(0, gather).view(S, H, L, D)
    if vb is None:
        return k, k[..., :v_dim]
    return k, vb.reshape(-1, bs * v_dim).index_select(0, gather).view(S, H, L, v_dim)


def _sdpa(q, k, v, bias, scale):
    """SDPA in fp32; bias None means causal (top-left aligned). k/v may have fewer heads than q
    (enable_gqa: each kv head serves its group of query heads without being repeated)."""
    dtype = q.dtype
    if dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out if dtype == torch.float32 else out.to(dtype)


def decode_attend(q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], kb: torch.Tensor,
                  vb: Optional[torch.Tensor], gather: torch.Tensor, new_pos: torch.Tensor, new_rows: torch.Tensor,
                  bias: torch.Tensor, scale: float, v_dim: int) -> torch.Tensor:
    """One decode step of one layer, reading the cache only. q [B, Hq, Dqk] -> [B, Hq, Dv].

    kb/vb: one layer's buffers [num_blocks, Hkv, bs, D], not yet holding the new token's k/v [B, Hkv, D];
    those go into the gathered context at position new_pos [B] (rows new_rows of its (token, head)
    view). MLA: v is None and the values are K's first v_dim channels, so they come along. bias
    [B, 1, 1, L] masks the padding past each context. The math of kernels.paged_attention_decode_torch."""
    B, Hq, D = q.shape
    H = kb.shape[1]
    L = bias.shape[-1]
    k_ctx, v_ctx = _gather(kb, vb, gather, B, L, v_dim)
    if torch.compiler.is_compiling():
        # Traced: a select, which the compiler fuses into its gather loop (one pass over the context).
        is_new = (torch.arange(L, device=q.device) == new_pos.view(B, 1, 1)).view(B, 1, L, 1)
        k_ctx = torch.where(is_new, k.view(B, H, 1, D), k_ctx)
        v_ctx = k_ctx[..., :v_dim] if vb is None else torch.where(is_new, v.view(B, H, 1, v_dim), v_ctx)
    else:
        # Eager: overwrite the new rows in place (a select would be a second pass over the context).
        k_ctx.view(-1, D).index_copy_(0, new_rows, k.reshape(-1, D))
        if vb is not None:
            v_ctx.view(-1, v_dim).index_copy_(0, new_rows, v.reshape(-1, v_dim))
    o = _sdpa(q.view(B, H, Hq // H, D), k_ctx, v_ctx, bias, scale)  # a kv head's query heads as its rows
    return o.view(B, Hq, v_dim)
