"""Our C++ training attention for CPU (kernels/causal_attention_cpu.py), against a float64 naive attention:
outputs and all three gradients, MHA / GQA / MQA and Dqk != Dv, odd lengths, the model's strided views;
under torch.compile as one call; `attention.backend=auto` picks it on CPU and falls back to SDPA without it."""

import pytest
import torch

import model.attention as attention
from builders import tiny_model
from kernels import causal_attention_cpu as module
from kernels.causal_attention_cpu import causal_attention_cpu


def inputs(B, Hq, Hkv, T, D, Dv, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # the model's layout: [B, T, H, D] viewed as [B, H, T, D]
        q = torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64).transpose(1, 2)
        k = torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64).transpose(1, 2)
        v = torch.randn(B, T, Hkv, Dv, generator=g, dtype=torch.float64).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, T, D, generator=g, dtype=torch.float64)
        k = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64)
        v = torch.randn(B, Hkv, T, Dv, generator=g, dtype=torch.float64)
    return q, k, v, torch.randn(B, Hq, T, Dv, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("shape,strided", [
    ((2, 4, 4, 33, 16, 16), False),   # MHA, one partial block
    ((2, 8, 2, 77, 32, 32), True),    # GQA, the model's strided views, 3 blocks
    ((3, 4, 1, 130, 8, 12), True),    # MQA, Dqk != Dv (MLA's shapes), 5 blocks
    ((1, 2, 2, 1, 16, 16), False),    # one token
])
def test_matches_float64_reference(shape, strided):
    B, Hq, Hkv, T, D, Dv = shape
    q, k, v, do = inputs(*shape, seed=sum(shape), strided=strided)
    scale = D ** -0.5
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = attention.math_attention(*ref, scale)
    expected.backward(do)
    ours = [t.float().requires_grad_() for t in (q, k, v)]
    out = causal_attention_cpu(*ours, scale)
    out.backward(do.float())
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
    for name, a, b in zip("qkv", ours, ref):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-5, rtol=2e-5, msg=f"d{name}")


def test_thread_count_does_not_change_the_results():
    q, k, v, do = (t.float() for t in inputs(4, 8, 2, 70, 16, 16, seed=3))
    runs = []
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = causal_attention_cpu(*leaves, 0.25)
            out.backward(do)
            runs.append([out] + [t.grad for t in leaves])
        finally:
            torch.set_num_threads(before)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_compiled_model_keeps_the_kernel_in_one_graph(monkeypatch):
    """train.compile: the forward and backward trace to the operators (fullgraph: no graph break) and
    give eager's logits and gradients; both sides against SDPA's."""
    monkeypatch.setattr(attention, "_chosen", {})
    assert attention.choose_backend("auto", "cpu", torch.float32) == "cpu"  # as the Trainer does
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    grads = {}
    for name in ("sdpa", "cpu", "compiled"):
        model = tiny_model("gqa")
        for layer in model.layers:
            layer.attn.backend = "sdpa" if name == "sdpa" else "auto"
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if name == "compiled" else model
        logits = run(x)[0]
        logits.square().mean().backward()
        grads[name] = [logits.detach()] + [p.grad for p in model.parameters()]
    for name in ("cpu", "compiled"):
        for a, b in zip(grads[name], grads["sdpa"]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_auto_uses_the_kernel_where_chosen_on_cpu_float32_only(monkeypatch):
    calls = []
    real = torch.ops.small_llm.causal_attention_fwd

    class Spy:  # counts the kernel's forward calls
        def __call__(self, *args):
            calls.append(args[0].dtype)
            return real(*args)
    assert module.cpu_kernel_error() is None
    monkeypatch.setattr(module, "causal_attention_cpu", lambda q, k, v, scale: Spy()(q, k, v, scale)[0])
    q, k, v, _ = inputs(1, 2, 1, 9, 8, 8, seed=1)
    monkeypatch.setattr(attention, "_chosen", {})
    attention.causal_attention(q.float(), k.float(), v.float(), 0.5, "auto")  # chosen nowhere: SDPA
    assert attention.choose_backend("auto", "cpu", torch.float32) == "cpu"
    assert attention.choose_backend("auto", "cpu", torch.float64) == "sdpa"
    attention.causal_attention(q.float(), k.float(), v.float(), 0.5, "auto")
    attention.causal_attention(q, k, v, 0.5, "auto")  # float64: SDPA
    assert calls == [torch.float32]


def test_without_the_kernel_auto_warns_and_uses_sdpa(monkeypatch, tmp_path):
    """No C++ compiler: `auto` trains on SDPA after one warning; an explicit `cpu` stops in one line."""
    monkeypatch.setattr(module, "_state", {})
    monkeypatch.setattr(attention, "_chosen", {})
    monkeypatch.setenv("SMALL_LLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.warns(UserWarning, match="CPU attention kernel unavailable .*no C\\+\\+ compiler"):
        assert attention.choose_backend("auto", "cpu", torch.float32) == "sdpa"
    with pytest.raises(ValueError) as err:
        attention.choose_backend("cpu", "cpu", torch.float32)
    assert str(err.value).startswith("attention.backend=cpu: no C++ compiler") and "\n" not in str(err.value)
    assert "use attention.backend=sdpa or auto" in str(err.value)
    with pytest.raises(ValueError, match="attention.backend=cpu: it runs on the CPU only"):
        attention.choose_backend("cpu", "cuda:0", torch.float32)
    assert not any(tmp_path.rglob("*.so"))
