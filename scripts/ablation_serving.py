"""What a smaller KV cache buys when serving (the ablation report's --serving): on the paged engine with the
same KV memory budget for every variant, the largest batch of sequences that fit in it at once, and decode
tokens/s at that batch.

A sequence of `prompt + new tokens` holds ceil(tokens / block_size) blocks of the cache when it ends; the
budget holds budget // bytes_per_block blocks; the largest batch is their quotient. With that batch the
engine decodes every sequence to the end without preempting any; one more sequence and it must preempt
(tests/test_ablation.py runs both). Prompts are random token ids, distinct, so no prefix is shared, and
prefix caching is off: every sequence pays for its own cache.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from checkpoint import load_model
from engine import LLM, SamplingParams
from engine.kv_cache import PagedKVCache
from model import ModelConfig

BLOCK_SIZE = 16  # the engine's default
DTYPE = torch.float32  # the CPU engine's


@dataclass
class Serving:
    """The report's --serving options."""
    budget_mib: float = 16.0  # KV memory, the same for every variant (fp32)
    prompt_tokens: int = 32
    new_tokens: Optional[int] = None  # None: up to the model's context


def fitting_batch(cfg: ModelConfig, budget_bytes: int, seq_tokens: int) -> tuple[int, int]:
    """(the largest batch of seq_tokens-token sequences whose KV cache fits in budget_bytes, blocks in the budget)."""
    blocks = budget_bytes // PagedKVCache.bytes_per_block(cfg, BLOCK_SIZE, DTYPE)
    return blocks // -(-seq_tokens // BLOCK_SIZE), blocks


def decode_batch(llm: LLM, batch: int, prompt_tokens: int, new_tokens: int, seed: int = 0):
    """Greedy-decode `batch` random prompts together, EOS ignored: the engine's stats of the call."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(llm.cfg.vocab_size, size=(batch, prompt_tokens)).tolist()
    llm.generate(prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True))
    return llm.stats


def serving_row(run_dir: Path, budget_bytes: int, prompt_tokens: int, new_tokens: int, device: str = "cpu") -> dict:
    """The run's last checkpoint in a `budget_bytes` KV cache: its largest batch and decode tokens/s there."""
    model, tokenizer, eos = load_model(run_dir, torch.device(device), DTYPE)
    batch, blocks = fitting_batch(model.cfg, budget_bytes, prompt_tokens + new_tokens)
    if batch < 1:
        raise ValueError(f"a KV budget of {budget_bytes / 2**20:.2f} MiB holds no sequence of "
                         f"{prompt_tokens + new_tokens} tokens of {run_dir}; raise --serving-budget")
    llm = LLM(model=model, tokenizer=tokenizer, eos_token_id=eos, device=device, dtype=DTYPE, block_size=BLOCK_SIZE,
              num_blocks=blocks, max_num_seqs=batch, enable_prefix_caching=False)
    decode_batch(llm, min(batch, 2), prompt_tokens, 2)  # warm-up: kernels built or loaded, first-call costs
    load = os.getloadavg()[0]
    st = decode_batch(llm, batch, prompt_tokens, new_tokens)
    return {"kv_bytes_per_token": model.cfg.kv_cache_bytes_per_token(DTYPE.itemsize), "num_blocks": blocks,
            "batch": batch, "decode_tokens_per_s": st.decode_tokens_per_s, "preemptions": st.preemptions,
            "blocks_used_peak": st.blocks_used_peak, "loadavg": load}
