"""End to end: the paged, continuously batched engine against full recompute (use_cache=False).

The reference decodes every token through the plain training forward (model(idx), no cache, no
positions) and shares only the sampler with the engine. Tiny random fp32 models for each attention
variant (MHA, GQA, MQA, MLA); weights are scaled so that greedy choices are clear (top-2 logit margins
far above float32 noise) and the generated sequences vary. Each decode path against full recompute on
every model option: tests/test_decode_paths.py.
"""

import random

import pytest
import torch

from engine import LLM, RequestTooLarge, SamplingParams
from builders import tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = ["mha", "gqa", "mqa", "mla"]
_models = {}


def model_for(attention):
    if attention not in _models:
        _models[attention] = tiny_model(attention, seed=0)
    return _models[attention]


def make_prompts(lengths, seed=0, vocab=300):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def reference(model, prompts, params):
    return LLM(model=model, device="cpu", use_cache=False).generate(prompts, params)


def tokens(outs):
    return [[s.token_ids for s in o.outputs] for o in outs]


GREEDY = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)


def _tight(bs, prompts, sp):
    """A budget that fits the largest request alone but far from all of them together."""
    need = max(-(-(len(p) + sp.max_new_tokens) // bs) for p in prompts)
    return need + 1


@pytest.mark.parametrize("attention", VARIANTS)
def test_block_sizes_budgets_batches_and_prefix_hits(attention):
    model = model_for(attention)
    prompts = make_prompts([1, 5, 16, 17, 40, 50], seed=1)
    ref = tokens(reference(model, prompts, GREEDY))
    for bs in (1, 16, 64):
        for num_blocks in (None, _tight(bs, prompts, GREEDY)):
            llm = LLM(model=model, device="cpu", block_size=bs, num_blocks=num_blocks, max_num_seqs=8)
            assert tokens(llm.generate(prompts, GREEDY)) == ref, (bs, num_blocks)
            if num_blocks is not None:
                assert llm.stats.preemptions > 0, f"budget {num_blocks} x {bs} did not force preemption"
    # Other batch compositions: one at a time, reversed pairs.
    llm = LLM(model=model, device="cpu", block_size=4, max_num_seqs=2)
    for i in (0, 4):
        assert tokens(llm.generate([prompts[i]], GREEDY)) == [ref[i]]
    assert tokens(llm.generate(prompts[::-1], GREEDY)) == ref[::-1]


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_prefix_cache_hits_duplicates_and_full_hits(attention):
    model = model_for(attention)
    base = make_prompts([32], seed=2)[0]  # two full blocks of 16
    prompts = [base, base + [1, 2, 3], base[:20], base, base[:16] + [9] * 10, list(base)]
    ref = tokens(reference(model, prompts, GREEDY))
    llm = LLM(model=model, device="cpu", block_size=16)
    # Duplicates within one step: each computes its own blocks (a block is keyed once its K/V are written).
    assert tokens(llm.generate(prompts, GREEDY)) == ref and llm.stats.prefix_hit_rate == 0
    assert tokens(llm.generate(prompts, GREEDY)) == ref  # again: hits from the finished requests, 100% for base
    again = llm.stats
    assert again.prefix_hit_rate > 0.4
    # Without prefix caching: the same tokens, in more blocks.
    plain = LLM(model=model, device="cpu", block_size=16, enable_prefix_caching=False)
    assert tokens(plain.generate(prompts, GREEDY)) == ref and plain.stats.prefix_hit_rate == 0
    # Sharing saves 8 blocks at admission: base three times (2 full blocks each), base + 3 (2),
    # base[:20] (1) and base[:16] + 10 (1) all reuse the cached blocks of base.
    assert again.blocks_used_peak <= plain.stats.blocks_used_peak - 8


SAMPLED = [SamplingParams(temperature=0.9, top_k=50, max_new_tokens=20, seed=11, ignore_eos=True),
           SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=25, seed=12, ignore_eos=True),
           SamplingParams(temperature=0.7, min_p=0.05, repetition_penalty=1.3, max_new_tokens=15, seed=13,
                          ignore_eos=True),
           SamplingParams(temperature=0, max_new_tokens=18, ignore_eos=True)]


@pytest.mark.parametrize("attention", VARIANTS)
def test_seeded_sampling_does_not_depend_on_the_batch(attention):
    model = model_for(attention)
    prompts = make_prompts([3, 18, 33, 7], seed=3)
    ref = tokens(reference(model, prompts, SAMPLED))
    llm = LLM(model=model, device="cpu", block_size=8)
    assert tokens(llm.generate(prompts, SAMPLED)) == ref
    for i in range(4):
        assert tokens(llm.generate([prompts[i]], [SAMPLED[i]])) == [ref[i]]
    llm = LLM(model=model, device="cpu", block_size=4, num_blocks=16, max_num_seqs=3)  # preemptions too
    assert tokens(llm.generate(prompts[::-1], SAMPLED[::-1])) == ref[::-1]
    assert llm.stats.preemptions > 0
    # Different seeds give different samples (the test above could not fail otherwise).
    other = [SamplingParams(**{**vars(p), "seed": (p.seed or 0) + 100}) for p in SAMPLED[:2]]
    assert tokens(llm.generate(prompts[:2], other)) != ref[:2]


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_parallel_samples_share_prompt_blocks_copy_on_write(attention):
    model = model_for(attention)
    prompts = make_prompts([20, 9], seed=4)  # partial last blocks at block size 16: shared, then copied
    sp = SamplingParams(temperature=1.0, n=4, max_new_tokens=20, seed=5, ignore_eos=True)
    ref = tokens(reference(model, prompts, sp))
    assert all(len({tuple(s) for s in r}) == 4 for r in ref)  # four different samples per prompt
    llm = LLM(model=model, device="cpu", block_size=16)
    assert tokens(llm.generate(prompts, sp)) == ref
    st = llm.stats
    assert st.cow_copies >= 2 * 3  # every sample but the last writer of each shared partial block copied it
    assert st.prefill_tokens == 29  # the prompts were computed once, not once per sample
    # Tight budget: forked samples get preempted and recomputed; same result.
    llm = LLM(model=model, device="cpu", block_size=4, num_blocks=14)
    assert tokens(llm.generate(prompts, sp)) == ref and llm.stats.preemptions > 0
    # Greedy samples are all the greedy continuation.
    g = SamplingParams(temperature=0, n=3, max_new_tokens=12, ignore_eos=True)
    out = LLM(model=model, device="cpu", block_size=16).generate(prompts[:1], g)
    assert tokens(out) == [tokens(reference(model, prompts[:1], SamplingParams(temperature=0, max_new_tokens=12,
                                                                               ignore_eos=True)))[0] * 3]


def test_eos_context_limit_and_errors():
    model = tiny_model("gqa", seed=0, max_seq_len=64)
    prompt = make_prompts([10], seed=5)[0]
    free = LLM(model=model, device="cpu").generate([prompt], GREEDY)[0]
    eos = free.token_ids[6]
    first = free.token_ids.index(eos)
    out = LLM(model=model, device="cpu", eos_token_id=eos).generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=30))[0]
    assert out.token_ids == free.token_ids[:first + 1] and out.finish_reason == "stop"
    assert free.finish_reason == "length" and len(free.token_ids) == 30
    # The context: generation stops at max_seq_len.
    llm = LLM(model=model, device="cpu", block_size=8)
    out = llm.generate([make_prompts([60])[0]], GREEDY)[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="context"):
        llm.generate([make_prompts([64])[0]], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY)
    # A request that cannot fit even alone: a clear error before anything runs.
    small = LLM(model=model, device="cpu", block_size=4, num_blocks=5)
    with pytest.raises(RequestTooLarge, match="needs 10 KV blocks"):
        small.generate([prompt], SamplingParams(temperature=0, max_new_tokens=30))
    assert small.block_manager.num_used_blocks == 0
    assert small.generate([prompt], SamplingParams(temperature=0, max_new_tokens=10))[0].token_ids == \
        free.token_ids[:10]


def test_checkpoint_tokenizer_and_stop_strings(tmp_path):
    from builders import write_checkpoint

    run = write_checkpoint(tmp_path / "run", "gqa")
    llm = LLM(run, device="cpu")
    sp = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    free = llm.generate(["To be, or not"], sp)[0]
    text = free.text
    assert isinstance(text, str) and len(text) > 10
    stop = text[5:8]
    cut = text.find(stop)
    out = llm.generate(["To be, or not"], SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True,
                                                         stop=[stop, "\x00never"]))[0]
    assert out.finish_reason == "stop" and out.text == text[:cut]
    assert out.token_ids == free.token_ids[:len(out.token_ids)] and len(out.token_ids) < len(free.token_ids)
    # The checkpoint folder itself and the checkpoints/ folder load the same model.
    same = LLM(run / "checkpoints", device="cpu").generate(["To be, or not"], sp)[0]
    assert same.token_ids == free.token_ids


@pytest.mark.slow
@pytest.mark.parametrize("attention,paged_kernel", [("gqa", True), ("mla", True), ("gqa", False)],
                         ids=["gqa-cpu-kernel", "mla-cpu-kernel", "gqa-gather-path"])
def test_compiled_decode_matches_full_recompute(attention, paged_kernel):
    """compile=True (torch.compile of the decode step, about a minute of compilation): same tokens."""
    model = model_for(attention)
    prompts = make_prompts([1, 5, 17, 40], seed=6)
    ref = tokens(reference(model, prompts, GREEDY))
    llm = LLM(model=model, device="cpu", block_size=4, num_blocks=30, compile=True, paged_kernel=paged_kernel)
    assert tokens(llm.generate(prompts, GREEDY)) == ref and llm.stats.preemptions > 0


# ---- failure paths: after any exception inside generate() the engine is as before the call ---------

def _assert_clean(llm):
    bm = llm.block_manager
    assert bm.num_used_blocks == 0, f"{bm.num_used_blocks} blocks leaked"
    bm.check([])  # refcounts, free lists and prefix-cache keys consistent
    assert not llm.core.requests and not llm.core.scheduler.has_unfinished()


class Boom(Exception):
    pass


@pytest.mark.parametrize("where", ["prefill", "decode"])
@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_forward_that_raises_leaves_the_engine_clean(monkeypatch, where, error):
    """A forward raising (a bug, an out-of-memory, Ctrl-C) frees every block; later calls work."""
    model = model_for("gqa")
    # Prompts with full blocks: a prefill that fails must leave no prefix-cache key behind for the
    # blocks it never wrote (the rerun below would read their garbage through a prefix hit).
    prompts = make_prompts([17, 33, 40], seed=7)
    ref = tokens(reference(model, prompts, GREEDY))
    llm = LLM(model=model, device="cpu", block_size=16, max_num_seqs=2)  # the third prompt waits
    real_run, calls = llm.runner.run, []

    def failing_run(seqs, is_prefill):
        calls.append(is_prefill)
        if is_prefill == (where == "prefill") and len(calls) >= 2:
            raise error("injected")
        return real_run(seqs, is_prefill)

    monkeypatch.setattr(llm.runner, "run", failing_run)
    with pytest.raises(error, match="injected"):
        llm.generate(prompts, GREEDY)
    _assert_clean(llm)
    monkeypatch.setattr(llm.runner, "run", real_run)
    assert tokens(llm.generate(prompts, GREEDY)) == ref
    _assert_clean(llm)


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_on_token_that_raises_leaves_the_engine_clean(error):
    model = model_for("mla")
    prompts = make_prompts([3, 20, 35], seed=8)
    sp = SamplingParams(temperature=1.0, n=2, seed=3, max_new_tokens=12, ignore_eos=True)
    ref = tokens(reference(model, prompts, sp))
    llm = LLM(model=model, device="cpu", block_size=8)
    seen = []

    def on_token(i, j, ids):
        seen.append(i)
        if len(seen) == 10:
            raise error("callback failed")

    with pytest.raises(error, match="callback failed"):
        llm.generate(prompts, sp, on_token=on_token)
    _assert_clean(llm)
    assert tokens(llm.generate(prompts, sp)) == ref


def test_a_failed_step_fails_its_requests_only():
    """Online: a step that raises ends the requests in it with the error; the others finish intact."""
    model = model_for("gqa")
    prompts = make_prompts([6, 30, 11], seed=9)
    ref = tokens(reference(model, prompts, GREEDY))
    llm = LLM(model=model, device="cpu", block_size=8)
    core, real_run = llm.core, llm.runner.run
    first = core.add_request(prompts[0], GREEDY)
    out = {first.index: [e.token for e in core.step()]}  # its prefill
    late = core.add_request(prompts[1], GREEDY)

    def failing_prefill(seqs, is_prefill):
        if is_prefill:
            raise Boom("bad batch")
        return real_run(seqs, is_prefill)

    llm.runner.run = failing_prefill
    events = core.step()  # the late request's prefill fails
    llm.runner.run = real_run
    assert [(e.request, type(e.error)) for e in events] == [(late, Boom)] and late.finished
    last = core.add_request(prompts[2], GREEDY)
    while core.has_unfinished():
        for e in core.step():
            assert e.error is None
            out.setdefault(e.request.index, []).append(e.token)
    assert out[first.index] == ref[0][0] and out[last.index] == ref[2][0]
    _assert_clean(llm)
    # abort(): a running request's blocks are free at once.
    r = core.add_request(prompts[1], GREEDY)
    core.step()
    assert llm.block_manager.num_used_blocks > 0
    assert core.abort(r.index) and not core.abort(r.index)
    _assert_clean(llm)
