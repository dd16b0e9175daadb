"""LLM: the Python API. Load a checkpoint, then `generate(prompts, SamplingParams(...))`.

    from engine import LLM, SamplingParams
    llm = LLM("runs/a")                                   # a run folder or a checkpoint folder
    outs = llm.generate(["To be", "Once"], SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=64))
    print(outs[0].text, llm.stats.to_dict())

With the cache (the default) requests run through the engine core (core.py: one scheduler for the
LLM's lifetime, the loop serve.py drives too) on the paged KV cache, continuously batched. With
use_cache=False every token is decoded by full recompute through the plain training forward
(model(idx), no cache, no positions): the slow reference the tests compare against. Both
paths share the sampler and the stopping rules, so with the same seeds they give the same tokens.

Exceptions: if anything raises inside generate() (a forward, an on_token callback, Ctrl-C), its
requests are aborted and their blocks freed before the exception propagates: the LLM is as before.

Context: a prompt must leave room for at least one new token (prompt tokens < model.max_seq_len, else
ValueError); generation stops at the context limit with finish_reason "length" (max_new_tokens is
effectively capped at max_seq_len - prompt tokens).
"""

import copy
import os
import time
from contextlib import suppress
from dataclasses import dataclass
from itertools import count
from typing import Callable, Optional, Union

import torch
from tqdm import tqdm

from checkpoint import load_model
from data.config import EOT
from model import ModelConfig, Transformer

from .block_manager import BlockManager
from .config import EngineConfig
from .core import EngineCore, GenerationStats, Request, check_prompt, fork_samples, new_request, stop_checker
from .kv_cache import PagedKVCache
from .model_runner import ModelRunner
from .quantize import quantize_int8
from .sampler import Sampler, TokenLogprobs, prompt_token_logprobs
from .sampling_params import SamplingParams
from .scheduler import RequestTooLarge, check_finished
from .sequence import Status

@dataclass
class CompletionOutput:
    index: int  # sample index within the request
    token_ids: list[int]
    text: Optional[str]  # None without a tokenizer
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    logits: Optional[torch.Tensor] = None  # [len(token_ids), vocab] when SamplingParams.return_logits


@dataclass
class RequestOutput:
    request_index: int
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    # SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (it has no context)
    prompt_logprobs: Optional[list[Optional[TokenLogprobs]]] = None

    @property
    def text(self) -> Optional[str]:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason


_SHORT_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # as train.py prints them


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 2 ** 31


class LLM:
    def __init__(self, ckpt=None, *, model: Optional[Transformer] = None, tokenizer=None,
                 eos_token_id: Optional[int] = None, config: Optional[EngineConfig] = None, **options):
        """ckpt: a run folder, its checkpoints/ folder or one checkpoint folder; or pass `model` (and
        optionally `tokenizer`, `eos_token_id`) directly: the LLM then uses that module for inference
        (in eval mode; on CPU the cached path runs a copy, taken here, whose linear weights are stored
        column-major, and the C++ decode step packs another, see engine/decode.py: make a new LLM
        after changing the weights).

        The engine's options (device, dtype, KV cache sizes, batch limits, decode paths): `config`, an
        EngineConfig (engine/config.py, which says what each does), or its fields as keywords, a
        shorthand for config=EngineConfig(**options)."""
        if config is not None and options:
            raise ValueError(f"give the engine options in config or as keywords, not both (got {sorted(options)})")
        self.config = c = config if config is not None else EngineConfig(**options)
        c.validate()  # again: a config can have been changed since it was made
        self.device, self.dtype = c.torch_device(), c.torch_dtype()
        self.model, self.tokenizer, self.eos_token_id = self._load(ckpt, model, tokenizer, eos_token_id)
        self.cfg: ModelConfig = self.model.cfg
        self.max_num_batched_tokens = c.max_num_batched_tokens or max(4096, self.cfg.max_seq_len)
        self.stats = GenerationStats()  # of the last generate() call
        self.core: Optional[EngineCore] = None
        self.num_blocks, self.cache, self.block_manager = 0, None, None
        if c.use_cache:
            self._start_engine()

    def _load(self, ckpt, model, tokenizer, eos_token_id) -> tuple[Transformer, object, Optional[int]]:
        """(model, tokenizer, end-of-text id) from the checkpoint or the caller, int8 with quantize."""
        if ckpt is not None:
            model, tokenizer, eos = load_model(ckpt, self.device, self.dtype)
            eos_token_id = eos if eos_token_id is None else eos_token_id
        elif model is None:
            raise ValueError("LLM needs a checkpoint path or a model")
        else:
            model = model.to(device=self.device, dtype=self.dtype).eval()
            if eos_token_id is None and tokenizer is not None:
                eos_token_id = tokenizer.token_to_id(EOT)
        return quantize_int8(model) if self.config.quantize else model, tokenizer, eos_token_id

    def _start_engine(self) -> None:
        """The paged KV cache (num_blocks None: room for max_num_seqs full-context sequences, capped by
        kv_cache_memory or 30% of the free memory), its block manager, the runner and the core."""
        c, block_size = self.config, self.config.block_size
        num_blocks = c.num_blocks
        if num_blocks is None:
            per_block = PagedKVCache.bytes_per_block(self.cfg, block_size, self.dtype)
            want = c.max_num_seqs * -(-self.cfg.max_seq_len // block_size)
            budget = c.kv_cache_memory if c.kv_cache_memory is not None else int(0.3 * _available_memory(self.device))
            num_blocks = max(1, min(want, budget // per_block))
        self.num_blocks = num_blocks
        self.cache = PagedKVCache(self.cfg, num_blocks, block_size, self.dtype, self.device, c.paged_kernel)
        self.block_manager = BlockManager(num_blocks, block_size, c.enable_prefix_caching)
        self.runner = ModelRunner(self.model, self.cache, compile=c.compile, column_major=self.device.type == "cpu",
                                  cpp_decode=c.cpp_decode)
        self.model = self.runner.model  # on CPU a copy with column-major linear weights
        self.core = EngineCore(self.runner, self.cache, self.block_manager, max_seq_len=self.cfg.max_seq_len,
                               vocab_size=self.cfg.vocab_size, max_num_seqs=c.max_num_seqs,
                               max_num_batched_tokens=self.max_num_batched_tokens, eos_token_id=self.eos_token_id,
                               tokenizer=self.tokenizer, stats=self._static_stats(),
                               adaptive_threads=c.adaptive_threads and self.device.type == "cpu")

    # ---- prompts ----------------------------------------------------------------------------
    def encode(self, prompt: Union[str, list[int]], index: int = 0) -> list[int]:
        """Token ids of one prompt (ValueError for text that is not valid Unicode, e.g. a lone surrogate,
        which is how Python hands over command-line bytes that are not UTF-8; `index` names the prompt)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer: pass token id lists instead")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"prompt {index} is not valid UTF-8 text: a lone surrogate "
                                 f"U+{ord(prompt[e.start]):04X} at character {e.start} (give UTF-8 text)") from None
            return self.tokenizer.encode(prompt).ids
        return [int(t) for t in prompt]

    def encode_prompts(self, prompts) -> list[list[int]]:
        """Token ids of each prompt (a string, a list of strings or of token id lists), each checked
        (ValueError: empty, too long for the context, ids outside the vocabulary)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings or of token id lists")
        ids = [self.encode(p, i) for i, p in enumerate(prompts)]
        for i, p in enumerate(ids):
            check_prompt(p, self.cfg.max_seq_len, self.cfg.vocab_size, i)
        return ids

    def decode(self, token_ids: list[int]) -> Optional[str]:
        return None if self.tokenizer is None else self.tokenizer.decode(token_ids)

    # ---- generation -------------------------------------------------------------------------
    def generate(self, prompts, sampling_params: Union[SamplingParams, list[SamplingParams], None] = None,
                 use_tqdm: bool = False,
                 on_token: Optional[Callable[[int, int, list[int]], None]] = None) -> list[RequestOutput]:
        """prompts: a string, a list of strings, or a list of token id lists. One SamplingParams for all
        or one per prompt. on_token(request_index, sample_index, output_token_ids) after every new token.
        Returns one RequestOutput per prompt, in order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompt_ids = self.encode_prompts(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        run = self._generate_cached if self.config.use_cache else self._generate_no_cache
        with tqdm(total=sum(p.n for p in params), desc="generate", unit="seq", disable=not use_tqdm) as bar:
            requests = run(prompt_ids, params, bar, on_token)
        return self._outputs(prompts, requests)

    def warmup(self, max_batch: int = 2) -> float:
        """Pay the one-off costs of the first steps here, so that the stats of the requests that follow
        are those of their steps alone: first-call initialisation, and with compile=True the compilation
        of each decode graph (batches of 1 and, if max_batch > 1, of 2 or more sequences, with block
        tables of 1 and of 2 or more blocks: torch.compile specialises sizes of 1). Each throwaway
        greedy request takes a prefill and two decode steps; seeded, they leave torch's RNG alone.
        Returns the seconds taken (self.stats is then the warm-up's)."""
        t0 = time.perf_counter()
        short, long = [0], [0] * min(self.config.block_size + 1, self.cfg.max_seq_len - 1)
        greedy = SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True, seed=0)
        for batch in (1, 2) if max_batch > 1 else (1,):
            for prompt in (short, long):
                with suppress(RequestTooLarge):  # a cache too small to hold it never runs a step of that shape
                    self.generate([prompt] * batch, greedy)
        return time.perf_counter() - t0

    def _static_stats(self) -> GenerationStats:
        size = torch.empty((), dtype=self.dtype).element_size()
        c = self.cfg
        if c.attention == "mla":
            full = c.n_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim) + c.n_heads * c.v_head_dim
        else:
            full = 2 * c.n_heads * c.head_dim
        return GenerationStats(block_size=self.config.block_size, num_blocks=self.num_blocks,
                               kv_bytes_per_token=c.kv_cache_bytes_per_token(size),
                               kv_bytes_per_token_full_kv=full * c.n_layers * size,
                               kv_dtype=_SHORT_DTYPE.get(self.dtype, str(self.dtype).removeprefix("torch.")),
                               kv_cache_bytes=0 if self.cache is None else self.cache.nbytes)

    def _generate_cached(self, prompt_ids, params, bar, on_token) -> list[Request]:
        """Feed the core and step it until this call's requests are done. On any exception (a step's
        error, a raising on_token, Ctrl-C) abort them all first: their blocks are freed."""
        core = self.core
        core.stats.blocks_used_peak = self.block_manager.num_used_blocks
        before = copy.copy(core.stats)
        requests = []
        try:
            for ids, p in zip(prompt_ids, params):
                requests.append(core.add_request(ids, p))  # RequestTooLarge before anything runs
            position = {r.index: i for i, r in enumerate(requests)}
            left = sum(p.n for p in params)
            while left:
                for ev in core.step():
                    if ev.error is not None:
                        raise ev.error
                    if ev.request.index not in position:
                        continue  # someone else's request on the same core
                    if on_token is not None:
                        on_token(position[ev.request.index], ev.seq.sample_index, ev.seq.output_token_ids)
                    left -= ev.finished
                    bar.update(ev.finished)
        except BaseException:
            for r in requests:
                core.abort(r.index)
            raise
        finally:
            self.stats = core.stats.since(before)
        return requests

    @torch.inference_mode()
    def _generate_no_cache(self, prompt_ids, params, bar, on_token) -> list[Request]:
        """The reference: every new token by full recompute through the training forward."""
        seq_ids, sampler, stop = count(), Sampler(), stop_checker(self.tokenizer)
        requests = [new_request(i, ids, p, self.cfg.max_seq_len, seq_ids)
                    for i, (ids, p) in enumerate(zip(prompt_ids, params))]
        active = []
        for r in requests:
            first = r.seqs[0]
            if first.needs_prompt_logprobs:
                start = r.params.prompt_logprobs_start
                logits = self.model(torch.tensor([first.token_ids], device=self.device))[0][0, start - 1:-1].float()
                first.prompt_logprobs = prompt_token_logprobs(logits, first.token_ids, r.params.prompt_logprobs,
                                                              start)
            r.seqs += fork_samples(first, seq_ids)
            active += r.seqs
        st = self.stats = self._static_stats()
        while active:
            t0 = time.perf_counter()
            logits = torch.cat([self.model(torch.tensor([s.token_ids], device=self.device))[0][:, -1].float()
                                for s in active])
            tokens, _ = sampler(logits, [s.params for s in active], [s.generator for s in active],
                                [s.token_ids for s in active])
            still = []
            for row, (seq, tok) in enumerate(zip(active, tokens)):
                seq.token_ids.append(tok)
                if seq.logits is not None:
                    seq.logits.append(logits[row].cpu())
                if check_finished(seq, tok, self.eos_token_id, stop):
                    seq.status = Status.FINISHED
                else:
                    still.append(seq)
                if on_token is not None:
                    on_token(seq.request_index, seq.sample_index, seq.output_token_ids)
            st.decode_time += time.perf_counter() - t0
            st.decode_tokens += len(active)
            st.steps += 1
            bar.update(len(active) - len(still))
            active = still
        return requests

    def _outputs(self, prompts, requests: list[Request]) -> list[RequestOutput]:
        outs = []
        for i, (prompt, req) in enumerate(zip(prompts, requests)):
            samples = []
            for seq in sorted(req.seqs, key=lambda s: s.sample_index):
                text = self.decode(seq.output_token_ids)
                text = None if text is None else text[:seq.stop_text_len]  # cut before a stop string, if one ended it
                logits = torch.stack(seq.logits) if seq.logits else None
                samples.append(CompletionOutput(seq.sample_index, seq.output_token_ids, text, seq.finish_reason,
                                                logits))
            outs.append(RequestOutput(i, prompt if isinstance(prompt, str) else None, req.prompt_token_ids, samples,
                                      req.seqs[0].prompt_logprobs))
        return outs
