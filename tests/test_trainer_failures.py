"""The trainer's failure paths (issue 13): nothing lost, nothing silently wrong.

Each test drives the real trainer on the tiny corpus and checks the outcome against something the
trainer does not compute itself: the logged metrics, an uninterrupted run, the files on disk, or the
command it printed, run as printed."""

import errno
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint.store as store
import train
import training.trainer as trainer
from checkpoint import CheckpointError, load_checkpoint
from conftest import ROOT, compose_config, tiny_overrides
from data import DataError
from test_train import Crash, assert_one_line_error, crash_after_save, metrics, run_cli, train_losses
from training.errors import TrainConfigError, TrainingError

pytestmark = pytest.mark.usefixtures("one_thread")


def patch_loss(monkeypatch, change):
    """Wrap the model's loss: change(loss, n, training) -> loss, where n counts forwards of that mode."""
    real_forward = trainer.Transformer.forward
    calls = {True: 0, False: 0}

    def forward(self, idx, targets=None, **kw):
        logits, loss = real_forward(self, idx, targets, **kw)
        if targets is not None:
            calls[self.training] += 1
            loss = change(loss, calls[self.training], self.training)
        return logits, loss

    monkeypatch.setattr(trainer.Transformer, "forward", forward)


def links(out: Path) -> dict:
    root = out / "checkpoints"
    return {name: os.readlink(root / name) for name in ("latest", "best") if (root / name).is_symlink()}


# ---- out_dir: never destroy a run by accident; one run at a time ----------------------------------

def test_new_run_refuses_an_out_dir_holding_a_run(corpus, data_cache, tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides(corpus, data_cache, out)
    train.run(compose_config(args))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(TrainConfigError, match="already holds a run .*train.resume=true.*train.overwrite=true"):
        train.run(compose_config(args))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing lost
    # overwrite=true replaces it: no checkpoint or metrics line of the old run survives.
    (out / "checkpoints" / "step_0000099").mkdir()  # an old checkpoint a 6-step run would never write
    train.run(compose_config(args + ["train.overwrite=true", "train.max_steps=4"]))
    assert sorted(train_losses(out)) == [1, 2, 3, 4]
    assert not (out / "checkpoints" / "step_0000099").exists() and links(out)["latest"] == "step_0000004"


def test_second_run_on_the_same_out_dir_gets_one_line_error(corpus, data_cache, tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides(corpus, data_cache, out)
    fault_dir = tmp_path / "fault"
    fault_dir.mkdir()
    env = {**os.environ, "WANDB_MODE": "disabled", "FAULT_DIR": str(fault_dir), "FAULT_STOP_AT_STEP": "4"}
    first = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_injection.py"), *args], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not (fault_dir / "stopped.0").exists():  # the first run holds out_dir, paused after step 4
            assert first.poll() is None, first.communicate()[1][-2000:]
            time.sleep(0.2)  # polling for the file; no timing is assumed
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        for extra in ("train.resume=true", "train.overwrite=true"):
            assert_one_line_error(run_cli(*args, extra), f"another training run is using out_dir={out}")
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written or deleted
    finally:
        first.kill()
        first.communicate()


# ---- Ctrl-C and SIGTERM: finish the step, save, print a resume command that works ----------------

# SIGTERM's run is slow (about 17 s; make test is at its 10-minute budget): Ctrl-C's covers the same code path.
@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_signal_saves_and_prints_a_working_resume_command(sig, corpus, data_cache, tmp_path):
    straight = tmp_path / "straight"
    train.run(compose_config(tiny_overrides(corpus, data_cache, straight)))
    out = tmp_path / "run"
    args = tiny_overrides(corpus, data_cache, out)
    env = {**os.environ, "WANDB_MODE": "disabled", "FAULT_DIR": str(tmp_path / "fault"),
           "FAULT_SIGNAL_AT_STEP": "4", "FAULT_SIGNAL": sig.name}
    (tmp_path / "fault").mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fault_injection.py"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + sig, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert load_checkpoint(out).trainer_state()["step"] == 5  # the step under way when the signal came
    lines = proc.stdout.splitlines()
    command = lines[lines.index(next(line for line in lines if "resume with:" in line)) + 1].strip()
    argv = shlex.split(command)
    assert argv[0] == sys.executable and argv[-1] == "train.resume=true"
    argv[1] = str(ROOT / "tests" / "fault_injection.py")  # the same train.py, with the FAULT_ hooks (unset here)
    resumed = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "WANDB_MODE": "disabled", "FAULT_DIR": str(tmp_path / "fault")})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert train_losses(out) == train_losses(straight)
    assert [r["val_loss"] for r in metrics(out) if "val_loss" in r][-1] == \
        [r["val_loss"] for r in metrics(straight) if "val_loss" in r][-1]


def test_second_ctrl_c_aborts_at_once_in_one_line(corpus, data_cache, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "fault").mkdir()
    env = {**os.environ, "WANDB_MODE": "disabled", "FAULT_DIR": str(tmp_path / "fault"), "FAULT_SIGNAL_AT_STEP": "4",
           "FAULT_SIGNAL": "SIGINT", "FAULT_SIGNAL_COUNT": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fault_injection.py"),
                           *tiny_overrides(corpus, data_cache, out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("interrupted: stopped without saving")
    assert links(out)["latest"] == "step_0000003"  # the aborted step 5 was not saved; step 3 is intact


def test_try_it_line_runs_as_printed(corpus, data_cache, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_overrides(corpus, data_cache, out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Everything the run wrote is in out_dir (Hydra's record included); nothing beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert (out / ".hydra" / "config.yaml").is_file() and not (out / "train.log").exists()
    # KV cache size in one unit, for the dtype the model computes in (fp32 on CPU): 2 (K and V) x kv heads x
    # head_dim x layers x 4 bytes, by hand from the tiny overrides (dim 32, 4 heads, 2 kv heads, 2 layers).
    assert f"KV cache {2 * 2 * (32 // 4) * 2 * 4:,} bytes/token in float32" in proc.stdout
    line = next(line for line in proc.stdout.splitlines() if line.startswith("try it:"))
    argv = shlex.split(line[len("try it:"):])
    prompt = argv[argv.index("--prompt") + 1]
    assert prompt and prompt in corpus.joinpath("doc00.txt").read_text() + "".join(
        p.read_text() for p in corpus.iterdir())  # a line of the data, not a fixed "**ROMEO**"
    gen = subprocess.run(argv + ["--max-new-tokens", "4"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert gen.returncode == 0 and prompt in gen.stdout, gen.stderr[-2000:]


def test_help_shows_every_option_with_its_meaning(tmp_path):
    """Every field of every config dataclass is listed with a help text under it (a field without one fails)."""
    from dataclasses import fields, is_dataclass

    from training.config import SECTIONS

    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and list(tmp_path.iterdir()) == [], proc.stderr[-2000:]
    keys = [f"{prefix}.{f.name}" if prefix else f.name for prefix, cls in SECTIONS for f in fields(cls)
            if not is_dataclass(f.type)]
    assert len(keys) > 80 and "train.max_steps" in keys and "wandb.tags" in keys and "seed" in keys
    for key in keys:
        assert f"\n  {key} = " in proc.stdout, key
        under = proc.stdout.split(f"\n  {key} = ", 1)[1].split("\n")[1]
        assert under.startswith("      ") and under.strip(), (key, under)  # its help, indented under it
    for key, meaning in [("train.max_steps", "optimizer steps; the LR schedule spans these"),
                         ("train.grad_clip", "max global gradient norm; 0 disables clipping"),
                         ("model.n_kv_heads", "key/value heads"), ("data.val_path", "Optional separate validation text"),
                         ("wandb.mode", "offline (no account needed"), ("train.schedule", "(one of: cosine, wsd)")]:
        after = proc.stdout.split(f"  {key} = ", 1)[1]
        assert meaning in after.split("\n  ", 2)[1], (key, after[:300])  # the line(s) under the key


# ---- non-finite numbers never reach a checkpoint --------------------------------------------------

class InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss with a poisoned gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * math.inf


@pytest.mark.parametrize("clip", ["1.0", "0"])
def test_infinite_gradient_stops_before_the_weights_change(clip, corpus, data_cache, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # The third step (a save step) gets an infinite gradient; its loss is finite.
    patch_loss(monkeypatch, lambda loss, n, training: InfGrad.apply(loss) if training and n == 3 else loss)
    with pytest.raises(TrainingError, match="gradient norm is (inf|nan) at step 2; stopped without saving"):
        train.run(compose_config(tiny_overrides(corpus, data_cache, out) + [f"train.grad_clip={clip}"]))
    assert not (out / "checkpoints").exists()  # no checkpoint with NaN weights
    logged = [r for r in metrics(out) if "train_loss" in r]
    assert [r["step"] for r in logged] == [1, 2] and all(math.isfinite(r["grad_norm"]) for r in logged)


def test_nan_val_loss_stops_without_saving(corpus, data_cache, tmp_path, monkeypatch):
    out = tmp_path / "run"
    patch_loss(monkeypatch, lambda loss, n, training: loss * math.nan if not training and n > 2 else loss)
    with pytest.raises(TrainingError, match="val loss is nan at step 6; stopped without saving.*step_0000003"):
        train.run(compose_config(tiny_overrides(corpus, data_cache, out)))  # 2 eval batches per eval
    assert links(out) == {"latest": "step_0000003", "best": "step_0000003"}
    assert all(math.isfinite(r["val_loss"]) for r in metrics(out) if "val_loss" in r)


def test_best_is_the_lowest_evaluation_even_between_saves(corpus, data_cache, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # Evaluations at steps 2, 4, 6, checkpoints every 6: make step 2's the best by far.
    patch_loss(monkeypatch, lambda loss, n, training: loss - 3.0 if not training and n <= 2 else loss)
    train.run(compose_config(tiny_overrides(corpus, data_cache, out) + ["train.eval_every=2", "train.save_every=6"]))
    evals = {r["step"]: r["val_loss"] for r in metrics(out) if "val_loss" in r}
    assert sorted(evals) == [2, 4, 6]
    best_step = min(evals, key=evals.get)
    assert best_step == 2
    assert links(out) == {"latest": "step_0000006", "best": f"step_{best_step:07d}"}
    assert load_checkpoint(out / "checkpoints" / "best").trainer_state()["step"] == best_step


# ---- every option checked before any work ---------------------------------------------------------

@pytest.mark.parametrize("option, message", [
    ("train.batch_size=0", "train.batch_size=0 must be positive"),
    ("train.grad_accum=0", "train.grad_accum=0 must be positive"),
    ("train.seq_len=-1", "train.seq_len=-1 must be positive"),
    ("train.lr=-0.1", "train.lr=-0.1 must be >= 0"),
    ("train.eval_batches=0", "train.eval_batches=0 must be positive"),
    ("train.max_minutes=0", "train.max_minutes=0.0 must be positive"),
    ("train.peak_tflops=0", "train.peak_tflops=0.0 must be positive"),
    ("train.beta2=1.0", "train.beta2=1.0 must be in [0, 1)"),
    ("train.device=foo", "unknown train.device 'foo'"),
    ("attention.backend=foo", "unknown attention.backend 'foo'"),
    ("attention.backend=triton", "attention.backend=triton needs a CUDA device"),
    ("attention.backend=cpu train.device=mps", "attention.backend=cpu is our C++ kernel for CPU training"),
    ("train.optimizer=sgd", "unknown train.optimizer 'sgd': choose adamw or muon"),
    ("train.compile=maybe", "unknown train.compile 'maybe': choose true, false or auto"),
    ("wandb.mode=off", "unknown wandb.mode 'off': choose offline, online or disabled"),
    ("train.discard_later_checkpoints=true", "train.discard_later_checkpoints=true applies to train.resume=PATH"),
])
def test_bad_option_is_refused_before_any_work(option, message, corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter would make triton usable on CPU
    cache, out = tmp_path / "cache", tmp_path / "run"
    with pytest.raises(TrainConfigError, match=re.escape(message)):
        train.run(compose_config(tiny_overrides(corpus, cache, out) + option.split()))
    assert not cache.exists() and not out.exists()  # no data prepared, nothing written


def test_bad_paths_get_one_line_errors(corpus, data_cache, tmp_path, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    args = tiny_overrides(corpus, data_cache, a_file)
    assert_one_line_error(run_cli(*args), f"out_dir={a_file} is a file")
    assert_one_line_error(run_cli(*tiny_overrides(corpus, data_cache, tmp_path / "o"), "train.grad_accum=0"),
                          "train.grad_accum=0 must be positive")
    # A read-only place (as root, permissions do not stop us: emulate a read-only mount).
    readonly = tmp_path / "ro"
    readonly.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == readonly else real_access(p, mode))
    for option, args in (("out_dir", tiny_overrides(corpus, data_cache, readonly / "run")),
                         ("data.cache_dir", tiny_overrides(corpus, readonly / "cache", tmp_path / "run"))):
        with pytest.raises(TrainConfigError, match=f"{option}=.* cannot be written"):
            train.run(compose_config(args))


def test_full_disk_leaves_nothing_behind(corpus, tmp_path, monkeypatch):
    # The token cache.
    import data.pipeline as pipeline

    def disk_full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    cache = tmp_path / "cache"
    monkeypatch.setattr(pipeline, "_write_tokens", disk_full)
    with pytest.raises(DataError, match="could not write the token cache .*No space left on device.*data.cache_dir"):
        train.run(compose_config(tiny_overrides(corpus, cache, tmp_path / "a")))
    assert list(cache.iterdir()) == []  # no .tmp- folder keeps the disk full
    monkeypatch.undo()

    # A checkpoint: torch.save reports a full disk as a RuntimeError.
    def torch_save_full(obj, f):
        Path(f).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(store.torch, "save", torch_save_full)
    out = tmp_path / "b"
    with pytest.raises(CheckpointError, match="could not write checkpoint .*file write failed.*no earlier checkpoint"):
        train.run(compose_config(tiny_overrides(corpus, cache, out)))
    assert [p.name for p in (out / "checkpoints").iterdir()] == []


# ---- resume -----------------------------------------------------------------------------------------

def test_resume_restores_the_rng_and_tolerates_a_torn_metrics_line(corpus, data_cache, tmp_path, monkeypatch):
    """Training that draws from the global RNG between steps (as dropout would): exact only if the
    checkpoint's RNG state is restored. The crash also tears the last metrics line."""
    noise = lambda loss, n, training: loss + 0.01 * torch.rand(()) if training else loss  # noqa: E731
    patch_loss(monkeypatch, noise)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.run(compose_config(tiny_overrides(corpus, data_cache, straight)))
    real_save = crash_after_save(monkeypatch, 3)
    with pytest.raises(Crash):
        train.run(compose_config(tiny_overrides(corpus, data_cache, resumed)))
    with (resumed / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "train_lo')  # killed mid-write
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    torch.manual_seed(12345)  # the global RNG as a fresh process would have it: the checkpoint must set it
    train.run(compose_config(tiny_overrides(corpus, data_cache, resumed) + ["train.resume=true"]))
    assert train_losses(resumed) == train_losses(straight)


def test_resume_from_a_checkpoint_path_and_notes_on_changes(corpus, data_cache, tmp_path, monkeypatch, capsys):
    straight, first = tmp_path / "straight", tmp_path / "first"
    train.run(compose_config(tiny_overrides(corpus, data_cache, straight)))
    real_save = crash_after_save(monkeypatch, 3)
    with pytest.raises(Crash):
        train.run(compose_config(tiny_overrides(corpus, data_cache, first)))
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    second = tmp_path / "second"
    step3 = first / "checkpoints" / "step_0000003"
    train.run(compose_config(tiny_overrides(corpus, data_cache, second) + [f"train.resume={step3}"]))
    assert {s: v for s, v in train_losses(second).items()} == {s: v for s, v in train_losses(straight).items()
                                                               if s > 3}
    # A resume that changes the LR or the length, or lets the thread count vary, says so in one line each.
    capsys.readouterr()
    train.run(compose_config(tiny_overrides(corpus, data_cache, second) + ["train.resume=true", "train.lr=1e-3",
                                                                           "train.max_steps=8",
                                                                           "train.adaptive_threads=true"]))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1
    assert "train.lr: 0.004 -> 0.001: the run is no longer the exact continuation" in notes[0]
    assert "train.adaptive_threads=true: the thread count follows the machine's load" in notes[0]
    # The LR by hand: cosine after 2 warmup steps, to 10% of the peak at max_steps (6 before, 8 now).
    cosine = lambda step, n, lr: lr * 0.1 + 0.5 * (lr - lr * 0.1) * (1 + math.cos(math.pi * (step - 2) / (n - 2)))  # noqa: E731
    assert f"train.max_steps 6 -> 8: the LR schedule now spans 8 steps (LR at step 6: " \
           f"{cosine(6, 6, 4e-3):.3g} -> {cosine(6, 8, 1e-3):.3g})" in notes[0]


def test_resume_from_an_earlier_checkpoint_keeps_the_later_ones_unless_told(corpus, data_cache, tmp_path, capsys):
    """train.resume=PATH at step 3 of a run that went on to step 6: the first save would delete step 6 (issue 25).
    Refused in one line naming both ways on; train.discard_later_checkpoints=true deletes it and the run goes on
    to the uninterrupted run's losses."""
    out = tmp_path / "run"
    args = tiny_overrides(corpus, data_cache, out) + ["train.keep_checkpoints=2"]
    train.run(compose_config(args))
    root, straight = out / "checkpoints", train_losses(out)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000003", "step_0000006"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    resume = [f"train.resume={root / 'step_0000003'}"]
    with pytest.raises(CheckpointError, match=r"is at step 3, but out_dir=.* holds later checkpoints \(step_0000006\) "
                                              r".*new out_dir, or pass train.discard_later_checkpoints=true"):
        train.run(compose_config(args + resume))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing lost
    capsys.readouterr()
    train.run(compose_config(args + resume + ["train.discard_later_checkpoints=true"]))
    assert f"deleted {root / 'step_0000006'}" in capsys.readouterr().out
    assert train_losses(out) == straight and links(out)["latest"] == "step_0000006"


def test_keep_checkpoints_keeps_the_newest_and_best(corpus, data_cache, tmp_path, monkeypatch):
    """train.keep_checkpoints=3, a save every step: steps 4-6 stay, and `best`, made the first evaluation (step 3)
    by a worse second one."""
    patch_loss(monkeypatch, lambda loss, n, training: loss if training or n <= 2 else loss + 10)  # eval 2: n 3-4
    out = tmp_path / "run"
    train.run(compose_config(tiny_overrides(corpus, data_cache, out) + ["train.save_every=1",
                                                                        "train.keep_checkpoints=3"]))
    evals = {r["step"]: r["val_loss"] for r in metrics(out) if "val_loss" in r}
    best = min(evals, key=evals.get)
    assert best == 3
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == \
        [f"step_{s:07d}" for s in sorted({best, 4, 5, 6})]
    assert links(out) == {"latest": "step_0000006", "best": "step_0000003"}


def test_resume_auto_starts_a_job_requeued_before_its_first_save_and_resumes_it_after(corpus, data_cache, tmp_path,
                                                                                     monkeypatch):
    """docs/distributed.md's SLURM recipe: one command for every start of a job. Killed before its first save,
    the job left metrics.jsonl but no checkpoint (issue 25: the requeued job was refused); it starts over,
    is killed after saving step 3, and continues from there, to the uninterrupted run's losses."""
    straight = tmp_path / "straight"
    train.run(compose_config(tiny_overrides(corpus, data_cache, straight)))
    out = tmp_path / "run"
    args = tiny_overrides(corpus, data_cache, out) + ["train.resume=auto"]
    real_step = trainer.Trainer.train_step

    def killed_at_step_3(self):
        if self.progress.step == 2:
            raise Crash
        return real_step(self)

    monkeypatch.setattr(trainer.Trainer, "train_step", killed_at_step_3)
    with pytest.raises(Crash):
        train.run(compose_config(args))
    assert sorted(train_losses(out)) == [1, 2] and not (out / "checkpoints" / "latest").exists()
    monkeypatch.setattr(trainer.Trainer, "train_step", real_step)
    real_save = crash_after_save(monkeypatch, 3)
    with pytest.raises(Crash):
        train.run(compose_config(args))
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    summary = train.run(compose_config(args))
    assert summary["final_step"] == 6 and train_losses(out) == train_losses(straight)


def test_resume_of_a_checkpoint_from_before_the_optimizer_option_names_adamw():
    """Checkpoints written before train.optimizer existed were trained with AdamW; the default is now Muon,
    whose state would start from nothing: the resume is refused with the option that continues it."""
    from omegaconf import OmegaConf

    from training.resume import check_resume_compatible

    current = OmegaConf.to_container(compose_config([]))
    saved = OmegaConf.to_container(compose_config([]))
    del saved["train"]["optimizer"]
    with pytest.raises(CheckpointError, match=re.escape("trained with train.optimizer=adamw, now muon; resume "
                                                        "with train.optimizer=adamw")):
        check_resume_compatible(saved, current, step=3)
    current["train"]["optimizer"] = "adamw"
    assert check_resume_compatible(saved, current, step=3) == []


def test_time_budget_stops_and_saves(corpus, data_cache, tmp_path, monkeypatch):
    """The budget is checked against the trainer's clock; a fake clock (a minute per step) makes the
    stopping step independent of the machine's speed."""
    monkeypatch.setattr(trainer.Trainer, "elapsed", lambda self: 60.0 * self.progress.step)
    out = tmp_path / "budget"
    summary = train.run(compose_config(tiny_overrides(corpus, data_cache, out) + ["train.max_steps=100000",
                                                                                  "train.max_minutes=2.5"]))
    assert summary["final_step"] == 3 and summary["stopped_by"] == "train.max_minutes=2.5"
    assert load_checkpoint(out).trainer_state()["step"] == 3


# ---- bits per byte ----------------------------------------------------------------------------------

def test_bits_per_byte_counts_the_bytes_of_the_scored_windows(corpus, data_cache, tmp_path):
    out = tmp_path / "run"
    cfg = compose_config(tiny_overrides(corpus, data_cache, out) + ["train.max_steps=1", "train.eval_batches=1"])
    train.run(cfg)
    from omegaconf import OmegaConf

    from data.pipeline import cache_folder, load_prepared

    d = load_prepared(cache_folder(OmegaConf.to_object(cfg.data)))
    T, B = cfg.train.seq_len, cfg.train.batch_size
    # By hand: each of the B windows' targets, decoded on its own (EOT is no text).
    eot = d.meta["eot_id"]
    n_bytes = sum(len(d.tokenizer.decode([int(t) for t in d.val[i * T + 1:(i + 1) * T + 1] if t != eot]).encode())
                  for i in range(B))
    (r,) = [r for r in metrics(out) if "val_loss" in r]
    assert r["val_bpb"] == pytest.approx(r["val_loss"] * B * T / (n_bytes * math.log(2)), rel=1e-9)
