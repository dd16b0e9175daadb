"""Data pipeline: text source -> train/val split -> BPE tokenizer -> cached token memmaps -> batches.

    from data import DataConfig, prepare, TokenBatches
    d = prepare(DataConfig())                       # Shakespeare, BPE 4096, cached in .cache/data
    batches = TokenBatches(d.train, seq_len=256, batch_size=32, seed=1337)
    x, y = batches.get_batch(step)
"""
from .config import DataConfig
from .errors import DataError
from .loader import TokenBatches, eval_batches
from .prepare import PreparedData, bits_per_byte, load_prepared, prepare
from .sources import load_documents

__all__ = ["DataConfig", "DataError", "prepare", "load_prepared", "PreparedData", "TokenBatches",
           "eval_batches", "bits_per_byte", "load_documents"]
