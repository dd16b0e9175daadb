"""Rotary position embeddings with precomputed real cos/sin tables.

We rotate the two halves of each head (x[:d/2], x[d/2:]) rather than interleaved pairs: the same
rotation up to a fixed permutation of the head's channels, and two contiguous slices are cheaper
than strided ones.
"""

import torch


def rope_tables(rope_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [max_seq_len, rope_dim // 2], in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by cos/sin [B or 1, T, D/2] (already gathered at the tokens' positions)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
