"""A model ready to run from a path: the one loader `generate.py`, the `LLM` API and `train.init_from` share."""

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from data.config import EOT
from model import ModelConfig, Transformer

from .store import CheckpointError, load_checkpoint


@dataclass
class Pretrained:
    dir: Path  # the checkpoint folder the weights came from
    config: ModelConfig
    state_dict: dict  # our parameter names, full tensors
    tokenizer_path: Path


def load_pretrained(path) -> Pretrained:
    """Model config, weights and tokenizer from a run, checkpoints/ or checkpoint folder; CheckpointError on any problem."""
    c = load_checkpoint(path)
    try:
        cfg = ModelConfig(**c.config["model"])
    except Exception as e:  # missing section, unknown keys, invalid values
        raise CheckpointError(f"checkpoint '{c.dir}' has an unusable model config ({e})") from None
    return Pretrained(c.dir, cfg, c.model_state, c.tokenizer_path)


def load_model(path, device: torch.device, dtype: torch.dtype):
    """(model in eval mode, tokenizer, end-of-text id) from any path load_pretrained accepts."""
    p = load_pretrained(path)
    model = Transformer(p.config)
    try:
        model.load_state_dict(p.state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"checkpoint '{p.dir}' does not match its config "
                              f"({' '.join(first[:2])[:200]})") from None
    try:
        tok = Tokenizer.from_file(str(p.tokenizer_path))
    except Exception as e:
        raise CheckpointError(f"checkpoint '{p.dir}' has an unreadable tokenizer.json ({e})") from None
    return model.to(device=device, dtype=dtype).eval(), tok, tok.token_to_id(EOT)
