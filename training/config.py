"""The run configuration as typed dataclasses, registered with Hydra's ConfigStore.

Typed configs make Hydra reject a mistyped key (`train.max_step=10`) or a wrong type
(`train.lr=fast`) with a message naming it, before any work starts. The YAML files in conf/ pick
values; these classes say which keys exist and what they mean.
"""

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from data.config import DataConfig
from model.config import ModelConfig

from .errors import TrainConfigError

PARALLEL_MODES = ("ddp", "fsdp")
SCHEDULES = ("cosine", "wsd")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class TrainConfig:
    max_steps: int = 400  # optimizer steps; the LR schedule spans these
    max_minutes: Optional[float] = None  # wall-clock budget: stop (and save) once exceeded
    batch_size: int = 32  # global sequences per optimizer step, whatever the number of processes
    seq_len: int = 128  # tokens per sequence (<= model.max_seq_len)
    grad_accum: int = 1  # micro-batches per step: each process runs batch_size / (world * grad_accum)
    lr: float = 2e-3  # peak learning rate
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
    save_every: int = 200  # steps between checkpoints (also saved at the end)
    resume: bool = False  # continue from out_dir/checkpoints/latest
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    parallel: str = "ddp"  # under torchrun: ddp (replicate) | fsdp (shard with FSDP2)
    progress: bool = True  # show a progress bar


@dataclass
class AttentionRuntimeConfig:
    # auto: our Triton flash kernel on CUDA, SDPA on CPU. triton | sdpa | math force one.
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
    out_dir: str = "${hydra:runtime.output_dir}"  # checkpoints, metrics.jsonl and wandb files go here
    seed: int = 1337


def check_train_config(cfg, model_cfg: ModelConfig, world_size: int) -> None:
    """Options the typed config cannot check by itself (ranges, choices, relations), before any work."""
    t = cfg.train
    per_step = world_size * t.grad_accum
    if t.batch_size % per_step:
        raise TrainConfigError(f"train.batch_size ({t.batch_size}) must be divisible by processes x train.grad_accum "
                               f"({world_size} x {t.grad_accum})")
    if t.seq_len > model_cfg.max_seq_len:
        raise TrainConfigError(f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({model_cfg.max_seq_len})")
    if t.schedule not in SCHEDULES:
        raise TrainConfigError(f"unknown train.schedule '{t.schedule}': choose cosine or wsd")
    if t.parallel not in PARALLEL_MODES:
        raise TrainConfigError(f"unknown train.parallel '{t.parallel}': choose one of {', '.join(PARALLEL_MODES)}")
    if t.max_steps <= 0 or t.eval_every <= 0 or t.save_every <= 0 or t.log_every <= 0:
        raise TrainConfigError("train.max_steps, train.eval_every, train.save_every and train.log_every must be positive")
    if cfg.wandb.mode not in WANDB_MODES:
        raise TrainConfigError(f"unknown wandb.mode '{cfg.wandb.mode}': choose offline, online or disabled")


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
