"""The model: a Llama-style decoder with MHA/GQA/MQA/MLA attention (see model/config.py)."""

from .attention import BACKENDS, attend, causal_attention, choose_backend, math_attention
from .config import ATTENTION_KINDS, ConfigError, ModelConfig
from .llama import Transformer

__all__ = ["ATTENTION_KINDS", "BACKENDS", "ConfigError", "ModelConfig", "Transformer", "attend",
           "causal_attention", "choose_backend", "math_attention"]
