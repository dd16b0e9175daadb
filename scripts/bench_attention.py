"""Attention throughput: our Triton FlashAttention-2 vs SDPA (flash backend) vs FlexAttention.

Prints forward and backward TFLOP/s per shape, with
    forward FLOPs  = 2 * B * Hq * N^2 * (Dqk + Dv), halved when causal,
    backward FLOPs = 2.5 * forward FLOPs,
the usual FlashAttention accounting (masked-out work is not counted).

Shapes: "d64" and "d128" (Dqk = Dv), and "mla" (Dqk = 192, Dv = 128, DeepSeek-style MLA heads,
which SDPA's flash backend cannot run). Batch is 16k tokens / N, heads = 2048 / Dv.

    python scripts/bench_attention.py                       # CUDA sweep, bf16, N = 512 .. 8192
    python scripts/bench_attention.py --shapes d128 --seq-lens 2048 4096 --causal
    python scripts/bench_attention.py --group 4             # GQA: Hkv = Hq / 4
    python scripts/bench_attention.py --check               # also compare against a reference
    python scripts/bench_attention.py --smoke               # tiny shapes, CPU, Triton interpreter

--smoke runs end to end without a GPU (it switches on TRITON_INTERPRET=1 itself); its numbers
only show that everything runs. No GPU figures have been measured for this repository yet.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before triton is imported anywhere
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
from kernels import flash_attention  # noqa: E402

SHAPES = {"d64": (64, 64), "d128": (128, 128), "mla": (192, 128)}
SMOKE_SHAPES = {"d64": (16, 16), "d128": (32, 32), "mla": (48, 32)}  # scaled down for --smoke


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU under Triton's interpreter, 1 repetition (no GPU needed)")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES),
                   help="head-dim configurations to run (default: all)")
    p.add_argument("--seq-lens", nargs="+", type=int, default=None,
                   help="sequence lengths (default 512 1024 2048 4096 8192; smoke: 32 64)")
    p.add_argument("--causal", dest="causal", action="store_const", const=[True],
                   help="causal only (default: causal and non-causal)")
    p.add_argument("--no-causal", dest="causal", action="store_const", const=[False], help="non-causal only")
    p.add_argument("--group", type=int, default=1, help="query heads per kv head (1 = MHA; default 1)")
    p.add_argument("--tokens", type=int, default=16384, help="batch * N per measurement (default 16384)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="default bf16")
    p.add_argument("--warmup", type=int, default=None, help="warm-up time in ms on CUDA (default 25)")
    p.add_argument("--reps", type=int, default=None, help="timing time in ms on CUDA (default 100); "
                   "repetitions on CPU (default 1)")
    p.add_argument("--check", action="store_true",
                   help="also report the max abs error of our output and gradients vs a float32 reference")
    args = p.parse_args(argv)
    if args.causal is None:
        args.causal = [True, False]
    return args


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------
def time_ms(fn, device, warmup, reps, grads_to_none=()):
    """Median milliseconds per call: triton.testing.do_bench on CUDA, a wall clock on CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup, rep=reps, grad_to_none=list(grads_to_none))
    for _ in range(max(warmup, 0)):
        fn()
    times = []
    for _ in range(max(reps, 1)):
        for t in grads_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


# ------------------------------------------------------------------------------------------
# The three implementations: each returns o for q [B,Hq,N,Dqk], k [B,Hkv,N,Dqk], v [B,Hkv,N,Dv]
# ------------------------------------------------------------------------------------------
def ours(q, k, v, causal):
    return flash_attention(q, k, v, causal=causal)


def sdpa_flash(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # SDPA explains why it refuses a backend only in warnings: turn them into the error text.
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        except RuntimeError as e:
            msgs = (str(w.message).split(" (Triggered")[0].strip() for w in caught)
            why = "; ".join(m for m in msgs if m and not m.endswith(":"))
            raise RuntimeError(f"{why or e}") from e


_flex_cache = {}


def flex(q, k, v, causal):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention as flex_attn

    B, Hq, N, _ = q.shape
    key = (q.device, N, causal)
    if key not in _flex_cache:
        mask = None
        if causal:
            mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, N, N,
                                     device=q.device)
        # Compiled on CUDA (eager flex attention is a slow reference); eager on CPU for --smoke.
        fn = torch.compile(flex_attn) if q.device.type == "cuda" else flex_attn
        _flex_cache[key] = (fn, mask)
    fn, mask = _flex_cache[key]
    with warnings.catch_warnings():  # eager flex on CPU warns that it is unfused: we know
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return fn(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


IMPLS = {"ours": ours, "sdpa": sdpa_flash, "flex": flex}


def reference(q, k, v, causal):
    q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        n = q.shape[2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return s.softmax(-1) @ v


# ------------------------------------------------------------------------------------------
def measure(impl, q, k, v, do, causal, device, warmup, reps):
    """(forward ms, backward ms); either is the exception instead if that pass cannot run."""
    plain = [t.detach() for t in (q, k, v)]
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    try:
        with torch.no_grad():
            impl(*plain, causal)  # first call compiles / autotunes / checks support
            fwd = time_ms(lambda: impl(*plain, causal), device, warmup, reps)
    except Exception as e:
        return e, e
    try:
        o = impl(*leaves, causal)
        o.backward(do, retain_graph=True)
        bwd = time_ms(lambda: o.backward(do, retain_graph=True), device, warmup, reps, grads_to_none=leaves)
    except Exception as e:
        bwd = e
    return fwd, bwd


def check(q, k, v, do, causal):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    o = flash_attention(*leaves, causal=causal)
    grads = torch.autograd.grad(o, leaves, do)
    ref_leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ro = reference(*ref_leaves, causal)
    rgrads = torch.autograd.grad(ro, ref_leaves, do.float())
    return max((a.float() - b).abs().max().item() for a, b in zip((o, *grads), (ro, *rgrads)))


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        device = torch.device("cpu")
        shapes = {name: SMOKE_SHAPES[name] for name in args.shapes}
        seq_lens = args.seq_lens or [32, 64]
        tokens, heads_budget = 64, 64
        warmup, reps = (0 if args.warmup is None else args.warmup), (1 if args.reps is None else args.reps)
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device: use --smoke to run the tiny CPU version", file=sys.stderr)
            sys.exit(2)
        device = torch.device("cuda")
        shapes = {name: SHAPES[name] for name in args.shapes}
        seq_lens = args.seq_lens or [512, 1024, 2048, 4096, 8192]
        tokens, heads_budget = args.tokens, 2048
        warmup, reps = (25 if args.warmup is None else args.warmup), (100 if args.reps is None else args.reps)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    print(f"device={device} dtype={args.dtype} group={args.group}"
          + ("  [smoke: CPU + Triton interpreter, numbers are meaningless]" if args.smoke else ""))
    cols = ["shape", "N", "B", "Hq", "causal"] + [f"{i} {p}" for p in ("fwd", "bwd") for i in IMPLS]
    if args.check:
        cols.append("max|err|")
    print("TFLOP/s")
    print("  ".join(f"{c:>10}" for c in cols))
    notes: list[str] = []

    def note(reason):
        reason = reason.strip().splitlines()[0][:200] if reason.strip() else "failed"
        if reason not in notes:
            notes.append(reason)
        return f"n/a[{notes.index(reason) + 1}]"

    for name, (dqk, dv) in shapes.items():
        for n in seq_lens:
            for causal in args.causal:
                hq = max(args.group, heads_budget // dv // args.group * args.group)
                hkv = hq // args.group
                b = max(1, tokens // n)
                g = torch.Generator(device=device).manual_seed(0)
                q = torch.randn(b, hq, n, dqk, device=device, dtype=dtype, generator=g)
                k = torch.randn(b, hkv, n, dqk, device=device, dtype=dtype, generator=g)
                v = torch.randn(b, hkv, n, dv, device=device, dtype=dtype, generator=g)
                do = torch.randn(b, hq, n, dv, device=device, dtype=dtype, generator=g)
                flops = 2 * b * hq * n * n * (dqk + dv) / (2 if causal else 1)
                fwd_cells, bwd_cells = [], []
                for impl in IMPLS.values():
                    fwd_ms, bwd_ms = measure(impl, q, k, v, do, causal, device, warmup, reps)
                    for cells, ms, work in ((fwd_cells, fwd_ms, flops), (bwd_cells, bwd_ms, 2.5 * flops)):
                        if isinstance(ms, Exception):  # unsupported shape / backend on this machine
                            cells.append(note(f"{impl.__name__}: {type(ms).__name__}: {ms}"))
                        else:
                            cells.append(f"{work / ms / 1e9:.3g}")
                row = [name, n, b, hq, causal] + fwd_cells + bwd_cells
                if args.check:
                    row.append(f"{check(q, k, v, do, causal):.2e}")
                print("  ".join(f"{str(c):>10}" for c in row), flush=True)
    for i, reason in enumerate(notes, 1):
        print(f"[{i}] {reason}")


if __name__ == "__main__":
    main()
