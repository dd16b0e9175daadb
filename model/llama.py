"""A Llama-style decoder: pre-norm RMSNorm, RoPE, SwiGLU, and a pluggable attention module."""

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import build_attention
from .config import ModelConfig
from .loss import linear_cross_entropy
from .rope import rope_tables


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)  # gate and up projections in one matmul
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: str):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = build_attention(cfg, layer_idx, backend)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i, backend) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        llama3 = None if cfg.rope_scaling_factor == 1.0 else (
            cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_seq_len)
        cos, sin = rope_tables(cfg.rope_dim, cfg.max_seq_len, cfg.rope_theta, llama3)
        # Not persistent: they are a function of the config, so checkpoints need not carry them.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # Each residual branch adds to the stream once per layer: scale their output projections so
        # the stream's variance does not grow with depth (GPT-2's 1/sqrt(2 * n_layers)).
        for name, p in self.named_parameters():
            if name.endswith(("attn.wo.weight", "ffn.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, include_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not include_embedding:
            n -= self.embed.weight.numel()
        return n

    def hidden_states(self, idx: torch.Tensor, positions: Optional[torch.Tensor] = None, cache=None) -> torch.Tensor:
        """Final-normed hidden states [B, T, dim]; positions [B or 1, T] default to 0..T-1."""
        T = idx.shape[1]
        if positions is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens is longer than model.max_seq_len ({self.cfg.max_seq_len})")
            cos, sin = self.rope_cos[:T].unsqueeze(0), self.rope_sin[:T].unsqueeze(0)
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        return self.norm(x)

    def forward(self, idx, targets=None, positions=None, cache=None):
        """(logits [B, T, vocab], None), or with targets (None, the mean cross-entropy, targets -1 ignored):
        the loss never builds the whole logit matrix (model/loss.py)."""
        h = self.hidden_states(idx, positions, cache)
        if targets is None:
            return self.lm_head(h), None
        return None, linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten())
