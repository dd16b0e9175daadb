"""Attention: MHA/GQA/MQA as one module, MLA as another, both on one shared `attend` helper.

Training calls the modules without a cache: attention runs over the sequence with a causal mask
through a backend chosen once where the model is built (`choose_backend`: kernel builds, self-checks
and warnings happen there; the forward only looks the choice up). Generation passes a cache object (see engine/): the module hands it the
new tokens' projections and the cache stores them and attends over everything stored. The cache
contract is one method:

    cache.attend(layer_idx, q [T, Hq, Dqk], k [T, Hkv, Dqk], v [T, Hkv, Dv] or None, scale) -> [T, Hq, Dv]

where T packs the new tokens of every sequence in the batch, and v=None means "the values are the
first Dv channels of k" (MLA's latent cache, where keys and values are one buffer).
"""

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .rope import apply_rope

BACKENDS = ("auto", "triton", "cpu", "sdpa", "math")
AUTO_TRITON_DEVICES = ("cuda",)  # where "auto" tries our Triton kernel (the tests' override: "cpu", the interpreter)
_chosen: dict[tuple[str, str, torch.dtype], str] = {}  # (backend asked, device, dtype) -> the backend that runs


def math_attention(q, k, v, scale: float) -> torch.Tensor:
    """Naive causal attention, q [B, Hq, T, D], k/v [B, Hkv, T, D]. The readable reference.

    Query heads are grouped by their kv head with a view, so GQA never copies K/V."""
    B, Hq, T, _ = q.shape
    Hkv = k.shape[1]
    q = q.view(B, Hkv, Hq // Hkv, T, q.shape[-1])
    # Softmax in at least fp32 (fp16/bf16 inputs), keeping fp64 when testing against references.
    scores = (q @ k.unsqueeze(2).transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype)
    return (probs @ v.unsqueeze(2)).view(B, Hq, T, v.shape[-1])


def choose_backend(backend: str, device, dtype: torch.dtype) -> str:
    """The backend that runs `backend` on `device` in `dtype`, decided where a model is built and kept for
    the forward (`chosen_backend`). Every side effect is here, once per key: our C++ kernel's build, the
    Triton self-check (kernels/self_check.py), a fallback's warning. "auto" is our Triton kernel on CUDA
    once it has passed its self-check, our C++ kernel on CPU in float32, else SDPA. Raises ValueError
    with a one-line message (callers may print it as is) for a backend that cannot run on `device`."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # the forward sees "cuda:0", not "cuda"
        device = torch.device("cuda", torch.cuda.current_device())
    key = (backend, str(device), dtype)
    if key not in _chosen:
        _chosen[key] = _choose(backend, device, dtype)
    return _chosen[key]


@torch.compiler.assume_constant_result  # a pure lookup: torch.compile takes its answer as a constant
def chosen_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """What choose_backend chose for (device, dtype). A model used where it was not built (no choice
    made) runs "auto" on SDPA, which runs everywhere, and a named backend as named."""
    return _chosen.get((backend, str(device), dtype), "sdpa" if backend == "auto" else backend)


def _choose(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend '{backend}': choose one of {', '.join(BACKENDS)}")
    if backend == "cpu" or (backend == "auto" and device.type == "cpu" and device.type not in AUTO_TRITON_DEVICES):
        from kernels.causal_attention_cpu import cpu_kernel_error

        if backend == "auto" and dtype != torch.float32:  # the kernel is float32 only
            return "sdpa"
        problem = "it runs on the CPU only" if device.type != "cpu" else cpu_kernel_error()
        if problem and backend == "cpu":
            raise ValueError(f"attention.backend=cpu: {problem}: use attention.backend=sdpa or auto")
        if problem:
            warnings.warn(f"CPU attention kernel unavailable ({problem}); training on SDPA")
        return "sdpa" if problem else "cpu"
    if backend not in ("auto", "triton"):
        return backend
    from kernels.self_check import flash_attention_ok, triton_unusable  # these import no triton

    if backend == "auto":
        ok = device.type in AUTO_TRITON_DEVICES and triton_unusable(device) is None and flash_attention_ok(device)
        return "triton" if ok else "sdpa"  # flash_attention_ok warned if it failed
    problem = triton_unusable(device)
    if problem:
        raise ValueError(f"attention.backend=triton: {problem}: use attention.backend=sdpa or auto")
    if not flash_attention_ok(device):
        raise ValueError(f"attention.backend=triton: our Triton kernel failed its self-check on {device} "
                         "(see the warning above): use attention.backend=sdpa or auto")
    return backend


def causal_attention(q, k, v, scale: float, backend: str) -> torch.Tensor:
    """Causal self-attention over whole sequences, q [B, Hq, T, Dqk], k [B, Hkv, T, Dqk], v [B, Hkv, T, Dv],
    through the backend chosen for q's device and dtype (choose_backend)."""
    backend = chosen_backend(backend, q.device, q.dtype)
    if backend == "triton":
        from kernels import flash_attention  # imported lazily: Triton is not needed for the other backends

        return flash_attention(q, k, v, causal=True, sm_scale=scale)
    if backend == "cpu" and q.dtype == torch.float32:  # the kernel is float32 only: other dtypes on SDPA
        from kernels.causal_attention_cpu import causal_attention_cpu

        return causal_attention_cpu(q, k, v, scale)
    if backend in ("sdpa", "cpu"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return math_attention(q, k, v, scale)


def attend(q, k, v, *, scale: float, backend: str, cache=None, layer_idx: int = 0) -> torch.Tensor:
    """q [B, T, Hq, Dqk], k [B, T, Hkv, Dqk], v [B, T, Hkv, Dv] or None (cache only) -> [B, T, Hq, Dv]."""
    B, T = q.shape[:2]
    if cache is not None:
        out = cache.attend(layer_idx, q.flatten(0, 1), k.flatten(0, 1), None if v is None else v.flatten(0, 1), scale)
        return out.view(B, T, *out.shape[1:])
    out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, backend)
    return out.transpose(1, 2)


class GroupedQueryAttention(nn.Module):
    """MHA (n_kv_heads == n_heads), GQA (1 < n_kv_heads < n_heads) and MQA (n_kv_heads == 1)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: str = "auto"):
        super().__init__()
        self.layer_idx, self.backend = layer_idx, backend
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # One fused projection for q, k and v: a single large matmul is faster than three small ones.
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(q, k, v, scale=self.head_dim ** -0.5, backend=self.backend, cache=cache, layer_idx=self.layer_idx)
        return self.wo(out.reshape(B, T, -1))


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2 MLA with decoupled RoPE.

    Keys and values come from a latent c_kv = norm(W_DKV x) of width kv_lora_rank; position lives in a
    separate RoPE key k_pe, one for all heads. Training up-projects c_kv to per-head k_nope and v.
    Decoding caches only [c_kv, k_pe] and absorbs the up-projections into the query and the output:
    q_nope . (W_UK c) = (W_UK^T q_nope) . c, so attention runs in latent space as MQA whose keys are
    [c_kv, k_pe] (width r + rope) and whose values are c_kv (width r).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: str = "auto"):
        super().__init__()
        self.layer_idx, self.backend = layer_idx, backend
        self.n_heads = cfg.n_heads
        self.nope, self.rope, self.v_dim, self.rank = (
            cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank)
        q_out = cfg.n_heads * (self.nope + self.rope)
        if cfg.q_lora_rank:
            self.wq = nn.Sequential(nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False),
                                    nn.RMSNorm(cfg.q_lora_rank, eps=cfg.mla_norm_eps),
                                    nn.Linear(cfg.q_lora_rank, q_out, bias=False))
        else:
            self.wq = nn.Linear(cfg.dim, q_out, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, self.rank + self.rope, bias=False)
        self.kv_norm = nn.RMSNorm(self.rank, eps=cfg.mla_norm_eps)
        self.wkv_b = nn.Linear(self.rank, cfg.n_heads * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.v_dim, cfg.dim, bias=False)
        self.scale = (self.nope + self.rope) ** -0.5

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        c_kv, k_pe = self.wkv_a(x).split([self.rank, self.rope], dim=-1)
        c_kv = self.kv_norm(c_kv)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin)  # [B, T, 1, rope]: shared by all heads
        if cache is None:
            kv = self.wkv_b(c_kv).view(B, T, self.n_heads, self.nope + self.v_dim)
            k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
            q = torch.cat([q_nope, q_pe], dim=-1)
            k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_heads, -1)], dim=-1)
            out = attend(q, k, v, scale=self.scale, backend=self.backend)
        else:
            w_uk, w_uv = self.wkv_b.weight.view(self.n_heads, self.nope + self.v_dim, self.rank).split(
                [self.nope, self.v_dim], dim=1)
            q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
            q = torch.cat([q_latent, q_pe], dim=-1)
            latent = torch.cat([c_kv.unsqueeze(2), k_pe], dim=-1)  # [B, T, 1, r + rope]: the whole cache entry
            out_latent = attend(q, latent, None, scale=self.scale, backend=self.backend, cache=cache,
                                layer_idx=self.layer_idx)
            out = torch.einsum("bthr,hvr->bthv", out_latent, w_uv)
        return self.wo(out.reshape(B, T, -1))


def build_attention(cfg: ModelConfig, layer_idx: int, backend: str) -> nn.Module:
    cls = MultiHeadLatentAttention if cfg.attention == "mla" else GroupedQueryAttention
    return cls(cfg, layer_idx, backend)

