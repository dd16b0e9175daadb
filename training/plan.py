"""A run's start-up, decided before anything is done: `make_plan(cfg)` reads the options, the checkpoint to
start from and the files the data depends on, and writes nothing; the Trainer then locks out_dir and carries
the plan out (prepares the data, builds the model, loads the state).

So a mistake in the command stops the run before any file is touched, and everything the run does is
decided from the command and the files it names, in one place.
"""

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from checkpoint import Pretrained, load_pretrained, resolve_checkpoint
from checkpoint.store import CheckpointError
from data import DataConfig
from data.pipeline import cache_folder
from data.recall import recall_vocab_size
from data.tokenizer import load_tokenizer, vocab_size_of
from model import Transformer

from .config import validate
from .distributed import pick_device
from .metrics import flops_per_token, peak_flops
from .resume import adopt_pretrained_config


@dataclass(frozen=True)
class Plan:
    # The run's options, read-only. train.init_from: the checkpoint's model and tokenizer adopted.
    # model.vocab_size: the one the tokenizer will have (the prepared data's replaces it in the run).
    cfg: DictConfig
    device: torch.device  # this process's (train.device; under torchrun, cuda:LOCAL_RANK)
    init_from: Optional[Pretrained]  # train.init_from's weights, config and tokenizer; None: random weights
    resume: Optional[Path]  # the checkpoint folder to continue from (train.resume); None: start at step 0
    data: DataConfig  # the data to prepare, or to find in data.cache_dir ...
    data_dir: Path  # ... in this folder of it (its cache key)
    compile: bool  # train.compile, decided (auto: see compiles)
    peak_flops: Optional[float]  # one device's peak FLOP/s (for MFU; training/metrics.py); None: unknown


def make_plan(cfg: DictConfig, cli_overrides=()) -> Plan:
    """The plan for `cfg`; raises the one-line error of a bad option, checkpoint or data path. Reads files,
    writes none. `cli_overrides`: the command line's key=value pairs (init_from refuses model options that
    contradict the checkpoint's). Every rank makes the same plan: its errors are reported by rank 0."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        cfg = copy.deepcopy(cfg)  # the caller's config stays as it was
        pretrained = None
        if cfg.train.init_from:
            pretrained = load_pretrained(cfg.train.init_from)
            adopt_pretrained_config(cfg, pretrained, cli_overrides)
        validate(cfg, world_size)
        data = OmegaConf.to_object(cfg.data)
        cfg.model.vocab_size = expected_vocab_size(data, pretrained)
        OmegaConf.set_readonly(cfg, True)
        device = pick_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
        peak = peak_flops(device, cfg.train.peak_tflops)
        with torch.device("meta"):  # the model's shapes alone, no memory
            flops = flops_per_token(Transformer(OmegaConf.to_object(cfg.model)), cfg.train.seq_len)
        return Plan(cfg=cfg, device=device, init_from=pretrained, resume=checkpoint_to_resume(cfg),
                    data=data, data_dir=cache_folder(data),
                    compile=compiles(cfg, device, world_size > 1, flops, peak), peak_flops=peak)
    except Exception as e:
        e.reported_by = 0
        raise


def expected_vocab_size(data: DataConfig, pretrained: Optional[Pretrained]) -> int:
    """model.vocab_size before the data is prepared, from the options alone: the checkpoint's (train.init_from), the
    given tokenizer's, data=recall's or the BPE's size (which a tiny corpus may not fill; data=chat adds its tokens)."""
    if data.source == "recall":
        return recall_vocab_size(data.recall_vocab)
    if pretrained is not None:
        return pretrained.config.vocab_size
    return vocab_size_of(load_tokenizer(data.tokenizer_path)) if data.tokenizer_path else data.vocab_size


def checkpoint_to_resume(cfg) -> Optional[Path]:
    """train.resume=true: out_dir's latest checkpoint; auto: that or None (no checkpoint: start over);
    PATH: that checkpoint or run folder; false: None."""
    resume, latest = cfg.train.resume, Path(cfg.out_dir) / "checkpoints" / "latest"
    if not resume or (resume == "auto" and not latest.exists()):
        return None
    if resume in (True, "auto"):
        if not latest.exists():
            raise CheckpointError(f"train.resume=true but there is no checkpoint in {latest.parent}: "
                                  "point out_dir at the run to continue, or drop train.resume")
        return resolve_checkpoint(latest)
    return resolve_checkpoint(resume)


# train.compile=auto compiles a run whose eager steps would take more than this, at this share of the peak.
COMPILE_PAYS_AFTER_S, EXPECTED_MFU = 600, 0.4


def compiles(cfg, device: torch.device, distributed: bool, flops_per_token: float, peak: Optional[float]) -> bool:
    """Whether train.compile (true, false or auto) compiles this run. auto decides from the command and the
    machine alone, never the Inductor cache or the load, so one command always trains the same way.

    Measured on make train's model (README, Performance): a cold compilation took about 50 s, and then the
    steps ran 1.05-1.2x faster than eager ones, so compiling pays for runs of more than about 10 minutes. auto
    estimates the run's length from its FLOPs at 40% of the peak (make train logs an MFU of 36-56%), on the
    CPU in one process, where it was measured; elsewhere it stays eager."""
    t = cfg.train
    if t.compile != "auto":
        return bool(t.compile)
    if device.type != "cpu" or distributed or not peak:
        return False
    seconds = t.max_steps * t.batch_size * t.seq_len * flops_per_token / (EXPECTED_MFU * peak)
    if t.max_minutes is not None:
        seconds = min(seconds, 60 * t.max_minutes)
    return seconds > COMPILE_PAYS_AFTER_S
