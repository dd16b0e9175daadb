"""The sampler's filters against hand-computed expectations, and its per-request determinism."""

import math

import pytest
import torch

from engine.sampler import Sampler, apply_repetition_penalty, filter_logits, make_generator, sample_from_probs
from engine.sampling_params import SamplingParams


pytestmark = pytest.mark.usefixtures("one_thread")

NEG = float("-inf")


def logits_of(probs):
    return torch.tensor([[math.log(p) for p in probs]])


def kept(masked):
    return (masked[0] > NEG).nonzero().flatten().tolist()


def filt(logits, top_k=0, top_p=1.0, min_p=0.0):
    B = logits.shape[0]
    return filter_logits(logits, torch.full((B,), top_k), torch.full((B,), top_p), torch.full((B,), min_p))


def test_top_k_keeps_exactly_k():
    x = torch.tensor([[0.1, 3.0, -1.0, 2.0, 2.5]])
    assert kept(filt(x, top_k=2)) == [1, 4]
    assert kept(filt(x, top_k=1)) == [1]
    assert kept(filt(x, top_k=5)) == [0, 1, 2, 3, 4]
    assert kept(filt(x, top_k=100)) == [0, 1, 2, 3, 4]
    # Ties: exactly k survive, the lower token id first.
    assert kept(filt(torch.tensor([[1.0, 2.0, 2.0, 2.0]]), top_k=2)) == [1, 2]
    # Kept logits are unchanged.
    assert filt(x, top_k=2)[0, 1].item() == 3.0


def test_top_p_keeps_the_crossing_token():
    x = logits_of([0.5, 0.3, 0.15, 0.05])
    # 0.5 < 0.6: the second token crosses 0.6 and is kept; nothing after it.
    assert kept(filt(x, top_p=0.6)) == [0, 1]
    assert kept(filt(x, top_p=0.5)) == [0]  # the first token alone reaches 0.5
    assert kept(filt(x, top_p=0.81)) == [0, 1, 2]
    assert kept(filt(x, top_p=0.96)) == [0, 1, 2, 3]
    assert kept(filt(x, top_p=0.01)) == [0]  # the top token always survives
    # Unsorted input: the same by probability.
    y = logits_of([0.15, 0.5, 0.05, 0.3])
    assert kept(filt(y, top_p=0.6)) == [1, 3]


def test_top_p_after_top_k_uses_renormalised_mass():
    x = logits_of([0.4, 0.3, 0.2, 0.1])
    # top-k 2 leaves {0.4, 0.3} -> renormalised {0.571, 0.429}: top-p 0.55 keeps only the first.
    assert kept(filt(x, top_k=2, top_p=0.55)) == [0]
    # Without top-k, 0.4 < 0.55 so the second token (crossing) is kept too.
    assert kept(filt(x, top_p=0.55)) == [0, 1]


def test_min_p():
    x = logits_of([0.5, 0.3, 0.15, 0.05])
    assert kept(filt(x, min_p=0.3)) == [0, 1, 2]  # >= 0.15
    assert kept(filt(x, min_p=0.31)) == [0, 1]
    assert kept(filt(x, min_p=1.0)) == [0]
    assert kept(filt(x, min_p=0.0)) == [0, 1, 2, 3]


def test_rows_are_filtered_independently():
    x = torch.cat([logits_of([0.5, 0.3, 0.15, 0.05]), logits_of([0.05, 0.15, 0.3, 0.5])])
    out = filter_logits(x, torch.tensor([1, 0]), torch.tensor([1.0, 0.6]), torch.tensor([0.0, 0.0]))
    assert (out[0] > NEG).nonzero().flatten().tolist() == [0]
    assert (out[1] > NEG).nonzero().flatten().tolist() == [2, 3]


def test_repetition_penalty():
    x = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0])
    out = apply_repetition_penalty(x, [0, 1, 1, 3], 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, -6.0, 1.0]
    assert apply_repetition_penalty(x, [0], 1.0) is x
    assert x.tolist() == [2.0, -1.0, 0.5, -3.0, 1.0]  # not modified in place


def test_inverse_cdf_draw():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75]] * 4)
    u = torch.tensor([0.0, 0.2499, 0.25, 0.9999999])
    assert sample_from_probs(probs, u).tolist() == [1, 1, 3, 3]
    # u * total rounding up to the total must not select a zero-probability tail token.
    probs = torch.tensor([[0.3, 0.7, 0.0, 0.0]])
    assert sample_from_probs(probs, torch.tensor([1.0])).tolist() == [1]


def tokens_of(sampler):
    """The sampler's tokens only (it also returns the logprobs each row asked for)."""
    return lambda *a, **kw: sampler(*a, **kw)[0]


def test_sampler_greedy_penalty_and_distribution():
    s = tokens_of(Sampler())
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 4.9]])
    greedy = SamplingParams(temperature=0)
    assert s(logits, [greedy, greedy], [None, None], [[], []]) == [1, 0]
    # The penalty turns the argmax: 5.0 / 2 = 2.5 < 4.9.
    pen = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert s(logits, [greedy, pen], [None, None], [[], [0]]) == [1, 2]
    # A precomputed argmax (the compiled decode step's) is used as is, unless a penalty changes the logits;
    # sampled rows still draw.
    given = torch.tensor([2, 2])
    assert s(logits, [greedy, greedy], [None, None], [[], []], argmax=given.clone()) == [2, 2]
    assert s(logits, [greedy, pen], [None, None], [[], [0]], argmax=given.clone()) == [1, 2]
    hot = SamplingParams(temperature=1.0, top_k=1)
    assert s(logits, [greedy, hot], [None, make_generator(0)], [[], []], argmax=given.clone()) == [2, 0]
    # Sampling follows the filtered distribution: top_k=2 over softmax([1, 3, 2]) never picks token 0.
    p = SamplingParams(temperature=1.0, top_k=2)
    gen = make_generator(0)
    draws = [s(logits[:1], [p], [gen], [[]])[0] for _ in range(4000)]
    assert 0 not in draws
    frac = draws.count(1) / len(draws)
    expected = math.exp(3) / (math.exp(3) + math.exp(2))
    assert abs(frac - expected) < 0.03


def test_seeded_rows_do_not_depend_on_the_batch():
    s = tokens_of(Sampler())
    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    p = SamplingParams(temperature=0.8, top_p=0.9, min_p=0.01)
    alone = s(logits[2:3], [p], [make_generator(42)], [[]])
    gens = [make_generator(i) for i in range(5)]
    gens[2] = make_generator(42)
    mixed = s(logits, [p, SamplingParams(temperature=0), p, p, SamplingParams(temperature=2.0, top_k=3)],
              gens, [[]] * 5)
    assert mixed[2] == alone[0]
    # Different sample indices of one seed draw different streams.
    a = torch.rand(4, generator=make_generator(7, 0))
    b = torch.rand(4, generator=make_generator(7, 1))
    assert not torch.equal(a, b)


def test_logprobs_of_sampled_and_top_tokens_match_float64():
    torch.manual_seed(1)
    logits = torch.randn(3, 40) * 4
    asks = [SamplingParams(temperature=0.7, seed=1, repetition_penalty=1.5, logprobs=5),
            SamplingParams(temperature=0),
            SamplingParams(temperature=0, logprobs=0)]
    tokens, lps = Sampler()(logits, asks, [make_generator(1), None, None], [[0, 1, 2], [], []])
    assert lps[1] is None and lps[2].top == []
    for r in (0, 2):
        ref = [math.log(math.exp(x) / sum(math.exp(y) for y in logits[r].double().tolist()))
               for x in logits[r].double().tolist()]  # raw distribution: no penalty, no temperature
        assert abs(lps[r].logprob - ref[tokens[r]]) < 1e-5
        best = sorted(range(40), key=lambda t: -ref[t])[:asks[r].logprobs]
        assert [t for t, _ in lps[r].top] == best
        assert all(abs(v - ref[t]) < 1e-5 for t, v in lps[r].top)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2),
                                 dict(top_k=-2), dict(repetition_penalty=0), dict(max_new_tokens=0), dict(n=0),
                                 dict(stop=[""]), dict(logprobs=-1), dict(logprobs=21)])
def test_invalid_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
