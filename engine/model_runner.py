"""The model runner: packs a scheduled batch into one forward over the paged cache, returns logits.

Prefill packs the new tokens of every sequence into one row ([1, T], positions [1, T]); a sequence
whose prompt starts with cached blocks only computes the rest (at least its last token, so a 100%
prefix hit still yields logits). Decode packs one token per sequence. Only the last token of each
sequence goes through the LM head.

A decode step on CPU only reads the cache: the forward returns the new K/V of every layer and the
runner writes them in one op afterwards (see kv_cache.py). compile=True compiles that forward (the
whole model for one token per sequence, the paged-attention kernel calls, or on the gather path the
gathers from the cache, included) with torch.compile; prefill stays eager. The first steps pay the
compilation (two graphs: batch 1 and batch >= 2; sizes are dynamic after that).
"""

from typing import Optional

import torch

from model import Transformer

from .kv_cache import PagedKVCache, long_tensor
from .sequence import Sequence


def use_column_major_linears(model: torch.nn.Module) -> int:
    """Store every nn.Linear weight [out, in] column-major (same values, same shape, strides (1, out)).

    F.linear computes x @ W.T; with W column-major, W.T is a contiguous [in, out] matrix and MKL runs a
    plain NN GEMM, which for the small batches of decoding is much faster on CPU than the NT GEMM a
    row-major weight gives (measured here: the model's matmuls at 16 tokens 5.9 -> 4.6 ms single-threaded,
    and several times faster with 2 threads). A weight shared with an embedding is left alone (the
    lookup wants rows). Returns the number of weights changed."""
    shared = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and id(m.weight) not in shared and m.weight.is_contiguous() \
                    and m.weight.shape[0] > 1:
                m.weight.data = m.weight.data.t().contiguous().t()
                n += 1
    return n


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedKVCache, compile: bool = False):
        self.model, self.cache = model, cache
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

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits [len(seqs), vocab] (float32) for the next token of each sequence, and their argmax
        when the step computed it (the compiled decode step does, inside its graph, right after the
        LM head: measured ~45 us at batch 16 where a separate torch.argmax, a scalar loop on CPU,
        takes 200-250 us in the decode loop), else None."""
        if is_prefill:
            return self.prefill(seqs), None
        return self.decode(seqs)

    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        bs = self.block_size
        ids, positions, slots, q_lens, ctx_lens, last = [], [], [], [], [], []
        for seq in seqs:
            n = seq.num_tokens
            start = min(seq.num_computed_tokens, n - 1)  # recompute at least the last token
            table = seq.block_table
            ids += seq.token_ids[start:n]
            positions += range(start, n)
            # Tokens already in a cached block are recomputed for their query only: not rewritten.
            slots += [-1 if p < seq.num_computed_tokens else table[p // bs] * bs + p % bs for p in range(start, n)]
            q_lens.append(n - start)
            ctx_lens.append(n)
            last.append(len(ids) - 1)
        self.cache.begin_prefill([s.block_table for s in seqs], q_lens, ctx_lens, slots)
        idx, pos = self._inputs(ids, positions)
        return self._logits(idx, pos, torch.tensor(last, dtype=torch.long, device=self.device))

    def decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        ctx = [s.num_tokens for s in seqs]
        self.cache.begin_decode([s.block_table for s in seqs], ctx)
        idx, pos = self._inputs([s.token_ids[-1] for s in seqs], [n - 1 for n in ctx])
        if self.cache.decode_kernel == "triton":  # it reads the cache: K/V were written layer by layer
            return self._logits(idx, pos), None
        if self.compiled:
            self._mark_dynamic(idx, pos)
        logits, argmax, k, v = self._decode_fn(idx, pos)
        self.cache.commit_decode(k, v)
        return logits, argmax

    def _inputs(self, ids: list[int], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return long_tensor(ids, self.device).unsqueeze(0), long_tensor(positions, self.device).unsqueeze(0)

    def _logits(self, idx: torch.Tensor, pos: torch.Tensor, last=None) -> torch.Tensor:
        h = self.model.hidden_states(idx, pos, self.cache)[0]  # [T, dim]
        if last is not None:
            h = h.index_select(0, last)
        return self.model.lm_head(h).float()

    def _decode_step(self, idx: torch.Tensor, pos: torch.Tensor):
        """(logits, their argmax when compiled else None, new K of every layer, new V or None): reads
        the cache, writes nothing."""
        logits = self._logits(idx, pos)
        argmax = logits.argmax(-1) if torch.compiler.is_compiling() else None
        return (logits, argmax, *self.cache.new_kv())

    def _mark_dynamic(self, idx, pos) -> None:
        """Batch and context sizes vary step to step: compile them as symbols, not constants."""
        from torch._dynamo import maybe_mark_dynamic

        meta = self.cache.meta
        if self.cache.decode_kernel:
            step = ((meta.block_tables, (0, 1)), (meta.context_lens, (0,)))
        else:
            g = meta.groups[0]
            step = ((meta.new_pos, (0,)), (g.gather, (0,)), (g.bias, (0, 3)))
        for t, dims in ((idx, (1,)), (pos, (1,)), *step):
            for d in dims:
                if t.shape[d] > 1:
                    maybe_mark_dynamic(t, d)
