"""Prompt log-probabilities (SamplingParams.prompt_logprobs; echo + logprobs in serve.py).

The reference is independent of the engine: the plain training forward of a float64 copy of the model
over the whole prompt, then log_softmax. Position i's distribution scores prompt token i + 1; the first
prompt token has no entry (None, as in vLLM; null in OpenAI's legacy format)."""

import copy
import random

import pytest
import torch

from builders import tiny_model, write_checkpoint
from engine import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3  # alternatives asked for


@torch.no_grad()
def reference(model64, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab] float64 log-probs: row i is the distribution over prompt token i + 1."""
    return model64(torch.tensor([prompt]))[0][0, :-1].log_softmax(-1)


def assert_matches(prompt_logprobs, prompt: list[int], ref: torch.Tensor, k: int = K, start: int = 1):
    """Entries from index `start` on match the reference; those before are None."""
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[:start] == [None] * min(start, len(prompt))
    for i, (tok, got) in enumerate(zip(prompt[start:], prompt_logprobs[start:]), start - 1):
        assert abs(got.logprob - ref[i, tok].item()) < 1e-4, (i, got.logprob, ref[i, tok].item())
        want = ref[i].topk(k).values.tolist()
        assert len(got.top) == k
        for (t, v), w in zip(got.top, want):
            assert abs(v - w) < 1e-4 and abs(v - ref[i, t].item()) < 1e-4  # the k most likely, with their values


def prompts_of(lengths, seed=0, vocab=300):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_prompt_logprobs_match_the_float64_forward(attention):
    model = tiny_model(attention, seed=0)
    model64 = copy.deepcopy(model).double()
    prompts = prompts_of([1, 7, 16, 33, 40])
    sp = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True, prompt_logprobs=K)
    plain = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)
    llm = LLM(model=model, device="cpu", block_size=16)
    # Batched with requests of other lengths that do not ask for them (one prefill step for all).
    others = prompts_of([5, 23], seed=1)
    outs = llm.generate(prompts + others, [sp] * len(prompts) + [plain] * len(others))
    for p, o in zip(prompts, outs):
        assert_matches(o.prompt_logprobs, p, reference(model64, p))
    assert all(o.prompt_logprobs is None for o in outs[len(prompts):])
    # The prompts' blocks are cached now: asked again, they still compute every position (no hit)...
    outs2 = llm.generate(prompts, sp)
    assert llm.stats.prefix_hit_tokens == 0
    for p, o, o1 in zip(prompts, outs2, outs):
        assert_matches(o.prompt_logprobs, p, reference(model64, p))
        assert o.token_ids == o1.token_ids
    # ...while a request without prompt log-probs takes the hits their blocks give.
    llm.generate(prompts, plain)
    assert llm.stats.prefix_hit_tokens == 16 + 32 + 32
    # n > 1: every sample reports the prompt once; the full-recompute reference path agrees.
    sampled = SamplingParams(temperature=1.0, seed=5, n=3, max_new_tokens=6, ignore_eos=True, prompt_logprobs=K)
    got = llm.generate(prompts[2:4], sampled)
    ref = LLM(model=model, device="cpu", use_cache=False).generate(prompts[2:4], sampled)
    for p, o, r in zip(prompts[2:4], got, ref):
        assert_matches(o.prompt_logprobs, p, reference(model64, p))
        assert_matches(r.prompt_logprobs, p, reference(model64, p))
        assert [s.token_ids for s in o.outputs] == [s.token_ids for s in r.outputs]
    assert llm.stats.blocks_used_end == 0


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_prompt_logprobs_from_a_start_take_prefix_hits_before_it(attention):
    """Continuations of one context scored after it (eval.py's loglikelihood): with prompt_logprobs_start at
    the first continuation token, the context's full blocks before that position come from the prefix
    cache, and the scored entries still match the reference; the full-recompute path agrees."""
    model = tiny_model(attention, seed=0)
    model64 = copy.deepcopy(model).double()
    context = prompts_of([40], seed=3)[0]
    prompts = [context + c for c in prompts_of([3, 5, 1, 2], seed=4)]
    sp = SamplingParams(temperature=0, max_new_tokens=1, prompt_logprobs=K, prompt_logprobs_start=len(context))
    llm = LLM(model=model, device="cpu", block_size=16)
    first = llm.generate(prompts[:1], sp)[0]
    assert llm.stats.prefix_hit_tokens == 0
    outs = llm.generate(prompts[1:], sp)
    assert llm.stats.prefix_hit_tokens == 3 * 32  # positions 0-31; position 39 (scores token 40) is in block 2
    ref_llm = LLM(model=model, device="cpu", use_cache=False)
    for p, o, r in zip(prompts, [first, *outs], ref_llm.generate(prompts, sp)):
        assert_matches(o.prompt_logprobs, p, reference(model64, p), start=len(context))
        assert_matches(r.prompt_logprobs, p, reference(model64, p), start=len(context))
    # A start at or past the end scores nothing: every entry is None, and the whole prompt may be a hit.
    beyond = SamplingParams(temperature=0, max_new_tokens=1, prompt_logprobs=0, prompt_logprobs_start=100)
    assert llm.generate([context[:32]], beyond)[0].prompt_logprobs == [None] * 32
    assert llm.stats.blocks_used_end == 0


def test_preempted_request_keeps_its_prompt_logprobs():
    """With too few blocks, running sequences are preempted and recomputed by a later prefill (which may
    take prefix hits then): the prompt log-probs of the first prefill stand, the tokens do not change."""
    model = tiny_model("gqa", seed=0)
    model64 = copy.deepcopy(model).double()
    prompts = prompts_of([20, 30, 25], seed=2)
    sp = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True, prompt_logprobs=0)
    llm = LLM(model=model, device="cpu", block_size=8, num_blocks=14)
    outs = llm.generate(prompts, sp)
    assert llm.stats.preemptions > 0
    assert llm.stats.prefix_hit_tokens > 0  # a re-admitted sequence has its log-probs: it takes hits again
    ref = LLM(model=model, device="cpu", use_cache=False).generate(prompts, sp)
    for p, o, r in zip(prompts, outs, ref):
        assert_matches(o.prompt_logprobs, p, reference(model64, p), k=0)
        assert o.token_ids == r.token_ids


def test_bad_prompt_logprobs_are_one_line_errors():
    for bad in (-1, 21, 1.5):
        with pytest.raises(ValueError, match="prompt_logprobs must be between 0 and 20"):
            SamplingParams(prompt_logprobs=bad)
    for bad in (0, -3, 2.0):
        with pytest.raises(ValueError, match="prompt_logprobs_start must be an integer >= 1"):
            SamplingParams(prompt_logprobs=0, prompt_logprobs_start=bad)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from checkpoint import load_model
    from test_serve import InProcess

    run = write_checkpoint(tmp_path_factory.mktemp("plp") / "run", "gqa")
    s = InProcess(run, max_num_seqs=8)
    model, tokenizer, _ = load_model(run, torch.device("cpu"), torch.float32)
    yield s, model.double(), tokenizer
    s.stop()


def test_echo_logprobs_over_http_as_lm_eval_harness_asks(served):
    """lm-evaluation-harness's local-completions request for loglikelihood tasks, through the openai
    client: token-id prompts, echo, logprobs 1, max_tokens 1, temperature 0. It reads token_logprobs
    and top_logprobs over [ctxlen:-1]."""
    from openai import OpenAI

    s, model64, tok = served
    c = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    context, continuation = tok.encode("To be, or not").ids, tok.encode(" to be").ids
    prompts = [context + continuation, tok.encode("Once upon a time").ids]
    r = c.completions.create(model="run", prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0,
                             seed=1234)
    for ids, ch in zip(prompts, sorted(r.choices, key=lambda ch: ch.index)):
        lp, ref = ch.logprobs, reference(model64, ids)
        assert len(lp.tokens) == len(ids) + 1 and lp.tokens[:len(ids)] == [tok.decode([t]) for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for i, t in enumerate(ids[1:]):
            assert abs(lp.token_logprobs[i + 1] - ref[i, t].item()) < 1e-4
            assert len(lp.top_logprobs[i + 1]) == 1
            assert abs(max(lp.top_logprobs[i + 1].values()) - ref[i].max().item()) < 1e-4
        assert lp.text_offset == [len("".join(lp.tokens[:j])) for j in range(len(lp.tokens))]
        assert ch.text == "".join(lp.tokens)
    # The harness's sum over the continuation, and its greedy test (the token is the top alternative).
    lp, ctxlen = r.choices[0].logprobs, len(context)
    ref = reference(model64, prompts[0])
    want = sum(ref[ctxlen - 1 + j, t].item() for j, t in enumerate(continuation))
    assert abs(sum(lp.token_logprobs[ctxlen:-1]) - want) < 1e-4
    greedy = all(ref[ctxlen - 1 + j].argmax().item() == t for j, t in enumerate(continuation))
    assert greedy == all(v == max(top.values()) for v, top in zip(lp.token_logprobs[ctxlen:-1],
                                                                  lp.top_logprobs[ctxlen:-1]))


def test_echo_logprobs_streamed_score_only_and_n(served):
    from openai import OpenAI

    s, model64, tok = served
    c = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    text = "ROMEO: But soft"
    ids = tok.encode(text).ids
    whole = c.completions.create(model="run", prompt=text, echo=True, logprobs=2, max_tokens=3, temperature=0,
                                 extra_body={"ignore_eos": True})
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 3 and whole.choices[0].text.startswith(text)
    ref = reference(model64, ids)
    assert [round(v, 4) for v in lp.token_logprobs[1:len(ids)]] == [round(ref[i, t].item(), 4)
                                                                   for i, t in enumerate(ids[1:])]
    # Streamed: the chunks carry the same entries, the prompt's with the first one.
    tokens, logprobs, offsets, texts = [], [], [], ""
    for chunk in c.completions.create(model="run", prompt=text, echo=True, logprobs=2, max_tokens=3,
                                      temperature=0, stream=True, extra_body={"ignore_eos": True}):
        for ch in chunk.choices:
            texts += ch.text
            tokens += ch.logprobs.tokens
            logprobs += ch.logprobs.token_logprobs
            offsets += ch.logprobs.text_offset
    assert (tokens, logprobs, offsets, texts) == (lp.tokens, lp.token_logprobs, lp.text_offset,
                                                  whole.choices[0].text)
    # max_tokens 0 with echo: the prompt scored, nothing generated.
    r = c.completions.create(model="run", prompt=text, echo=True, logprobs=0, max_tokens=0)
    assert r.choices[0].text == text and r.usage.completion_tokens == 0 and r.choices[0].finish_reason == "length"
    assert r.choices[0].logprobs.token_logprobs == lp.token_logprobs[:len(ids)]
    assert r.choices[0].logprobs.top_logprobs[1:] == [{} for _ in ids[1:]]
    # n samples of one prompt: each choice has the prompt's entries.
    r = c.completions.create(model="run", prompt=text, echo=True, logprobs=2, max_tokens=2, n=2, seed=3)
    for ch in r.choices:
        assert ch.logprobs.token_logprobs[:len(ids)] == lp.token_logprobs[:len(ids)]
        assert ch.logprobs.top_logprobs[:len(ids)] == lp.top_logprobs[:len(ids)]
    assert s.metrics()["smallllm_kv_blocks_used"] == 0
