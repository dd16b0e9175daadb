"""The run folder (out_dir): one run at a time, and a new run never destroys an old one by accident.

A run holds an exclusive lock on `out_dir/.lock` (flock: released by the kernel when the process ends,
even on SIGKILL, so a crashed run never leaves a stale lock). A new run refuses a folder that already
holds a run's checkpoints or metrics, unless it continues it (train.resume) or replaces it on purpose
(train.overwrite). Hydra's record of the config (.hydra/) is written here too, once the folder is ours
(conf/config.yaml stops Hydra from writing it before the checks).
"""

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from .errors import TrainConfigError

LOCK_FILE = ".lock"
RUN_FILES = ("checkpoints", "metrics.jsonl", "wandb_run_id")  # what a run writes into out_dir


def claim_out_dir(out_dir: Path, resume: bool, overwrite: bool):
    """Create and lock `out_dir` for this process: (the open lock file, to keep open while training; the paths this
    call created, the folder and/or the lock file, for release_out_dir to remove if the run fails to start). A
    folder holding a run is refused unless this run continues it (resume) or replaces it (overwrite: replace_run
    deletes it once the run is ready to start, so an error before then loses nothing)."""
    created = [] if out_dir.exists() else [out_dir]
    out_dir.mkdir(parents=True, exist_ok=True)
    created += [] if (out_dir / LOCK_FILE).exists() else [out_dir / LOCK_FILE]
    lock = _lock(out_dir / LOCK_FILE)
    if lock is None:
        raise TrainConfigError(f"another training run is using out_dir={out_dir}: wait for it to finish, "
                               "or choose another out_dir")
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not resume and not overwrite:
        release_out_dir(lock, created)
        raise TrainConfigError(f"out_dir={out_dir} already holds a run ({', '.join(existing)}): continue it with "
                               "train.resume=true, replace it with train.overwrite=true, or choose another out_dir")
    return lock, created


def _lock(path: Path):
    """`path` opened and flock-ed, or None if another process holds it. A run that fails to start deletes the lock
    file it created (release_out_dir): if that happened between our open and flock, lock the new file instead."""
    while True:
        lock = open(path, "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return None
        if path.exists() and os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
            return lock
        lock.close()


def release_out_dir(lock, created=()) -> None:
    """Unlock out_dir, first removing what claim_out_dir created (`created`: a run that failed to start leaves no
    trace); the folder only if nothing else was written into it meanwhile."""
    for path in reversed(created):
        if path.is_dir():
            with contextlib.suppress(OSError):  # not empty: leave it
                path.rmdir()
        else:
            path.unlink(missing_ok=True)
    lock.close()


def replace_run(out_dir: Path) -> None:
    """train.overwrite=true: delete the previous run's checkpoints and metrics (out_dir is locked)."""
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def record_config(out_dir: Path, cfg) -> None:
    """.hydra/config.yaml and overrides.yaml, as Hydra writes them (what the run was asked to do)."""
    folder = out_dir / ".hydra"
    folder.mkdir(exist_ok=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    if HydraConfig.initialized():
        (folder / "overrides.yaml").write_text(OmegaConf.to_yaml(HydraConfig.get().overrides.task))
