"""The sampler: logits [B, vocab] -> one token per row, each row under its own SamplingParams.

Order: repetition penalty, then (for rows with temperature > 0) temperature, top-k, top-p, min-p, and
a draw. Temperature 0 is greedy: argmax of the (penalised) logits.

Rows whose SamplingParams ask for logprobs also get the log-probability of the sampled token and the
top alternatives at that position (log-softmax of the raw logits, before penalty, temperature and
filters). Prompt log-probs (prompt_token_logprobs) are the same numbers at every prompt position.

Each sequence draws from its own torch.Generator (seeded from the request's seed), one uniform number
per sampled token, and picks the token by inverse CDF: a row's token depends only on its logits and
its generator, never on which other sequences share the batch.
"""

import hashlib
from typing import NamedTuple, Optional, Sequence as Seq

import torch

from .sampling_params import SamplingParams

SEED_STRIDE = 0x9E3779B97F4A7C15  # mixes the sample index into the seed (golden-ratio increment)


def request_seed(seed: int, request_index: int) -> int:
    """Request r of a run seeded with `seed` (generate.py): a 63-bit mix, so nearby seeds and nearby
    requests do not share streams (seed + r would give run 0's request 1 the stream of run 1's request 0)."""
    digest = hashlib.blake2b(f"{seed}:{request_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def make_generator(seed: int, sample_index: int = 0) -> torch.Generator:
    """Sample i of a request draws from a generator seeded by (seed, i)."""
    return torch.Generator().manual_seed((seed + sample_index * SEED_STRIDE) % (2 ** 63))


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float) -> torch.Tensor:
    """One row [V]: tokens already seen get logit / penalty if positive, logit * penalty if not."""
    if penalty == 1.0 or not token_ids:
        return logits
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=logits.device)
    seen = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Mask filtered-out logits with -inf. logits [B, V] (already divided by the temperature);
    top_k [B] int (0 = off), top_p [B] float (1 = off), min_p [B] float (0 = off).

    top-k keeps exactly k tokens (ties broken by the lower token id). top-p then keeps, among those,
    the most likely tokens until their (renormalised) mass reaches top_p, including the token that
    crosses it. min-p keeps tokens with probability >= min_p * the top probability. The most likely
    token always survives."""
    B, V = logits.shape
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    rank = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    remove = rank[None, :] >= k[:, None]  # in sorted order
    if bool((top_p < 1).any()):
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        remove |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
    if bool((min_p > 0).any()):
        probs = sorted_logits.softmax(-1)
        remove |= probs < min_p[:, None] * probs[:, :1]
    remove[:, 0] = False
    mask = torch.zeros_like(remove).scatter_(1, order, remove)
    return logits.masked_fill(mask, float("-inf"))


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs [B, V] (rows need not sum to 1), uniforms [B] in [0, 1) -> [B] ids.
    Only tokens with positive probability can be drawn."""
    cdf = probs.cumsum(-1)
    x = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    idx = torch.searchsorted(cdf, x, right=True).squeeze(1)
    # u * total may round up to total: fall back to the last token with positive probability.
    last_pos = probs.shape[1] - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(-1)
    return torch.minimum(idx, last_pos)


class TokenLogprobs(NamedTuple):
    logprob: float  # of the sampled token
    top: list[tuple[int, float]]  # the most likely tokens at this position, most likely first


def token_logprobs(logits: torch.Tensor, tokens: list[int], num_top: list[int]) -> list[TokenLogprobs]:
    """logits [B, V] (raw); one sampled token and one number of alternatives per row."""
    lp = logits.float().log_softmax(-1)
    k = max(num_top)
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    picked = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    top_v, top_i = top_v.tolist(), top_i.tolist()
    return [TokenLogprobs(picked[r], list(zip(top_i[r][:n], top_v[r][:n]))) for r, n in enumerate(num_top)]


def prompt_token_logprobs(logits: torch.Tensor, prompt: list[int], num_top: int,
                          first: int = 1) -> list[Optional[TokenLogprobs]]:
    """Prompt log-probs of the tokens from index `first` on: logits [len(prompt) - first, V] (raw) of
    positions first - 1..len(prompt) - 2, each predicting the next prompt token. The tokens before
    `first` get None: the first token has no context (as in vLLM), the others were not asked for."""
    scored = prompt[first:]
    return [None] * (len(prompt) - len(scored)) + (token_logprobs(logits, scored, [num_top] * len(scored))
                                                   if scored else [])


class Sampler:
    def __call__(self, logits: torch.Tensor, params: Seq[SamplingParams],
                 generators: Seq[Optional[torch.Generator]], histories: Seq[list[int]],
                 argmax: Optional[torch.Tensor] = None) -> tuple[list[int], list[Optional[TokenLogprobs]]]:
        """logits [B, V] float32; one SamplingParams, generator and token history (prompt + output) per row.
        argmax: logits.argmax(-1) when the caller already has it (the compiled decode step computes it).
        Returns the tokens, and for each row its TokenLogprobs (None unless its params ask for logprobs)."""
        raw = logits
        rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if rows:
            logits = logits.clone()
            for i in rows:
                logits[i] = apply_repetition_penalty(logits[i], histories[i], params[i].repetition_penalty)
        tokens = argmax if argmax is not None and not rows else logits.argmax(-1)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            tokens = self._draw(logits, tokens, params, generators, sampled)
        tokens = tokens.tolist()
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        found = token_logprobs(raw[want], [tokens[i] for i in want], [params[i].logprobs for i in want]) if want else []
        logprobs = dict(zip(want, found))
        return tokens, [logprobs.get(i) for i in range(len(params))]

    @torch.inference_mode()
    def _draw(self, logits: torch.Tensor, tokens: torch.Tensor, params: Seq[SamplingParams],
              generators: Seq[Optional[torch.Generator]], sampled: list[int]) -> torch.Tensor:
        """tokens with the rows in `sampled` (temperature > 0) drawn. Only this part runs in inference
        mode (it writes into `tokens`, which may be an inference tensor): the greedy path skips the
        decorator, a few Python frames that cost ~25 us per decode step on CPU (measured in the engine at
        batch 1, where the whole step is ~0.8 ms)."""
        dev = logits.device
        sub = logits[sampled] if len(sampled) < len(params) else logits
        ps = [params[i] for i in sampled]
        temp = torch.tensor([p.temperature for p in ps], device=dev)
        top_k = torch.tensor([p.top_k for p in ps], device=dev)
        top_p = torch.tensor([p.top_p for p in ps], device=dev)
        min_p = torch.tensor([p.min_p for p in ps], device=dev)
        x = sub / temp[:, None]
        if any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in ps):
            x = filter_logits(x, top_k, top_p, min_p)
        probs = x.softmax(-1)
        u = torch.cat([torch.rand(1, generator=generators[i]) for i in sampled]).to(dev)
        drawn = sample_from_probs(probs, u)
        if len(sampled) == len(params):
            return drawn
        tokens[torch.tensor(sampled, device=dev)] = drawn
        return tokens
