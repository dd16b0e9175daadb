"""Inference: a paged KV cache with continuous batching (see engine/llm.py for the API).

    block_manager.py   the allocator: blocks, refcounts, block tables, prefix cache, copy-on-write
    sequence.py        one sample of one request (plain data)
    scheduler.py       waiting/running queues, admission, preemption, retirement
    core.py            the online engine: add_request / step / abort on one scheduler
    async_engine.py    one thread owns the core; asyncio callers (serve.py) enqueue and await
    text.py            stop strings and streamed text
    kv_cache.py        the cache object the attention layers call, and the step metadata
    model_runner.py    packs a batch into one forward, returns next-token logits
    sampler.py         greedy, temperature, top-k, top-p, min-p, repetition penalty; per-request RNG
    llm.py             LLM(ckpt).generate(prompts, SamplingParams(...)), offline, on the core
"""

from .block_manager import BlockManager
from .core import EngineCore, Event, GenerationStats, Request
from .llm import LLM, CompletionOutput, RequestOutput
from .sampling_params import SamplingParams
from .scheduler import RequestTooLarge

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "GenerationStats", "BlockManager",
           "RequestTooLarge", "EngineCore", "Request", "Event"]
