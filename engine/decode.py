"""Decode paths: one step of one new token per sequence over the paged cache, behind one interface,
`path(step) -> (logits [S, vocab] float32, their argmax [S] or None)`.

`TorchDecode`, the reference on every device, is the model's own forward over the cache (whose decode
backend attends: kv_cache.py); compile=True compiles it (CPU). A device may have one fast path that
re-implements the forward, in FAST_PATHS: on CPU `CppDecode` (MHA/GQA/MQA, fp32 or int8 weights); on
CUDA none, the reference on the Triton paged kernel is fast. A fast path says which models it computes
exactly (`supports(model, cache)`: None or the reason it declines, one line), and `fast_path` says the
reason once: a model change it does not implement is a visible fallback, not a silent slowdown.
tests/test_decode_paths.py runs every path against full recompute on every model option.
"""

import warnings
from itertools import accumulate, chain
from typing import Optional, Protocol

import torch
import torch.nn as nn

from model import Transformer
from model.attention import GroupedQueryAttention
from model.llama import Block, SwiGLU

from .kv_cache import PagedKVCache, StepInputs
from .quantize import Int8Linear


class DecodePath(Protocol):
    name: str

    def __call__(self, step: StepInputs) -> tuple[torch.Tensor, Optional[torch.Tensor]]: ...


class TorchDecode:
    """The reference: the PyTorch forward over the cache. Under compile=True its argmax comes from the
    compiled graph, right after the LM head: measured ~45 us at batch 16, where a separate torch.argmax,
    a scalar loop on CPU, takes 200-250 us in the decode loop."""
    name = "torch"

    def __init__(self, model: Transformer, cache: PagedKVCache, compile: bool = False):
        """compile=True: the step under torch.compile (CPU; two graphs, batch 1 and batch >= 2, sizes are
        dynamic after that), which sets two global compiler options. (EngineConfig refuses compile off CPU.)"""
        self.model, self.cache, self.compiled, self._step = model, cache, compile, self._decode_step
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
            self._step = torch.compile(self._decode_step, fullgraph=True, dynamic=False, options={
                "cpp_wrapper": True, "freezing": True, "cpp.weight_prepack": False})

    @torch.inference_mode()
    def __call__(self, step: StepInputs) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        idx, pos = self.cache.begin(step)
        if not self.cache.hold_back:  # the backend wrote the new K/V layer by layer
            return self._logits(idx, pos), None
        if self.compiled:
            self._mark_dynamic(idx, pos)
        logits, argmax, k, v = self._step(idx, pos)
        self.cache.commit(k, v)
        return logits, argmax

    def _logits(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.hidden_states(idx, pos, self.cache)[0]).float()

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


class CppDecode:
    """CPU's fast path: the whole step in one C++ call (kernels/decode_step_cpu.py; the reference's numbers
    to ~1e-6) that also writes the new K/V into the cache. It packs its own copy of the fp32 linear
    weights; int8 weights (engine/quantize.py) it reads in place. It re-implements model/llama.py op for
    op, so `supports` lists the modules it implements and declines any other."""
    name = "cpp"
    title = "the C++ decode step"
    attention = ("mha", "gqa", "mqa")
    modules = (Transformer, nn.ModuleList, Block, GroupedQueryAttention, SwiGLU, nn.Embedding, nn.RMSNorm,
               nn.Linear, Int8Linear)

    def __init__(self, model: Transformer, cache: PagedKVCache):
        from kernels.decode_step_cpu import decode_model

        def weight(lin):
            return (lin.weight, lin.scale) if isinstance(lin, Int8Linear) else (lin.weight.contiguous(), torch.empty(0))

        norms, linears = [], []
        for layer in model.layers:
            norms += [layer.attn_norm.weight, layer.ffn_norm.weight]
            linears += [layer.attn.wqkv, layer.attn.wo, layer.ffn.w13, layer.ffn.w2]
        weights, scales = zip(*map(weight, linears + [model.lm_head]))
        cfg = model.cfg
        self.cache = cache
        self.model = decode_model(model.embed.weight, model.rope_cos, model.rope_sin, norms + [model.norm.weight],
                                  list(weights), list(scales), cfg.n_heads, cfg.n_kv_heads, cfg.norm_eps)

    @classmethod
    def supports(cls, model: Transformer, cache: PagedKVCache) -> Optional[str]:
        """None if this step computes `model` over `cache` exactly, else why not (one line)."""
        from kernels.decode_step_cpu import cpu_kernel_error

        if cache.dtype != torch.float32:
            return f"it computes in float32, the cache holds {cache.dtype}"
        if model.cfg.attention not in cls.attention:
            return f"attention={model.cfg.attention}: it implements {', '.join(cls.attention)}"
        for name, m in model.named_modules():
            if type(m) not in cls.modules:
                return f"it does not implement {name} ({type(m).__name__})"
            if (type(m) is nn.Linear and m.bias is not None) or \
                    (type(m) is nn.RMSNorm and (m.weight is None or m.eps != model.cfg.norm_eps)):
                return f"it does not implement {name} ({m})"
        error = cpu_kernel_error()
        return f"its kernel is unavailable: {error}" if error else None

    def __call__(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        # One C++ call that records no autograd: entering inference mode (a few Python frames,
        # ~25 us right after the step has streamed the weights through the caches) buys nothing.
        tables = list(chain.from_iterable(step.block_tables))  # one flat list: sequence i's table starts at starts[i]
        starts = list(accumulate(map(len, step.block_tables), initial=0))[:-1]
        return self.model.step(step.token_ids, step.positions, step.slot_mapping, tables, starts, self.cache.k_buf,
                               self.cache.v_buf)


FAST_PATHS = {"cpu": CppDecode}  # device type -> its fast path
_said: set[str] = set()  # the declines already said: once per process


def fast_path(model: Transformer, cache: PagedKVCache) -> Optional[DecodePath]:
    """The fast path of the cache's device for `model`, or None: the device has none, the cache decodes
    through the gather path (paged_kernel=False asks for the reference), or the fast path declines the
    model, which is said once per reason in one line."""
    path = FAST_PATHS.get(cache.device.type)
    if path is None or not cache.paged_kernel:
        return None
    reason = path.supports(model, cache)
    if reason is None:
        return path(model, cache)
    message = f"{path.title} does not apply ({reason}); decoding through the slower PyTorch step"
    if message not in _said:
        _said.add(message)
        warnings.warn(message, stacklevel=2)
    return None
