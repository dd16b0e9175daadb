"""Data pipeline: text source -> train/val split -> BPE tokenizer -> cached token memmaps -> batches.

    from data import DataConfig, prepare, TokenBatches
    d = prepare(DataConfig())                       # Shakespeare, BPE 4096, cached in .cache/data
    batches = TokenBatches(d.train, seq_len=256, batch_size=32, seed=1337)
    x, y = batches.get_batch(step)

The names below are imported on first use (PEP 562), so inference, which needs only
`data.tokenizer`, does not pay for importing `datasets` (about a second).
"""
import importlib

_EXPORTS = {
    "DataConfig": "config", "EOT": "config", "DataError": "errors", "TokenBatches": "loader",
    "eval_batches": "loader", "eval_text_size": "loader", "prepare": "pipeline", "load_prepared": "pipeline", "PreparedData": "pipeline",
    "bits_per_byte": "pipeline", "load_documents": "sources",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
