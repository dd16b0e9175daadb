"""Paged decode attention: the Triton kernel (in Triton's CPU interpreter), the C++ CPU kernel and
the PyTorch gather path, all against a float64 reference that walks the block table token by token.
KERNEL_TEST_DEVICE=cuda runs the Triton kernel compiled on a GPU (scripts/gpu_check.py does; it
skips the CPU-only tests)."""

import os

DEVICE = os.environ.get("KERNEL_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import paged_attention_decode, paged_attention_decode_cpu, paged_attention_decode_torch  # noqa: E402
from kernels import paged_attention_cpu  # noqa: E402

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}


def reference(q, k_cache, v_cache, block_tables, context_lens, sm_scale, v_dim):
    """float64: rebuild each sequence's contiguous K/V by following its block table, then a
    naive softmax per query head."""
    B, Hq, _ = q.shape
    page_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    out = torch.zeros(B, Hq, v_dim, dtype=torch.float64, device=q.device)
    for b in range(B):
        keys, values = [], []
        for t in range(int(context_lens[b])):
            page, slot = int(block_tables[b, t // page_size]), t % page_size
            keys.append(k_cache[page, slot])
            values.append(k_cache[page, slot, :, :v_dim] if v_cache is None else v_cache[page, slot])
        K = torch.stack(keys).double()  # [L, Hkv, Dqk]
        V = torch.stack(values).double()  # [L, Hkv, Dv]
        for h in range(Hq):
            scores = K[:, h // group] @ q[b, h].double() * sm_scale
            weights = torch.exp(scores - scores.max())
            out[b, h] = (weights / weights.sum()) @ V[:, h // group]
    return out


def make_case(B, Hq, Hkv, Dqk, Dv, page_size, lens, latent=False, dtype=torch.float32, seed=0,
              table_dtype=torch.int32):
    """A cache whose pages are handed out in shuffled order, whose unused slots are NaN (stale
    data must never leak into the output) and whose table padding is garbage."""
    g = torch.Generator().manual_seed(seed)
    pages_per_seq = [math.ceil(n / page_size) for n in lens]
    max_pages = max(pages_per_seq) + 1  # at least one padded column
    num_pages = sum(pages_per_seq) + 5  # some pages belong to no one
    k_cache = torch.full((num_pages, page_size, Hkv, Dqk), float("nan"))
    v_cache = None if latent else torch.full((num_pages, page_size, Hkv, Dv), float("nan"))
    free = torch.randperm(num_pages, generator=g).tolist()
    block_tables = torch.randint(-(2 ** 20), 2 ** 20, (B, max_pages), generator=g)  # garbage padding
    for b, n in enumerate(lens):
        for j in range(pages_per_seq[b]):
            page = free.pop()
            block_tables[b, j] = page
            valid = min(page_size, n - j * page_size)
            k_cache[page, :valid] = torch.randn(valid, Hkv, Dqk, generator=g)
            if v_cache is not None:
                v_cache[page, :valid] = torch.randn(valid, Hkv, Dv, generator=g)
    q = 2.0 * torch.randn(B, Hq, Dqk, generator=g)
    k_cache = k_cache.to(dtype)
    v_cache = None if v_cache is None else v_cache.to(dtype)
    return tuple(t if t is None else t.to(DEVICE) for t in (
        q.to(dtype), k_cache, v_cache, block_tables.to(table_dtype), torch.tensor(lens, dtype=torch.int32)))


# name: (B, Hq, Hkv, Dqk, Dv, page_size, context lengths, latent)
CASES = {
    "mha": (3, 4, 4, 32, 32, 16, [1, 37, 70], False),
    "gqa": (3, 6, 2, 48, 40, 8, [9, 64, 23], False),
    "mqa": (2, 8, 1, 24, 24, 4, [51, 1], False),
    "mla-latent": (3, 4, 1, 48, 32, 16, [33, 1, 80], True),
    "odd-page-size": (2, 4, 2, 16, 16, 5, [12, 26], False),
}


@pytest.mark.parametrize("num_splits", [1, 3], ids=["one-split", "split-k"])
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(name, num_splits):
    B, Hq, Hkv, Dqk, Dv, page_size, lens, latent = CASES[name]
    q, kc, vc, bt, cl = make_case(B, Hq, Hkv, Dqk, Dv, page_size, lens, latent, seed=len(name))
    scale = 0.3
    expected = reference(q, kc, vc, bt, cl, scale, Dv)
    out = paged_attention_decode(q, kc, vc, bt, cl, scale, v_dim=Dv, num_splits=num_splits)
    assert out.shape == (B, Hq, Dv) and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_torch_path_matches_reference(name):
    B, Hq, Hkv, Dqk, Dv, page_size, lens, latent = CASES[name]
    q, kc, vc, bt, cl = make_case(B, Hq, Hkv, Dqk, Dv, page_size, lens, latent, seed=len(name))
    expected = reference(q, kc, vc, bt, cl, 0.3, Dv)
    out = paged_attention_decode_torch(q, kc, vc, bt, cl, 0.3, v_dim=Dv)
    assert out.shape == (B, Hq, Dv) and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # float64 inputs are computed in float64
    out64 = paged_attention_decode_torch(q.double(), kc.double(), None if vc is None else vc.double(),
                                         bt, cl, 0.3, v_dim=Dv)
    torch.testing.assert_close(out64, expected, atol=1e-12, rtol=1e-12)


def take_last(q, kc, vc, bt, cl):
    """Move each sequence's last K/V out of the cache into k_last/v_last [B, Hkv, D] (strided views of a
    larger tensor) and leave NaN in their slots: a kernel that read the slot instead would return NaN."""
    B, Hkv = q.shape[0], kc.shape[2]
    k_last = torch.empty(B, 2 * Hkv, kc.shape[3])[:, ::2]
    v_last = None if vc is None else torch.empty(B, 2 * Hkv, vc.shape[3])[:, ::2]
    kc, vc = kc.clone(), None if vc is None else vc.clone()
    for b, n in enumerate(cl.tolist()):
        page, slot = int(bt[b, (n - 1) // kc.shape[1]]), (n - 1) % kc.shape[1]
        k_last[b] = kc[page, slot]
        kc[page, slot] = float("nan")
        if vc is not None:
            v_last[b] = vc[page, slot]
            vc[page, slot] = float("nan")
    return kc, vc, k_last, v_last


@pytest.mark.parametrize("last", [False, True], ids=["cache-only", "k_last"])
@pytest.mark.parametrize("name", list(CASES))
def test_cpu_kernel_matches_reference(name, last):
    B, Hq, Hkv, Dqk, Dv, page_size, lens, latent = CASES[name]
    q, kc, vc, bt, cl = make_case(B, Hq, Hkv, Dqk, Dv, page_size, lens, latent, seed=len(name),
                                  table_dtype=torch.int64 if last else torch.int32)
    expected = reference(q, kc, vc, bt, cl, 0.3, Dv)
    extra = {}
    if last:
        kc, vc, extra["k_last"], extra["v_last"] = take_last(q, kc, vc, bt, cl)
    q = q.transpose(0, 1).contiguous().transpose(0, 1)  # strided rows: the kernel reads q's strides
    out = paged_attention_decode_cpu(q, kc, vc, bt, cl, 0.3, v_dim=Dv, **extra)
    assert out.shape == (B, Hq, Dv) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_cpu_kernel_extreme_logits_and_strided_cache():
    """Scores in the thousands (the softmax must subtract the max), and the engine's head-major
    buffer [pages, Hkv, page_size, D] read through its [pages, page_size, Hkv, D] view."""
    q, kc, vc, bt, cl = make_case(3, 8, 2, 32, 32, 16, [70, 100, 1], seed=15)
    q = q * 200
    expected = reference(q, kc, vc, bt, cl, 1.0, 32)
    kc, vc = kc.transpose(1, 2).contiguous().transpose(1, 2), vc.transpose(1, 2).contiguous().transpose(1, 2)
    out = paged_attention_decode_cpu(q, kc, vc, bt, cl, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_cpu_kernel_reports_a_missing_compiler(monkeypatch, tmp_path):
    """No compiler: a one-line reason, and the engine's cache falls back to the gather path with a warning."""
    from engine.kv_cache import PagedKVCache
    from builders import tiny_config

    monkeypatch.setattr(paged_attention_cpu, "_state", {})
    monkeypatch.setenv("SMALL_LLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert "no C++ compiler 'no-such-compiler'" in paged_attention_cpu.cpu_kernel_error()
    with pytest.warns(UserWarning, match="gather path"):
        cache = PagedKVCache(tiny_config("gqa"), 8, 4, torch.float32, "cpu")
    assert cache.decode_backend.name == "gather"
    with pytest.raises(RuntimeError, match="unavailable: no C"):
        paged_attention_decode_cpu(**_bad())
    assert not any(tmp_path.rglob("*.so"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(dtype):
    q, kc, vc, bt, cl = make_case(2, 4, 2, 32, 32, 8, [5, 41], dtype=dtype, seed=11,
                                  table_dtype=torch.int64)
    expected = reference(q, kc, vc, bt, cl, 32 ** -0.5, 32)
    atol, rtol = TOL[dtype]
    out = paged_attention_decode(q, kc, vc, bt, cl)  # default scale and splits
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(paged_attention_decode_torch(q, kc, vc, bt, cl).double(), expected,
                               atol=atol, rtol=rtol)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the interpreter warns on exp2 overflow
def test_extreme_logits_split_k():
    """Scores in the thousands: each split and the merge must subtract their maxima."""
    q, kc, vc, bt, cl = make_case(2, 4, 1, 32, 32, 16, [70, 100], seed=14)
    q = q * 200
    expected = reference(q, kc, vc, bt, cl, 1.0, 32)
    out = paged_attention_decode(q, kc, vc, bt, cl, 1.0, num_splits=2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_non_contiguous_query():
    q, kc, vc, bt, cl = make_case(2, 4, 2, 16, 16, 4, [7, 13], seed=12)
    q_strided = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not q_strided.is_contiguous()
    expected = reference(q, kc, vc, bt, cl, 0.25, 16)
    out = paged_attention_decode(q_strided, kc, vc, bt, cl, 0.25)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def _bad(**over):
    q, kc, vc, bt, cl = make_case(2, 4, 2, 16, 16, 4, [3, 5], seed=13)
    args = dict(q=q, k_cache=kc, v_cache=vc, block_tables=bt, context_lens=cl)
    args.update(over)
    return args


BAD_INPUTS = {
    "q-rank": (lambda: _bad(q=torch.randn(2, 4, 1, 16)), "q must be 3-D"),
    "heads": (lambda: _bad(q=torch.randn(2, 3, 16)), "multiple of kv heads"),
    "head-dim": (lambda: _bad(q=torch.randn(2, 4, 8)), "head dim"),
    "latent-needs-v-dim": (lambda: _bad(v_cache=None), "v_dim"),
    "v-shape": (lambda: _bad(v_cache=torch.randn(3, 4, 2, 16)), "v_cache must be"),
    "dtype": (lambda: _bad(q=torch.randn(2, 4, 16, dtype=torch.float16)), "share a dtype"),
    "table-dtype": (lambda: _bad(block_tables=torch.zeros(2, 3)), "block_tables"),
    "lens-shape": (lambda: _bad(context_lens=torch.tensor([3], dtype=torch.int32)), "context_lens"),
}
CPU_BAD_INPUTS = {
    "cpu-dtype": (lambda: {k: v.double() if v.is_floating_point() else v for k, v in _bad().items()}, "float32"),
    "k-last-shape": (lambda: _bad(k_last=torch.randn(2, 2, 8), v_last=torch.randn(2, 2, 16)), "k_last must be"),
    "v-last-without-k-last": (lambda: _bad(v_last=torch.randn(2, 2, 16)), "v_last exactly when"),
    "k-last-without-v-last": (lambda: _bad(k_last=torch.randn(2, 2, 16)), "v_last exactly when"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("fn", [paged_attention_decode, paged_attention_decode_torch, paged_attention_decode_cpu],
                         ids=["triton", "torch", "cpu"])
def test_bad_inputs_raise(fn, case):
    make, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        fn(**make())


@pytest.mark.parametrize("case", list(CPU_BAD_INPUTS))
def test_cpu_kernel_bad_inputs_raise(case):
    make, message = CPU_BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        paged_attention_decode_cpu(**make())


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        paged_attention_decode(**_bad())


def test_autotune_key_takes_few_values_as_contexts_grow():
    """The GPU autotuner benchmarks every config once per key value: as a sequence grows token by
    token to 4k (any split count), the key must take a handful of values, not one per 64 tokens."""
    from kernels._triton_loader import load_kernel_module
    from kernels.paged_attention import _launch_meta

    kern = load_kernel_module("_paged_attention_triton", interpret=False)
    q, kc = torch.empty(2, 8, 64), torch.empty(1, 16, 2, 64)
    for splits in (None, 1, 3, 8):
        keys = set()
        for pages in range(1, 257):  # the table grows a page (16 tokens) at a time
            meta = _launch_meta(q, kc, torch.empty(2, pages, dtype=torch.int32), 64, splits, interp=False)
            keys.add(tuple(meta[name] for name in kern._paged_decode.keys))
        assert len(keys) <= 8, f"num_splits={splits}: {len(keys)} autotune keys"


def test_kernels_compile_for_gpu():
    """The compiled (GPU) build of both kernels, ahead of time for sm_90, no GPU needed."""
    from kernels._triton_loader import load_kernel_module
    from test_flash_attention import compile_for_gpu

    kern = load_kernel_module("_paged_attention_triton", interpret=False)
    pointers = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", BLOCK_TABLES="*i32", CONTEXT_LENS="*i32",
                    O_PART="*fp32", LSE_PART="*fp32")
    for split in (False, True):
        compile_for_gpu(kern._paged_decode, pointers,
                        dict(D_QK=48, D_V=32, BLOCK_DQK=64, BLOCK_DV=32, BLOCK_G=16, PAGE_SIZE=16, SPLIT=split,
                             UPCAST=False, DOT_PRECISION="tf32", BLOCK_N=32), arch=90)
    compile_for_gpu(kern._paged_reduce, pointers, dict(D_V=32, BLOCK_DV=32, BLOCK_S=4), arch=90)
