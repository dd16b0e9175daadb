"""Inference: a paged KV cache with continuous batching (see engine/llm.py for the API).

    block_manager.py   the allocator: blocks, refcounts, block tables, prefix cache, copy-on-write
    sequence.py        one sample of one request (plain data)
    scheduler.py       waiting/running queues, admission, preemption, retirement
    kv_cache.py        the cache object the attention layers call, and the step metadata
    model_runner.py    packs a batch into one forward, returns next-token logits
    sampler.py         greedy, temperature, top-k, top-p, min-p, repetition penalty; per-request RNG
    llm.py             LLM(ckpt).generate(prompts, SamplingParams(...))
"""

from .block_manager import BlockManager
from .llm import LLM, CompletionOutput, GenerationStats, RequestOutput
from .sampling_params import SamplingParams
from .scheduler import RequestTooLarge

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "GenerationStats", "BlockManager",
           "RequestTooLarge"]
