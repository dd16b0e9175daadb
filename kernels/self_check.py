"""Check our Triton kernels once per device before trusting them with real work.

The Triton kernels have been verified in Triton's CPU interpreter only (tests/), never compiled
on a GPU by us. A kernel that compiles to wrong code, or does not compile at all on some GPU,
must not train a model or serve tokens silently. So the first use on each device runs the kernel
on a small random problem and compares it with PyTorch:

    flash_attention_ok(device)   forward and backward vs SDPA (training attention)
    paged_decode_ok(device)      one split and split-K vs paged_attention_decode_torch (decoding)

Each returns True if the kernel agrees, else warns in ONE line (what failed and why, what is
used instead; SMALL_LLM_DEBUG=1 also prints an exception's traceback) and returns False; the
caller then uses the PyTorch path. The answer is cached per device, so the check costs one small
problem (plus Triton's compile and autotune, which the first real call would pay anyway) per
process.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1), which is how the tests
check this logic without a GPU. `import kernels.self_check` does not import triton.
"""

from __future__ import annotations

import os
import threading
import traceback
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

_results: dict[tuple[str, str], bool] = {}
_lock = threading.Lock()

# Allowed error relative to the largest reference value. The check's inputs are bf16 on CUDA (what
# training and serving use) and fp32 on CPU. A wrong kernel misses by O(1); bf16 rounding of the
# output and of the gradients' many-term sums stays well under 3e-2.
_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-3}


def triton_unusable(device) -> Optional[str]:
    """Why our Triton kernels cannot run on `device` (None if they can): triton is missing (it has
    wheels for Linux only), or the device is not CUDA (CPU only under TRITON_INTERPRET=1, for tests)."""
    try:
        from ._triton_loader import interpreting
    except ImportError:
        return "the triton package is not installed (Linux only: pip install triton)"
    device = torch.device(device)
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    return (f"it needs a CUDA GPU, got device {device} (CPU runs it only in Triton's slow "
            "interpreter, TRITON_INTERPRET=1, for tests)")


def flash_attention_ok(device) -> bool:
    """True if our flash-attention kernel matches SDPA on `device` (checked once per device)."""
    return _cached("flash_attention", torch.device(device), check_flash_attention,
                   "Triton flash-attention kernel", "PyTorch SDPA")


def paged_decode_ok(device) -> bool:
    """True if our paged-decode kernel matches the PyTorch gather path on `device` (once per device)."""
    return _cached("paged_decode", torch.device(device), check_paged_decode,
                   "Triton paged-decode kernel", "the PyTorch gather path")


def _cached(name: str, device: torch.device, check: Callable, kernel: str, fallback: str) -> bool:
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one check
        device = torch.device("cuda", torch.cuda.current_device())
    key = (name, str(device))
    if key in _results:
        return _results[key]
    with _lock:
        if key not in _results:
            problem = run_check(check, device)
            if problem:
                warnings.warn(f"our {kernel} failed its self-check on {device} ({problem}); using {fallback} "
                              "instead. Please report this with the output of scripts/gpu_check.py (SMALL_LLM_DEBUG=1 "
                              "prints the traceback)", stacklevel=3)
            _results[key] = problem is None
        return _results[key]


def run_check(check: Callable, device: torch.device) -> Optional[str]:
    """`check(device)` as its caller's context would not disturb it: the first use may come under
    torch.no_grad / inference_mode (evaluation, generation) or autocast (training), none of which
    may change the check (it needs gradients and an fp32 reference). Exceptions become the problem."""
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            return check(device)
    except Exception as e:  # a compile error, an unsupported GPU, a launch failure ...
        if os.environ.get("SMALL_LLM_DEBUG") == "1":
            traceback.print_exception(e)
        return describe_exception(e)


def describe_exception(e: BaseException) -> str:
    """`Type: first line` of `e`, and of the exception that caused it if any: a wrapper's first line often
    names no cause (Triton's CompilationError starts with "at 12:4:", the kernel's source position)."""
    def line(x: BaseException) -> str:
        message = str(x).strip().splitlines()
        return f"{type(x).__name__}: {message[0] if message else 'no message'}"

    root, seen = e, {id(e)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        root = nxt
        seen.add(id(root))
    return line(e) if root is e else f"{line(e)}, caused by {line(root)}"


def _check_dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _mismatch(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> Optional[str]:
    """None if `actual` is close to `expected` (relative to expected's largest value), else what differs."""
    if actual.shape != expected.shape:
        return f"{name} has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    err = (actual.float() - expected.float()).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    if not err <= _TOLERANCE[dtype] * scale:  # also catches NaN
        return f"{name} differs by {err:.3g}, allowed {_TOLERANCE[dtype] * scale:.3g}"
    return None


def check_flash_attention(device: torch.device, kernel: Optional[Callable] = None) -> Optional[str]:
    """Run `kernel` (default: kernels.flash_attention) forward and backward on a small causal GQA
    problem and compare with SDPA computed in fp32 from the same inputs. None if they agree, else
    what differs. N = 72 spans several tiles with a ragged tail; 4 query heads share 2 K/V heads."""
    if kernel is None:
        from .flash_attention import flash_attention as kernel
    dtype = _check_dtype(device)
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, N, D = 1, 4, 2, 72, 32
    q = 2.0 * torch.randn(B, Hq, N, D, generator=g)  # a peaked softmax: rescaling errors show
    k, v = torch.randn(B, Hkv, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g)
    do = torch.randn(B, Hq, N, D, generator=g)
    q, k, v, do = (t.to(device, dtype) for t in (q, k, v, do))

    def run(fn, leaves):
        leaves = [t.detach().clone().requires_grad_() for t in leaves]
        out = fn(*leaves)
        return (out, *torch.autograd.grad(out, leaves, do.to(out.dtype)))

    got = run(lambda q, k, v: kernel(q, k, v, causal=True), (q, k, v))
    want = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
               [t.float() for t in (q, k, v)])
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, want):
        problem = _mismatch(name, a, b, dtype)
        if problem:
            return problem
    return None


def check_paged_decode(device: torch.device, kernel: Optional[Callable] = None) -> Optional[str]:
    """Run `kernel` (default: kernels.paged_attention_decode) on a small paged cache (pages handed
    out in shuffled order, contexts of 1 to 150 tokens, GQA and MLA's latent mode, one split and
    split-K) and compare with kernels.paged_attention_decode_torch. None if they agree."""
    from .paged_attention import paged_attention_decode_torch

    if kernel is None:
        from .paged_attention import paged_attention_decode as kernel
    dtype = _check_dtype(device)
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, page, lens = 3, 4, 2, 64, 16, [1, 37, 150]
    pages_per_seq = -(-max(lens) // page)
    num_pages = B * pages_per_seq
    tables = torch.randperm(num_pages, generator=g).view(B, pages_per_seq).to(device, torch.int32)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = (2.0 * torch.randn(B, Hq, D, generator=g)).to(device, dtype)
    k_cache = torch.randn(num_pages, page, Hkv, D, generator=g).to(device, dtype)
    v_cache = torch.randn(num_pages, page, Hkv, D, generator=g).to(device, dtype)
    cases = [("gqa", q, k_cache, v_cache, None), ("mla-latent", q, k_cache[:, :, :1], None, D // 2)]
    for name, q_, k_, v_, v_dim in cases:
        want = paged_attention_decode_torch(q_, k_, v_, tables, context_lens, v_dim=v_dim)
        for splits in (1, 3):
            got = kernel(q_, k_, v_, tables, context_lens, v_dim=v_dim, num_splits=splits)
            problem = _mismatch(f"{name} output ({splits} split{'s' * (splits > 1)})", got, want, dtype)
            if problem:
                return problem
    return None
