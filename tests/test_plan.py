"""training/plan.py: a run's start-up is planned first, writing nothing, then carried out by a Trainer that locks
out_dir before it prepares data or builds a model (issue 26)."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
from omegaconf.errors import ReadonlyConfigError

import train
import training.trainer as trainer
from builders import write_checkpoint
from conftest import compose_config, tiny_overrides
from training.errors import TrainConfigError
from training.plan import make_plan

WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.symlink", "os.link", "os.truncate", "os.chmod",
                "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
watch = {"writes": None}  # a list while a block is watched (audit hooks cannot be removed: this one idles)


def _record_writes(event: str, args: tuple) -> None:
    writes = watch["writes"]
    if writes is None:
        return
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)
        if writing and "__pycache__" not in str(path):  # Python's own bytecode cache of a first import
            writes.append((event, path))
    elif event in WRITE_EVENTS:
        writes.append((event, args[0]))


sys.addaudithook(_record_writes)


def writes_of(fn, *args):
    """(fn's result, every file operation that creates, changes or deletes something while it runs)."""
    watch["writes"] = []
    try:
        return fn(*args), watch["writes"]
    finally:
        watch["writes"] = None


@pytest.mark.parametrize("start", ["new", "init_from"])
def test_making_a_plan_writes_nothing(start, corpus, tmp_path):
    """A plan for a new run in an out_dir and data cache that do not exist yet, or from a checkpoint's weights: no
    file or folder is created, and the caller's config is left as it was (the plan has its own)."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    extra = [f"train.init_from={write_checkpoint(tmp_path / 'base', n_layers=3)}"] if start == "init_from" else []
    cfg = compose_config(tiny_overrides(corpus, cache, out) + extra)
    before = sorted(tmp_path.rglob("*"))
    plan, writes = writes_of(make_plan, cfg)
    assert writes == []
    assert sorted(tmp_path.rglob("*")) == before and not out.exists() and not cache.exists()
    assert plan.data_dir.parent == cache.resolve() and plan.resume is None
    assert cfg.model.n_layers == 2 and plan.cfg.model.n_layers == (3 if start == "init_from" else 2)


def test_plan_is_frozen(corpus, data_cache, tmp_path):
    plan = make_plan(compose_config(tiny_overrides(corpus, data_cache, tmp_path / "run")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.compile = True
    with pytest.raises(ReadonlyConfigError):
        plan.cfg.train.lr = 1.0


HOLD_LOCK = textwrap.dedent("""
    import fcntl, sys
    f = open(sys.argv[1], "a")
    fcntl.flock(f, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes our stdin
""")


def test_second_run_stops_at_the_lock_before_data_or_model(corpus, tmp_path, monkeypatch):
    """Another process holds out_dir: the run fails with the one-line lock error before it prepares data (the
    data cache is not even created) or builds a model, and out_dir keeps only the other run's lock file."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    out.mkdir()
    calls = []
    for name in ("prepare", "load_prepared", "Transformer"):
        monkeypatch.setattr(trainer, name, lambda *a, name=name, **kw: calls.append(name))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / ".lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(TrainConfigError, match=f"another training run is using out_dir={out}: wait"):
            train.run(compose_config(tiny_overrides(corpus, cache, out)))
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert calls == [] and not cache.exists()
    assert [p.name for p in out.iterdir()] == [".lock"]
