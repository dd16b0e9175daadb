"""The cache's attention against independent references, on random non-contiguous block tables.

Decode is checked against kernels.paged_attention_decode_torch (reading the cache through its
logical [num_blocks, block_size, Hkv, D] view); prefill against a naive per-sequence softmax over the
sequence's context with the causal offset of the cached prefix.
"""

import pytest
import torch

from engine.attention_triton import TritonAttention
from engine.kv_cache import PagedKVCache, StepInputs
from builders import tiny_config
from kernels import paged_attention_decode_torch


pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = ["mha", "gqa", "mqa", "mla"]


def dims(cache):
    cfg = cache.cfg
    Hq = cfg.n_heads
    return Hq, cache.n_kv_heads, cache.k_dim, cache.v_dim


def random_tables(num_blocks, lens, bs, gen):
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, i = [], 0
    for n in lens:
        k = -(-n // bs)
        tables.append(perm[i:i + k])
        i += k
    return tables


def step_inputs(cache, tables, ctx_lens, q_lens, is_prefill):
    """The step where sequence i computes its last q_lens[i] tokens (token ids do not matter here)."""
    bs, slots, positions = cache.block_size, [], []
    for t, n, q in zip(tables, ctx_lens, q_lens):
        positions += range(n - q, n)
        slots += [t[p // bs] * bs + p % bs for p in range(n - q, n)]
    return StepInputs(is_prefill, [0] * len(slots), positions, slots, tables, ctx_lens, q_lens)


def fill(cache, tables, lens, gen):
    """Random K/V for every position of every sequence, written straight into the buffers."""
    bs = cache.block_size
    for table, n in zip(tables, lens):
        for pos in range(n):
            b, off = table[pos // bs], pos % bs
            cache.k_buf[:, b, :, off] = torch.randn(cache.k_buf[:, b, :, off].shape, generator=gen)
            if cache.v_buf is not None:
                cache.v_buf[:, b, :, off] = torch.randn(cache.v_buf[:, b, :, off].shape, generator=gen)


def naive(q, keys, values, offset, scale):
    """q [n, Hq, D], keys [C, Hkv, D], values [C, Hkv, Dv]; query i sees keys 0 .. offset + i."""
    Hq, Hkv = q.shape[1], keys.shape[1]
    rep = Hq // Hkv
    k = keys.repeat_interleave(rep, dim=1).double()
    v = values.repeat_interleave(rep, dim=1).double()
    s = torch.einsum("nhd,chd->hnc", q.double(), k) * scale
    C = keys.shape[0]
    mask = torch.arange(C)[None, :] <= offset + torch.arange(q.shape[0])[:, None]
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hnc,chd->nhd", s.softmax(-1), v).float()


@pytest.mark.parametrize("paged_kernel", [True, False], ids=["cpu-kernel", "gather-path"])
@pytest.mark.parametrize("attention", VARIANTS)
@pytest.mark.parametrize("bs", [1, 4, 16])
def test_decode_matches_kernel_reference(attention, bs, paged_kernel):
    gen = torch.Generator().manual_seed(0)
    cfg = tiny_config(attention, n_layers=2)
    cache = PagedKVCache(cfg, 64 * 16 // bs + 8, bs, torch.float32, "cpu", paged_kernel)
    assert cache.decode_backend.name == ("cpu" if paged_kernel else "gather")
    Hq, Hkv, D, Dv = dims(cache)
    lens = [1, 7, 33, 50, 17]  # not multiples of the block size
    tables = random_tables(cache.num_blocks, lens, bs, gen)
    fill(cache, tables, [n - 1 for n in lens], gen)  # the last token comes with the step
    cache.begin(step_inputs(cache, tables, lens, [1] * len(lens), is_prefill=False))
    B = len(lens)
    q = torch.randn(B, Hq, D, generator=gen)
    k = torch.randn(B, Hkv, D, generator=gen)
    v = None if attention == "mla" else torch.randn(B, Hkv, Dv, generator=gen)
    scale = 0.3
    before = cache.k_buf.clone()
    outs = [cache.attend(layer, q, k, v, scale) for layer in range(cfg.n_layers)]
    assert (cache.k_buf == before).all()  # the forward only read the cache
    cache.commit(*cache.held_kv())  # the new K/V of every layer go to their slots after the forward
    for layer, out in enumerate(outs):
        bt = torch.tensor([t + [0] * (64 - len(t)) for t in tables], dtype=torch.int32)
        ref = paged_attention_decode_torch(q, cache.k_cache(layer), cache.v_cache(layer), bt,
                                           torch.tensor(lens, dtype=torch.int32), scale, v_dim=Dv)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for i, (t, n) in enumerate(zip(tables, lens)):
            pos = n - 1
            torch.testing.assert_close(cache.k_cache(layer)[t[pos // bs], pos % bs], k[i])
            if v is not None:
                torch.testing.assert_close(cache.v_cache(layer)[t[pos // bs], pos % bs], v[i])


# (cached prefix, new tokens). Mixed: no prefix, a prefix, one new token, lengths far apart (several
# padded groups with masks). Uniform: whole prompts of one length (one causal group, no mask).
MIXED = [(0, 5), (32, 9), (16, 1), (0, 70), (48, 3), (3, 120)]
UNIFORM = [(0, 21), (0, 21), (0, 21)]


@pytest.mark.parametrize("attention", VARIANTS)
@pytest.mark.parametrize("bs,cases", [(1, MIXED), (16, MIXED), (16, UNIFORM), (4, UNIFORM[:1])],
                         ids=["bs1-mixed", "bs16-mixed", "bs16-uniform", "bs4-single"])
def test_prefill_with_cached_prefixes(attention, bs, cases):
    gen = torch.Generator().manual_seed(1)
    cfg = tiny_config(attention, n_layers=1)
    cache = PagedKVCache(cfg, 300 // bs + 16, bs, torch.float32, "cpu")
    Hq, Hkv, D, Dv = dims(cache)
    lens = [c + n for c, n in cases]
    tables = random_tables(cache.num_blocks, lens, bs, gen)
    fill(cache, tables, [c for c, _ in cases], gen)
    q_lens = [n for _, n in cases]
    cache.begin(step_inputs(cache, tables, lens, q_lens, is_prefill=True))
    groups = cache.plan.groups
    if cases is MIXED:  # several padded groups with masks
        assert len(groups) > 1 and not all(g.causal for g in groups)
    else:  # whole prompts of one length: one causal group, no mask
        assert len(groups) == 1 and groups[0].causal and groups[0].bias is None
    T = sum(q_lens)
    q = torch.randn(T, Hq, D, generator=gen)
    k = torch.randn(T, Hkv, D, generator=gen)
    v = None if attention == "mla" else torch.randn(T, Hkv, Dv, generator=gen)
    out = cache.attend(0, q, k, v, 0.25)
    start = 0
    for (c, n), t in zip(cases, tables):
        j = torch.arange(c + n)
        keys = cache.k_cache(0)[torch.tensor(t)[j // bs], j % bs]  # [C, Hkv, D]
        values = keys[..., :Dv] if v is None else cache.v_cache(0)[torch.tensor(t)[j // bs], j % bs]
        torch.testing.assert_close(keys[c:], k[start:start + n])  # written before attending
        ref = naive(q[start:start + n], keys, values, c, 0.25)
        torch.testing.assert_close(out[start:start + n], ref, atol=1e-5, rtol=1e-5)
        start += n


def test_prefill_skips_slots_marked_minus_one():
    cfg = tiny_config("gqa", n_layers=1)
    cache = PagedKVCache(cfg, 8, 4, torch.float32, "cpu")
    cache.k_buf.fill_(7.0)
    cache.begin(StepInputs(True, [0, 0], [6, 7], [-1, 7], [[0, 1]], [8], [2]))
    k = torch.zeros(2, cache.n_kv_heads, cache.k_dim)
    cache.attend(0, torch.zeros(2, 4, cache.k_dim), k, torch.zeros_like(k), 1.0)
    assert (cache.k_cache(0)[1, 2] == 7).all() and (cache.k_cache(0)[1, 3] == 0).all()


def test_copy_blocks():
    cfg = tiny_config("mla", n_layers=2)
    cache = PagedKVCache(cfg, 4, 2, torch.float32, "cpu")
    cache.k_buf[:, 1] = torch.arange(cache.k_buf[:, 1].numel(), dtype=torch.float32).view_as(cache.k_buf[:, 1])
    cache.copy_blocks([(1, 3)])
    assert torch.equal(cache.k_buf[:, 3], cache.k_buf[:, 1])


@pytest.mark.parametrize("attention", VARIANTS)
def test_cuda_decode_path_through_the_triton_kernel(attention, monkeypatch):
    """The CUDA decode branch (the Triton kernel reading the head-major buffers through strided views),
    run on CPU by Triton's interpreter, against the gather path."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(3)
    cfg = tiny_config(attention, n_layers=1)
    cache = PagedKVCache(cfg, 40, 4, torch.float32, "cpu", paged_kernel=False)
    Hq, Hkv, D, Dv = dims(cache)
    lens = [3, 9, 14]
    tables = random_tables(cache.num_blocks, lens, 4, gen)
    fill(cache, tables, [n - 1 for n in lens], gen)
    q = torch.randn(3, Hq, D, generator=gen)
    k = torch.randn(3, Hkv, D, generator=gen)
    v = None if attention == "mla" else torch.randn(3, Hkv, Dv, generator=gen)
    step = step_inputs(cache, tables, lens, [1] * 3, is_prefill=False)
    cache.begin(step)
    torch_out = cache.attend(0, q, k, v, 0.3)
    cache.decode_backend = TritonAttention(cache)
    cache.begin(step)
    assert not cache.hold_back
    triton_out = cache.attend(0, q, k, v, 0.3)
    torch.testing.assert_close(triton_out, torch_out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attention", ["gqa", "mqa"])
def test_prefill_never_repeats_kv_heads(attention):
    """Whole prompts of one length take the unmasked causal branch: the kv heads serve their query
    heads through SDPA's enable_gqa, never copied per query head (the README's promise)."""
    gen = torch.Generator().manual_seed(4)
    cfg = tiny_config(attention, n_layers=1)
    cache = PagedKVCache(cfg, 16, 4, torch.float32, "cpu")
    Hq, Hkv, D, Dv = dims(cache)
    tables = random_tables(cache.num_blocks, [9, 9], 4, gen)
    cache.begin(step_inputs(cache, tables, [9, 9], [9, 9], is_prefill=True))
    assert cache.plan.groups[0].causal
    q, k, v = torch.randn(18, Hq, D, generator=gen), torch.randn(18, Hkv, D, generator=gen), torch.randn(18, Hkv, Dv, generator=gen)
    with torch.profiler.profile() as prof:
        out = cache.attend(0, q, k, v, 0.25)
    ops = {e.name for e in prof.events()}
    assert not ops & {"aten::repeat_interleave", "aten::repeat", "aten::expand"}, ops
    for i in range(2):
        rows = slice(9 * i, 9 * i + 9)
        torch.testing.assert_close(out[rows], naive(q[rows], k[rows], v[rows], 0, 0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("passes", [True, False])
def test_cuda_uses_triton_only_after_its_self_check(passes, monkeypatch):
    """A failed self-check of the Triton kernel means the gather path (the self-check warns itself).
    (The choice is made for a CUDA device; the buffers here are on CPU, only the decision is tested.)"""
    from engine import kv_cache

    checked = []
    monkeypatch.setattr(kv_cache, "paged_decode_ok", lambda device: checked.append(device) or passes)
    cache = PagedKVCache(tiny_config("gqa"), 8, 4, torch.float32, "cpu", paged_kernel=False)
    cache.device = torch.device("cuda")
    assert cache._paged_decode_backend().name == ("triton" if passes else "gather")
    assert checked == [torch.device("cuda")]
