"""EngineCore: the online engine. Requests join at any time; each step() advances all of them at once.

    core = EngineCore(runner, cache, block_manager, eos_token_id=..., tokenizer=...)
    req = core.add_request(prompt_ids, SamplingParams(...))   # joins the batch at the next step
    while core.has_unfinished():
        for ev in core.step():                                  # one forward for every scheduled sequence
            ...  # ev.request, ev.seq, ev.token, ev.logprobs, ev.finished, ev.error
    core.abort(req.index)                                       # frees the request's blocks at once

One scheduler lives as long as the core: the offline LLM.generate (llm.py) and the server's engine
thread (serve.py) both feed this loop. Nothing here is thread-safe: one thread owns the core.

Invariants between steps (the tests check them after failures):
  - every sequence of an unfinished request is in exactly one of scheduler.waiting / running, or is a
    finished sample; finished, aborted and failed requests are gone from `requests`;
  - only running sequences hold blocks: after the last request ends, every block is free.
A step that raises an Exception (the forward, the sampler, a stop check) fails the requests of that
step: their blocks are freed, each gets one event carrying the error, and the other requests go on.
A KeyboardInterrupt is not caught here: whoever owns the requests aborts them (LLM.generate does).
"""

import time
from dataclasses import asdict, dataclass, replace
from itertools import count
from typing import Optional

import torch

from .block_manager import BlockManager
from .sampler import Sampler, TokenLogprobs, make_generator
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence, Status
from .text import find_stop
from .threads import ThreadGovernor


def check_prompt(ids: list[int], max_seq_len: int, vocab_size: int, index: int = 0) -> None:
    """The one prompt check (LLM.generate, generate.py and serve.py use it): ValueError naming the fix."""
    if not ids:
        raise ValueError(f"prompt {index} is empty")
    if len(ids) >= max_seq_len:
        raise ValueError(f"prompt {index} has {len(ids)} tokens but the model's context is {max_seq_len} tokens "
                         f"(a prompt may have at most {max_seq_len - 1})")
    if any(t < 0 or t >= vocab_size for t in ids):
        raise ValueError(f"prompt {index} has token ids outside the vocabulary [0, {vocab_size})")


def stop_checker(tokenizer):
    """seq -> where its output text is cut if one of its stop strings now appears in it, else None."""
    if tokenizer is None:
        return None

    def cut(seq: Sequence) -> Optional[int]:
        stops, out = seq.params.stop, seq.output_token_ids
        # A token is at least one byte and a character at most 4: the last 4 * len + 4 tokens hold
        # any stop string the newest token could have completed (decoding them all every step would not).
        if find_stop(tokenizer.decode(out[-(4 * max(map(len, stops)) + 4):]), stops) is None:
            return None
        return find_stop(tokenizer.decode(out), stops)
    return cut


@dataclass(eq=False)
class Request:
    index: int  # the core's id for it (abort(index))
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]  # sample 0 first; the others fork from it once the prompt is computed
    num_finished: int = 0  # samples done
    error: Optional[BaseException] = None

    @property
    def finished(self) -> bool:
        return self.error is not None or self.num_finished == self.params.n


def new_request(index: int, prompt_ids: list[int], params: SamplingParams, max_seq_len: int,
                seq_ids: count) -> Request:
    """A request with its first sample; seeded by params.seed, else by a seed drawn from torch's RNG."""
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
    seq = Sequence(next(seq_ids), index, 0, list(prompt_ids), len(prompt_ids), params,
                   min(len(prompt_ids) + params.max_new_tokens, max_seq_len), generator=make_generator(seed, 0),
                   seed=seed, forks_pending=params.n - 1, logits=[] if params.return_logits else None)
    return Request(index, list(prompt_ids), params, [seq])


def fork_samples(parent: Sequence, seq_ids: count) -> list[Sequence]:
    """Samples 1..n-1 of parent's request: same tokens so far, each its own generator (seed, j)."""
    children = [Sequence(next(seq_ids), parent.request_index, j, list(parent.token_ids), parent.num_prompt_tokens,
                         parent.params, parent.max_tokens, generator=make_generator(parent.seed, j), seed=parent.seed,
                         status=Status.RUNNING, prompt_logprobs=parent.prompt_logprobs,
                         logits=[] if parent.params.return_logits else None)
                for j in range(1, parent.forks_pending + 1)]
    parent.forks_pending = 0
    return children


@dataclass
class Event:
    """One step's news for one sample (seq), or a request-wide error (seq None, finished True)."""
    request: Request
    seq: Optional[Sequence]
    token: Optional[int] = None
    logprobs: Optional[TokenLogprobs] = None
    finished: bool = False  # this sample is done (its finish_reason is set)
    error: Optional[BaseException] = None


@dataclass
class GenerationStats:
    """Engine figures. The core keeps running totals; LLM.generate reports one call's (since())."""
    prefill_tokens: int = 0  # tokens computed by prefill steps (prefix-cache hits excluded)
    prefill_time: float = 0.0
    decode_tokens: int = 0  # tokens generated by decode steps
    decode_time: float = 0.0
    steps: int = 0
    decode_steps: int = 0  # decode_tokens / decode_steps = sequences sharing a decode step, on average
    num_blocks: int = 0
    block_size: int = 0
    blocks_used_peak: int = 0
    blocks_used_end: int = 0  # held by unfinished sequences at the end (0 once everything finished)
    kv_bytes_per_token: int = 0  # all layers, in the cache's dtype (kv_dtype)
    kv_bytes_per_token_full_kv: int = 0  # what caching full per-head K and V would cost (MLA comparison)
    kv_dtype: str = ""
    kv_cache_bytes: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    preemptions: int = 0
    cow_copies: int = 0
    live_token_steps: int = 0  # sum over sampled steps (every 4th) of tokens held in the cache by running sequences
    allocated_slot_steps: int = 0  # sum over the same steps of the slots of the blocks they hold

    COUNTERS = ("prefill_tokens", "prefill_time", "decode_tokens", "decode_time", "steps", "decode_steps",
                "prefix_query_tokens", "prefix_hit_tokens", "preemptions", "cow_copies", "live_token_steps",
                "allocated_slot_steps")

    def since(self, before: "GenerationStats") -> "GenerationStats":
        """These figures minus the running totals of `before` (the rest as they are now)."""
        return replace(self, **{k: getattr(self, k) - getattr(before, k) for k in self.COUNTERS})

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_time if self.prefill_time else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_time if self.decode_time else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    @property
    def kv_memory_utilization(self) -> float:
        """KV memory held by live tokens over memory allocated to them (1 - internal fragmentation)."""
        return self.live_token_steps / self.allocated_slot_steps if self.allocated_slot_steps else 1.0

    def to_dict(self) -> dict:
        return dict(asdict(self), prefill_tokens_per_s=round(self.prefill_tokens_per_s, 2),
                    decode_tokens_per_s=round(self.decode_tokens_per_s, 2),
                    prefix_hit_rate=round(self.prefix_hit_rate, 4),
                    kv_memory_utilization=round(self.kv_memory_utilization, 4),
                    internal_fragmentation=round(1 - self.kv_memory_utilization, 4),
                    prefill_time=round(self.prefill_time, 4), decode_time=round(self.decode_time, 4))


class EngineCore:
    def __init__(self, runner, cache, block_manager: BlockManager, *, max_seq_len: int, vocab_size: int,
                 max_num_seqs: int, max_num_batched_tokens: int, eos_token_id: Optional[int], tokenizer=None,
                 stats: Optional[GenerationStats] = None, adaptive_threads: bool = False):
        self.runner, self.cache, self.bm = runner, cache, block_manager
        # On CPU: fewer torch threads while other processes take cores (engine/threads.py).
        self.threads = ThreadGovernor() if adaptive_threads else None
        self.max_seq_len, self.vocab_size = max_seq_len, vocab_size
        self.scheduler = Scheduler(block_manager, max_num_seqs, max_num_batched_tokens, eos_token_id,
                                   stop_checker(tokenizer))
        self.sampler = Sampler()
        self.requests: dict[int, Request] = {}  # unfinished ones
        self.stats = stats or GenerationStats()
        self._request_ids, self._seq_ids = count(), count()

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        """Queue a request (ValueError for a bad prompt, RequestTooLarge if it cannot fit the cache)."""
        check_prompt(prompt_ids, self.max_seq_len, self.vocab_size)
        req = new_request(next(self._request_ids), prompt_ids, params, self.max_seq_len, self._seq_ids)
        self.scheduler.add(req.seqs[0])
        self.requests[req.index] = req
        return req

    def abort(self, index: int) -> bool:
        """Drop an unfinished request and free its blocks now; False if it is not (or no longer) here."""
        req = self.requests.pop(index, None)
        if req is None:
            return False
        self.scheduler.remove(req.seqs)
        for seq in req.seqs:
            self.bm.free(seq)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Schedule, run one forward, sample, retire. Returns one event per sequence that ran."""
        if not self.scheduler.has_unfinished():
            return []
        if self.threads is not None:
            self.threads.update()
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        run = batch.seqs
        try:
            self.cache.copy_blocks(batch.copies)
            logits, argmax = self.runner.run(batch.seqs, batch.is_prefill)  # argmax: None in prefill
            if batch.is_prefill:
                run, logits = self._fork(batch.seqs, logits)
            tokens, logprobs = self.sampler(logits, [s.params for s in run], [s.generator for s in run],
                                            [s.token_ids for s in run], argmax)
            self.scheduler.postprocess(run, tokens)
        except Exception as e:
            return self.fail([s.request_index for s in run], e)
        events = []
        for row, (seq, tok, lp) in enumerate(zip(run, tokens, logprobs)):
            if seq.logits is not None:
                seq.logits.append(logits[row].detach().cpu())
            req = self.requests[seq.request_index]
            done = seq.status is Status.FINISHED
            req.num_finished += done
            if req.finished:
                del self.requests[req.index]
            events.append(Event(req, seq, tok, lp, done))
        self._count(batch, run, time.perf_counter() - t0)
        return events

    def _fork(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """After a prefill: samples 1..n-1 of each request share its prompt blocks and its logits row."""
        if not any(s.forks_pending for s in seqs):
            return seqs, logits
        run, rows = list(seqs), list(range(len(seqs)))
        for i, seq in enumerate(seqs):
            if seq.forks_pending:
                children = fork_samples(seq, self._seq_ids)
                for child in children:
                    self.bm.fork(seq, child)
                    self.scheduler.running.append(child)
                self.requests[seq.request_index].seqs += children
                run += children
                rows += [i] * len(children)
        return run, logits[torch.tensor(rows, device=logits.device)]

    def fail(self, indices, error: Exception) -> list[Event]:
        """End these requests with `error`, their blocks freed (a step that raised: its requests; the
        engine thread passes every request when the scheduler itself raised); the rest go on."""
        events = []
        for index in dict.fromkeys(indices):
            req = self.requests.get(index)
            if req is not None and self.abort(index):
                req.error = error
                events.append(Event(req, None, finished=True, error=error))
        return events

    def _count(self, batch, run: list[Sequence], dt: float) -> None:
        st, bm = self.stats, self.bm
        if batch.is_prefill:
            st.prefill_time += dt
            st.prefill_tokens += sum(s.num_tokens - 1 - min(s.num_cached_tokens, s.num_tokens - 2) for s in batch.seqs)
        else:
            st.decode_time += dt
            st.decode_tokens += len(run)
            st.decode_steps += 1
        st.steps += 1
        st.blocks_used_peak = max(st.blocks_used_peak, bm.num_used_blocks)
        st.blocks_used_end = bm.num_used_blocks
        st.prefix_query_tokens, st.prefix_hit_tokens = bm.prefix_query_tokens, bm.prefix_hit_tokens
        st.cow_copies, st.preemptions = bm.cow_copies, self.scheduler.num_preemptions
        if st.steps % 4 == 1:  # a sample of the steps keeps the walk over block tables off the hot path
            self._track_memory()

    def _track_memory(self) -> None:
        """Add this step's live tokens and allocated slots (shared blocks counted once)."""
        bs, used = self.bm.block_size, self.bm.num_used_blocks
        if not used:
            return
        fill: dict[int, int] = {}
        for seq in self.scheduler.running:
            n = seq.num_computed_tokens
            for i, b in enumerate(seq.block_table):
                fill[b] = max(fill.get(b, 0), min(bs, n - i * bs))
        self.stats.live_token_steps += sum(fill.values())
        self.stats.allocated_slot_steps += used * bs
