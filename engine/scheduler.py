"""The scheduler: waiting and running queues, admission by free blocks, preemption by recompute.

Each step is either a prefill step or a decode step (prefill first, as in nano-vllm):
  - prefill: admit waiting sequences, oldest first, while their blocks fit, up to max_num_seqs running
    and max_num_batched_tokens new tokens (the first one is admitted whatever its length);
  - decode: every running sequence gets one new token. If the blocks for that token cannot be found,
    the most recently admitted running sequence is preempted: its blocks are freed and it goes back
    to the front of the waiting queue, to be recomputed by a later prefill (its tokens so far become
    its prompt for the cache; its output and RNG state are kept, so the result does not change).
    Nothing else is harmed: the victim only loses work.
A sequence that still needs its prompt log-probabilities takes prefix-cache hits only before the
first position it scores (SamplingParams.prompt_logprobs_start).

Retiring (EOS unless ignore_eos, a stop token or string, max_new_tokens or the model's context) frees blocks;
so does remove() + BlockManager.free() for a request that is aborted or fails (engine/core.py).
A request that could not fit even alone in the whole cache is refused when added (RequestTooLarge).
"""

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from .block_manager import BlockManager
from .sequence import Sequence, Status


class RequestTooLarge(ValueError):
    """A request needs more KV blocks than the whole cache has."""


@dataclass
class Batch:
    seqs: list[Sequence]
    is_prefill: bool
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) blocks


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 eos_token_id: Optional[int], stop_checker: Optional[Callable[[Sequence], Optional[int]]] = None):
        self.bm = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.eos_token_id = eos_token_id
        self.stop_checker = stop_checker  # seq -> cut position in its output text if a stop string ended it
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        need = self.bm.blocks_for(seq.max_tokens)
        if need > self.bm.num_blocks:
            raise RequestTooLarge(
                f"a request needs {need} KV blocks ({seq.max_tokens} tokens at block size {self.bm.block_size}) "
                f"but the cache has only {self.bm.num_blocks}: raise num_blocks or lower max_new_tokens")
        self.waiting.append(seq)

    def remove(self, seqs: list[Sequence]) -> None:
        """Take seqs out of the queues (an aborted or failed request); the caller frees their blocks."""
        gone = set(seqs)
        self.waiting = deque(s for s in self.waiting if s not in gone)
        self.running = deque(s for s in self.running if s not in gone)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        # Prefill: admit what fits.
        admitted, num_tokens = [], 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.bm.match_prefix(seq)
            if seq.needs_prompt_logprobs:  # prompt log-probs need the logits of the positions scored: no hit there
                hits = hits[:(seq.params.prompt_logprobs_start - 1) // self.bm.block_size]
            new_tokens = seq.num_tokens - len(hits) * self.bm.block_size
            if admitted and num_tokens + new_tokens > self.max_num_batched_tokens:
                break
            if not self.bm.can_allocate(seq, hits):
                break
            self.waiting.popleft()
            self.bm.allocate(seq, hits)
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            num_tokens += max(new_tokens, 1)
        if admitted:
            return Batch(admitted, True)
        # Decode: one token for every running sequence, preempting from the back when blocks run out.
        batch, copies = [], []
        while self.running:
            seq = self.running.popleft()
            while not self.bm.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                cow = self.bm.append_slot(seq)
                if cow is not None:
                    copies.append(cow)
                batch.append(seq)
        self.running.extend(batch)
        if not batch and self.waiting:
            raise RuntimeError("scheduler stalled: nothing can run (this is a bug)")
        return Batch(batch, False, copies)

    def preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, seqs: list[Sequence], tokens: list[int]) -> None:
        """Record the step's computed K/V and sampled tokens; retire and free finished sequences."""
        finished = []
        for seq, tok in zip(seqs, tokens):
            self.bm.mark_computed(seq, seq.num_tokens)
            seq.token_ids.append(tok)
            if check_finished(seq, tok, self.eos_token_id, self.stop_checker):
                finished.append(seq)
        for seq in finished:
            seq.status = Status.FINISHED
            self.bm.free(seq)
        if finished:
            self.running = deque(s for s in self.running if s.status is Status.RUNNING)


def check_finished(seq: Sequence, tok: int, eos_token_id: Optional[int],
                   stop_checker: Optional[Callable[[Sequence], Optional[int]]]) -> bool:
    """Set seq.finish_reason if tok ends it: 'stop' (EOS, a stop token or a stop string) or 'length'."""
    if (tok == eos_token_id and not seq.params.ignore_eos) or tok in seq.params.stop_token_ids:
        seq.finish_reason = "stop"
    elif seq.params.stop and stop_checker is not None and (cut := stop_checker(seq)) is not None:
        seq.finish_reason, seq.stop_text_len = "stop", cut
    elif seq.num_tokens >= seq.max_tokens:
        seq.finish_reason = "length"
    return seq.finish_reason is not None
