"""Conversations as training data (data=chat): read, check, split, tokenize in the chat format, cache, batch.

    python train.py +experiment=sft train.init_from=runs/base data=chat data.path=chats.jsonl

Sources: JSONL files of {"messages": [{"role": ..., "content": ...}, ...]} (OpenAI's format) named by data.path
(a file, a glob or a folder of .jsonl files), or a Hugging Face dataset with a `messages` column named by
data.name (a local path works offline). data.val_path names separate validation JSONL; without it,
data.val_fraction of the conversations are held out, chosen by data.seed.

A cache folder <cache_dir>/chat-<hash>/ (written atomically by data/pipeline.py's prepare) holds:
    train.bin, val.bin                 the token ids of the conversations, end to end (uint16 or uint32)
    train.mask.bin, val.mask.bin       one byte per token: 1 where it is a training target (data/chat.py)
    train.starts.bin, val.starts.bin   int64 offsets: conversation i is ids[starts[i]:starts[i + 1]]
    tokenizer.json                     with the chat tokens; tokenizer_config.json holds the chat template
    meta.json

Batches hold one conversation per row, padded rather than packed: our training attention is causal over a whole
row with no document mask, so conversations packed into one row would attend to each other, while padding after
a conversation's last token changes nothing before it. Padded positions have ignored targets (-1), and so do all
but the reply tokens. A row is the conversation's first train.seq_len + 1 tokens (inputs and shifted targets): a
longer conversation is cut there (what follows is not trained on), and one without a reply token inside that
window is left out; the start of training says how many. Rows are padded to the longest conversation of the
global batch, so every process's rows are the ones a single process would have.

Training visits the conversations in a fresh seeded order each epoch; the batch of a step is a pure function of
(seed, step), so a resumed run sees exactly the batches of the uninterrupted one.
"""

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from tokenizers import Tokenizer

from .chat import (CHAT_TEMPLATE, CHAT_TOKENS, TEMPLATE_FILE, add_chat_tokens, check_messages,
                   render_conversation, render_prompt)
from .config import EOT
from .errors import DataError
from .loader import check_ranks
from .sources import fingerprint_files, load_documents, resolve_files, source_fingerprint
from .split import held_out
from .tokenizer import load_tokenizer, token_dtype, train_tokenizer, vocab_size_of

CHAT_FORMAT_VERSION = 1  # bump when a change here changes the files written (with data/chat.py's format)


# ----------------------------------------------------------------------------- sources

def chat_files(path: str, option: str) -> list[Path]:
    files = resolve_files(path, option)
    other = [f for f in files if f.suffix.lower() != ".jsonl"]
    if other:
        raise DataError(f"{option}={path!r}: data=chat reads .jsonl files of {{\"messages\": [...]}}, and {other[0]} "
                        f"is not one; point {option} at the .jsonl files")
    return files


def read_jsonl(path: Path) -> list[list[dict]]:
    """The conversations of one JSONL file, each checked; DataError naming the line of the first bad one."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno}); fix or remove the "
                                    "line") from None
                if not isinstance(row, dict) or "messages" not in row:
                    raise DataError(f"{path}:{n}: expected an object with \"messages\" (OpenAI's chat format: "
                                    "{\"messages\": [{\"role\": \"user\", \"content\": \"...\"}, ...]})")
                out.append(check_messages(row["messages"], f"{path}:{n}"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it") from None
    return out


def _as_hf(cfg):
    """The data.name part of a chat config as a data=hf config reading the `messages` column."""
    return replace(cfg, source="hf", text_column="messages", val_path=None)


def load_conversations(cfg) -> tuple[list, Optional[list]]:
    """(main conversations, separate validation conversations or None), each a list of checked message lists."""
    cfg.validate()
    val = None
    if cfg.path:
        main = [c for f in chat_files(cfg.path, "data.path") for c in read_jsonl(f)]
    else:
        docs, own_val = load_documents(_as_hf(cfg))
        where = f"data.name={cfg.name!r}"
        main = [check_messages(m, f"{where} split {cfg.split!r} row {i}") for i, m in enumerate(docs["text"])]
        if own_val is not None:
            val = [check_messages(m, f"{where} split 'validation' row {i}") for i, m in enumerate(own_val["text"])]
    if cfg.max_documents is not None:
        main = main[:cfg.max_documents]
    if not main:
        raise DataError(f"{describe_chat(cfg)} holds no conversations; check data.path / data.name")
    if cfg.val_path:
        val = [c for f in chat_files(cfg.val_path, "data.val_path") for c in read_jsonl(f)]
        if not val:
            raise DataError(f"data.val_path={cfg.val_path!r} holds no conversations")
    return main, val


def chat_fingerprint(cfg) -> dict:
    """What the conversations depend on (for the cache key). Validates inputs."""
    cfg.validate()
    fp: dict = {"source": "chat", "format": CHAT_FORMAT_VERSION, "max_documents": cfg.max_documents}
    files = chat_files(cfg.path, "data.path") if cfg.path else []
    if cfg.path:
        fp["files"] = fingerprint_files(files)
    else:
        fp["hf"] = source_fingerprint(_as_hf(cfg))
    if cfg.val_path:
        val_files = chat_files(cfg.val_path, "data.val_path")
        if set(files) & set(val_files):
            raise DataError("data.path and data.val_path share files: the validation conversations would be "
                            "trained on; keep the two apart")
        fp["val_files"] = fingerprint_files(val_files)
    return fp


def describe_chat(cfg) -> str:
    desc = f"chat {cfg.path}" if cfg.path else f"chat hf {cfg.name} split={cfg.split}"
    if cfg.max_documents:
        desc += f" first {cfg.max_documents} conversations"
    return desc + (f", val {cfg.val_path}" if cfg.val_path else "")


# ----------------------------------------------------------------------------- writing the cache

def write_chat(cfg, tmp: Path) -> dict:
    """Split the conversations, make the tokenizer (with the chat tokens) and write the split files into `tmp`;
    returns the meta fields."""
    convs, val = load_conversations(cfg)
    if val is None:
        train_idx, val_idx = held_out(len(convs), cfg.val_fraction, cfg.seed, "too few conversations to hold some "
                                      "out for validation: add conversations or give data.val_path")
        convs, val = [convs[i] for i in train_idx], [convs[i] for i in val_idx]
    if cfg.tokenizer_path:
        tok = load_tokenizer(cfg.tokenizer_path)
    else:
        print(f"data: training byte-level BPE, vocab {cfg.vocab_size}, on {len(convs)} conversations", flush=True)
        tok = train_tokenizer((m["content"] for c in convs for m in c), cfg.vocab_size)
    add_chat_tokens(tok)
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / TEMPLATE_FILE).write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    vocab_size = vocab_size_of(tok)
    dtype = token_dtype(vocab_size)
    first_reply = next(i for i, m in enumerate(val[0]) if m["role"] == "assistant")
    meta = {"format": "chat", "vocab_size": vocab_size, "eot_id": tok.token_to_id(EOT), "eot_token": EOT,
            "dtype": dtype.name, "chat_tokens": {t: tok.token_to_id(t) for t in CHAT_TOKENS},
            "tokenizer": cfg.tokenizer_path or "byte-level BPE trained on the train split's messages",
            "sample_prompt": render_prompt(val[0][:first_reply], CHAT_TEMPLATE)}
    tok.encode_special_tokens = True  # message text is text, even "<|im_end|>" (data/chat.py)
    for split, split_convs in (("train", convs), ("val", val)):
        meta.update(_write_split(split_convs, tok, dtype, tmp, split))
    return meta


def _write_split(convs: list, tok: Tokenizer, dtype: np.dtype, tmp: Path, split: str) -> dict:
    ids, mask = [], []
    for c in convs:
        i, m = render_conversation(c, tok)
        ids.append(np.asarray(i, dtype))
        mask.append(np.asarray(m, np.uint8))
    starts = np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.int64)
    np.concatenate(ids).tofile(tmp / f"{split}.bin")
    mask = np.concatenate(mask)
    mask.tofile(tmp / f"{split}.mask.bin")
    starts.tofile(tmp / f"{split}.starts.bin")
    return {f"n_{split}_tokens": int(starts[-1]), f"n_{split}_targets": int(mask.sum()),
            f"n_{split}_conversations": len(convs)}


# ----------------------------------------------------------------------------- reading it back, batches

@dataclass
class Conversations:
    """One split: conversation i is ids[starts[i]:starts[i + 1]]; mask is 1 on its training targets."""
    ids: np.ndarray
    mask: np.ndarray
    starts: np.ndarray
    pad_id: int  # the input id of padded positions (their targets are ignored)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def window_lengths(self, seq_len: int) -> np.ndarray:
        """Tokens of each conversation that fit a row of seq_len inputs (inputs and targets: seq_len + 1)."""
        return np.minimum(np.diff(self.starts), seq_len + 1)

    def trainable(self, seq_len: int) -> np.ndarray:
        """Indices of the conversations with a target among their first seq_len + 1 tokens (the first token is
        never one: nothing predicts it)."""
        before = np.concatenate([[0], np.cumsum(self.mask, dtype=np.int64)])  # before[i]: targets in ids[:i]
        return np.flatnonzero(before[self.starts[:-1] + self.window_lengths(seq_len)] > before[self.starts[:-1] + 1])

    def rows(self, picks: np.ndarray, seq_len: int, width: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 inputs x and targets y [len(picks), width]: conversation picks[r] in row r, cut to seq_len + 1
        tokens and padded to `width` (default: its longest), targets -1 but on reply tokens."""
        lengths = self.window_lengths(seq_len)[picks]
        width = int(lengths.max()) - 1 if width is None else width
        x = np.full((len(picks), width), self.pad_id, dtype=np.int64)
        y = np.full((len(picks), width), -1, dtype=np.int64)
        for r, (c, n) in enumerate(zip(picks, lengths)):
            s = self.starts[c]
            t = np.asarray(self.ids[s:s + n], dtype=np.int64)
            x[r, :n - 1] = t[:-1]
            y[r, :n - 1] = np.where(self.mask[s + 1:s + n] == 1, t[1:], -1)
        return torch.from_numpy(x), torch.from_numpy(y)


def _trainable(split: Conversations, seq_len: int, name: str) -> np.ndarray:
    keep = split.trainable(seq_len)
    if len(keep) == 0:
        raise DataError(f"no {name} conversation has a reply token within its first train.seq_len+1={seq_len + 1} "
                        "tokens; raise train.seq_len")
    return keep


class ConversationBatches:
    """Training rows, one conversation each, every conversation once per epoch in a seeded order:
    get_batch(step) is a pure function of (seed, step), whatever the number of processes."""

    def __init__(self, split: Conversations, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        check_ranks(batch_size, rank, world_size)
        self.split, self.seq_len, self.batch_size, self.seed = split, seq_len, batch_size, seed
        self.rank, self.local_batch_size = rank, batch_size // world_size
        self.keep = _trainable(split, seq_len, "training")
        self._order = (None, None)  # (epoch, its order), the last one asked for

    def order(self, epoch: int) -> np.ndarray:
        if self._order[0] != epoch:
            self._order = (epoch, self.keep[np.random.default_rng([self.seed, epoch]).permutation(len(self.keep))])
        return self._order[1]

    def get_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows [rank*B/W, (rank+1)*B/W) of the global batch of `step`: samples step*B .. step*B+B-1
        of the epochs' orders, padded to the longest of the B."""
        epoch, pos = np.divmod(step * self.batch_size + np.arange(self.batch_size), len(self.keep))
        picks = np.array([self.order(e)[p] for e, p in zip(epoch, pos)])
        width = int(self.split.window_lengths(self.seq_len)[picks].max()) - 1
        lo = self.rank * self.local_batch_size
        return self.split.rows(picks[lo:lo + self.local_batch_size], self.seq_len, width)


def conversation_eval_batches(split: Conversations, seq_len: int, batch_size: int,
                              max_batches: Optional[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The validation conversations in order, batch_size per batch (max_batches batches, None = all that fit;
    fewer conversations than batch_size make one smaller batch): the same every evaluation."""
    keep = _trainable(split, seq_len, "validation")
    rows = min(batch_size, len(keep))
    n_batches = len(keep) // rows if max_batches is None else min(len(keep) // rows, max_batches)
    for b in range(n_batches):
        yield split.rows(keep[b * rows:(b + 1) * rows], seq_len)


@dataclass
class ChatData:
    """A prepared data=chat folder; the trainer reads it through the methods PreparedData has too."""
    dir: Path
    train: Conversations
    val: Conversations
    tokenizer: Tokenizer
    tokenizer_path: Path
    meta: dict

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def sample_prompt(self) -> str:
        """The first validation conversation up to its first reply: the prompt of the samples at evaluations."""
        return self.meta["sample_prompt"]

    def train_batches(self, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if rank == 0:
            for name, split in (("training", self.train), ("validation", self.val)):
                cut = int((np.diff(split.starts) > seq_len + 1).sum())
                left_out = len(split) - len(split.trainable(seq_len))
                if cut:
                    print(f"data: {cut:,} of {len(split):,} {name} conversations are longer than train.seq_len+1="
                          f"{seq_len + 1} tokens and are cut there; {left_out:,} have no reply token before the "
                          "cut and are left out")
        return ConversationBatches(self.train, seq_len, batch_size, seed, rank, world_size)

    def val_batches(self, seq_len: int, batch_size: int, max_batches: Optional[int]):
        return conversation_eval_batches(self.val, seq_len, batch_size, max_batches)

    def val_text_size(self, seq_len: int, batch_size: int, max_batches: Optional[int]) -> tuple[int, int]:
        """(target tokens, UTF-8 bytes of their text) of val_batches: the replies' tokens (<|im_end|> adds none)."""
        n_tokens = n_bytes = 0
        for _, y in self.val_batches(seq_len, batch_size, max_batches):
            for row in y:
                targets = row[row >= 0].tolist()
                n_tokens += len(targets)
                n_bytes += len(self.tokenizer.decode(targets).encode("utf-8"))
        return n_tokens, n_bytes


def load_chat(d: Path, meta: dict) -> ChatData:
    dtype = np.dtype(meta["dtype"])

    def split(name: str) -> Conversations:
        return Conversations(np.memmap(d / f"{name}.bin", dtype=dtype, mode="r"),
                             np.memmap(d / f"{name}.mask.bin", dtype=np.uint8, mode="r"),
                             np.fromfile(d / f"{name}.starts.bin", dtype=np.int64), meta["eot_id"])

    return ChatData(d, split("train"), split("val"), Tokenizer.from_file(str(d / "tokenizer.json")),
                    d / "tokenizer.json", meta)
