"""Byte-level BPE tokenizer: train one on the train split, or load an existing tokenizer.json.

Byte-level means every string is representable (no unknown token) and, with no normalizer,
decode(encode(s)) == s exactly.
"""
import os
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .config import EOT, MIN_VOCAB
from .errors import DataError


def train_tokenizer(texts: Iterable[str], vocab_size: int, length: int | None = None) -> Tokenizer:
    """Train byte-level BPE with `vocab_size` tokens; the EOT special token gets id 0.

    On a small corpus BPE may run out of merges and end up with fewer tokens than asked.
    """
    if vocab_size < MIN_VOCAB:
        raise DataError(f"data.vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                        f"{MIN_VOCAB} (256 bytes + {EOT}); raise data.vocab_size")
    tok = Tokenizer(models.BPE())
    # GPT-2 style: split on the GPT-2 regex, map bytes to printable chars; no prefix space so
    # that text round-trips exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    """An existing tokenizer.json; the EOT token is added as a special token if missing."""
    p = os.path.expanduser(path)
    if not os.path.isfile(p):
        raise DataError(f"data.tokenizer_path={path!r} does not exist; give a tokenizer.json file "
                        f"or unset data.tokenizer_path to train one")
    try:
        tok = Tokenizer.from_file(p)
    except Exception as e:
        raise DataError(f"data.tokenizer_path={path!r} is not a valid tokenizer.json ({e}); "
                        f"give a file saved by HF tokenizers") from e
    if tok.token_to_id(EOT) is None:
        tok.add_special_tokens([EOT])
    return tok


def vocab_size_of(tok: Tokenizer) -> int:
    """Ids run from 0 to vocab_size-1 (added tokens included, even if their ids have gaps)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids 0..vocab_size-1: uint16 up to 65536 tokens."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)
