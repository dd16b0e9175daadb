"""A checkpoint is complete or invisible, and a run killed with SIGKILL at any moment resumes from the
last complete checkpoint to the same losses as a run that was never interrupted, under DDP, FSDP2 or
one process, also with another number of processes than the one that saved it.

Faults are injected by tests/fault_injection.py (a wrapper around train.main, driven by FAULT_*
environment variables), which stops the run at a chosen point so the test can SIGKILL it there."""

import errno
import os
import signal
import time
from pathlib import Path

import pytest
import torch

import train
import checkpoint.store as store
from conftest import ROOT, compose_config
from test_distributed import (assert_same_run, finish, launch, losses, ok, one_error_line, overrides,  # noqa: F401
                              reference_run, torchrun)
from checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint

FAULTS = ROOT / "tests" / "fault_injection.py"


def kill_when_stopped(args: list[str], nproc: int, cwd: Path, fault: dict, stopped_ranks) -> None:
    """Run under fault injection until the given ranks stop at the fault, then SIGKILL every process
    (the launcher and each rank, as when a node is lost) and wait for them to be gone."""
    fault_dir = cwd / "fault"
    proc = launch(args, nproc, cwd, script=FAULTS, env={"FAULT_DIR": str(fault_dir), **fault})
    deadline = time.time() + 300
    while not all((fault_dir / f"stopped.{r}").exists() for r in stopped_ranks):
        if proc.poll() is not None or time.time() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"the run did not reach the fault:\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.2)
    pids = [int((fault_dir / f"pid.{r}").read_text()) for r in range(nproc)]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    if nproc > 1:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun itself (its ranks run in sessions of their own)
    proc.communicate(timeout=60)
    for pid in pids:  # reaped by their parent; make sure none lingers
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)


def test_sigkill_mid_training_then_resume_on_one_process(corpus, data_cache, reference_run, tmp_path):
    """DDP on 2 processes killed during step 5 (checkpoint at step 3), resumed on 1 process."""
    out = tmp_path / "run"
    args = overrides(corpus, data_cache, out)
    kill_when_stopped(args, 2, tmp_path, {"FAULT_STOP_AT_STEP": "4"}, stopped_ranks=[0, 1])
    assert sorted(losses(out, "train_loss")) == [1, 2, 3, 4]  # steps 1-4 ran, step 4 was not saved
    assert load_checkpoint(out).trainer_state()["step"] == 3

    summary = train.run(compose_config(args + ["train.resume=true"]))  # world size 2 -> 1
    assert_same_run(out, reference_run)  # steps 1-3 from the killed run, 4-6 resumed
    assert summary["final_val_loss"] == pytest.approx(losses(reference_run, "val_loss")[6], abs=1e-5)


@pytest.mark.slow  # torchrun with two processes, about 21 s: make test is at its 10-minute budget
def test_sigkill_mid_checkpoint_then_resume_on_two_processes(corpus, data_cache, reference_run, tmp_path):
    """One process killed while writing the step-6 checkpoint, resumed with FSDP2 on 2 processes."""
    out = tmp_path / "run"
    args = overrides(corpus, data_cache, out)
    kill_when_stopped(args, 1, tmp_path, {"FAULT_STOP_IN_SAVE_AT_STEP": "6"}, stopped_ranks=[0])
    root = out / "checkpoints"
    unfinished = root / ".tmp-step_0000006"
    assert {p.name for p in unfinished.iterdir()} == {"model.safetensors"}  # the kill hit mid-write
    assert os.readlink(root / "latest") == "step_0000003"
    assert load_checkpoint(out).trainer_state()["step"] == 3  # the unfinished folder is invisible
    with pytest.raises(CheckpointError, match="unfinished checkpoint"):
        load_checkpoint(unfinished)

    ok(torchrun(args + ["train.resume=true", "train.parallel=fsdp"], 2, tmp_path))  # world size 1 -> 2
    assert_same_run(out, reference_run)
    assert not list(root.glob(".tmp*")) and os.readlink(root / "latest") == "step_0000006"


@pytest.mark.slow
def test_signal_to_one_rank_stops_all_after_the_same_step(corpus, data_cache, reference_run, tmp_path):
    """SIGTERM reaches only rank 1 (of 2, DDP): both ranks finish the step, save it, and stop; the run
    then resumes on 1 process to the uninterrupted run's losses."""
    out = tmp_path / "run"
    args = overrides(corpus, data_cache, out)
    (tmp_path / "fault").mkdir()
    proc = finish(launch(args, 2, tmp_path, script=FAULTS,
                         env={"FAULT_DIR": str(tmp_path / "fault"), "FAULT_SIGNAL_AT_STEP": "4",
                              "FAULT_SIGNAL": "SIGTERM", "FAULT_SIGNAL_RANK": "1"}))
    assert "stopped by a signal to another process at step 5" in proc.stdout, proc.stderr[-3000:]
    assert load_checkpoint(out).trainer_state()["step"] == 5
    train.run(compose_config(args + ["train.resume=true"]))
    assert_same_run(out, reference_run)


# ---- the checkpoint writer itself ------------------------------------------------------------------

def write(root: Path, step: int, tokenizer: Path, **kw) -> Path:
    state = {"w": torch.full((4, 4), float(step)), "embed.weight": torch.ones(3, 2)}
    return save_checkpoint(root, step, state, {"step": step}, {"model": {}}, tokenizer, False, **kw)


def test_checkpoint_is_complete_or_invisible(tmp_path, monkeypatch):
    root, tokenizer = tmp_path / "checkpoints", tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    write(root, 1, tokenizer, best=True)

    # Leftovers of a run killed while saving: an unfinished folder and a half-made symlink.
    (root / ".tmp-step_0000002").mkdir()
    (root / ".tmp-step_0000002" / "model.safetensors").write_bytes(b"partial")
    (root / ".latest.tmp").symlink_to(".tmp-step_0000002")
    assert resolve_checkpoint(root) == (root / "step_0000001").resolve()
    with pytest.raises(CheckpointError, match="unfinished"):
        resolve_checkpoint(root / ".tmp-step_0000002")

    # A failed write (full disk) raises a clear error and changes nothing visible.
    real_save_file = store.save_file

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store, "save_file", disk_full)
    with pytest.raises(CheckpointError, match=r"No space left on device.*step_0000001 is intact"):
        write(root, 3, tokenizer)
    assert sorted(p.name for p in root.iterdir()) == ["best", "latest", "step_0000001"]  # leftovers cleaned
    assert load_checkpoint(root).trainer_state()["step"] == 1

    # A good write: files and folder fsynced before the rename, `latest` moved only after it.
    monkeypatch.setattr(store, "save_file", real_save_file)
    events, real_fsync, real_replace = [], store._fsync, os.replace
    monkeypatch.setattr(store, "_fsync", lambda p: (events.append(("fsync", Path(p).name)), real_fsync(p)))
    monkeypatch.setattr(store.os, "replace",
                        lambda a, b: (events.append(("rename", Path(a).name, Path(b).name)), real_replace(a, b)))
    write(root, 4, tokenizer)
    rename = events.index(("rename", ".tmp-step_0000004", "step_0000004"))
    synced_before = {e[1] for e in events[:rename] if e[0] == "fsync"}
    assert {"model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt",
            ".tmp-step_0000004"} <= synced_before
    switch = events.index(("rename", ".latest.tmp", "latest"))
    assert rename < switch and ("fsync", "checkpoints") in events[switch:]
    assert os.readlink(root / "latest") == "step_0000004" and os.readlink(root / "best") == "step_0000001"
    assert sorted(p.name for p in root.iterdir()) == ["best", "latest", "step_0000001", "step_0000004"]
    ckpt = load_checkpoint(root)
    assert torch.equal(ckpt.model_state["w"], torch.full((4, 4), 4.0)) and ckpt.trainer_state() == {"step": 4}


@pytest.mark.slow
def test_resume_refuses_incompatible_config_under_torchrun(corpus, data_cache, reference_run, tmp_path):
    files = lambda: {p: p.read_bytes() for p in reference_run.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    proc = torchrun(overrides(corpus, data_cache, reference_run) + ["train.resume=true", "model.n_layers=3"], 2,
                    tmp_path)
    one_error_line(proc, "model.n_layers: 2 -> 3")  # refused on every rank, printed once
    assert files() == before  # checkpoints and metrics.jsonl untouched


class Killed(BaseException):
    """A kill at a chosen moment: a BaseException, so no `except Exception` in the code under test catches it."""


def test_saving_a_step_again_keeps_latest_whole_at_every_moment(tmp_path, monkeypatch):
    """Step 2 saved again while `latest` and `best` name it (issue 25: the old folder was deleted before the
    new one was renamed in). The save is killed after each of its filesystem operations in turn: every time,
    `latest` and `best` load a complete step 2, old or new, and the next save cleans up after the kill."""
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    old, new = torch.full((4, 4), 2.0), torch.full((4, 4), -2.0)
    ops = [(store.os, "replace"), (store.os, "link"), (store.shutil, "rmtree"), (store.Path, "unlink")]
    real = {name: getattr(owner, name) for owner, name in ops}
    for kill_at in range(1, 100):
        root = tmp_path / f"kill_{kill_at}" / "checkpoints"
        for step in (1, 2):
            save_checkpoint(root, step, {"w": old}, {"step": step}, {"model": {}}, tokenizer, False, best=True)
        calls = 0

        def counted(name):
            def op(*args, **kw):
                nonlocal calls
                result = real[name](*args, **kw)
                calls += 1
                if calls == kill_at:
                    raise Killed
                return result
            return op

        for owner, name in ops:
            monkeypatch.setattr(owner, name, counted(name))
        try:
            save_checkpoint(root, 2, {"w": new}, {"step": 2}, {"model": {}}, tokenizer, False)
            finished = True
        except Killed:
            finished = False
        for owner, name in ops:
            monkeypatch.setattr(owner, name, real[name])
        for link in ("latest", "best"):
            ckpt = load_checkpoint(root / link)
            assert ckpt.trainer_state() == {"step": 2}, (kill_at, link)
            assert torch.equal(ckpt.model_state["w"], old) or torch.equal(ckpt.model_state["w"], new), (kill_at, link)
        if finished:
            assert torch.equal(load_checkpoint(root).model_state["w"], new)
            break
        save_checkpoint(root, 3, {"w": new}, {"step": 3}, {"model": {}}, tokenizer, False)  # the resumed run's save
        assert os.readlink(root / "latest") == "step_0000003"
        assert {p.name for p in root.glob(".tmp*")} <= {os.readlink(root / "best")}  # only what `best` still names
        assert load_checkpoint(root / "best").trainer_state() == {"step": 2}, kill_at
    assert kill_at > 5  # the save was killed at every one of its (more than 5) operations before it finished


def test_saving_a_step_again_on_a_filesystem_without_hard_links(tmp_path, monkeypatch):
    """The re-save above rebuilds the step folder from hard links; where the filesystem has none (os.link
    fails, as on some network and FAT mounts) it copies the files instead of failing."""
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 2, {"w": torch.zeros(3)}, {"step": 2}, {"model": {}}, tokenizer, False, best=True)

    def no_links(*args, **kw):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(store.os, "link", no_links)
    save_checkpoint(root, 2, {"w": torch.ones(3)}, {"step": 2}, {"model": {}}, tokenizer, False)
    for link in ("latest", "best"):
        assert torch.equal(load_checkpoint(root / link).model_state["w"], torch.ones(3)), link
    assert not list(root.glob(".tmp*"))
