"""CPU speed tricks that change no value, kept out of the readable path.

- `CppDecodeStep`: the runner's decode step for MHA/GQA/MQA models on CPU, one C++ call for the
  whole forward (kernels/decode_step_cpu.py) instead of the eager one; same numbers to ~1e-6.
- `column_major_copy(model)`: the model the runner decodes with on CPU when the C++ step does not
  apply (MLA, the gather path), with every linear weight stored column-major. The caller's model is
  left as it was.
- `long_tensor(values)`: int64 index tensors from Python lists through an array buffer, the way the
  runner and the attention backends build a step's indices.
"""

import copy
from array import array
from typing import Optional

import torch


def column_major_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of model whose nn.Linear weights [out, in] are stored column-major (same values, same
    shape, strides (1, out)); every other parameter and buffer is shared with model, not copied.

    F.linear computes x @ W.T; with W column-major, W.T is a contiguous [in, out] matrix and MKL runs a
    plain NN GEMM, which for the small batches of decoding is much faster on CPU than the NT GEMM a
    row-major weight gives (measured here: the model's matmuls at 16 tokens 5.9 -> 4.6 ms single-threaded,
    and several times faster with 2 threads). A weight shared with an embedding is left alone (the
    lookup wants rows)."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)
              and id(m.weight) not in embedded and m.weight.is_contiguous() and m.weight.shape[0] > 1}
    # deepcopy takes what `memo` already maps: shared tensors map to themselves, linear weights to
    # their column-major copies, so the copy allocates nothing else.
    memo = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in linear:
            memo[id(t)] = torch.nn.Parameter(t.detach().t().contiguous().t(), requires_grad=t.requires_grad)
        else:
            memo[id(t)] = t
    return copy.deepcopy(model, memo)


def long_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor from a list of ints: through an array buffer, ~6x faster than torch.tensor(list)."""
    if not values:
        return torch.empty(0, dtype=torch.long, device=device)
    t = torch.frombuffer(array("q", values), dtype=torch.long)
    return t if device.type == "cpu" else t.to(device)


class CppDecodeStep:
    """A decode step through the C++ kernel: tokens, positions, slots and block tables in, (logits
    [S, vocab], argmax [S]) out, the new K/V written into the cache. The kernel packs its own copy of
    the model's fp32 linear weights for streaming; int8 weights (engine/quantize.py) it reads in place."""

    def __init__(self, model: torch.nn.Module, cache):
        from kernels.decode_step_cpu import decode_model

        from .quantize import Int8Linear

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
    def for_model(cls, model: torch.nn.Module, cache) -> Optional["CppDecodeStep"]:
        """The C++ step for this model and cache, or None where it does not apply: it knows the
        model/llama.py layers with GroupedQueryAttention (MHA, GQA, MQA), fp32 or int8 linears without
        bias, on the CPU paged-kernel backend; MLA and the gather path keep the PyTorch step. Warns in
        one line (and returns None) when it applies but the kernel cannot be built."""
        from kernels.decode_step_cpu import cpu_kernel_error
        from model.attention import GroupedQueryAttention

        from .quantize import Int8Linear

        if cache.device.type != "cpu" or cache.dtype != torch.float32 or cache.decode_backend.name != "cpu":
            return None
        linears = [model.lm_head] + [lin for layer in model.layers for part in (layer.attn, layer.ffn)
                                     for lin in part.children()]
        norms = [model.norm] + [n for layer in model.layers for n in (layer.attn_norm, layer.ffn_norm)]
        if not all(isinstance(layer.attn, GroupedQueryAttention) for layer in model.layers) \
                or not all(isinstance(m, Int8Linear) or (type(m) is torch.nn.Linear and m.bias is None) for m in linears) \
                or not all(type(n) is torch.nn.RMSNorm and n.weight is not None and n.eps == model.cfg.norm_eps
                           for n in norms):
            return None
        error = cpu_kernel_error()
        if error:
            import warnings

            warnings.warn(f"CPU decode-step kernel unavailable ({error}); decoding through the slower PyTorch step")
            return None
        return cls(model, cache)

    def __call__(self, step) -> tuple[torch.Tensor, torch.Tensor]:
        tables, starts = [], []
        for t in step.block_tables:  # one flat list: sequence i's table starts at starts[i]
            starts.append(len(tables))
            tables += t
        return self.model.step(step.token_ids, step.positions, step.slot_mapping, tables, starts, self.cache.k_buf,
                               self.cache.v_buf)
