"""Turn a DataConfig into token files on disk, cached by a hash of everything that matters.

Layout of a cache folder <cache_dir>/<source>-<hash>/:
    train.bin, val.bin   flat token ids (uint16, or uint32 for vocabularies above 65536),
                         an EOT token after every document
    tokenizer.json       the tokenizer that produced them
    meta.json            vocab_size, eot_id, dtype, token/byte/document counts, source, inputs
(data=chat writes conversations with their training masks instead: data/conversations.py.)

A folder is built in a temporary sibling and renamed into place only when complete, so a crash
never leaves a half-written cache, and a second process building the same data at the same time
is harmless (the loser of the rename discards its copy). Call prepare() on rank 0, then barrier,
then load_prepared()/prepare() everywhere.
"""
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import tokenizers
from tokenizers import Tokenizer

from .config import EOT
from .conversations import chat_fingerprint, describe_chat, load_chat, write_chat
from .errors import DataError
from .loader import TokenBatches, eval_batches, eval_text_size
from .recall import AnswerBatches, answer_targets, write_recall
from .sources import describe, load_documents, source_fingerprint
from .split import split_documents
from .tokenizer import load_tokenizer, token_dtype, train_tokenizer, vocab_size_of

# Bump when a change in this package changes the files it writes: invalidates all caches.
PIPELINE_VERSION = 1


@dataclass
class PreparedData:
    dir: Path                   # the cache folder
    train: np.memmap            # 1-D token ids
    val: np.memmap
    tokenizer: Tokenizer
    tokenizer_path: Path
    meta: dict                  # vocab_size, eot_id, n_train_tokens, n_val_tokens, n_train_bytes, ...

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    sample_prompt = "\n"  # the prompt of the samples at evaluations

    # What the trainer reads through (data=chat's ChatData has the same methods: data/conversations.py).
    # data=recall scores the answers alone: every other target becomes -1, which the loss ignores.
    def train_batches(self, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        batches = TokenBatches(self.train, seq_len, batch_size, seed, rank, world_size)
        recall = self.meta.get("recall")
        return batches if recall is None else AnswerBatches(batches, recall)

    def val_batches(self, seq_len: int, batch_size: int, max_batches):
        batches = eval_batches(self.val, seq_len, batch_size, max_batches)
        recall = self.meta.get("recall")
        return batches if recall is None else ((x, answer_targets(x, y, recall)) for x, y in batches)

    def val_text_size(self, seq_len: int, batch_size: int, max_batches) -> tuple[int, int]:
        return eval_text_size(self.val, self.tokenizer, seq_len, batch_size, max_batches)


def bits_per_byte(loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Convert a mean per-token loss (nats) into bits per UTF-8 byte of text.

    Unlike loss, comparable across tokenizers: total nats = loss * n_tokens, spread over
    n_bytes bytes, divided by ln 2 for bits. n_tokens and n_bytes must describe the same text the
    loss was measured on (loader.eval_text_size; EOT tokens count as tokens but add no bytes).
    """
    return loss_nats * n_tokens / (n_bytes * math.log(2))


def cache_inputs(cfg) -> dict:
    """Everything that determines the prepared files, as JSON-able data (hashed into the key).

    Options that do not change the result (num_proc, cache_dir) are left out, and so are options
    that do not apply (val_fraction when val_path is given, vocab_size with a given tokenizer).
    """
    inputs = {"pipeline_version": PIPELINE_VERSION, "tokenizers": tokenizers.__version__,
              "source": chat_fingerprint(cfg) if cfg.source == "chat" else source_fingerprint(cfg)}
    if cfg.val_path is None:
        inputs["split"] = {"val_fraction": cfg.val_fraction, "seed": cfg.seed, "chunk_chars": cfg.chunk_chars}
    if cfg.tokenizer_path:
        path = os.path.expanduser(cfg.tokenizer_path)
        if not os.path.isfile(path):
            load_tokenizer(cfg.tokenizer_path)  # raises the DataError
        inputs["tokenizer"] = {"sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}
    elif cfg.source != "recall":  # data=recall: its word-level tokenizer follows from source_fingerprint's vocab
        inputs["tokenizer"] = {"bpe_vocab_size": cfg.vocab_size}
    return inputs


def cache_key(inputs: dict) -> str:
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def cache_folder(cfg) -> Path:
    """The folder prepare(cfg) uses (cheap: hashes inputs, loads nothing)."""
    key = cache_key(cache_inputs(cfg))
    return Path(os.path.expanduser(cfg.cache_dir)).resolve() / f"{cfg.source}-{key[:16]}"


def load_prepared(dir) -> PreparedData:
    """Reopen a folder written by prepare() (a ChatData for data=chat)."""
    d = Path(dir)
    if not (d / "meta.json").is_file():
        raise DataError(f"{d} is not a prepared data folder (no meta.json); run prepare() first")
    meta = json.loads((d / "meta.json").read_text())
    if meta.get("format") == "chat":
        return load_chat(d, meta)
    dtype = np.dtype(meta["dtype"])
    return PreparedData(
        dir=d,
        train=np.memmap(d / "train.bin", dtype=dtype, mode="r"),
        val=np.memmap(d / "val.bin", dtype=dtype, mode="r"),
        tokenizer=Tokenizer.from_file(str(d / "tokenizer.json")),
        tokenizer_path=d / "tokenizer.json",
        meta=meta,
    )


def prepare(cfg) -> PreparedData:
    """Build (or find in the cache) the tokenized train/val splits for `cfg`."""
    cfg.validate()
    inputs = cache_inputs(cfg)
    key = cache_key(inputs)
    out = Path(os.path.expanduser(cfg.cache_dir)).resolve() / f"{cfg.source}-{key[:16]}"
    if (out / "meta.json").is_file():
        return load_prepared(out)  # cache hit: nothing to do
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared
        _build(cfg, inputs, key, tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "meta.json").is_file():
                raise
            shutil.rmtree(tmp)  # another process finished the same build first
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk gets its space back
        if isinstance(e, OSError):
            raise DataError(f"could not write the token cache in {out.parent} ({e.strerror or e}); "
                            "free space or point data.cache_dir elsewhere") from None
        raise
    return load_prepared(out)


def _build(cfg, inputs: dict, key: str, tmp: Path) -> None:
    t0 = time.time()
    chat = cfg.source == "chat"
    source = describe_chat(cfg) if chat else describe(cfg)
    print(f"data: preparing {source} -> {tmp.parent}", flush=True)
    meta = {"source": source}
    meta.update(write_chat(cfg, tmp) if chat else write_recall(cfg, tmp) if cfg.source == "recall"
                else _tokenize_documents(cfg, tmp))
    meta.update(key=key, inputs=inputs, pipeline_version=PIPELINE_VERSION,
                build_seconds=round(time.time() - t0, 2))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"data: {meta['n_train_tokens']:,} train / {meta['n_val_tokens']:,} val tokens, "
          f"vocab {meta['vocab_size']}, {meta['build_seconds']} s", flush=True)


def _tokenize_documents(cfg, tmp: Path) -> dict:
    """Text sources: split the documents, train (or load) the tokenizer, write the token files; the meta fields."""
    docs, val = load_documents(cfg)
    if val is None:
        train, val = split_documents(docs, cfg.val_fraction, cfg.seed, cfg.chunk_chars)
    else:
        train = docs  # a separate validation set: all of the main source is for training

    if cfg.tokenizer_path:
        tok = load_tokenizer(cfg.tokenizer_path)
    else:
        print(f"data: training byte-level BPE, vocab {cfg.vocab_size}, on {len(train)} documents", flush=True)
        texts = (t or "" for batch in train.iter(batch_size=1000) for t in batch["text"])
        tok = train_tokenizer(texts, cfg.vocab_size, length=len(train))
    tok.save(str(tmp / "tokenizer.json"))
    vocab_size, eot_id = vocab_size_of(tok), tok.token_to_id(EOT)
    dtype = token_dtype(vocab_size)

    meta = {"vocab_size": vocab_size, "eot_id": eot_id, "eot_token": EOT,
            "dtype": dtype.name, "tokenizer": cfg.tokenizer_path or f"byte-level BPE trained on train split"}
    for split, split_docs in (("train", train), ("val", val)):
        n_tokens, n_bytes = _write_tokens(split_docs, tok, eot_id, dtype, tmp, split, cfg.num_proc)
        meta.update({f"n_{split}_tokens": n_tokens, f"n_{split}_bytes": n_bytes,
                     f"n_{split}_documents": len(split_docs)})
    return meta


def _write_tokens(docs: datasets.Dataset, tok: Tokenizer, eot_id: int, dtype: np.dtype,
                  tmp: Path, split: str, num_proc) -> tuple[int, int]:
    """Tokenize documents into <tmp>/<split>.bin (EOT after each); return (tokens, UTF-8 bytes)."""
    tok_json = tok.to_str()

    def encode(batch):
        # A private copy per process. encode_special_tokens (not kept by pickling, hence set
        # here) makes a literal "<|endoftext|>" in the text plain text, not a document boundary.
        t = Tokenizer.from_str(tok_json)
        t.encode_special_tokens = True
        texts = [s or "" for s in batch["text"]]
        enc = t.encode_batch_fast(texts, add_special_tokens=False)
        return {"ids": [e.ids + [eot_id] for e in enc], "n_bytes": [len(s.encode("utf-8")) for s in texts]}

    if num_proc and num_proc > 1:
        # Each worker process is one tokenizer thread; avoids the fork-after-threads warning.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenized = docs.map(
        encode, batched=True, num_proc=num_proc if num_proc and num_proc > 1 else None,
        remove_columns=docs.column_names, desc=f"tokenizing {split}",
        cache_file_name=str(tmp / f"{split}.arrow"),  # scratch, deleted below with the folder's other arrows
        load_from_cache_file=False, new_fingerprint=f"{split}-{hashlib.sha256(tok_json.encode()).hexdigest()[:16]}",
    )
    table = tokenized.with_format("arrow")
    n_tokens = int(pc.sum(pc.list_value_length(table["ids"])).as_py() or 0)
    n_bytes = int(pc.sum(table["n_bytes"]).as_py() or 0)
    arr = np.memmap(tmp / f"{split}.bin", dtype=dtype, mode="w+", shape=(n_tokens,))
    i = 0
    for batch in table.iter(batch_size=1024):
        ids = batch["ids"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        arr[i:i + len(ids)] = ids
        i += len(ids)
    assert i == n_tokens
    arr.flush()
    del arr, table, tokenized
    for f in tmp.glob("*.arrow"):
        f.unlink()
    return n_tokens, n_bytes
