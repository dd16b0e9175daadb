"""Training speed and MFU: train.py's own step, and its whole loop, against transformers' LlamaForCausalLM.

    python -m scripts.bench_train                       # the README shape, fp32: Trainer.train_step (Muon, AdamW,
                                                        # each compiled too) against transformers
    python -m scripts.bench_train --loop --variants muon compiled hf --steps 10   # train.py's whole loop
    python -m scripts.bench_train --shape make-train    # `make train`'s shape (train.py's defaults)
    python -m scripts.bench_train --variants adamw logits-adamw hf   # what the chunked loss (model/loss.py) is worth
    python -m scripts.bench_train --variants compiled compiled-sdpa hf  # what our CPU attention kernel is worth
    python -m scripts.bench_train --variants muon compiled attention=mla   # any train.py option, key=value
    python -m scripts.bench_train --variants muon adamw  # the cost of the default Muon's step against AdamW's
    python -m scripts.bench_train --peak-tflops 0.15    # MFU against a peak you know better than the estimate
    python -m scripts.bench_train --variants adamw --rounds 1 --profile   # where a step's time goes
    python -m scripts.bench_train --busy                # next to a process spinning on one core, thread governor on
    python -m scripts.bench_train --busy --fixed-threads  # ... threads fixed (train.py's default)

Ours is train.py's own code: each variant is a Trainer (training/trainer.py) built from the config train.py
composes for the shape and the variant's options, and a step is its `train_step` (the batch, forward,
backward, clipping, the loss and gradient checks, the optimizer). `--loop` runs train.py's whole loop
instead (`train.run`: also the logging, the progress bar, wandb offline, the time and signal checks) for
train.log_every + --steps steps, and takes the seconds per step between its log lines at step
train.log_every and at the last step from the trainer's own clock (metrics.jsonl's elapsed_s): start-up,
the compilation and the run's one evaluation and save, after its last step, fall outside. It also says
what share of that time went to train_step: the rest is the loop's own. transformers is LlamaForCausalLM with
torch's fused AdamW and the same settings, which transformers' Trainer picks with torch >= 2.8
(`adamw_torch_fused`), on random tokens of the same shape.
Each round times every variant in turn, so a change of machine load hits all of them alike; the table
gives each variant's median over the rounds, and its ratio to transformers in each round.
MFU is tokens/s x FLOPs per token / the device's peak, both defined in training/metrics.py.
--busy runs every round next to a process spinning on one core, our variants under the thread governor
that train.adaptive_threads=true runs between steps (engine/threads.py) unless --fixed-threads.
"""

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import train
from data import prepare
from model import ModelConfig, Transformer
from scripts.busy import spin_one_core
from training.config import TrainConfig
from training.metrics import flops_per_token, peak_flops
from training.plan import make_plan
from training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
# train.py's options for each shape: the README's (model/small, 8,192 BPE ids, 16 x 256 tokens) and make
# train's (train.py's defaults: model/tiny, 4,096 ids, 32 x 128 tokens), both on the embedded plays.
SHAPES = {"readme": ["model=small", "data.vocab_size=8192", "train.batch_size=16", "train.seq_len=256"],
          "make-train": []}
# Ours: train.py's options for each variant (attention.backend=auto is our C++ kernel on CPU, as train.py
# runs); hf: transformers.
VARIANTS = {"muon": ["train.compile=false"], "adamw": ["train.optimizer=adamw", "train.compile=false"],
            "compiled": ["train.compile=true"], "compiled-adamw": ["train.optimizer=adamw", "train.compile=true"],
            "logits-adamw": ["train.optimizer=adamw", "train.compile=false"],
            "sdpa": ["attention.backend=sdpa", "train.compile=false"],
            "compiled-sdpa": ["attention.backend=sdpa", "train.compile=true"], "hf": None}
DEFAULT_VARIANTS = ["muon", "adamw", "compiled", "compiled-adamw", "hf"]


def config(overrides: list[str]):
    """The config train.py composes from these command-line options."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


class LogitsLossTrainer(Trainer):
    """The variant logits-adamw: the whole [tokens, vocab] logits, then F.cross_entropy (transformers' way,
    and ours before model/loss.py)."""

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.fwd_model(x)[0].flatten(0, 1), y.flatten())


class TimedTrainer(Trainer):
    """The Trainer, keeping the seconds each train_step took (--loop: the loop's time outside the steps)."""
    step_seconds = []

    def train_step(self) -> dict:
        started = time.perf_counter()
        stats = super().train_step()
        TimedTrainer.step_seconds.append(time.perf_counter() - started)
        return stats


def loop_seconds_per_step(cfg) -> tuple[float, float]:
    """train.run(cfg), train.py's whole loop, quietly: the seconds per step from its log line at step
    train.log_every to the one at the last step (train.max_steps), and the share of them in train_step. The
    run evaluates and saves after its last step only, outside that window."""
    cfg.train.eval_every = cfg.train.save_every = cfg.train.max_steps
    TimedTrainer.step_seconds = []
    with (contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()),
          mock.patch.object(train, "Trainer", TimedTrainer)):
        train.run(cfg)
    lines = (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()
    elapsed = {r["step"]: r["elapsed_s"] for r in map(json.loads, lines) if "train_loss" in r}
    first, last = cfg.train.log_every, cfg.train.max_steps
    seconds = elapsed[last] - elapsed[first]
    return seconds / (last - first), sum(TimedTrainer.step_seconds[first:last]) / seconds


def transformers_llama(cfg: ModelConfig, batch_size: int, seq_len: int):
    """One step of LlamaForCausalLM at our model's shape, as transformers' Trainer runs it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=False, attn_implementation="sdpa"))
    tc = TrainConfig()
    params = list(hf.parameters())
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay, fused=True)
    # seq_len input tokens, as ours; transformers shifts the labels inside (seq_len - 1 predictions)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))

    def step():
        hf(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="train.py options (key=value) after the shape's, for every variant")
    p.add_argument("--shape", default="readme", choices=list(SHAPES), help="readme: " + " ".join(SHAPES["readme"]) +
                   "; make-train: train.py's defaults")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                   help="muon: ours eager (the default optimizer; train.compile=auto keeps make train's short run "
                   "eager); adamw: train.optimizer=adamw; compiled: train.compile=true with Muon (what auto runs for "
                   "a run estimated at over 10 minutes, such as 400 steps at the README shape); compiled-adamw: "
                   "both; logits-adamw: adamw with the loss on the whole logits (as before model/loss.py); hf: "
                   "transformers; sdpa, compiled-sdpa: muon and compiled on torch's SDPA instead of our CPU attention "
                   "kernel")
    p.add_argument("--loop", action="store_true", help="time train.py's whole loop (train.run) rather than "
                   "Trainer.train_step: a run of train.log_every + --steps steps per variant and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of alternated timings")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the first round "
                   "(compiled: the compilation happens here; --loop: each run's first train.log_every steps)")
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
    if args.loop and (args.profile or "logits-adamw" in args.variants):
        p.error("--loop runs train.py as it is: drop logits-adamw and --profile (for the loop, use py-spy: "
                "docs/performance.md)")
    return args


def timer(step, n: int):
    """A function that runs `step` n times and returns the seconds it took."""
    def timed() -> float:
        t = time.perf_counter()
        for _ in range(n):
            step()
        return time.perf_counter() - t
    return timed


def build(name: str, args, base: list[str], work: Path, hf_step):
    """Variant `name`: (its step, a function timing --steps of them, []); --loop: (None, a function timing a whole
    run's, the share of each run's time in train_step)."""
    if name == "hf":
        step = hf_step()
    elif args.loop:
        runs, shares = [], []

        def loop():  # a new run, in a new out_dir, each round
            runs.append(work / f"{name}-{len(runs)}")
            cfg = config(base + VARIANTS[name] + [f"out_dir={runs[-1]}"])
            cfg.train.max_steps = cfg.train.log_every + args.steps
            seconds, share = loop_seconds_per_step(cfg)
            shares.append(share)
            return seconds * args.steps
        return None, loop, shares
    else:
        cls = LogitsLossTrainer if name == "logits-adamw" else Trainer
        quiet = ["train.progress=false", "wandb.mode=disabled"]  # the Trainer alone never logs nor shows progress
        step = cls(make_plan(config(base + VARIANTS[name] + quiet + [f"out_dir={work / name}"]))).train_step
    for _ in range(args.warmup):
        step()
    return step, timer(step, args.steps), []


def main():
    args = parse_args()
    governed = ["train.adaptive_threads=true"] if args.busy and not args.fixed_threads else []
    base = SHAPES[args.shape] + args.overrides + governed
    with tempfile.TemporaryDirectory(prefix="bench_train-") as work:
        shape = config(base + [f"out_dir={work}"])
        if "hf" in args.variants and shape.model.attention == "mla":
            raise SystemExit("error: transformers' LlamaForCausalLM has no MLA: drop hf from --variants")
        shape.model.vocab_size = prepare(OmegaConf.to_object(shape.data)).vocab_size  # as the Trainer sets it
        model_cfg = OmegaConf.to_object(shape.model)
        fpt = flops_per_token(Transformer(model_cfg), shape.train.seq_len)
        peak = peak_flops(torch.device("cpu"), args.peak_tflops)
        print_header(args, shape, model_cfg, fpt, peak)
        if args.busy:
            spin_one_core()
            print("one core busy: a process spins beside; our threads "
                  + ("fixed" if args.fixed_threads else "under the thread governor (engine/threads.py)"))
        steps, timers, shares = {}, {}, {}
        for name in args.variants:
            t = time.perf_counter()
            steps[name], timers[name], shares[name] = build(name, args, base, Path(work), lambda: transformers_llama(
                model_cfg, shape.train.batch_size, shape.train.seq_len))
            print(f"{name}: built and warmed up in {time.perf_counter() - t:.1f} s")
        report(time_rounds(timers, args, shape.train.batch_size * shape.train.seq_len * args.steps), fpt, peak)
        for name, of_loop in shares.items():
            if of_loop:
                print(f"{name}: {statistics.median(of_loop):.1%} of the loop's time in Trainer.train_step (median; "
                      f"each round: {' '.join(f'{s:.1%}' for s in of_loop)})")
        if args.profile:
            profile_steps(steps)


def print_header(args, shape, model_cfg: ModelConfig, fpt: float, peak) -> None:
    """One line: the options, the model's shape, the batch, the threads, FLOPs per token, the peak, what is timed."""
    peak_text = f"peak {peak / 1e9:.1f} GFLOP/s" if peak else "peak unknown (set --peak-tflops)"
    print(f"{' '.join(SHAPES[args.shape] + args.overrides) or 'train.py defaults'}: {model_cfg.attention} "
          f"d={model_cfg.dim} L={model_cfg.n_layers} H={model_cfg.n_heads} kv={model_cfg.n_kv_heads} "
          f"ffn={model_cfg.ffn_dim} vocab={model_cfg.vocab_size} | batch {shape.train.batch_size} x seq "
          f"{shape.train.seq_len} fp32 | threads {torch.get_num_threads()} | {fpt / 1e6:.1f} MFLOP/token | "
          f"{peak_text} | " + (f"train.py's loop: runs of train.log_every={shape.train.log_every} + "
                               f"{args.steps} steps" if args.loop else "Trainer.train_step"))


def time_rounds(timers: dict, args, tokens: int) -> dict:
    """{variant: its tokens/s in each of --rounds rounds}, the variants timed back to back within a round;
    `tokens`: what one timing processes."""
    threads = torch.get_num_threads()
    tok_s = {name: [] for name in timers}
    for _ in range(args.rounds):
        for name, timed in timers.items():
            # Each in its own mode: train.py's compiled runs are deterministic (compile_for_training), its
            # eager runs and transformers' are not; a compiled variant has turned it on process-wide.
            torch.use_deterministic_algorithms("train.compile=true" in (VARIANTS[name] or []), warn_only=True)
            tok_s[name].append(tokens / timed())
            torch.set_num_threads(threads)  # the next variant starts from the same count
    return tok_s


def profile_steps(steps: dict) -> None:
    """One step of each variant under torch.profiler: its ops by their own CPU time."""
    from torch.profiler import profile

    for name, step in steps.items():
        with profile() as prof:
            step()
        print(f"\n{name}: one step, ops by their own CPU time\n"
              + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def report(tok_s: dict, fpt, peak) -> None:
    """The table: each variant's median tokens/s, its MFU, and its ratio to transformers within each round.
    The machine's speed drifts between rounds (other virtual machines on the host): the ratio within a round,
    where the variants ran back to back, is the steadier figure, and its median is the summary."""
    print(f"{'':14s} {'tokens/s (median, each round)':>44s} {'MFU':>7s}  x transformers: median (each round)")
    for name, rates in tok_s.items():
        mfu = f"{statistics.median(rates) * fpt / peak:7.1%}" if peak and fpt else f"{'-':>7s}"
        ratio = "-"
        if "hf" in tok_s:
            ratios = [r / h for r, h in zip(rates, tok_s["hf"])]
            ratio = f"{statistics.median(ratios):.2f} ({' '.join(f'{r:.2f}' for r in ratios)})"
        print(f"{name:14s} {statistics.median(rates):8.0f}  ({' '.join(f'{r:.0f}' for r in rates):>32s}) "
              f"{mfu}  {ratio}")


if __name__ == "__main__":
    main()
