"""Deterministic train/val split by whole documents.

Splitting by document (not by token position) keeps validation text unseen as a whole:
no document is half in train, half in val.
"""
import math

import datasets
import numpy as np

from .errors import DataError


def chunk_text(text: str, size: int) -> list[str]:
    """Cut text into pieces of at most `size` characters, at line ends where possible.

    ''.join(chunks) == text. A line longer than `size` is cut mid-line.
    """
    chunks, start = [], 0
    while start < len(text):
        end = start + size
        if end < len(text):
            newline = text.rfind("\n", start, end)
            if newline >= start:
                end = newline + 1  # keep the newline with the line it ends
        chunks.append(text[start:end])
        start = end
    return chunks


def split_documents(docs: datasets.Dataset, val_fraction: float, seed: int,
                    chunk_chars: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out about val_fraction of the documents (at least one, never all), chosen by seed.

    A corpus that is a single document is first cut into chunks, which are then the documents.
    Documents keep their original order within each split.
    """
    if len(docs) == 1:
        text = docs[0]["text"]
        # At most chunk_chars per chunk, but enough chunks (~1/val_fraction) that val can be
        # about val_fraction of the text rather than, say, half of a short file.
        size = min(chunk_chars, math.ceil(len(text) / math.ceil(1 / val_fraction)))
        docs = datasets.Dataset.from_dict({"text": chunk_text(text, max(1, size))})
    train_idx, val_idx = held_out(len(docs), val_fraction, seed, "the corpus is too short to split into train and "
                                  "val; add text or give a separate data.val_path")
    return docs.select(train_idx), docs.select(val_idx)


def held_out(n: int, val_fraction: float, seed: int, too_few: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of n items, sorted: about val_fraction of them (at least one, never all) held out,
    chosen by seed. DataError(too_few) for fewer than 2 items."""
    if n < 2:
        raise DataError(too_few)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
