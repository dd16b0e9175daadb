"""Checkpoints that are complete or invisible.

Layout under `<out_dir>/checkpoints/`:

    step_0000500/            one complete checkpoint
        model.safetensors    weights (from the uncompiled module; loads without unpickling code)
        config.json          the resolved run config
        tokenizer.json
        trainer_state.pt     optimizer, RNG states, step, best val loss, time trained (plain tensors and numbers)
    latest -> step_0000500   symlinks, switched atomically once the folder is whole
    best   -> step_0000250

A checkpoint is written into `.tmp-step_.../`, every file and the folder fsynced, then renamed;
only then does `latest` move (a new symlink renamed over the old one, then the parent fsynced).
A crash at any point leaves the previous checkpoint whole and `latest` pointing at it; the next save
deletes the `.tmp-*` leftovers, and a `.tmp-*` folder is never loaded. A failed write (a full disk)
raises CheckpointError and leaves the previous checkpoint as it was.

The weights and optimizer state are full (unsharded) tensors keyed by parameter name, whatever the
number of processes or DDP/FSDP: a checkpoint resumes under any world size.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or incompatible."""


MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, STATE_FILE = (
    "model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt")
TMP_PREFIX = ".tmp-"  # a checkpoint being written (or left unfinished by a crash): never loaded


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _point(link: Path, target_name: str) -> None:
    """Atomically make `link` a symlink to `target_name` (a sibling folder)."""
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target_name)
    os.replace(tmp, link)


def save_checkpoint(root: Path, step: int, model_state: dict, trainer_state: dict, config: dict,
                    tokenizer_path: Path, tied_embeddings: bool, best: bool = False) -> Path:
    """Write checkpoint `step` under `root`, point `latest` (and `best` if asked) at it, prune the rest."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final, tmp = root / name, root / f"{TMP_PREFIX}{name}"
    remove_unfinished(root)
    try:
        tmp.mkdir()
        weights = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        if tied_embeddings:
            weights.pop("lm_head.weight", None)  # the same tensor as embed.weight: safetensors stores it once
        save_file(weights, tmp / MODEL_FILE, metadata={"step": str(step)})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
        torch.save(trainer_state, tmp / STATE_FILE)
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
    except (OSError, RuntimeError) as e:  # e.g. the disk is full (torch.save says so with a RuntimeError)
        shutil.rmtree(tmp, ignore_errors=True)  # nothing visible changed, and the space is given back
        latest = root / "latest"
        kept = f"the last complete checkpoint {latest.resolve()} is intact" if latest.exists() else \
            "no earlier checkpoint exists"
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise CheckpointError(f"could not write checkpoint {final} ({reason}); {kept}; free space and resume") from None
    if final.exists():
        # The same step written again: after a crash between this rename and the `latest` switch
        # below (`latest` still points at an older checkpoint), or by a new run in an old out_dir.
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    _point(root / "latest", name)
    if best:
        _point(root / "best", name)
    _fsync(root)
    keep = {os.readlink(root / link) for link in ("latest", "best") if (root / link).is_symlink()}
    for old in root.glob("step_*"):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_unfinished(root: Path) -> None:
    """Delete what a run killed while saving leaves: `.tmp-step_*` folders and `.latest.tmp` links."""
    for p in Path(root).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(root).glob(".*.tmp"):
        if p.is_symlink():
            p.unlink()


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder from a checkpoint folder, a `checkpoints/` folder or a run folder."""
    p = Path(path).expanduser()
    if p.name.startswith(TMP_PREFIX):
        raise CheckpointError(f"'{path}' is an unfinished checkpoint (the run stopped while writing it) and is "
                              "never loaded: resume from the run's latest checkpoint")
    for candidate in (p, p / "latest", p / "checkpoints" / "latest"):
        if (candidate / MODEL_FILE).is_file():
            return candidate.resolve()
    if not p.exists():
        raise CheckpointError(f"no checkpoint at '{path}': the path does not exist")
    raise CheckpointError(f"no checkpoint at '{path}': expected {MODEL_FILE} there, or a checkpoints/latest "
                          "inside (pass a run's out_dir or one of its checkpoint folders)")


@dataclass
class Checkpoint:
    dir: Path
    config: dict
    model_state: dict
    tokenizer_path: Path

    def trainer_state(self) -> dict:
        try:
            return torch.load(self.dir / STATE_FILE, weights_only=True, map_location="cpu")
        except Exception as e:
            raise CheckpointError(f"checkpoint '{self.dir}' has an unreadable {STATE_FILE} ({e.__class__.__name__}): "
                                  "it is corrupt; resume from another checkpoint") from None


def load_checkpoint(path) -> Checkpoint:
    d = resolve_checkpoint(path)
    for f in (CONFIG_FILE, TOKENIZER_FILE):
        if not (d / f).is_file():
            raise CheckpointError(f"checkpoint '{d}' is incomplete: {f} is missing")
    try:
        config = json.loads((d / CONFIG_FILE).read_text())
        state = load_file(d / MODEL_FILE)
    except Exception as e:
        raise CheckpointError(f"checkpoint '{d}' is corrupt ({e.__class__.__name__}: {str(e)[:120]}); "
                              "use another checkpoint") from None
    if config.get("model", {}).get("tie_embeddings") and "embed.weight" in state:
        state["lm_head.weight"] = state["embed.weight"]
    return Checkpoint(d, config, state, d / TOKENIZER_FILE)
