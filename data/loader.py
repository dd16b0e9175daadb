"""Batches of token windows from a flat token array (a train.bin / val.bin memmap).

Training batches are random windows drawn from a generator seeded by (seed, step), so a run
resumed at step k sees exactly the batches it would have seen, whatever the number of GPUs:
every rank draws the same global batch and keeps its own contiguous rows.
"""
from typing import Iterator, Optional

import numpy as np
import torch

from .errors import DataError


def _check(tokens: np.ndarray, seq_len: int, batch_size: int, rank: int, world_size: int) -> None:
    if tokens.ndim != 1:
        raise DataError(f"expected a 1-D token array, got shape {tokens.shape}")
    check_ranks(batch_size, rank, world_size)
    if len(tokens) < seq_len + 1:
        raise DataError(f"the split has {len(tokens)} tokens, fewer than train.seq_len+1={seq_len + 1}; "
                        f"lower train.seq_len or add data")


def check_ranks(batch_size: int, rank: int, world_size: int) -> None:
    """Every process must get the same share of a batch's rows."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
    if batch_size % world_size != 0:
        raise DataError(f"train.batch_size={batch_size} is not divisible by world_size={world_size}; "
                        f"use a batch size that is a multiple of the number of processes")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    # One fancy-indexing read of [rows, seq_len+1] from the memmap, then x/y as shifted views.
    w = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    w = torch.from_numpy(w)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class TokenBatches:
    """Random training windows: get_batch(step) is a pure function of (seed, step)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        _check(tokens, seq_len, batch_size, rank, world_size)
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size

    def get_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch for `step` is batch_size random windows of seq_len+1 tokens, chosen by
        np.random.default_rng([seed, step]) (pure function of (seed, step): resume is exact and
        independent of world size). Returns this rank's contiguous share of rows:
        rows [rank*B/W, (rank+1)*B/W), as int64 tensors x, y = window[:-1], window[1:] of shape [B/W, seq_len]."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)  # last start N-T-1
        lo = self.rank * self.local_batch_size
        return _windows(self.tokens, starts[lo:lo + self.local_batch_size], self.seq_len)


def _eval_layout(n_tokens: int, seq_len: int, batch_size: int, max_batches: Optional[int]) -> tuple[int, int]:
    """(rows per batch, number of batches) of the evaluation windows of a split of n_tokens."""
    n_windows = (n_tokens - 1) // seq_len
    rows = min(batch_size, n_windows)
    n_batches = n_windows // rows
    return rows, n_batches if max_batches is None else min(n_batches, max_batches)


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int,
                 max_batches: Optional[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, non-overlapping consecutive windows from the start of the split (the same every eval).

    Window i has inputs tokens[i*T:(i+1)*T] and targets shifted by one, so each token is scored at
    most once. Batches hold batch_size windows (max_batches of them, None = all that fit); a split too
    short for one full batch gives one smaller batch. Under data parallelism every rank reads the same
    batches and scores its share of the rows (Trainer.evaluate), so the loss does not depend on the
    number of processes.
    """
    _check(tokens, seq_len, batch_size, 0, 1)
    rows, n_batches = _eval_layout(len(tokens), seq_len, batch_size, max_batches)
    for b in range(n_batches):
        yield _windows(tokens, (b * rows + np.arange(rows)) * seq_len, seq_len)


def eval_text_size(tokens: np.ndarray, tokenizer, seq_len: int, batch_size: int,
                   max_batches: Optional[int]) -> tuple[int, int]:
    """(tokens, UTF-8 bytes) that eval_batches scores: its targets are the consecutive tokens[1 : n + 1].

    Bits per byte divides the loss on these tokens by the bytes of their text (EOT adds none), so two
    tokenizers are compared on the same text, not on split-wide averages."""
    _check(tokens, seq_len, batch_size, 0, 1)
    rows, n_batches = _eval_layout(len(tokens), seq_len, batch_size, max_batches)
    n = rows * n_batches * seq_len
    return n, len(tokenizer.decode(np.asarray(tokens[1:n + 1]).tolist(), skip_special_tokens=True).encode("utf-8"))
