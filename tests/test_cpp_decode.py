"""The C++ decode step (engine/cpu_speed.CppDecodeStep, kernels/csrc/decode_step_cpu.cpp) against
independent references: the PyTorch step of the same engine (cpp_decode=False: ATen ops, MKL) for
fp32, and full recompute of the dequantized fp32 model (F.linear) for int8. Logits to 1e-4, greedy
tokens identical, at batch 1 and several rows; MLA, compile and a kernel that cannot be built keep
the PyTorch step."""

import random

import pytest
import torch

from builders import dequantized_copy, tiny_model
from engine import LLM, SamplingParams
from kernels import decode_step_cpu

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True, return_logits=True)


def prompts(lengths, seed=0, vocab=300):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def assert_same(out, ref):
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.outputs[0].logits, r.outputs[0].logits, atol=1e-4, rtol=0)


# dim 72 / ffn 90 / vocab 301: K not a multiple of the vector width and N not of the tile (the tails);
# tied: the LM head is the embedding matrix (int8: its own quantized copy).
SHAPES = {"tiny": {}, "tails": dict(dim=72, ffn_dim=90, vocab_size=301), "tied": dict(tie_embeddings=True)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("attention", ["mha", "gqa", "mqa"])
def test_fp32_matches_the_pytorch_step(attention, shape):
    model = tiny_model(attention, seed=1, **SHAPES[shape])
    # batch 1, then 5 rows of mixed lengths: more than one register block of rows (linear.h's MB, 3 or 4)
    for batch in (prompts([9]), prompts([1, 4, 17, 30, 6], seed=2)):
        ref = LLM(model=model, device="cpu", block_size=4, cpp_decode=False).generate(batch, GREEDY)
        llm = LLM(model=model, device="cpu", block_size=4)
        assert llm.runner.cpp_step is not None
        assert_same(llm.generate(batch, GREEDY), ref)
        if shape != "tied":  # (the tied tiny model repeats one token; its logits are compared all the same)
            assert len({t for r in ref for t in r.token_ids}) > 5  # not one repeated token


@pytest.mark.parametrize("attention,shape", [("gqa", "tails"), ("mqa", "tails"), ("gqa", "tied")])
def test_int8_matches_full_recompute_of_the_dequantized_model(attention, shape):
    model = tiny_model(attention, seed=3, **SHAPES[shape])
    for batch in (prompts([12], seed=4), prompts([3, 20, 8, 5, 14], seed=5)):  # 5 rows: int8 tiles -> fp32 once
        ref = LLM(model=dequantized_copy(model), device="cpu", use_cache=False).generate(batch, GREEDY)
        llm = LLM(model=model, device="cpu", block_size=4, quantize="int8")
        assert llm.runner.cpp_step is not None
        assert_same(llm.generate(batch, GREEDY), ref)


def test_preemption_and_prefix_hits_on_a_small_cache():
    """Blocks freed and reused mid-run (preemption), prompts that share cached blocks: the C++ step
    writes each new K/V to its slot, so recomputed and shared contexts read back the same values."""
    model = tiny_model("gqa", seed=6)
    base = prompts([9], seed=7)[0]
    batch = [base + p for p in prompts([1, 6, 11, 2], seed=8)]
    ref = LLM(model=model, device="cpu", use_cache=False).generate(batch, GREEDY)
    llm = LLM(model=model, device="cpu", block_size=4, num_blocks=18)
    assert_same(llm.generate(batch[:1], GREEDY), ref[:1])  # leaves the shared blocks in the prefix cache
    assert_same(llm.generate(batch, GREEDY), ref)
    assert llm.stats.preemptions > 0 and llm.stats.prefix_hit_tokens > 0


def test_mla_compile_and_gather_path_keep_the_pytorch_step():
    assert LLM(model=tiny_model("mla"), device="cpu").runner.cpp_step is None
    assert LLM(model=tiny_model("gqa"), device="cpu", compile=True).runner.cpp_step is None
    assert LLM(model=tiny_model("gqa"), device="cpu", paged_kernel=False).runner.cpp_step is None


def test_no_compiler_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(decode_step_cpu, "_state", {})
    monkeypatch.setenv("SMALL_LLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    model = tiny_model("gqa", seed=9)
    with pytest.warns(UserWarning, match=r"^CPU decode-step kernel unavailable \(no C\+\+ compiler") as caught:
        llm = LLM(model=model, device="cpu", block_size=4)
    assert llm.runner.cpp_step is None and all("\n" not in str(w.message) for w in caught)
    batch = prompts([5, 13], seed=10)
    assert_same(llm.generate(batch, GREEDY), LLM(model=model, device="cpu", use_cache=False).generate(batch, GREEDY))
