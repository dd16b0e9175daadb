"""Checkpoints, read and written in one place that both training and inference import.

    store.py   our own format: atomic save, load, resolve a run/checkpoint folder (training writes it)
    load.py    a model ready to run from a path: (ModelConfig, weights, tokenizer) (inference reads it);
               our checkpoints and Hugging Face folders alike
    hf.py      Hugging Face folders: names, layouts and config mapped both ways (export and import)
    gguf.py    GGUF files for llama.cpp (export only)
"""

from .load import Pretrained, load_chat_template, load_model, load_pretrained
from .store import (Checkpoint, CheckpointError, discard_later, later_checkpoints, load_checkpoint, resolve_checkpoint,
                    save_checkpoint)

__all__ = ["Checkpoint", "CheckpointError", "discard_later", "later_checkpoints", "load_checkpoint",
           "resolve_checkpoint", "save_checkpoint",
           "Pretrained", "load_chat_template", "load_pretrained", "load_model"]
