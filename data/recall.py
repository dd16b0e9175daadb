"""data=recall: multi-query associative recall (MQAR, Zoology: Arora et al. 2023), generated from data.seed.

Each sequence lists key-value pairs, then asks for every pair again: a query is a key seen earlier in the
sequence, and the token after it must be that key's value. The answers follow from the context alone, so
scoring them measures how well a model retrieves from its context, which is what attention variants trade
against their KV cache (docs/ablation.md).

    <|endoftext|> k12 v3 k40 v17 ... k7 v60   v9 v33 k40 v17 v2 v51 k12 v3 ... v28
                  data.recall_pairs pairs   queries up to data.recall_seq_len tokens: every key once, in
                                            random order at random even offsets, followed by its value;
                                            random values (noise) between

Token ids (the tokenizer below): 0 is <|endoftext|>, which starts every sequence; keys k0.. are 1..V and
values v0.. are V+1..2V, V = data.recall_vocab. Keys within a sequence are distinct; values are drawn with
replacement. The sequences are stored as a token stream like text (data/pipeline.py): the trainer draws
random windows from it as from text.

The loss is on the answers alone, as in Zoology: AnswerBatches sets every other target to -1, which the
loss ignores, and evaluation scores the same targets (val_loss: nats per answer; val_bpb means nothing
here). The keys, the stored values and the noise are random and drown the answers: in a pilot a small
model trained on every token stayed at chance for 400 steps where on the answers alone it was right 19%
of the time after 200 (docs/ablation.md).

An answer is the target of any position whose input is a key that occurred earlier in the same sequence
(after the last <|endoftext|>) within the window: the rule needs no labels, works on any window of the
stream, and finds exactly the queries whose pair is inside the window.
"""

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from .config import EOT
from .errors import DataError
from .tokenizer import token_dtype

EOT_ID, FIRST_KEY = 0, 1
GENERATOR_VERSION = 1  # bump when the sequences generate() gives change: a new data cache


def sequence(rng: np.random.Generator, seq_len: int, pairs: int, vocab: int) -> np.ndarray:
    """One sequence of seq_len token ids (see the module docstring)."""
    keys = FIRST_KEY + rng.choice(vocab, pairs, replace=False)
    values = FIRST_KEY + vocab + rng.integers(vocab, size=pairs)
    seq = np.empty(seq_len, dtype=np.int64)
    seq[0] = EOT_ID
    seq[1:1 + 2 * pairs:2], seq[2:2 + 2 * pairs:2] = keys, values
    queries = seq[1 + 2 * pairs:]  # a view: the query region
    queries[:] = FIRST_KEY + vocab + rng.integers(vocab, size=len(queries))  # noise: random values
    at = 2 * np.sort(rng.choice(len(queries) // 2, pairs, replace=False))
    order = rng.permutation(pairs)
    queries[at], queries[at + 1] = keys[order], values[order]
    return seq


def generate(n_sequences: int, seq_len: int, pairs: int, vocab: int, seed: int) -> np.ndarray:
    """[n_sequences, seq_len] token ids, a pure function of the arguments."""
    rng = np.random.default_rng(seed)
    return np.stack([sequence(rng, seq_len, pairs, vocab) for _ in range(n_sequences)])


def recall_tokenizer(vocab: int) -> Tokenizer:
    """Word-level, one token per space-separated word: "<|endoftext|> k3 v7 k3" -> [0, 4, 16, 4] at vocab 8.
    Decoding joins the words with spaces. Anything else (a newline, an unknown word) reads as <|endoftext|>,
    a sequence start: so the trainer's sample, prompted with "\\n", starts a sequence."""
    words = [EOT] + [f"k{i}" for i in range(vocab)] + [f"v{i}" for i in range(vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=EOT))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "removed")
    tok.add_special_tokens([EOT])  # decode(skip_special_tokens=True) leaves it out, as for text
    return tok


def recall_vocab_size(vocab: int) -> int:
    """The ids of recall_tokenizer(vocab): <|endoftext|>, the keys, the values."""
    return 1 + 2 * vocab


def write_recall(cfg, folder) -> dict:
    """Generate the train and held-out sequences into folder/{train,val}.bin with tokenizer.json; returns the
    meta.json fields (data/pipeline.py adds the cache's own). data.val_fraction of the sequences are held out."""
    n_val = max(1, round(cfg.recall_sequences * cfg.val_fraction))
    seqs = generate(cfg.recall_sequences, cfg.recall_seq_len, cfg.recall_pairs, cfg.recall_vocab, cfg.seed)
    tok = recall_tokenizer(cfg.recall_vocab)
    tok.save(str(folder / "tokenizer.json"))
    vocab_size = recall_vocab_size(cfg.recall_vocab)
    meta = {"vocab_size": vocab_size, "eot_id": EOT_ID, "eot_token": EOT, "dtype": token_dtype(vocab_size).name,
            "tokenizer": "word-level: <|endoftext|>, keys k0.., values v0.. (data/recall.py)",
            "recall": {"pairs": cfg.recall_pairs, "vocab": cfg.recall_vocab, "seq_len": cfg.recall_seq_len,
                       "first_key": FIRST_KEY, "eot_id": EOT_ID}}
    for split, part in (("train", seqs[:-n_val]), ("val", seqs[-n_val:])):
        ids = part.reshape(-1).astype(token_dtype(vocab_size))
        ids.tofile(folder / f"{split}.bin")
        text = tok.decode(ids.tolist(), skip_special_tokens=True)
        meta.update({f"n_{split}_tokens": len(ids), f"n_{split}_bytes": len(text.encode("utf-8")),
                     f"n_{split}_documents": len(part)})
    return meta


def answer_mask(x: torch.Tensor, spec: dict) -> torch.Tensor:
    """[B, T] bool: input x[b, t] is a key that occurred earlier in its sequence within the window, so the
    target y[b, t] is that key's value. spec: meta.json's "recall" entry."""
    is_key = (x >= spec["first_key"]) & (x < spec["first_key"] + spec["vocab"])
    sequence_no = torch.cumsum(x == spec["eot_id"], dim=1)
    same = (x[:, :, None] == x[:, None, :]) & (sequence_no[:, :, None] == sequence_no[:, None, :])
    return is_key & same.tril(-1).any(-1)  # [b, t, s]: s < t


def answer_targets(x: torch.Tensor, y: torch.Tensor, spec: dict) -> torch.Tensor:
    """The targets y with every one but the answers set to -1, which the loss ignores."""
    return y.masked_fill(~answer_mask(x, spec), -1)


class AnswerBatches:
    """data=recall's training batches: TokenBatches' windows, the loss on their answers alone."""

    def __init__(self, batches, spec: dict):
        if batches.seq_len < spec["seq_len"]:
            raise DataError(f"train.seq_len={batches.seq_len} is shorter than data.recall_seq_len={spec['seq_len']}: "
                            "a window must hold a whole sequence; raise train.seq_len or lower data.recall_seq_len")
        self.batches, self.spec = batches, spec

    def get_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batches.get_batch(step)
        return x, answer_targets(x, y, self.spec)


def recall_hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How many answers are predicted exactly: the top logit at an answer position is its target. logits
    [B, T, vocab]; targets [B, T] from answer_targets (a -1 is never a top logit, so only answers count)."""
    return (logits.argmax(-1) == targets).sum()
