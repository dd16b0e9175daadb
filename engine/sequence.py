"""Sequence: one sample of one request, as the scheduler and the allocator see it. Plain data.

Invariants (kept by the block manager and the scheduler):
  - token_ids = prompt + generated tokens; num_prompt_tokens never changes.
  - block_table[i] holds the K/V of positions [i * block_size, (i + 1) * block_size).
  - num_computed_tokens tokens (a prefix of token_ids) have their K/V in the cache. Between steps a
    running sequence has num_computed_tokens == num_tokens - 1: only the last sampled token is new.
  - A waiting sequence owns no blocks (block_table == []) and num_computed_tokens == 0.
  - prompt_logprobs, once set, holds one entry per prompt token (None for the first, and for those before
    params.prompt_logprobs_start): it is set by the prefill forward that computed the scored positions
    (model_runner.py), and shared by forked samples.
  - token_ids only grow (appended to, never changed), so block_keys[i], the prefix-cache key of
    token_ids[:(i + 1) * block_size], stays valid once computed.
"""

import enum
from dataclasses import dataclass, field
from typing import Optional

import torch

from .sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_index: int
    sample_index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    max_tokens: int  # stop at this total length: min(prompt + max_new_tokens, model context)
    generator: Optional[torch.Generator] = None
    seed: int = 0  # the request's seed; sample i draws from make_generator(seed, i)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at the last admission
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache key of each full block so far (block_manager.py)
    forks_pending: int = 0  # samples still to fork from this one once its prompt is computed
    finish_reason: Optional[str] = None
    stop_text_len: Optional[int] = None  # where the output text is cut when a stop string ended it
    logits: Optional[list] = None  # raw logits of each generated position when params.return_logits
    prompt_logprobs: Optional[list] = None  # [None, TokenLogprobs, ...] when params.prompt_logprobs is set

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Its next prefill must compute every prompt position it scores (no prefix-cache hit there)."""
        return self.params.prompt_logprobs is not None and self.prompt_logprobs is None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]
