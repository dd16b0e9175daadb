"""The run configuration as typed dataclasses, registered with Hydra's ConfigStore.

Typed configs make Hydra reject a mistyped key (`train.max_step=10`) or a wrong type
(`train.lr=fast`) with a message naming it, before any work starts. The YAML files in conf/ pick
values; these classes say which keys exist and what they mean.
"""

import inspect
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from data.config import DataConfig
from evaluation import EvalError, require_harness
from model.attention import BACKENDS
from model.config import ModelConfig

from .errors import TrainConfigError

OPTIMIZERS = ("adamw", "muon")
PARALLEL_MODES = ("ddp", "fsdp")
SCHEDULES = ("cosine", "wsd")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class TrainConfig:
    max_steps: int = 400  # optimizer steps; the LR schedule spans these
    max_minutes: Optional[float] = None  # wall-clock budget: stop (and save) once exceeded
    # with train.max_minutes: fit the LR schedule to the time, so that its decay ends inside the budget (the
    # run evaluates and saves after its first step to time both, and after its warmup fixes the schedule's
    # length to the steps that fit, printed and saved in its checkpoints; docs/training.md); false: the schedule
    # spans train.max_steps and the budget only stops the run, to be resumed (e.g. before a job's time limit)
    fit_schedule: bool = True
    batch_size: int = 32  # global sequences per optimizer step, whatever the number of processes
    seq_len: int = 128  # tokens per sequence (<= model.max_seq_len)
    grad_accum: int = 1  # micro-batches per step: each process runs batch_size / (world * grad_accum)
    # muon | adamw. muon: Muon for the attention and SwiGLU matrices, AdamW for embeddings, norms and the head
    # (training/optim.py); lower val loss in the same minutes (docs/recipe.md)
    optimizer: str = "muon"
    # peak learning rate (Muon's too: its update is scaled to AdamW's RMS). 4e-3: in make train's budget,
    # below 1e-3 and 2e-3 and level with 8e-3 (docs/recipe.md)
    lr: float = 4e-3
    min_lr_ratio: float = 0.1  # final LR = lr * min_lr_ratio
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay)
    decay_fraction: float = 0.2  # wsd: share of max_steps spent decaying at the end
    weight_decay: float = 0.1  # applied to matrices only (not norms, not embeddings)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    log_every: int = 10  # steps between metrics.jsonl / wandb lines
    eval_every: int = 100  # steps between evaluations (val loss, perplexity, bits per byte, a sample)
    eval_batches: int = 10  # batches of batch_size sequences per evaluation
    sample_tokens: int = 120  # tokens generated for the sample at each evaluation
    # lm-evaluation-harness tasks scored at each evaluation on rank 0 and logged as <task>/<metric>
    # (evaluation/harness.py, as eval.py scores them; needs requirements-eval.txt): task names or YAML
    # files, e.g. [hellaswag,arc_easy]; null: none
    eval_tasks: Optional[list[str]] = None
    eval_tasks_limit: Optional[int] = None  # documents per train.eval_tasks task at each evaluation; null: all
    save_every: int = 200  # steps between checkpoints (also at the end, and at each new best evaluation)
    # checkpoints kept besides `best`: the newest N (1: `latest` only); each save deletes older ones
    keep_checkpoints: int = 1
    # true: continue from out_dir/checkpoints/latest; a path: continue from that checkpoint (or run) folder;
    # auto: continue if out_dir has a checkpoint, else start from step 0 (a requeued job: it also replaces the
    # metrics a previous attempt logged before its first save)
    resume: Any = False
    # train.resume=PATH at step N while out_dir holds checkpoints after N: delete them (refused without this)
    discard_later_checkpoints: bool = False
    overwrite: bool = False  # start a new run in an out_dir that holds one (deletes its checkpoints and metrics)
    # A checkpoint or run folder to start from: its weights, model config and tokenizer; fresh optimizer and step
    init_from: Optional[str] = None
    # torch.compile the training steps (training/trainer.py, compile_for_training): Inductor fuses the norms, RoPE,
    # SwiGLU and the residual adds (README, Performance), bitwise repeatable on CPU, its compilation cached in
    # .cache/torchinductor. auto: where it pays (trainer.compiles: on the CPU in one process, a run estimated at
    # over 10 minutes; make train's is not), and eager with a warning where Inductor cannot compile; true:
    # everywhere, an error where it cannot; false: eager.
    compile: Any = "auto"
    # CPU: before each step, run torch on the cores other processes leave free (engine/threads.py, as
    # generation does by default; README, Performance). Off by default because results may depend on the
    # thread count (after two steps of the make-train model, 3 threads changed the weights' last bits where
    # 1 and 2 agreed): with it on, a run is no longer bitwise repeatable or exactly resumable.
    adaptive_threads: bool = False
    # Peak TFLOP/s of one device, the denominator of the logged `mfu`; null: estimated (training/metrics.py)
    peak_tflops: Optional[float] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    parallel: str = "ddp"  # under torchrun: ddp (replicate) | fsdp (shard with FSDP2)
    progress: bool = True  # show a progress bar


@dataclass
class AttentionRuntimeConfig:
    # auto: our Triton flash kernel on CUDA, our C++ kernel on CPU (SDPA where ours cannot run).
    # triton | cpu | sdpa | math force one.
    backend: str = "auto"


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline (no account needed; `wandb sync` later) | online | disabled
    project: str = "small-llm"
    group: Optional[str] = None  # runs of one sweep share a group
    name: Optional[str] = None  # defaults to the attention variant
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    attention: AttentionRuntimeConfig = field(default_factory=AttentionRuntimeConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # The run folder: checkpoints, metrics.jsonl, wandb files and Hydra's .hydra/. Default: Hydra's run
    # folder, runs/<date>/<time> (multirun: multirun/<date>/<time>/<job number>)
    out_dir: str = "${hydra:runtime.output_dir}"
    seed: int = 1337


def _writable(path: Path) -> bool:
    """Whether `path` can be created or written: the nearest existing ancestor must be a writable folder."""
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK)


def check_options(cfg) -> None:
    """Every option's range and choice, before any work starts (no data, no files): one error naming it."""
    t = cfg.train
    positive = ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "save_every",
                "log_every", "keep_checkpoints")
    for name in positive:
        if getattr(t, name) <= 0:
            raise TrainConfigError(f"train.{name}={getattr(t, name)} must be positive")
    for name in ("lr", "warmup_steps", "weight_decay", "grad_clip", "sample_tokens"):
        if getattr(t, name) < 0:
            raise TrainConfigError(f"train.{name}={getattr(t, name)} must be >= 0")
    for name, value, ok, rng in (("min_lr_ratio", t.min_lr_ratio, 0 <= t.min_lr_ratio <= 1, "in [0, 1]"),
                                 ("decay_fraction", t.decay_fraction, 0 < t.decay_fraction <= 1, "in (0, 1]"),
                                 ("beta1", t.beta1, 0 <= t.beta1 < 1, "in [0, 1)"),
                                 ("beta2", t.beta2, 0 <= t.beta2 < 1, "in [0, 1)")):
        if not ok:
            raise TrainConfigError(f"train.{name}={value} must be {rng}")
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        raise TrainConfigError(f"train.peak_tflops={t.peak_tflops} must be positive (or null to estimate it)")
    if t.max_minutes is not None and t.max_minutes <= 0:
        raise TrainConfigError(f"train.max_minutes={t.max_minutes} must be positive (or null for no time budget)")
    if t.discard_later_checkpoints and t.resume in (False, True, "auto"):
        raise TrainConfigError("train.discard_later_checkpoints=true applies to train.resume=PATH (a checkpoint "
                               f"folder), not train.resume={t.resume}: drop it, or name the checkpoint to resume from")
    if t.schedule not in SCHEDULES:
        raise TrainConfigError(f"unknown train.schedule '{t.schedule}': choose cosine or wsd")
    if t.parallel not in PARALLEL_MODES:
        raise TrainConfigError(f"unknown train.parallel '{t.parallel}': choose one of {', '.join(PARALLEL_MODES)}")
    if t.compile not in (True, False, "auto"):
        raise TrainConfigError(f"train.compile={t.compile} must be true, false or auto")
    if t.optimizer not in OPTIMIZERS:
        raise TrainConfigError(f"unknown train.optimizer '{t.optimizer}': choose adamw or muon")
    if cfg.wandb.mode not in WANDB_MODES:
        raise TrainConfigError(f"unknown wandb.mode '{cfg.wandb.mode}': choose offline, online or disabled")
    if not (t.device in ("auto", "cpu", "cuda", "mps") or t.device.startswith("cuda:") and t.device[5:].isdigit()):
        raise TrainConfigError(f"unknown train.device '{t.device}': choose auto, cpu, cuda, cuda:N or mps")
    if cfg.attention.backend not in BACKENDS:
        raise TrainConfigError(f"unknown attention.backend '{cfg.attention.backend}': choose {', '.join(BACKENDS)}")
    # Triton runs on CUDA, or anywhere in its (slow) interpreter, which the tests use on CPU.
    on_cuda = t.device not in ("cpu", "mps") and torch.cuda.is_available()
    if cfg.attention.backend == "triton" and not (on_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise TrainConfigError("attention.backend=triton needs a CUDA device (or TRITON_INTERPRET=1, Triton's "
                               "slow interpreter): use attention.backend=auto (our C++ kernel on CPU)")
    if cfg.attention.backend == "cpu" and (on_cuda or t.device == "mps"):
        raise TrainConfigError("attention.backend=cpu is our C++ kernel for CPU training, but this run trains on "
                               f"{'a GPU' if on_cuda else 'mps'}: use attention.backend=auto")
    if t.adaptive_threads and (on_cuda or t.device == "mps"):
        raise TrainConfigError(f"train.adaptive_threads=true sets CPU threads, but this run trains on "
                               f"{'a GPU' if on_cuda else 'mps'}: drop it, or train on the CPU (train.device=cpu)")
    if t.eval_tasks:
        if t.parallel == "fsdp":
            raise TrainConfigError("train.eval_tasks scores the whole model on one process, which "
                                   "train.parallel=fsdp shards: use train.parallel=ddp or drop train.eval_tasks")
        try:
            require_harness("train.eval_tasks")
        except EvalError as e:
            raise TrainConfigError(str(e)) from None
    if t.resume and t.overwrite:
        raise TrainConfigError("train.resume and train.overwrite exclude each other: continue the run, or replace it")
    check_folder("out_dir", cfg.out_dir)
    check_folder("data.cache_dir", cfg.data.cache_dir)


def check_folder(option: str, value: str) -> None:
    """A folder the run writes into: it must be (or become) a writable folder."""
    path = Path(os.path.expanduser(value))
    if path.exists() and not path.is_dir():
        raise TrainConfigError(f"{option}={value} is a file: choose a folder")
    if not _writable(path):
        raise TrainConfigError(f"{option}={value} cannot be written (read-only or not a folder): "
                               f"choose a writable {option}")


def validate(cfg, world_size: int) -> None:
    """Every option, alone and with the others, for a run of `world_size` processes: one error naming it."""
    check_options(cfg)
    model_cfg = OmegaConf.to_object(cfg.model)  # ModelConfig validates itself
    t = cfg.train
    per_step = world_size * t.grad_accum
    if t.batch_size % per_step:
        raise TrainConfigError(f"train.batch_size ({t.batch_size}) must be divisible by processes x train.grad_accum "
                               f"({world_size} x {t.grad_accum})")
    if t.seq_len > model_cfg.max_seq_len:
        raise TrainConfigError(f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({model_cfg.max_seq_len})")


def option_help() -> str:
    """Every option with the comment beside or above it in its dataclass (the text of `train.py --help`)."""
    sections = (("", Config), ("train", TrainConfig), ("model", ModelConfig), ("data", DataConfig),
                ("attention", AttentionRuntimeConfig), ("wandb", WandbConfig))
    out = []
    for prefix, cls in sections:
        pending = []  # comment lines above the next field
        for line in inspect.getsource(cls).splitlines()[1:]:
            text = line.strip()
            if text.startswith("#"):
                pending.append(text.lstrip("#").strip())
                continue
            m = re.match(r"(\w+):[^=]+=\s*(.*?)(?:\s+#\s*(.*))?$", text)
            if m and not m.group(2).startswith("field("):
                key = f"{prefix}.{m.group(1)}" if prefix else m.group(1)
                meaning = "\n      ".join(pending + [m.group(3)] if m.group(3) else pending)
                out.append(f"  {key} = {m.group(2)}\n      {meaning}" if meaning else f"  {key} = {m.group(2)}")
            pending = []
    return "\n".join(out)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    # `python train.py --help`: the groups, then every option with its meaning (escaped for OmegaConf and
    # string.Template, which Hydra runs over the text).
    options = option_help().replace("$", "$$").replace("$${", "$\\${")
    cs.store(group="hydra/help", name="train", node={
        "app_name": "train.py",
        "header": "python train.py [group=option ...] [key=value ...]   (docs: README.md, Training)",
        "footer": "Hydra's own flags: python train.py --hydra-help",
        "template": "${hydra.help.header}\n\n== Groups (group=option) ==\n$APP_CONFIG_GROUPS\n\n"
                    "== Options (key=value; the default, then what it means) ==\n" + options +
                    "\n\n${hydra.help.footer}\n"})
