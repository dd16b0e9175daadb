"""MFU's FLOP count (training/metrics.py) against torch's own FLOP counter (tests/test_train.py checks the
MFU that train.py logs against this count)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from builders import tiny_config
from model import ModelConfig, Transformer
from training.metrics import flops_per_token


def counted_flops_per_token(cfg: ModelConfig, batch: int = 2) -> float:
    """Forward + backward FLOPs per token that torch.utils.flop_counter counts on the model, with the
    attention's share halved for the causal mask (the counter counts the whole score matrix). The math
    attention backend does attention in batched matmuls (bmm) and every Linear is an mm: the counter's
    per-op totals keep the two apart."""
    torch.manual_seed(0)
    model = Transformer(cfg, backend="math")
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len + 1))
    with FlopCounterMode(display=False) as counter:
        model(x[:, :-1], x[:, 1:])[1].backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(by_op) == {"aten.mm", "aten.bmm"}, by_op  # nothing else the count would miss
    return (by_op["aten.mm"] + by_op["aten.bmm"] / 2) / x[:, :-1].numel()


@pytest.mark.parametrize("attention, overrides", [
    ("gqa", {}), ("mha", {"tie_embeddings": True}), ("mla", {}), ("mla", {"q_lora_rank": 16}),
])
def test_flops_per_token_matches_torch_flop_counter(attention, overrides):
    cfg = tiny_config(attention, max_seq_len=16, **overrides)
    assert flops_per_token(Transformer(cfg), cfg.max_seq_len) == counted_flops_per_token(cfg)

