"""The run folder (out_dir): one run at a time, and a new run never destroys an old one by accident.

A run holds an exclusive lock on `out_dir/.lock` (flock: released by the kernel when the process ends,
even on SIGKILL, so a crashed run never leaves a stale lock). A new run refuses a folder that already
holds a run's checkpoints or metrics, unless it continues it (train.resume) or replaces it on purpose
(train.overwrite). Hydra's record of the config (.hydra/) is written here too, once the folder is ours
(conf/config.yaml stops Hydra from writing it before the checks).
"""

import fcntl
import shutil
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from .errors import TrainConfigError

LOCK_FILE = ".lock"
RUN_FILES = ("checkpoints", "metrics.jsonl", "wandb_run_id")  # what a run writes into out_dir


def claim_out_dir(out_dir: Path, resume: bool, overwrite: bool):
    """Create and lock `out_dir` for this process; returns the open lock file (keep it open while training)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = open(out_dir / LOCK_FILE, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise TrainConfigError(f"another training run is using out_dir={out_dir}: wait for it to finish, "
                               "or choose another out_dir") from None
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not resume:
        if not overwrite:
            lock.close()
            raise TrainConfigError(f"out_dir={out_dir} already holds a run ({', '.join(existing)}): continue it with "
                                   "train.resume=true, replace it with train.overwrite=true, or choose another out_dir")
        for name in existing:
            path = out_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return lock


def record_config(out_dir: Path, cfg) -> None:
    """.hydra/config.yaml and overrides.yaml, as Hydra writes them (what the run was asked to do)."""
    folder = out_dir / ".hydra"
    folder.mkdir(exist_ok=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    if HydraConfig.initialized():
        (folder / "overrides.yaml").write_text(OmegaConf.to_yaml(HydraConfig.get().overrides.task))
