"""Training step time and MFU: ours against transformers' LlamaForCausalLM on the same shape.

    python -m scripts.bench_train                       # the README shape, fp32: ours (Muon, AdamW, each compiled
                                                        # too) against transformers
    python -m scripts.bench_train --variants adamw logits-adamw hf   # what the chunked loss (model/loss.py) is worth
    python -m scripts.bench_train --variants compiled compiled-sdpa hf  # what our CPU attention kernel is worth
    python -m scripts.bench_train --variants muon hf --rounds 5
    python -m scripts.bench_train --attention mla --variants muon compiled
    python -m scripts.bench_train --variants muon adamw  # the cost of the default Muon's step against AdamW's
    python -m scripts.bench_train --peak-tflops 0.15    # MFU against a peak you know better than the estimate
    python -m scripts.bench_train --variants adamw --rounds 1 --profile   # where a step's time goes
    python -m scripts.bench_train --busy                # next to a process spinning on one core, thread governor on
    python -m scripts.bench_train --busy --fixed-threads  # ... threads fixed (train.py's default)

A step is what train.py runs: forward, backward, gradient clipping, the optimizer step (ours: the
trainer's optimizer from training/optim.py, Muon by default, AdamW fused; transformers: torch's fused
AdamW with the same settings, which transformers' Trainer picks with torch >= 2.8, `adamw_torch_fused`).
Each round times every variant in turn for --steps steps after --warmup, so a change of machine load
hits all of them alike; the table gives each variant's median over the rounds, and its ratio to
transformers in each round.
MFU is tokens/s x FLOPs per token / the device's peak, both defined in training/metrics.py.
--busy runs every round next to a process spinning on one core, our variants under the thread governor
that train.adaptive_threads=true runs between steps (engine/threads.py) unless --fixed-threads.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from engine.threads import ThreadGovernor
from model import ModelConfig, Transformer
from scripts.busy import spin_one_core
from training.config import TrainConfig
from training.metrics import flops_per_token, peak_flops
from training.optim import build_optimizer
from training.trainer import choose_attention, compile_for_training

# Ours: (optimizer, train.compile, the loss taken on the whole logits as before model/loss.py, attention.backend:
# auto is our C++ kernel on CPU, as train.py runs); hf: transformers.
VARIANTS = {"muon": ("muon", False, False, "auto"), "adamw": ("adamw", False, False, "auto"),
            "compiled": ("muon", True, False, "auto"), "compiled-adamw": ("adamw", True, False, "auto"),
            "logits-adamw": ("adamw", False, True, "auto"), "sdpa": ("muon", False, False, "sdpa"),
            "compiled-sdpa": ("muon", True, False, "sdpa"), "hf": None}
DEFAULT_VARIANTS = ["muon", "adamw", "compiled", "compiled-adamw", "hf"]


def train_step(forward, params, optimizer, clip: float, governor=None):
    """One step as Trainer.train_step runs it (without its loss and gradient-norm checks)."""
    def step():
        if governor is not None:  # train.adaptive_threads=true: fewer threads while other processes take cores
            governor.update()
        forward().backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def ours(cfg: ModelConfig, x: torch.Tensor, optimizer: str, compiled: bool, logits_loss: bool, backend: str,
         governor=None):
    torch.manual_seed(0)
    choose_attention(backend, torch.device("cpu"))  # as the Trainer does
    model = Transformer(cfg, backend=backend)
    # As train.py compiles: this also turns on torch's deterministic mode, process-wide, so every variant of a
    # run that includes a compiled one (transformers too) steps in that mode.
    fwd = compile_for_training(model, torch.device("cpu")) if compiled else model
    tc = TrainConfig(optimizer=optimizer)
    params = list(model.parameters())
    if logits_loss:  # the whole [tokens, vocab] logits, then F.cross_entropy: transformers' way, ours before
        def loss():
            return F.cross_entropy(fwd(x[:, :-1])[0].flatten(0, 1), x[:, 1:].flatten())
    else:
        def loss():
            return fwd(x[:, :-1], x[:, 1:])[1]
    return train_step(loss, params, build_optimizer(model, tc, "cpu"), tc.grad_clip, governor)


def transformers_llama(cfg: ModelConfig, x: torch.Tensor):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=False, attn_implementation="sdpa"))
    tc = TrainConfig()
    params = list(hf.parameters())
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay, fused=True)
    # The same seq_len input tokens as ours; transformers shifts the labels inside (seq_len - 1 predictions)
    return train_step(lambda: hf(input_ids=x[:, :-1], labels=x[:, :-1]).loss, params, opt, tc.grad_clip)


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
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                   help="muon: ours eager (the default optimizer; train.compile=auto keeps make train's short run "
                   "eager); adamw: train.optimizer=adamw; compiled: train.compile=true with Muon (what auto runs for "
                   "a run estimated at over 10 minutes, such as 400 steps at the README shape); compiled-adamw: "
                   "both; logits-adamw: adamw with the loss on the whole logits (as before model/loss.py); hf: "
                   "transformers; sdpa, compiled-sdpa: muon and compiled on torch's SDPA instead of our CPU attention "
                   "kernel")
    p.add_argument("--rounds", type=int, default=3, help="rounds of alternated timings")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the first round "
                   "(compiled: the compilation happens here)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak TFLOP/s for MFU "
                   "(default: estimated from the CPU, see training/metrics.py)")
    p.add_argument("--busy", action="store_true", help="time the steps next to a process spinning on one core, "
                   "ours under the thread governor (train.adaptive_threads=true)")
    p.add_argument("--fixed-threads", action="store_true",
                   help="with --busy: keep the thread count fixed, as train.py does by default")
    p.add_argument("--profile", action="store_true", help="then profile one step of each variant (torch.profiler): "
                   "where the time goes, op by op")
    args = p.parse_args()
    if args.fixed_threads and not args.busy:
        p.error("--fixed-threads goes with --busy (without it, the threads are fixed already)")
    if "hf" in args.variants and args.attention == "mla":
        p.error("transformers' LlamaForCausalLM has no MLA: drop hf from --variants")

    kv = {"mha": args.n_heads, "mqa": 1}.get(args.attention, args.n_kv_heads)
    cfg = ModelConfig(vocab_size=args.vocab_size, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                      n_kv_heads=kv, ffn_dim=args.ffn_dim, max_seq_len=args.seq_len, attention=args.attention)
    fpt = flops_per_token(Transformer(cfg), args.seq_len)
    peak = peak_flops(torch.device("cpu"), args.peak_tflops)
    tokens = args.batch_size * args.seq_len
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    peak_text = f"peak {peak / 1e9:.1f} GFLOP/s" if peak else "peak unknown (set --peak-tflops)"
    print(f"{args.attention}: d={args.dim} L={args.n_layers} H={args.n_heads} kv={kv} ffn={args.ffn_dim} "
          f"vocab={args.vocab_size} | batch {args.batch_size} x seq {args.seq_len} fp32 | "
          f"threads {torch.get_num_threads()} | {fpt / 1e6:.1f} MFLOP/token | {peak_text}")

    if args.busy:
        spin_one_core()
        print("one core busy: a process spins beside; our threads "
              + ("fixed" if args.fixed_threads else "under the governor (engine/threads.py)"))
    governor = ThreadGovernor() if args.busy and not args.fixed_threads else None
    threads = torch.get_num_threads()
    steps = {}
    for name in args.variants:
        t = time.perf_counter()
        steps[name] = transformers_llama(cfg, x) if name == "hf" else ours(cfg, x, *VARIANTS[name], governor)
        for _ in range(args.warmup):
            steps[name]()
        print(f"{name}: built and warmed up in {time.perf_counter() - t:.1f} s")
    tok_s = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            tok_s[name].append(tokens * args.steps / (time.perf_counter() - t))
            torch.set_num_threads(threads)  # the next variant starts from the same count

    # The machine's speed drifts between rounds (other virtual machines on the host): the ratio within a
    # round, where the variants ran back to back, is the steadier figure, and its median is the summary.
    print(f"{'':14s} {'tokens/s (median, each round)':>44s} {'MFU':>7s}  x transformers: median (each round)")
    for name, rates in tok_s.items():
        mfu = f"{statistics.median(rates) * fpt / peak:7.1%}" if peak else f"{'-':>7s}"
        ratio = "-"
        if "hf" in tok_s:
            ratios = [r / h for r, h in zip(rates, tok_s["hf"])]
            ratio = f"{statistics.median(ratios):.2f} ({' '.join(f'{r:.2f}' for r in ratios)})"
        print(f"{name:14s} {statistics.median(rates):8.0f}  ({' '.join(f'{r:.0f}' for r in rates):>32s}) "
              f"{mfu}  {ratio}")
    if args.profile:
        from torch.profiler import profile

        for name, step in steps.items():
            with profile() as prof:
                step()
            print(f"\n{name}: one step, ops by their own CPU time\n"
                  + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
