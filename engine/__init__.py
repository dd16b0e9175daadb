"""Inference: a paged KV cache with continuous batching (see engine/llm.py for the API and
docs/engine.md for one request followed through these files).

    llm.py               LLM(ckpt).generate(prompts, SamplingParams(...)), offline, on the core
    config.py            EngineConfig: the engine's options, and generate.py's and serve.py's flags for them
    core.py              the online engine: add_request / step / abort on one scheduler
    async_engine.py      the core in a thread of its own, for asyncio callers (serve.py)
    text.py              stop strings and streamed text
    scheduler.py         waiting/running queues, admission, preemption, retirement
    sequence.py          one sample of one request (plain data)
    block_manager.py     the allocator: blocks, refcounts, block tables, prefix cache, copy-on-write
    model_runner.py      turns a batch into StepInputs and runs one forward over the cache
    decode.py            the decode paths: the PyTorch reference, and per device one fast path
                         (CPU: the whole step in C++) that says once when it declines a model
    kv_cache.py          the K/V buffers, StepInputs, and the protocol of a forward over them
    attention_gather.py  attention backend: PyTorch gather + SDPA (all prefill; the reference decode)
    attention_cpu.py     attention backend: decode through the C++ paged kernel (CPU)
    attention_triton.py  attention backend: decode through the Triton paged kernel (CUDA)
    cpu_speed.py         CPU speed tricks that change no value (column-major weights, index tensors)
    quantize.py          int8 weights for every linear layer (--quantize int8)
    threads.py           the thread governor: fewer torch threads while other processes take cores
    sampling_params.py   the options of one request
    sampler.py           greedy, temperature, top-k, top-p, min-p, repetition penalty; per-request RNG
"""


import importlib

# Each name is imported from its module on first use (PEP 562), not here: importing `engine.config`
# for generate.py's and serve.py's flags then leaves torch unimported, and --help takes 0.1 s, not 4 s.
_HOMES = {"LLM": "llm", "CompletionOutput": "llm", "RequestOutput": "llm", "EngineConfig": "config",
          "SamplingParams": "sampling_params", "RequestTooLarge": "scheduler", "BlockManager": "block_manager",
          "EngineCore": "core", "Event": "core", "GenerationStats": "core", "Request": "core"}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'engine' has no attribute '{name}'")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
