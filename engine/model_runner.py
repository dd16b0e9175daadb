"""The model runner: turns a scheduled batch into one forward over the paged cache, returns logits.

`step_inputs` packs the batch (kv_cache.StepInputs): prefill packs the new tokens of every sequence
into one row ([1, T], positions [1, T]); a sequence whose prompt starts with cached blocks only
computes the rest (at least its last token, so a 100% prefix hit still yields logits). Decode packs
one token per sequence. `run` then follows the cache's protocol (kv_cache.py): begin(step), the
forward (each layer calls cache.attend), and for decode steps that hold the new K/V back, commit.
Only the last token of each sequence goes through the LM head, except in the prefill of a sequence
that asks for prompt log-probabilities (SamplingParams.prompt_logprobs): there every prompt position it
scores does, one sequence at a time, and the runner stores the result on the sequence (seq.prompt_logprobs).

Prefill runs the PyTorch forward here, eagerly; decode steps go to the runner's one decode path
(decode.py: the device's fast path where it supports the model, else the PyTorch forward).
"""

from typing import Optional

import torch

from model import Transformer

from .cpu_speed import column_major_copy
from .decode import TorchDecode, fast_path
from .kv_cache import PagedKVCache, StepInputs
from .sampler import prompt_token_logprobs
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedKVCache, compile: bool = False, column_major: bool = False,
                 cpp_decode: bool = False):
        """cpp_decode=True decodes through the device's fast path where it applies (decode.fast_path; not
        with compile), which on CPU packs its own copy of the fp32 weights. column_major=True runs
        everything else (prefill; the PyTorch decode step) with a copy of the model whose linear weights
        are stored column-major (cpu_speed.py: faster small-batch GEMMs on CPU, e.g. a 32-token prompt;
        the model passed in is unchanged)."""
        fast = fast_path(model, cache) if cpp_decode and not compile else None
        self.model = column_major_copy(model) if column_major else model
        self.decode = fast or TorchDecode(self.model, cache, compile)  # the one decode path of this runner
        self.cache = cache

    def step_inputs(self, seqs: list[Sequence], is_prefill: bool) -> StepInputs:
        """The step's inputs: for each sequence the tokens from its first uncomputed one (at most its
        last: a decode step, or a prompt fully served by the prefix cache, recomputes that one token)."""
        bs = self.cache.block_size
        ids, positions, slots, tables, context_lens, query_lens = [], [], [], [], [], []
        for seq in seqs:  # plain appends to local lists: this runs every decode step
            n, done, table = seq.num_tokens, seq.num_computed_tokens, seq.block_table
            start = min(done, n - 1)
            ids += seq.token_ids[start:]
            positions += range(start, n)
            for p in range(start, n):  # a token already in a cached block is recomputed, not rewritten
                slots.append(-1 if p < done else table[p // bs] * bs + p % bs)
            tables.append(table)
            context_lens.append(n)
            query_lens.append(n - start)
        return StepInputs(is_prefill, ids, positions, slots, tables, context_lens, query_lens)

    def run(self, seqs: list[Sequence], is_prefill: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits [len(seqs), vocab] (float32) for the next token of each sequence, and their argmax
        when the step computed it (the C++ step and the compiled one do), else None."""
        step = self.step_inputs(seqs, is_prefill)
        if not is_prefill:
            return self.decode(step)
        return self._prefill_logits(seqs, step), None

    @torch.inference_mode()
    def _prefill_logits(self, seqs: list[Sequence], step: StepInputs) -> torch.Tensor:
        """Logits of each sequence's last token. A sequence that needs its prompt log-probs (admitted
        without prefix hits over the positions it scores, so its query holds them) gets them here from the
        logits of those positions, one sequence at a time: only one [scored, vocab] tensor lives at once."""
        idx, pos = self.cache.begin(step)
        h = self.model.hidden_states(idx, pos, self.cache)[0]  # [T, dim]
        start = 0
        for seq, n in zip(seqs, step.query_lens):
            if seq.needs_prompt_logprobs:
                p, first = seq.num_prompt_tokens, seq.params.prompt_logprobs_start
                lo = start - (seq.num_tokens - n)  # row of position 0 (rows before start hold other sequences)
                logits = self.model.lm_head(h[lo + first - 1:lo + p - 1]).float()
                seq.prompt_logprobs = prompt_token_logprobs(logits, seq.token_ids[:p], seq.params.prompt_logprobs,
                                                            first)
            start += n
        last = torch.tensor(step.query_lens, device=self.cache.device).cumsum(0) - 1  # each sequence's last token
        return self.model.lm_head(h.index_select(0, last)).float()
