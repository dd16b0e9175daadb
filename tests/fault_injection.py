"""Run train.py (as `python train.py` would) with a fault injected, for tests/test_crash_safety.py. Test-only: the trainer
never imports this file, and nothing in it runs unless a FAULT_* variable is set.

    FAULT_DIR=/tmp/f FAULT_STOP_AT_STEP=4 python tests/fault_injection.py <train.py overrides>
    FAULT_DIR=/tmp/f FAULT_STOP_AT_STEP=4 torchrun --nproc_per_node=2 tests/fault_injection.py <overrides>

FAULT_DIR                    each rank writes its pid to pid.<rank> at start, and creates
                             stopped.<rank> when it stops
FAULT_STOP_AT_STEP=N         every rank stops when step N is done (logged, evaluated, saved) and
                             step N+1 is about to start: a kill then lands in the middle of training
FAULT_STOP_IN_SAVE_AT_STEP=N rank 0 stops while writing checkpoint N, with model.safetensors already
                             in .tmp-step_N and the other files not yet written
FAULT_SIGNAL_AT_STEP=N       every rank (or only rank FAULT_SIGNAL_RANK) sends itself FAULT_SIGNAL (SIGINT or
                             SIGTERM) as step N+1 starts, as Ctrl-C or a scheduler's preemption would;
                             FAULT_SIGNAL_COUNT times (default 1)
A stopped rank sleeps until the test sends it SIGKILL.
"""

import os
import runpy
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoint.store  # noqa: E402
import training.optim  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))
FAULT_DIR = Path(os.environ["FAULT_DIR"])


def stop() -> None:
    (FAULT_DIR / f"stopped.{RANK}").touch()
    while True:
        time.sleep(60)


if "FAULT_STOP_AT_STEP" in os.environ:
    stop_step, real_lr_at = int(os.environ["FAULT_STOP_AT_STEP"]), training.optim.lr_at

    def lr_at(step, cfg, steps=None):  # called once at the top of each optimizer step, with the steps done so far
        if step == stop_step:
            stop()
        return real_lr_at(step, cfg, steps)

    training.optim.lr_at = lr_at  # before train.py runs its `from training.optim import lr_at`

if "FAULT_SIGNAL_AT_STEP" in os.environ:
    signal_step, real_lr_at_ = int(os.environ["FAULT_SIGNAL_AT_STEP"]), training.optim.lr_at

    def lr_at(step, cfg, steps=None):
        if step == signal_step and int(os.environ.get("FAULT_SIGNAL_RANK", RANK)) == RANK:
            for _ in range(int(os.environ.get("FAULT_SIGNAL_COUNT", "1"))):  # 2: a second Ctrl-C
                os.kill(os.getpid(), signal.Signals[os.environ["FAULT_SIGNAL"]])
        return real_lr_at_(step, cfg, steps)

    training.optim.lr_at = lr_at

if "FAULT_STOP_IN_SAVE_AT_STEP" in os.environ:
    save_step, real_save_file = int(os.environ["FAULT_STOP_IN_SAVE_AT_STEP"]), checkpoint.store.save_file

    def save_file(tensors, path, metadata=None):
        real_save_file(tensors, path, metadata=metadata)
        if metadata and int(metadata["step"]) == save_step:
            stop()

    checkpoint.store.save_file = save_file

if __name__ == "__main__":
    FAULT_DIR.mkdir(parents=True, exist_ok=True)
    (FAULT_DIR / f"pid.{RANK}").write_text(str(os.getpid()))
    # Run train.py as the main script (Hydra finds conf/ beside it), with the patches above in place.
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
