"""Triton FlashAttention-2 (kernels/flash_attention.py) against an independent float64 reference.

Runs on CPU in Triton's interpreter (TRITON_INTERPRET=1, set below; the kernels read it at call
time, so it does not matter whether triton was imported before). test_kernels_compile_for_gpu
builds the GPU version ahead of time, which needs no GPU either. KERNEL_TEST_DEVICE=cuda runs the
kernels compiled on a GPU instead (scripts/gpu_check.py does; it skips the CPU-only tests).
"""

import os

DEVICE = os.environ.get("KERNEL_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

from kernels import flash_attention  # noqa: E402
from kernels.flash_attention import _flash_attention_forward  # noqa: E402

TOL = {  # (atol, rtol) vs the float64 reference, for outputs of O(1)
    torch.float32: (2e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 4e-2),
}


def reference(q, k, v, causal, sm_scale):
    """Attention written out in float64: K/V repeated per query-head group, full score matrix,
    -inf above the diagonal, softmax as exp(s - logsumexp). Returns (o, lse)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * sm_scale
    if causal:
        n = q.shape[2]
        visible = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return torch.matmul(p, v), lse


def make_inputs(B, Hq, Hkv, N, Dqk, Dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q scaled up so the softmax is peaked: errors in the running max / rescaling would show.
    q = (2.0 * torch.randn(B, Hq, N, Dqk, generator=g)).to(dtype)
    k = torch.randn(B, Hkv, N, Dqk, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, Dv, generator=g).to(dtype)
    do = torch.randn(B, Hq, N, Dv, generator=g).to(dtype)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), do.to(DEVICE)


def reference_grads(q, k, v, do, causal, sm_scale):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o, _ = reference(*leaves, causal, sm_scale)
    return torch.autograd.grad(o, leaves, do.double())


def kernel_grads(q, k, v, do, causal, sm_scale=None):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = flash_attention(*leaves, causal=causal, sm_scale=sm_scale)
    return o, torch.autograd.grad(o, leaves, do)


def assert_close(actual, expected, dtype, name, scale=1.0):
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


def check_against_reference(q, k, v, do, causal, sm_scale=None, dtype=torch.float32):
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    o, lse = _flash_attention_forward(q, k, v, causal=causal, sm_scale=sm_scale)
    ro, rlse = reference(q, k, v, causal, scale)
    assert o.shape == ro.shape and o.dtype == q.dtype and lse.dtype == torch.float32
    assert_close(o, ro, dtype, "o")
    assert_close(lse, rlse, dtype, "lse")

    o2, grads = kernel_grads(q, k, v, do, causal, sm_scale)
    assert torch.equal(o, o2), "autograd path and forward-only path disagree"
    rgrads = reference_grads(q, k, v, do, causal, scale)
    for name, g, rg, t in zip(("dq", "dk", "dv"), grads, rgrads, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype
        # gradients sum over up to N (and group) terms: allow proportionally more
        assert_close(g, rg, dtype, name, scale=max(1.0, rg.abs().max().item() / 4))


# (Hq, Hkv, Dqk, Dv): group sizes 1, 2 and 3; head dims that are not powers of two; MLA-like
# Dqk != Dv (192/128 scaled down to 48/32 and 96/64). Dqk = 48 runs the split-head-dim path
# (32 + 16 column blocks, like 192 = 128 + 64), Dqk = 24 the padded path (to 32).
VARIANTS = {
    "mha": (2, 2, 32, 32),
    "gqa": (4, 2, 48, 48),
    "mqa": (3, 1, 24, 24),
    "mla": (2, 2, 48, 32),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("N", [1, 17, 77, 130])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference_fp32(variant, N, causal):
    Hq, Hkv, Dqk, Dv = VARIANTS[variant]
    B = 2 if N <= 17 else 1
    q, k, v, do = make_inputs(B, Hq, Hkv, N, Dqk, Dv, seed=N)
    check_against_reference(q, k, v, do, causal)


@pytest.mark.parametrize("Hq,Hkv,Dqk,Dv", [(4, 1, 96, 64), (2, 2, 16, 8), (2, 1, 130, 40)],
                         ids=["mla-96-64-split", "tiny-dims", "dim-130-split-128-16"])
def test_other_head_dims(Hq, Hkv, Dqk, Dv):
    q, k, v, do = make_inputs(1, Hq, Hkv, 45, Dqk, Dv, seed=1)
    check_against_reference(q, k, v, do, causal=True)


def test_custom_sm_scale():
    q, k, v, do = make_inputs(1, 4, 2, 40, 32, 32, seed=2)
    check_against_reference(q, k, v, do, causal=True, sm_scale=0.37)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_half_precision(dtype, causal):
    q, k, v, do = make_inputs(1, 4, 2, 77, 48, 32, dtype=dtype, seed=3)
    check_against_reference(q, k, v, do, causal, dtype=dtype)


def test_non_contiguous_inputs():
    """Transposed views of [B, N, H, D] and slices of a packed qkv projection."""
    B, N, Hq, Hkv, D = 2, 33, 4, 2, 32
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(B, N, Hq + 2 * Hkv, D, generator=g).to(DEVICE)
    q, k, v = qkv.split([Hq, Hkv, Hkv], dim=2)  # non-dense views
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    do = torch.randn(B, N, Hq, D, generator=g).to(DEVICE).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (q, k, v, do))
    check_against_reference(q, k, v, do, causal=True)

    # A [B, N, H, D]-ordered q gives an output whose transpose back is free.
    qt = torch.randn(B, N, Hq, D, generator=g).to(DEVICE).transpose(1, 2)
    o = flash_attention(qt, k, v)
    assert o.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(o, flash_attention(qt.contiguous(), k.contiguous(), v.contiguous()))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gqa_equals_mha_with_repeated_kv(causal):
    B, Hq, Hkv, N, D = 1, 4, 2, 50, 32
    q, k, v, do = make_inputs(B, Hq, Hkv, N, D, D, seed=5)
    o, (dq, dk, dv) = kernel_grads(q, k, v, do, causal)
    k_rep, v_rep = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    o_mha, (dq_mha, dk_mha, dv_mha) = kernel_grads(q, k_rep, v_rep, do, causal)
    # Same inputs per query head and the same tiles: bitwise identical.
    assert torch.equal(o, o_mha)
    assert torch.equal(dq, dq_mha)
    # dK/dV of a shared head = sum of its group's heads (summed in another order: close).
    torch.testing.assert_close(dk, dk_mha.view(B, Hkv, 2, N, D).sum(2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dv, dv_mha.view(B, Hkv, 2, N, D).sum(2), atol=1e-5, rtol=1e-5)


def test_backward_is_deterministic():
    q, k, v, do = make_inputs(2, 6, 2, 70, 32, 32, seed=6)
    o1, g1 = kernel_grads(q, k, v, do, causal=True)
    o2, g2 = kernel_grads(q, k, v, do, causal=True)
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the interpreter warns on exp2 overflow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_extreme_logits_stay_finite(dtype):
    """Huge scores (max subtraction must be exact) and a one-token sequence."""
    for N in (1, 40):
        q, k, v, do = make_inputs(1, 2, 1, N, 32, 32, seed=7)
        q = (q.float() * 40).to(dtype)  # logits in the hundreds
        k, v, do = k.to(dtype), v.to(dtype), do.to(dtype)
        o, lse = _flash_attention_forward(q, k, v, causal=True)
        _, grads = kernel_grads(q, k, v, do, causal=True)
        for t in (o, lse, *grads):
            assert torch.isfinite(t).all()
        ro, rlse = reference(q, k, v, True, 32 ** -0.5)
        assert_close(o, ro, dtype, "o")
        torch.testing.assert_close(lse.double(), rlse, atol=1e-3, rtol=1e-4)


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


BAD_INPUTS = {
    "rank": ((_t(2, 16, 8), _t(1, 2, 16, 8), _t(1, 2, 16, 8)), "4-D"),
    "heads": ((_t(1, 3, 16, 8), _t(1, 2, 16, 8), _t(1, 2, 16, 8)), "multiple of key/value heads"),
    "kv-heads": ((_t(1, 4, 16, 8), _t(1, 2, 16, 8), _t(1, 1, 16, 8)), "k has 2 heads but v has 1"),
    "qk-dim": ((_t(1, 2, 16, 8), _t(1, 2, 16, 16), _t(1, 2, 16, 8)), "head dim"),
    "too-wide": ((_t(1, 1, 4, 300), _t(1, 1, 4, 300), _t(1, 1, 4, 8)), r"head dim must be in \[1, 256\]"),
    "v-too-wide": ((_t(1, 1, 4, 8), _t(1, 1, 4, 8), _t(1, 1, 4, 257)), r"v head dim"),
    "float64": ((_t(1, 1, 4, 8, dtype=torch.float64),) * 3, "dtype torch.float64"),
    "mixed-dtype": ((_t(1, 1, 4, 8), _t(1, 1, 4, 8, dtype=torch.float16), _t(1, 1, 4, 8)), "share a dtype"),
    "seq-len": ((_t(1, 2, 16, 8), _t(1, 2, 12, 8), _t(1, 2, 12, 8)), "sequence lengths differ"),
    "batch": ((_t(2, 2, 16, 8), _t(1, 2, 16, 8), _t(1, 2, 16, 8)), "batch sizes differ"),
    "meta-device": ((_t(1, 1, 4, 8, device="meta"),) * 3, "unsupported device"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise(case):
    args, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        flash_attention(*args)


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        flash_attention(_t(1, 1, 4, 8), _t(1, 1, 4, 8), _t(1, 1, 4, 8))


def test_custom_op_opcheck():
    q, k, v, _ = make_inputs(1, 2, 1, 20, 16, 16, seed=8)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.llm_kernels.flash_attention_fwd.default, (q, k, v, True, 0.25),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_holds_the_op():
    """A compiled function with the kernel inside: one graph (fullgraph), forward and backward
    traced through the custom op's fake and autograd rules."""
    q, k, v, do = make_inputs(1, 4, 2, 24, 16, 16, seed=9)

    def block(q, k, v):
        return flash_attention(q * 1.5, k, v, causal=True).sin()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves, do)
    eager_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    eager = block(*eager_leaves)
    eager_grads = torch.autograd.grad(eager, eager_leaves, do)
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def compile_for_gpu(kernel, pointers, constexprs, arch, num_warps=4, num_stages=2):
    """Compile a kernel ahead of time for an NVIDIA GPU (down to a cubin, with the ptxas that
    ships in the triton wheel): no GPU needed. The interpreter is permissive about things the
    compiler rejects, so this keeps the GPU build honest. Unit last-dim strides are specialised
    to 1 as the launcher does for contiguous head dims."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):  # unwrap the autotuner
        kernel = kernel.fn
    constexprs = dict(constexprs)
    signature = {}
    for name in kernel.arg_names:
        if name.startswith("stride") and name.endswith("d"):
            constexprs[name] = 1
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = pointers.get(name, "fp32" if name == "sm_scale" else "i32")
    return triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


@pytest.mark.parametrize("arch,dtype,Dqk,Dv,causal", [
    (90, "bf16", 48, 32, True),
    (80, "fp16", 64, 64, False),
    pytest.param(90, "bf16", 192, 128, True, marks=pytest.mark.slow),  # ~20 s to compile
], ids=["sm90-bf16-d48-split", "sm80-fp16-d64", "sm90-bf16-mla-192-128"])
def test_kernels_compile_for_gpu(arch, dtype, Dqk, Dv, causal):
    from kernels._triton_loader import load_kernel_module
    from kernels.flash_attention import _head_dim_blocks

    kern = load_kernel_module("_flash_attention_triton", interpret=False)
    pointers = {name: f"*{dtype}" for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    pointers.update(LSE="*fp32", DELTA="*fp32")
    block_dqk, block_dqk2 = _head_dim_blocks(Dqk)
    meta = dict(D_QK=Dqk, D_V=Dv, BLOCK_DQK=block_dqk, BLOCK_DQK2=block_dqk2,
                BLOCK_DV=triton.next_power_of_2(Dv), CAUSAL=causal, UPCAST=False,
                DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    for kernel, blocks in ((kern._attn_fwd, (64, 32)), (kern._attn_bwd_dkdv, (32, 64)),
                           (kern._attn_bwd_dq, (64, 32))):
        compiled = compile_for_gpu(kernel, pointers, dict(meta, BLOCK_M=blocks[0], BLOCK_N=blocks[1]), arch)
        assert compiled.asm["cubin"]
    compile_for_gpu(kern._attn_bwd_preprocess, pointers,
                    dict(D_V=Dv, BLOCK_DV=meta["BLOCK_DV"], BLOCK_M=64), arch)


def test_autotune_keys_take_few_values_as_lengths_vary():
    """Each new autotune key value re-benchmarks every config on a GPU: sequence lengths 1..4096
    must map to a handful of keys (power-of-two buckets), for all three tuned kernels."""
    from kernels._triton_loader import load_kernel_module
    from kernels.flash_attention import _meta_args

    kern = load_kernel_module("_flash_attention_triton", interpret=False)
    for kernel in (kern._attn_fwd, kern._attn_bwd_dkdv, kern._attn_bwd_dq):
        keys = set()
        for n in range(1, 4097):
            q = torch.empty(1, 4, n, 64)
            args = dict(_meta_args(q, q[:, :2], q[:, :2], True, interp=False), N_CTX=n, GROUP=2)
            keys.add(tuple(args[name] for name in kernel.keys))
        assert len(keys) <= 13, f"{len(keys)} autotune keys"


def test_interpreter_switch_is_read_at_call_time():
    """Triton imported with the interpreter off (as another test or torch.compile may do), then
    TRITON_INTERPRET=1 set: CPU calls still run, in the interpreter. In a fresh process."""
    code = (
        "import os, torch, triton\n"
        "from kernels import flash_attention, paged_attention_decode\n"
        "q = torch.randn(1, 2, 5, 16)\n"
        "try:\n"
        "    flash_attention(q, q[:, :1], q[:, :1])\n"
        "    raise SystemExit('expected an error with the interpreter off')\n"
        "except ValueError as e:\n"
        "    assert 'TRITON_INTERPRET=1' in str(e)\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "o = flash_attention(q, q[:, :1], q[:, :1])\n"
        "ref = torch.nn.functional.scaled_dot_product_attention(q, q[:, :1].expand(1, 2, 5, 16),\n"
        "                                                       q[:, :1].expand(1, 2, 5, 16), is_causal=True)\n"
        "assert torch.allclose(o, ref, atol=1e-5), (o - ref).abs().max()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
