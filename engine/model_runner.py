"""The model runner: turns a scheduled batch into one forward over the paged cache, returns logits.

`step_inputs` packs the batch (kv_cache.StepInputs): prefill packs the new tokens of every sequence
into one row ([1, T], positions [1, T]); a sequence whose prompt starts with cached blocks only
computes the rest (at least its last token, so a 100% prefix hit still yields logits). Decode packs
one token per sequence. `run` then follows the cache's protocol (kv_cache.py): begin(step), the
forward (each layer calls cache.attend), and for decode steps that hold the new K/V back, commit.
Only the last token of each sequence goes through the LM head, except in the prefill of a sequence
that asks for prompt log-probabilities (SamplingParams.prompt_logprobs): there every prompt position it
scores does, one sequence at a time, and the runner stores the result on the sequence (seq.prompt_logprobs).

On CPU, decode steps of MHA/GQA/MQA models run as one C++ call (cpu_speed.CppDecodeStep: the whole
forward, the new K/V written into the cache, logits and their argmax out) unless cpp_decode=False or
compile=True; otherwise through the PyTorch forward below.

compile=True compiles the CPU decode forward (the whole model for one token per sequence, the
paged-attention kernel calls, or on the gather path the gathers from the cache, included) with
torch.compile; prefill stays eager. The first steps pay the compilation (two graphs: batch 1 and
batch >= 2; sizes are dynamic after that).
"""

from typing import Optional

import torch

from model import Transformer

from .cpu_speed import CppDecodeStep, column_major_copy, long_tensor
from .kv_cache import PagedKVCache, StepInputs
from .sampler import prompt_token_logprobs
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedKVCache, compile: bool = False, column_major: bool = False,
                 cpp_decode: bool = False):
        """cpp_decode=True decodes through the C++ step where it applies (cpu_speed.CppDecodeStep; not
        with compile), which packs its own copy of the fp32 weights. column_major=True runs everything else
        (prefill; decoding without the C++ step) with a copy of the model whose linear weights are
        stored column-major (cpu_speed.py: faster small-batch GEMMs on CPU, e.g. a 32-token prompt;
        the model passed in is unchanged)."""
        self.cpp_step = CppDecodeStep.for_model(model, cache) if cpp_decode and not compile else None
        self.model = column_major_copy(model) if column_major else model
        self.cache = cache
        self.block_size = cache.block_size
        self.device = cache.device
        self._decode_fn = self._decode_step
        if compile and self.device.type != "cpu":
            raise ValueError("compile=True compiles the CPU decode path; on CUDA decoding uses the Triton paged kernel")
        if compile:
            import torch._dynamo
            import torch.fx.experimental._config as fx_config

            fx_config.use_duck_shape = False  # do not tie unrelated sizes that happen to be equal
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
            # cpp_wrapper: the generated code calls its kernels from C++, not from a Python wrapper
            # (measured: 3-10% faster decode steps at batch 1-16; compilation takes longer, ~40 s cold).
            # freezing: the weights become constants of the graph instead of ~50 inputs checked and
            # unpacked at every call (measured, alternated A/B: +5-25% decode tokens/s at batch 1 and
            # 16). So the compiled step keeps the weights it was compiled with. weight_prepack off:
            # oneDNN's packed linear was slower than MKL's GEMM on the column-major weights here.
            self._decode_fn = torch.compile(self._decode_step, fullgraph=True, dynamic=False, options={
                "cpp_wrapper": True, "freezing": True, "cpp.weight_prepack": False})
        self.compiled = compile

    def step_inputs(self, seqs: list[Sequence], is_prefill: bool) -> StepInputs:
        """The step's inputs: for each sequence the tokens from its first uncomputed one (at most its
        last: a decode step, or a prompt fully served by the prefix cache, recomputes that one token)."""
        bs = self.block_size
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
        when the step computed it, else None. The C++ step does, and so does the compiled decode step,
        inside its graph right after the LM head: measured ~45 us at batch 16, where a separate
        torch.argmax, a scalar loop on CPU, takes 200-250 us in the decode loop."""
        step = self.step_inputs(seqs, is_prefill)
        if not is_prefill and self.cpp_step is not None:
            # One C++ call that records no autograd: entering inference mode (a few Python frames,
            # ~25 us right after the step has streamed the weights through the caches) buys nothing.
            return self.cpp_step(step)
        return self._forward(seqs, step)

    @torch.inference_mode()
    def _forward(self, seqs: list[Sequence], step: StepInputs) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """run() through the PyTorch forward."""
        self.cache.begin(step)
        idx = long_tensor(step.token_ids, self.device).unsqueeze(0)
        pos = long_tensor(step.positions, self.device).unsqueeze(0)
        if step.is_prefill:
            return self._prefill_logits(seqs, idx, pos, step.query_lens), None
        if not self.cache.hold_back:  # the backend wrote the new K/V layer by layer
            return self._logits(idx, pos), None
        if self.compiled:
            self._mark_dynamic(idx, pos)
        logits, argmax, k, v = self._decode_fn(idx, pos)
        self.cache.commit(k, v)
        return logits, argmax

    def _logits(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.hidden_states(idx, pos, self.cache)[0]).float()

    def _prefill_logits(self, seqs: list[Sequence], idx: torch.Tensor, pos: torch.Tensor,
                        query_lens: list[int]) -> torch.Tensor:
        """Logits of each sequence's last token. A sequence that needs its prompt log-probs (admitted
        without prefix hits over the positions it scores, so its query holds them) gets them here from the
        logits of those positions, one sequence at a time: only one [scored, vocab] tensor lives at once."""
        h = self.model.hidden_states(idx, pos, self.cache)[0]  # [T, dim]
        start = 0
        for seq, n in zip(seqs, query_lens):
            if seq.needs_prompt_logprobs:
                p, first = seq.num_prompt_tokens, seq.params.prompt_logprobs_start
                lo = start - (seq.num_tokens - n)  # row of position 0 (rows before start hold other sequences)
                logits = self.model.lm_head(h[lo + first - 1:lo + p - 1]).float()
                seq.prompt_logprobs = prompt_token_logprobs(logits, seq.token_ids[:p], seq.params.prompt_logprobs,
                                                            first)
            start += n
        last = torch.tensor(query_lens, device=self.device).cumsum(0) - 1  # each sequence's last token
        return self.model.lm_head(h.index_select(0, last)).float()

    def _decode_step(self, idx: torch.Tensor, pos: torch.Tensor):
        """(logits, their argmax when compiled else None, new K of every layer, new V or None): reads
        the cache, writes nothing."""
        logits = self._logits(idx, pos)
        argmax = logits.argmax(-1) if torch.compiler.is_compiling() else None
        return (logits, argmax, *self.cache.held_kv())

    def _mark_dynamic(self, idx, pos) -> None:
        """Batch and context sizes vary step to step: compile them as symbols, not constants."""
        from torch._dynamo import maybe_mark_dynamic

        for t, dims in ((idx, (1,)), (pos, (1,)), *self.cache.plan.dynamic_dims()):
            for d in dims:
                if t.shape[d] > 1:
                    maybe_mark_dynamic(t, d)
