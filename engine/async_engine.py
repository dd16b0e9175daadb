"""AsyncEngine: one thread owns the EngineCore; asyncio code (serve.py) only enqueues and awaits.

    engine = AsyncEngine(llm.core, decode=llm.decode)
    engine.start()
    async for up in engine.generate(prompt_ids, params):   # one Update per new token of any sample
        ...                                                # leaving the loop early aborts the request
    engine.close()

The engine thread drains an inbox of commands (add, abort), runs core.step() while anything is
unfinished, and hands each request's updates to its asyncio queue with call_soon_threadsafe. Updates
are copies made in the engine thread (the core keeps mutating its sequences), so the event loop never
reads engine state. The thread also keeps the figures /metrics shows (Metrics.snapshot()).
"""

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from .core import EngineCore
from .sampler import TokenLogprobs
from .sampling_params import SamplingParams

# Latency histogram buckets in seconds (Prometheus "le" bounds).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Update:
    """A new token of one sample, or the request's error (sample_index None)."""
    sample_index: Optional[int]
    token: Optional[int] = None
    logprobs: Optional[TokenLogprobs] = None
    finish_reason: Optional[str] = None  # set on the sample's last token
    stop_text_len: Optional[int] = None  # where its text is cut, when a stop string ended it
    prompt_logprobs: Optional[list] = None  # on each sample's first update, when its params ask for them
    error: Optional[BaseException] = None


@dataclass
class Histogram:
    bounds: tuple
    counts: list = None
    total: float = 0.0
    n: int = 0

    def __post_init__(self):
        if self.counts is None:
            self.counts = [0] * len(self.bounds)

    def observe(self, x: float) -> None:
        self.n += 1
        self.total += x
        for i, b in enumerate(self.bounds):
            if x <= b:
                self.counts[i] += 1


@dataclass
class Metrics:
    """What /metrics reports; written by the engine thread, read under the lock."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests_finished: int = 0
    requests_aborted: int = 0
    requests_failed: int = 0
    generated_tokens: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    gauges: dict = field(default_factory=dict)  # running, waiting, blocks, stats of the core

    def snapshot(self) -> dict:
        with self.lock:
            return dict(self.gauges, requests_finished=self.requests_finished,
                        requests_aborted=self.requests_aborted, requests_failed=self.requests_failed,
                        generated_tokens=self.generated_tokens,
                        ttft=Histogram(self.ttft.bounds, list(self.ttft.counts), self.ttft.total, self.ttft.n),
                        itl=Histogram(self.itl.bounds, list(self.itl.counts), self.itl.total, self.itl.n))


class _Handle:
    """One request as the engine thread tracks it: where its updates go, its timing."""

    def __init__(self, loop, prompt_ids, params):
        self.loop, self.queue = loop, asyncio.Queue()
        self.prompt_ids, self.params = prompt_ids, params
        self.arrival = time.perf_counter()
        self.index: Optional[int] = None  # the core's request index once added
        self.last_token: dict[int, float] = {}  # sample -> time of its last token

    def send(self, up: Update) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, up)


class AsyncEngine:
    def __init__(self, core: EngineCore):
        self.core = core
        self.metrics = Metrics()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._handles: dict[int, _Handle] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.num_in_flight = 0  # requests between generate() entry and exit (event-loop side only)

    def start(self) -> None:
        self._publish()
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def close(self) -> None:
        """Stop the thread; requests still unfinished end with an error."""
        self._stopping = True
        self._wake.set()
        self._thread.join()

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Update]:
        """The request's updates until every sample finished. Raises what adding it raised (ValueError,
        RequestTooLarge) or the error that failed it. Leaving early (a client gone) aborts it."""
        handle = _Handle(asyncio.get_running_loop(), prompt_ids, params)
        self.num_in_flight += 1
        left, done = params.n, False
        try:
            self._send(("add", handle))
            while left:
                up = await handle.queue.get()
                if up.error is not None:
                    done = True
                    raise up.error
                left -= up.finish_reason is not None
                done = not left
                yield up
        finally:
            self.num_in_flight -= 1
            if not done:
                self._send(("abort", handle))

    def _send(self, command) -> None:
        if self._stopping:
            raise RuntimeError("the server is shutting down")
        self._inbox.put(command)
        self._wake.set()

    # ---- the engine thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            self._drain_inbox()
            if not self.core.has_unfinished():
                self._wake.wait()
                continue
            try:
                events = self.core.step()
            except Exception as e:  # outside any one request (a scheduler bug): fail them all, keep serving
                events = self.core.fail(list(self.core.requests), e)
            self._deliver(events)
        shutdown = RuntimeError("the server shut down before this request finished")
        self._drain_inbox()
        for index, handle in list(self._handles.items()):
            self.core.abort(index)
            handle.send(Update(None, error=shutdown))

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, handle = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                try:
                    handle.index = self.core.add_request(handle.prompt_ids, handle.params).index
                    self._handles[handle.index] = handle
                except Exception as e:  # a bad prompt, a request too large for the cache
                    handle.send(Update(None, error=e))
            elif handle.index is not None and self.core.abort(handle.index):
                del self._handles[handle.index]
                with self.metrics.lock:
                    self.metrics.requests_aborted += 1
        self._publish()

    def _deliver(self, events) -> None:
        now = time.perf_counter()
        m = self.metrics
        with m.lock:
            for ev in events:
                handle = self._handles.get(ev.request.index)
                if handle is None:
                    continue  # not ours (an LLM.generate on the same core)
                if ev.error is not None:
                    m.requests_failed += 1
                    handle.send(Update(None, error=ev.error))
                else:
                    seq = ev.seq
                    m.generated_tokens += 1
                    last = handle.last_token.get(seq.sample_index)
                    if last is None and seq.sample_index == 0:
                        m.ttft.observe(now - handle.arrival)
                    elif last is not None:
                        m.itl.observe(now - last)
                    handle.last_token[seq.sample_index] = now
                    handle.send(Update(seq.sample_index, ev.token, ev.logprobs,
                                       seq.finish_reason if ev.finished else None, seq.stop_text_len,
                                       seq.prompt_logprobs if last is None else None))
            for ev in events:  # after delivering: a step may carry several samples of one finished request
                if ev.request.finished and self._handles.pop(ev.request.index, None) is not None:
                    m.requests_finished += ev.error is None
            # Under the same lock: a client that saw its last token then reads /metrics sees this step.
            m.gauges = self._gauges()

    def _publish(self) -> None:
        gauges = self._gauges()
        with self.metrics.lock:
            self.metrics.gauges = gauges

    def _gauges(self) -> dict:
        core, st = self.core, self.core.stats
        return dict(running=core.num_running, waiting=core.num_waiting, blocks_used=core.bm.num_used_blocks,
                    blocks_total=core.bm.num_blocks, prefix_query_tokens=core.bm.prefix_query_tokens,
                    prefix_hit_tokens=core.bm.prefix_hit_tokens, prompt_tokens=st.prefill_tokens,
                    decode_tokens=st.decode_tokens, decode_steps=st.decode_steps, steps=st.steps,
                    preemptions=core.scheduler.num_preemptions)
