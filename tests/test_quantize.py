"""int8 weight-only linears: the C++ kernel against float64 math on the dequantized weight, Int8Linear
against F.linear on it, a quantized tiny model against the same model holding the dequantized weights
(computed here from the scale rule, not by the code under test), the fallback without a compiler, and
scripts/quant_eval.py end to end on a tiny checkpoint."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from builders import dequantized_copy, tiny_model, write_checkpoint
from engine.quantize import Int8Linear, quantize_int8, quantize_weight
from kernels import int8_linear_cpu
from kernels.int8_linear_cpu import int8_linear_cpu as kernel

ROOT = Path(__file__).resolve().parents[1]


def random_int8(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    return q, scale


def reference(x, q, scale):
    """float64: x @ (q * scale)^T."""
    return x.double() @ (q.double() * scale.double()[:, None]).T


@pytest.mark.parametrize("m", [1, 3, 16, 64])
@pytest.mark.parametrize("k,n", [(37, 13), (259, 70)])  # neither a multiple of a vector width
def test_kernel_matches_float64(m, k, n):
    assert int8_linear_cpu.cpu_kernel_error() is None
    q, scale = random_int8(n, k, seed=m * 1000 + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + n))
    torch.testing.assert_close(kernel(x, q, scale).double(), reference(x, q, scale), atol=1e-4, rtol=1e-5)


def test_kernel_strided_and_batched_inputs():
    """Rows with a stride (a slice of a wider buffer), a transposed view (non-unit last stride) and
    leading batch dims [B, T, K] -> [B, T, N]."""
    q, scale = random_int8(21, 45, seed=1)
    wide = torch.randn(16, 60)
    rows = wide[:, 5:50]
    assert rows.stride() == (60, 1)
    torch.testing.assert_close(kernel(rows, q, scale).double(), reference(rows, q, scale), atol=1e-4, rtol=1e-5)
    cols = torch.randn(45, 5).t()
    assert cols.stride(1) != 1
    torch.testing.assert_close(kernel(cols, q, scale).double(), reference(cols, q, scale), atol=1e-4, rtol=1e-5)
    x3 = torch.randn(2, 7, 45)
    y3 = kernel(x3, q, scale)
    assert y3.shape == (2, 7, 21)
    torch.testing.assert_close(y3.double(), reference(x3.reshape(14, 45), q, scale).view(2, 7, 21),
                               atol=1e-4, rtol=1e-5)


def test_kernel_rejects_wrong_dtypes():
    q, scale = random_int8(4, 8, seed=2)
    with pytest.raises(ValueError, match="int8"):
        kernel(torch.randn(1, 8), q.float(), scale)
    with pytest.raises(ValueError, match="float32"):
        kernel(torch.randn(1, 8, dtype=torch.float64), q, scale)


def test_quantize_weight_scale_rule():
    """scale = max|w| / 127 per row: each row's largest weight maps to +-127, every weight is within
    scale / 2 of its dequantized value, and an all-zero row stays zero."""
    w = torch.randn(9, 33, dtype=torch.float64).float()
    w[4] = 0
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    amax = w.double().abs().amax(1)
    nonzero = amax > 0
    torch.testing.assert_close(scale.double()[nonzero], amax[nonzero] / 127)
    assert (q.abs().amax(1)[nonzero] == 127).all() and (q[4] == 0).all()
    err = (q.double() * scale.double()[:, None] - w.double()).abs()
    assert (err <= scale.double()[:, None] / 2 + 1e-7).all()


def test_int8_linear_matches_dequantized_f_linear():
    torch.manual_seed(3)
    w = torch.randn(70, 259)
    layer = Int8Linear(w)
    assert layer.kernel
    q, scale = layer.weight, layer.scale
    for m in (1, 5):
        x = torch.randn(m, 259)
        expected = F.linear(x.double(), q.double() * scale.double()[:, None])
        torch.testing.assert_close(layer(x).double(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("attention,tie", [("gqa", False), ("gqa", True), ("mla", False)])
def test_quantized_model_matches_dequantized_weights(attention, tie):
    model = tiny_model(attention, seed=4, tie_embeddings=tie)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize_int8(model)
    skip = {f"layers.{i}.attn.wkv_b" for i in range(model.cfg.n_layers)} if attention == "mla" else set()
    assert {n for n, m in quantized.named_modules() if isinstance(m, nn.Linear)} == skip
    assert isinstance(quantized.lm_head, Int8Linear)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = dequantized_copy(model, skip)(idx)[0]
        got = quantized(idx)[0]
        fp32 = model(idx)[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - fp32).abs().max() > 1e-3  # int8 really changed the numbers
    # the caller's model is untouched: same modules, same tensors, same values
    assert all(type(m) is not Int8Linear for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    if tie:
        assert model.lm_head.weight is model.embed.weight
        assert torch.equal(quantized.embed.weight, model.embed.weight)  # the lookup stays fp32


def test_head_can_stay_fp32():
    model = tiny_model("gqa", seed=6)
    quantized = quantize_int8(model, head=False)
    assert type(quantized.lm_head) is nn.Linear and torch.equal(quantized.lm_head.weight, model.lm_head.weight)
    idx = torch.randint(0, model.cfg.vocab_size, (1, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(quantized(idx)[0], dequantized_copy(model, {"lm_head"})(idx)[0],
                                   atol=1e-4, rtol=1e-4)


def test_no_compiler_falls_back_to_dequantized_linear(monkeypatch, tmp_path):
    """No compiler: a one-line reason, a warning from quantize_int8, and the same logits through
    F.linear on the dequantized weights."""
    monkeypatch.setattr(int8_linear_cpu, "_state", {})
    monkeypatch.setenv("SMALL_LLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    error = int8_linear_cpu.cpu_kernel_error()
    assert "no C++ compiler 'no-such-compiler'" in error and "\n" not in error
    model = tiny_model("gqa", seed=8)
    with pytest.warns(UserWarning, match="kernel is unavailable .*no C\\+\\+ compiler"):
        quantized = quantize_int8(model)
    assert not any(m.kernel for m in quantized.modules() if isinstance(m, Int8Linear))
    with pytest.raises(RuntimeError, match="unavailable: no C"):
        kernel(torch.randn(1, 8), *random_int8(4, 8, seed=9))
    idx = torch.randint(0, model.cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        torch.testing.assert_close(quantized(idx)[0], dequantized_copy(model)(idx)[0], atol=1e-4, rtol=1e-4)
    assert not any(tmp_path.rglob("*.so"))


def test_quant_eval_runs_end_to_end(tmp_path):
    run = write_checkpoint(tmp_path / "run", seed=11)
    text = tmp_path / "val.txt"
    text.write_text("To be, or not to be, that is the question. Once upon a time there was a small model. " * 12)
    cmd = [sys.executable, str(ROOT / "scripts" / "quant_eval.py"), str(run), "--text", str(text),
           "--prompts", "3", "--tokens", "5", "--seq-len", "32"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    for name in ("fp32", "int8, fp32 head", "int8"):  # loss, perplexity, bits/byte: finite numbers
        assert all(math.isfinite(float(v)) for v in rows[name].split("|")[2:5])
    bad = subprocess.run(cmd[:2] + [str(tmp_path / "nowhere"), "--text", str(text)], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1


def test_kernel_traces_as_one_op_under_torch_compile():
    """The fake implementation lets torch.compile trace through the operator (fullgraph: no break)."""
    layer = Int8Linear(torch.randn(30, 45))
    x = torch.randn(3, 45)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


def test_loads_beside_the_paged_attention_kernel():
    """The libraries add to torch.ops.small_llm; the int8 and decode-step ones (fragments) may load first."""
    code = ("from kernels import decode_step_cpu, int8_linear_cpu, paged_attention_cpu\n"
            "assert decode_step_cpu.cpu_kernel_error() is None\n"
            "assert int8_linear_cpu.cpu_kernel_error() is None\n"
            "assert paged_attention_cpu.cpu_kernel_error() is None\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_llm_int8_decodes_like_full_recompute_of_the_dequantized_model(attention):
    """LLM(quantize="int8") on the paged cache (and its full-recompute path) gives the greedy tokens of
    the dequantized fp32 model recomputed in full; the caller's model is untouched."""
    from engine import LLM, SamplingParams

    model = tiny_model(attention, seed=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    skip = {f"layers.{i}.attn.wkv_b" for i in range(model.cfg.n_layers)} if attention == "mla" else set()
    prompts = [[5, 60, 7, 200], list(range(40, 72)), [3] * 20]
    greedy = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True, return_logits=True)
    ref = LLM(model=dequantized_copy(model, skip), device="cpu", use_cache=False).generate(prompts, greedy)
    fp32 = LLM(model=model, device="cpu", use_cache=False).generate(prompts, greedy)
    for use_cache in (True, False):
        out = LLM(model=model, device="cpu", quantize="int8", block_size=4, use_cache=use_cache).generate(prompts, greedy)
        assert [o.token_ids for o in out] == [r.token_ids for r in ref]
        for o, r, f in zip(out, ref, fp32):
            torch.testing.assert_close(o.outputs[0].logits, r.outputs[0].logits, atol=1e-4, rtol=0)
            assert (o.outputs[0].logits[:1] - f.outputs[0].logits[:1]).abs().max() > 1e-3  # int8 is not fp32
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_llm_int8_refuses_what_it_cannot_run():
    from engine import LLM

    with pytest.raises(ValueError, match="unknown quantize 'int4'"):
        LLM(model=tiny_model("gqa"), device="cpu", quantize="int4")
    with pytest.raises(ValueError, match="float32 decoding on CPU"):
        LLM(model=tiny_model("gqa"), device="cpu", dtype=torch.bfloat16, quantize="int8")
