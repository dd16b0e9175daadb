"""Shared test helpers: a tiny local corpus and a composed, CPU-sized training config."""

import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

WORDS = ("the king queen lord lady sword crown night day love death speak hear thou art my good "
         "sweet fair noble heart eyes blood time life world hand heaven").split()


def write_corpus(folder: Path, n_docs: int = 12, lines: int = 60, seed: int = 0) -> Path:
    """A few play-like documents of random words: enough structure for a tiny model to learn."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        speakers = [w.upper() for w in rng.sample(WORDS, 3)]
        text = []
        for _ in range(lines):
            text.append(f"{rng.choice(speakers)}:")
            text.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + ".")
        (folder / f"doc{d:02d}.txt").write_text("\n".join(text) + "\n")
    return folder


@pytest.fixture(scope="session", autouse=True)
def cpu_attention_kernel():
    """Build (or load) our CPU training attention before any test: the kernel is loaded once per process,
    and a test that hides the C++ compiler (CXX=no-such-compiler) must not be the one that first asks
    for it, or every later test in the process would train on the SDPA fallback."""
    from kernels.causal_attention_cpu import cpu_kernel_error

    assert cpu_kernel_error() is None, cpu_kernel_error()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP's waits cost more than the
    work: run a module single-threaded, restoring the setting afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def pretrained(corpus, data_cache, tmp_path_factory):
    """A run of the tiny test config: what train.init_from starts from (fine-tuning, SFT)."""
    import train

    out = tmp_path_factory.mktemp("pretrained") / "run"
    train.run(compose_config(tiny_overrides(corpus, data_cache, out)))
    return out


def tiny_overrides(corpus: Path, cache: Path, out_dir: Path) -> list[str]:
    return [
        "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=64", "model.max_seq_len=64",
        "model.kv_lora_rank=16", "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
        "data=text", f"data.path={corpus}", "data.vocab_size=300", f"data.cache_dir={cache}", "data.val_fraction=0.2",
        "train.seq_len=32", "train.batch_size=8", "train.max_steps=6", "train.eval_every=3", "train.save_every=3",
        "train.eval_batches=2", "train.sample_tokens=4", "train.log_every=1", "train.warmup_steps=2",
        "train.progress=false", "wandb.mode=disabled", f"out_dir={out_dir}",
    ]


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    import train  # noqa: F401  (registers the structured configs)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)
