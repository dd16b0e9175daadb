"""Bits per byte of a text, scored as training scores its validation split (Trainer.evaluate).

The same windows (data.eval_batches: consecutive, non-overlapping windows of seq_len tokens, each
target scored once), the same loss (the model's own forward with targets), and the same conversion
(data.bits_per_byte over the UTF-8 bytes of exactly the scored tokens, data.eval_text_size). Every
whole window is scored; the tokens after the last one are not, as in training.
"""

import numpy as np
import torch

from data import DataError, bits_per_byte, eval_batches, eval_text_size


@torch.no_grad()
def text_bits_per_byte(model, tokenizer, text: str, seq_len: int, batch_size: int) -> dict:
    """{"bits_per_byte", "loss" (nats per token), "tokens", "bytes", "seq_len"} of `text` under `model`;
    windows shorter than seq_len if the text is. DataError if it has fewer than two tokens."""
    tokens = np.asarray(tokenizer.encode(text).ids, dtype=np.int64)
    if len(tokens) < 2:
        raise DataError(f"the text has {len(tokens)} token(s): at least 2 are needed to score one")
    seq_len = min(seq_len, len(tokens) - 1)
    windows = list(eval_batches(tokens, seq_len, 1, None))  # batch size 1 lays out every whole window
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, len(windows), batch_size):
        x, y = (torch.cat(part) for part in zip(*windows[i:i + batch_size]))
        _, loss = model(x.to(device), y.to(device))
        total += loss.double().cpu() * y.numel()
    n_tokens, n_bytes = eval_text_size(tokens, tokenizer, seq_len, 1, None)
    loss = total.item() / n_tokens
    return {"bits_per_byte": bits_per_byte(loss, n_tokens, n_bytes), "loss": loss, "tokens": n_tokens,
            "bytes": n_bytes, "seq_len": seq_len}
