"""Checkpoints that are complete or invisible.

Layout under `<out_dir>/checkpoints/`:

    step_0000500/            one complete checkpoint
        model.safetensors    weights (from the uncompiled module; loads without unpickling code)
        config.json          the resolved run config
        tokenizer.json
        tokenizer_config.json  the chat template, when the tokenizer has one beside it (data=chat's does)
        trainer_state.pt     optimizer, RNG states, step, best val loss, time trained (plain tensors and numbers)
    latest -> step_0000500   symlinks, switched atomically once the folder is whole
    best   -> step_0000250

A checkpoint is written into `.tmp-step_.../`, every file and the folder fsynced, then renamed;
only then does `latest` move (a new symlink renamed over the old one, then the parent fsynced).
A crash at any point leaves the previous checkpoint whole and `latest` pointing at it; the next save
deletes the `.tmp-*` leftovers, and a `.tmp-*` folder is never loaded. A failed write (a full disk)
raises CheckpointError and leaves the previous checkpoint as it was. Saving a step that exists again
(a resume from an earlier checkpoint) swaps the new folder in so that `latest` and `best` name a
complete checkpoint at every moment (_install). After the save, the `keep_last` newest checkpoints
and `best` stay; older ones are deleted.

Loading reports each failure in one line that names its cause; SMALL_LLM_DEBUG=1 also prints the
cause's traceback (`unusable`).

The weights and optimizer state are full (unsharded) tensors keyed by parameter name, whatever the
number of processes or DDP/FSDP: a checkpoint resumes under any world size.
"""

import json
import os
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data.chat import TEMPLATE_FILE


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or incompatible."""


MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, STATE_FILE = (
    "model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt")
TMP_PREFIX = ".tmp-"  # a checkpoint being written (or left unfinished by a crash): never loaded
LINKS = ("latest", "best")
DEBUG_ENV = "SMALL_LLM_DEBUG"  # =1: print the traceback behind a one-line error


def _steps(root: Path) -> dict[str, int]:
    """The checkpoint folders in `root`: name -> step (step_0000500 -> 500)."""
    names = (p.name for p in Path(root).glob("step_*"))
    return {name: int(name[5:]) for name in names if name[5:].isdigit()}


def unusable(where, file: str, e: BaseException, advice: str = "use another checkpoint") -> CheckpointError:
    """The one-line error for `file` of checkpoint `where` that could not be used, naming the cause: an OSError
    could not read it, any other exception found it corrupt or inconsistent. Raise it `from e`; with
    SMALL_LLM_DEBUG=1 the cause's traceback is printed first (stderr)."""
    if os.environ.get(DEBUG_ENV) == "1":
        traceback.print_exception(e)
    if isinstance(e, OSError):
        cause = f"cannot read {file} ({e.strerror or e})"
    else:
        message = str(e).strip().splitlines()
        cause = f"{file} is corrupt or invalid ({type(e).__name__}: {message[0][:160] if message else 'no message'})"
    return CheckpointError(f"checkpoint '{where}': {cause}; {advice} ({DEBUG_ENV}=1 shows the traceback)")


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
                    tokenizer_path: Path, tied_embeddings: bool, best: bool = False, keep_last: int = 1) -> Path:
    """Write checkpoint `step` under `root`, point `latest` (and `best` if asked) at it, and keep the `keep_last`
    newest checkpoints (this one included) and `best`: older ones are deleted."""
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
        if Path(tokenizer_path).with_name(TEMPLATE_FILE).is_file():
            shutil.copyfile(Path(tokenizer_path).with_name(TEMPLATE_FILE), tmp / TEMPLATE_FILE)
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
    _install(root, tmp, final)
    _point(root / "latest", name)
    if best:
        _point(root / "best", name)
    _fsync(root)
    _prune(root, step, keep_last)
    remove_unfinished(root)  # a folder _install's crash left `latest` on, now that `latest` has moved on
    return final


def _install(root: Path, tmp: Path, final: Path) -> None:
    """Rename the complete checkpoint `tmp` to `final`. If `final` exists (the same step saved again), a folder
    cannot be renamed over it, and deleting it first would leave the links that name it (`latest`, `best`)
    pointing at nothing until the rename: they move to `tmp` first, then `final` is rebuilt from hard links to
    `tmp`'s files (no data copied, and `tmp` stays whole), and they move back."""
    if not final.exists():
        os.replace(tmp, final)
        _fsync(root)
        return
    links = [root / n for n in LINKS if (root / n).is_symlink() and os.readlink(root / n) == final.name]
    for link in links:
        _point(link, tmp.name)
    _fsync(root)
    shutil.rmtree(final)
    staged = root / f"{TMP_PREFIX}{final.name}.linked"
    shutil.copytree(tmp, staged, copy_function=_link_or_copy)
    _fsync(staged)
    os.replace(staged, final)
    for link in links:
        _point(link, final.name)
    _fsync(root)
    shutil.rmtree(tmp)


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link, or a copy on a filesystem without them."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _prune(root: Path, step: int, keep_last: int) -> None:
    """Keep the `keep_last` newest checkpoints up to `step` (the one just saved first) and `best`; delete the rest."""
    steps = _steps(root)
    keep = set(sorted((n for n, s in steps.items() if s <= step), key=steps.get)[-keep_last:])
    keep |= {os.readlink(root / n) for n in LINKS if (root / n).is_symlink()}
    for old in root.glob("step_*"):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)


def later_checkpoints(root: Path, step: int) -> list[str]:
    """The names of the checkpoints in `root` saved after `step`, oldest first."""
    steps = _steps(root)
    return sorted((n for n, s in steps.items() if s > step), key=steps.get)


def discard_later(root: Path, step: int) -> list[str]:
    """Delete the checkpoints in `root` saved after `step` (a run resumed from `step` leaves them behind) and
    return their names. First `latest` moves to the newest checkpoint left (or goes, if none is) and a `best`
    among them goes, so no link ever names a deleted folder."""
    steps = _steps(root)
    later = later_checkpoints(root, step)
    left = sorted((n for n, s in steps.items() if s <= step), key=steps.get)
    for link in (root / n for n in LINKS):
        if not (link.is_symlink() and os.readlink(link) in later):
            continue
        if link.name == "latest" and left:
            _point(link, left[-1])
        else:
            link.unlink()
    _fsync(root)
    for name in later:
        shutil.rmtree(root / name)
    return later


def remove_unfinished(root: Path) -> None:
    """Delete what a run killed while saving leaves: `.tmp-step_*` folders (but one a link names: a crash in
    _install leaves `latest` on its complete `tmp`) and `.latest.tmp` links."""
    root = Path(root)
    linked = {os.readlink(root / n) for n in LINKS if (root / n).is_symlink()}
    for p in root.glob(f"{TMP_PREFIX}*"):
        if p.name not in linked:
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
    step: Optional[int] = None  # the step the weights were saved at (model.safetensors' metadata)

    def trainer_state(self) -> dict:
        try:
            return torch.load(self.dir / STATE_FILE, weights_only=True, map_location="cpu")
        except Exception as e:
            raise unusable(self.dir, STATE_FILE, e, "resume from another checkpoint") from e


def load_checkpoint(path) -> Checkpoint:
    d = resolve_checkpoint(path)
    for f in (CONFIG_FILE, TOKENIZER_FILE):
        if not (d / f).is_file():
            raise CheckpointError(f"checkpoint '{d}' is incomplete: {f} is missing")
    try:
        config = json.loads((d / CONFIG_FILE).read_text())
    except Exception as e:
        raise unusable(d, CONFIG_FILE, e) from e
    try:
        with safe_open(d / MODEL_FILE, "pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            step = (f.metadata() or {}).get("step")
    except Exception as e:
        raise unusable(d, MODEL_FILE, e) from e
    if config.get("model", {}).get("tie_embeddings") and "embed.weight" in state:
        state["lm_head.weight"] = state["embed.weight"]
    return Checkpoint(d, config, state, d / TOKENIZER_FILE, int(step) if step and step.isdigit() else None)
