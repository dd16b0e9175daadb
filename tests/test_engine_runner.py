"""The model runner: the step inputs it builds from sequences, and the CPU weight layout it decodes
with (on its own copy, never on the caller's model)."""

import torch

from builders import tiny_model
from engine import LLM, SamplingParams
from engine.cpu_speed import column_major_copy
from engine.model_runner import ModelRunner
from engine.kv_cache import PagedKVCache
from engine.sequence import Sequence


def test_step_inputs_pack_new_tokens_with_their_slots():
    model = tiny_model("gqa", seed=0)
    cache = PagedKVCache(model.cfg, 16, 4, torch.float32, "cpu", paged_kernel=False)
    runner = ModelRunner(model, cache)
    # a: 10 prompt tokens, the first 8 cached (two blocks); b: a prompt fully cached (recompute the last
    # token, write nothing); c: decoding its 7th token.
    a = Sequence(0, 0, 0, list(range(10)), 10, SamplingParams(), 100, block_table=[3, 5, 9], num_computed_tokens=8)
    b = Sequence(1, 1, 0, list(range(8)), 8, SamplingParams(), 100, block_table=[3, 5], num_computed_tokens=8)
    step = runner.step_inputs([a, b], is_prefill=True)
    assert step.token_ids == [8, 9, 7] and step.positions == [8, 9, 7]
    assert step.slot_mapping == [9 * 4 + 0, 9 * 4 + 1, -1]
    assert step.query_lens == [2, 1] and step.context_lens == [10, 8] and step.block_tables == [[3, 5, 9], [3, 5]]
    c = Sequence(2, 2, 0, [4, 4, 4, 4, 4, 4, 1], 3, SamplingParams(), 100, block_table=[7, 2], num_computed_tokens=6)
    step = runner.step_inputs([c], is_prefill=False)
    assert step.token_ids == [1] and step.positions == [6] and step.slot_mapping == [2 * 4 + 2]


def test_column_major_copy_leaves_the_callers_model_alone():
    """Decoding through the PyTorch step (cpp_decode=False; MLA always) uses a column-major copy."""
    model = tiny_model("gqa", seed=0)
    before = {n: (p.clone(), p.stride()) for n, p in model.named_parameters()}
    llm = LLM(model=model, device="cpu", block_size=4, cpp_decode=False)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_new_tokens=4))
    for n, p in model.named_parameters():
        assert p.stride() == before[n][1] and torch.equal(p, before[n][0]), n
    fast = dict(llm.runner.model.named_parameters())
    for n, p in model.named_parameters():
        if n.endswith("wqkv.weight") or n.endswith("w13.weight"):
            assert fast[n].stride() == (1, p.shape[0]) and torch.equal(fast[n], p)  # column-major, same values
        if n == "embed.weight":
            assert fast[n] is p  # everything but the linear weights is shared, not copied
    ref = LLM(model=model, device="cpu", use_cache=False).generate([[1, 2, 3]], SamplingParams(temperature=0, max_new_tokens=4))
    assert out[0].token_ids == ref[0].token_ids


def test_column_major_copy_keeps_tied_weights_tied():
    model = tiny_model("gqa", seed=0, tie_embeddings=True)
    fast = column_major_copy(model)
    assert fast.lm_head.weight is fast.embed.weight is model.embed.weight
