"""Rotary position embeddings with precomputed real cos/sin tables.

We rotate the two halves of each head (x[:d/2], x[d/2:]) rather than interleaved pairs: the same
rotation up to a fixed permutation of the head's channels, and two contiguous slices are cheaper
than strided ones.
"""

import math
from typing import Optional

import torch


def llama3_scaled(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                  original_max_seq_len: int) -> torch.Tensor:
    """Llama 3's long-context RoPE: wavelengths longer than original_max_seq_len / low_freq_factor are
    stretched by `factor`, those shorter than original_max_seq_len / high_freq_factor kept, and the band
    between blended linearly in original_max_seq_len / wavelength (as HF's rope_type "llama3")."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_max_seq_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > original_max_seq_len / low_freq_factor, inv_freq / factor, blended)
    return torch.where(wavelen < original_max_seq_len / high_freq_factor, inv_freq, out)


def rope_tables(rope_dim: int, max_seq_len: int, theta: float,
                llama3: Optional[tuple[float, float, float, int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [max_seq_len, rope_dim // 2], in float32.

    llama3 = (factor, low_freq_factor, high_freq_factor, original_max_seq_len) applies llama3_scaled."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))
    if llama3 is not None:
        inv_freq = llama3_scaled(inv_freq, *llama3)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by cos/sin [B or 1, T, D/2] (already gathered at the tokens' positions)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
