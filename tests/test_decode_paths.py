"""Every decode path (engine/decode.py) against an independent reference on every model option.

The reference is full recompute through the plain training forward (LLM(use_cache=False)), of the
dequantized fp32 model for int8 weights. The paths on CPU: the C++ step (the fast path, where it
supports the model), the PyTorch step on the C++ paged-attention kernel and the PyTorch step on the
gather path. Logits to 1e-4 (int8 1e-3), greedy tokens identical, at batch 1 and several rows. A model option
missing from VARIANTS fails a test, so a new option is checked on every path before it ships; a
fast path that declines a model says why, once."""

import dataclasses
import random

import pytest
import torch

from builders import dequantized_copy, tiny_model
from engine import LLM, SamplingParams, decode
from kernels import decode_step_cpu
from model import ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True, return_logits=True)

# Every ModelConfig option that changes the forward, at a value other than its default. "tails": sizes
# that are no multiple of the C++ kernels' vector width (dim, ffn_dim) or tile (vocab_size).
VARIANTS = {
    "mha": dict(attention="mha"), "gqa": {}, "mqa": dict(attention="mqa"),
    "mla": dict(attention="mla"), "mla-q-lora": dict(attention="mla", q_lora_rank=24, latent_norm_eps=1e-6),
    "tied": dict(tie_embeddings=True), "tails": dict(dim=72, ffn_dim=90, vocab_size=301),
    "llama3-rope": dict(rope_theta=500000.0, rope_scaling_factor=8.0, rope_low_freq_factor=2.0,
                        rope_high_freq_factor=8.0, rope_original_max_seq_len=16),
    "norm-eps": dict(norm_eps=0.5),
}
# Sizes the variants leave at tests/builders.py's values (n_kv_heads follows the attention kind).
SIZES = {"n_layers", "n_heads", "n_kv_heads", "max_seq_len", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
         "v_head_dim"}
# The paths on CPU, as LLM options, and which decode path each runs.
PATHS = {"fast": dict(), "paged-kernel": dict(cpp_decode=False), "gather": dict(paged_kernel=False)}


def prompts(lengths, seed=0, vocab=300):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def assert_same(out, ref, atol=1e-4):
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.outputs[0].logits, r.outputs[0].logits, atol=atol, rtol=0)


def test_every_model_option_is_a_variant():
    varied = set().union(*VARIANTS.values())
    missing = {f.name for f in dataclasses.fields(ModelConfig)} - varied - SIZES
    assert not missing, f"add a VARIANTS entry setting {sorted(missing)}: every decode path is checked on it"


@pytest.mark.parametrize("weights", ["fp32", "int8"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_path_matches_full_recompute(variant, weights):
    model = tiny_model(seed=1, **VARIANTS[variant])
    int8 = weights == "int8"
    wkv_b = {f"layers.{i}.attn.wkv_b" for i in range(model.cfg.n_layers)}  # int8 keeps MLA's wkv_b in fp32
    reference = dequantized_copy(model, wkv_b) if int8 else model
    batches = [prompts([9], seed=2), prompts([1, 4, 17, 30, 6], seed=3)]  # 5 rows: more than one register block
    refs = [LLM(model=reference, device="cpu", use_cache=False).generate(b, GREEDY) for b in batches]
    if variant != "tied":  # (the tied tiny model repeats its prompt's tokens; its logits are compared all the same)
        assert len({t for r in refs[1] for t in r.token_ids}) > 5, "the model repeats one token: a weak test"
    expected_fast = "torch" if model.cfg.attention == "mla" else "cpp"  # what the C++ step implements
    for path, options in PATHS.items():
        llm = LLM(model=model, device="cpu", block_size=4, quantize="int8" if int8 else None, **options)
        assert llm.runner.decode.name == (expected_fast if path == "fast" else "torch"), path
        assert llm.cache.decode_backend.name == ("gather" if path == "gather" else "cpu")
        for batch, ref in zip(batches, refs):
            # int8: the kernel's x @ Wq * scale rounds otherwise than F.linear on Wq * scale (~3e-4 here, where
            # int8 and fp32 weights differ by ~1e-2)
            assert_same(llm.generate(batch, GREEDY), ref, atol=1e-3 if int8 else 1e-4)


def test_preemption_and_prefix_hits_on_a_small_cache():
    """Blocks freed and reused mid-run (preemption), prompts that share cached blocks: the C++ step
    writes each new K/V to its slot, so recomputed and shared contexts read back the same values."""
    model = tiny_model("gqa", seed=6)
    base = prompts([9], seed=7)[0]
    batch = [base + p for p in prompts([1, 6, 11, 2], seed=8)]
    ref = LLM(model=model, device="cpu", use_cache=False).generate(batch, GREEDY)
    llm = LLM(model=model, device="cpu", block_size=4, num_blocks=18)
    assert llm.runner.decode.name == "cpp"
    assert_same(llm.generate(batch[:1], GREEDY), ref[:1])  # leaves the shared blocks in the prefix cache
    assert_same(llm.generate(batch, GREEDY), ref)
    assert llm.stats.preemptions > 0 and llm.stats.prefix_hit_tokens > 0


def test_what_the_user_asks_for_keeps_the_pytorch_step_without_a_word(recwarn):
    for options in (dict(cpp_decode=False), dict(paged_kernel=False), dict(compile=True)):
        assert LLM(model=tiny_model("gqa"), device="cpu", **options).runner.decode.name == "torch"
    assert not [w for w in recwarn if "decode step" in str(w.message)]


def declines(model, monkeypatch) -> list[str]:
    """The decline messages of two LLMs built on `model`, in a process that has said none yet."""
    monkeypatch.setattr(decode, "_said", set())
    with pytest.warns(UserWarning) as caught:
        llms = [LLM(model=model, device="cpu", block_size=4) for _ in range(2)]
    assert all(llm.runner.decode.name == "torch" for llm in llms)
    return [str(w.message) for w in caught if "C++ decode step" in str(w.message)]


def test_a_declined_model_says_why_once(monkeypatch):
    assert declines(tiny_model("mla"), monkeypatch) == [
        "the C++ decode step does not apply (attention=mla: it implements mha, gqa, mqa); decoding through the "
        "slower PyTorch step"]


def test_a_model_change_it_does_not_implement_is_declined_and_decoded_right(monkeypatch):
    """A layer the C++ step does not know (here a bias on one projection, as a change to model/llama.py
    would bring) is declined by name, once, and decoded by the PyTorch step like full recompute."""
    model = tiny_model("gqa", seed=4)
    wqkv = model.layers[1].attn.wqkv
    model.layers[1].attn.wqkv = torch.nn.Linear(wqkv.in_features, wqkv.out_features, bias=True)
    message, = declines(model, monkeypatch)
    assert message.startswith("the C++ decode step does not apply (it does not implement layers.1.attn.wqkv (Linear")
    batch = prompts([5, 13], seed=5)
    ref = LLM(model=model, device="cpu", use_cache=False).generate(batch, GREEDY)
    assert_same(LLM(model=model, device="cpu", block_size=4).generate(batch, GREEDY), ref)


def test_no_compiler_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(decode_step_cpu, "_state", {})
    monkeypatch.setenv("SMALL_LLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    model = tiny_model("gqa", seed=9)
    message, = declines(model, monkeypatch)
    assert message.startswith("the C++ decode step does not apply (its kernel is unavailable: no C++ compiler")
    assert "\n" not in message
    batch = prompts([5, 13], seed=10)
    assert_same(LLM(model=model, device="cpu", block_size=4).generate(batch, GREEDY),
                LLM(model=model, device="cpu", use_cache=False).generate(batch, GREEDY))
