"""Training throughput: tokens/s and MFU against a matmul peak measured on this machine.

    python -m scripts.bench_train                       # the README shape, fp32, eager and compiled
    python -m scripts.bench_train --attention mla --steps 10
    python -m scripts.bench_train --baseline-hf         # also time transformers' LlamaForCausalLM (if installed)
    python -m scripts.bench_train --busy                # next to a process spinning on one core, thread governor on
    python -m scripts.bench_train --busy --fixed-threads  # ... threads fixed (train.py's default)

FLOPs per token follow the PaLM appendix: 6 x (matmul parameters) + 12 x layers x heads x head_dim
x seq_len for attention (halved: causal). MFU = achieved FLOP/s / peak, where the peak is the best
of a few large fp32 matmuls on this machine (so MFU is relative to what this CPU can really do).
"""

import argparse
import time

import torch

from engine.threads import ThreadGovernor
from model import ModelConfig, Transformer
from scripts.busy import spin_one_core


def matmul_peak(device: torch.device, dtype=torch.float32, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def flops_per_token(cfg: ModelConfig, seq_len: int, n_matmul_params: int) -> float:
    attn_width = cfg.n_heads * ((cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) / 2
                                if cfg.attention == "mla" else cfg.head_dim)
    return 6 * n_matmul_params + 12 * cfg.n_layers * attn_width * seq_len / 2


def time_steps(step_fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step_fn()
    t = time.perf_counter()
    for _ in range(steps):
        step_fn()
    return (time.perf_counter() - t) / steps


def bench_ours(cfg: ModelConfig, args, compile_model: bool) -> float:
    torch.manual_seed(0)
    model = Transformer(cfg, backend="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = torch.compile(model) if compile_model else model
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1))
    # --busy: train.adaptive_threads=true's governor between steps, as Trainer.train_step runs it
    governor = ThreadGovernor() if args.busy and not args.fixed_threads else None

    def step():
        if governor is not None:
            governor.update()
        _, loss = fwd(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    threads = torch.get_num_threads()
    try:
        return time_steps(step, args.steps, args.warmup + (2 if compile_model else 0))
    finally:
        torch.set_num_threads(threads)  # the next measurement starts from the same count


def bench_hf(cfg: ModelConfig, args) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=args.seq_len, tie_word_embeddings=False, attn_implementation="sdpa"))
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len))

    def step():
        hf(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_steps(step, args.steps, args.warmup)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention", default="gqa", choices=["mha", "gqa", "mqa", "mla"])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-kv-heads", type=int, default=2)
    p.add_argument("--ffn-dim", type=int, default=688)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    p.add_argument("--baseline-hf", action="store_true", help="also time transformers' LlamaForCausalLM")
    p.add_argument("--busy", action="store_true", help="time the steps next to a process spinning on one core, "
                   "our steps under the thread governor (train.adaptive_threads=true)")
    p.add_argument("--fixed-threads", action="store_true",
                   help="with --busy: keep the thread count fixed, as train.py does by default")
    args = p.parse_args()
    if args.fixed_threads and not args.busy:
        p.error("--fixed-threads goes with --busy (without it, the threads are fixed already)")

    kv = {"mha": args.n_heads, "mqa": 1}.get(args.attention, args.n_kv_heads)
    cfg = ModelConfig(vocab_size=args.vocab_size, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                      n_kv_heads=kv, ffn_dim=args.ffn_dim, max_seq_len=args.seq_len, attention=args.attention)
    model = Transformer(cfg)
    n_matmul = model.num_params(include_embedding=False) - sum(
        p.numel() for n, p in model.named_parameters() if "norm" in n)
    fpt = flops_per_token(cfg, args.seq_len, n_matmul)
    peak = matmul_peak(torch.device("cpu"))
    tokens = args.batch_size * args.seq_len
    print(f"{args.attention}: d={args.dim} L={args.n_layers} H={args.n_heads} kv={kv} ffn={args.ffn_dim} "
          f"vocab={args.vocab_size} | batch {args.batch_size} x seq {args.seq_len} fp32 | "
          f"threads {torch.get_num_threads()} | measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    if args.busy:  # after the peak, which is the idle machine's
        spin_one_core()
        print("one core busy: a process spins beside; our threads "
              + ("fixed" if args.fixed_threads else "under the governor (engine/threads.py)"))
    rows = [("ours (eager)", bench_ours(cfg, args, False))]
    if not args.no_compile:
        rows.append(("ours (torch.compile)", bench_ours(cfg, args, True)))
    if args.baseline_hf:
        rows.append(("transformers LlamaForCausalLM", bench_hf(cfg, args)))
    print(f"{'':32s} {'tokens/s':>10s} {'MFU':>7s}")
    for name, sec in rows:
        tok_s = tokens / sec
        print(f"{name:32s} {tok_s:10.0f} {tok_s * fpt / peak:7.1%}")


if __name__ == "__main__":
    main()
