"""A model ready to run from a path: the one loader `generate.py`, the `LLM` API and `train.init_from` share."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tokenizers import Tokenizer

from data.chat import TEMPLATE_FILE
from data.config import EOT
from model import ModelConfig, Transformer

from .hf import is_hf_folder, read_hf_folder
from .store import CONFIG_FILE, TOKENIZER_FILE, CheckpointError, load_checkpoint, resolve_checkpoint, unusable


@dataclass
class Pretrained:
    dir: Path  # the checkpoint (or Hugging Face) folder the weights came from
    config: ModelConfig
    state_dict: dict  # our parameter names, full tensors
    tokenizer_path: Path
    eos_id: Optional[int]  # end of text: a HF folder's generation config, else the tokenizer's <|endoftext|>
    run_config: Optional[dict] = None  # our checkpoints: the resolved run config (data, train, ...)
    step: Optional[int] = None  # our checkpoints: the training step the weights were saved at
    chat_template: Optional[str] = None  # the Jinja chat template beside the tokenizer (data/chat.py), if any


def load_pretrained(path, tokenizer=None) -> Pretrained:
    """Model config, weights and tokenizer from a run, checkpoints/ or checkpoint folder, or a Hugging Face
    folder (LlamaForCausalLM, DeepseekV3ForCausalLM with dense layers); CheckpointError on any problem.

    tokenizer: a tokenizer.json to use instead of the one beside the weights (e.g. a HF folder without one)."""
    if is_hf_folder(path):
        cfg, state, tok, eos = read_hf_folder(path, tokenizer)
        d = Path(path).expanduser().resolve()
        return Pretrained(d, cfg, state, tok, _read_tokenizer(tok, d).token_to_id(EOT) if eos is None else eos,
                          chat_template=chat_template_beside(tok, d))
    c = load_checkpoint(path)
    try:
        cfg = ModelConfig(**c.config["model"])
    except Exception as e:  # missing section, unknown keys, invalid values
        raise unusable(c.dir, f"{CONFIG_FILE} (its model section)", e) from e
    tok = c.tokenizer_path if tokenizer is None else Path(tokenizer).expanduser()
    return Pretrained(c.dir, cfg, c.model_state, tok, _read_tokenizer(tok, c.dir).token_to_id(EOT), c.config, c.step,
                      chat_template_beside(tok, c.dir))


def chat_template_beside(tokenizer_path: Path, where: Path) -> Optional[str]:
    """The chat template beside a tokenizer.json, if there is one: the "chat_template" of tokenizer_config.json, or
    chat_template.jinja (where transformers saves it since 4.50)."""
    f, jinja = Path(tokenizer_path).with_name(TEMPLATE_FILE), Path(tokenizer_path).with_name("chat_template.jinja")
    try:
        if jinja.is_file():
            return jinja.read_text()
        template = json.loads(f.read_text()).get("chat_template") if f.is_file() else None
    except (OSError, ValueError, AttributeError) as e:
        raise unusable(where, TEMPLATE_FILE, e) from e
    return template if isinstance(template, str) else None  # a list of named templates: not supported


def load_chat_template(path) -> Optional[str]:
    """The chat template of what load_pretrained(path) would load, without loading the weights."""
    d = Path(path).expanduser() if is_hf_folder(path) else resolve_checkpoint(path)
    return chat_template_beside(d / TOKENIZER_FILE, d)


def _read_tokenizer(path: Path, where: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise unusable(where, f"the tokenizer {path}", e) from e


def load_model(path, device: torch.device, dtype: torch.dtype, tokenizer=None):
    """(model in eval mode, tokenizer, end-of-text id) from any path load_pretrained accepts."""
    p = load_pretrained(path, tokenizer)
    model = Transformer(p.config)
    try:
        model.load_state_dict(p.state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"checkpoint '{p.dir}' does not match its config "
                              f"({' '.join(first[:2])[:200]})") from None
    return model.to(device=device, dtype=dtype).eval(), _read_tokenizer(p.tokenizer_path, p.dir), p.eos_id
