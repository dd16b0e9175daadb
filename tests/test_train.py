"""Training end to end on a tiny local corpus: every attention variant, exact resume, checkpoints,
wandb offline logging, and every bad input the README promises a one-line error for."""

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

import train
import training.plan as plan
import training.trainer as trainer
from conftest import ROOT, compose_config, tiny_overrides
from checkpoint import CheckpointError, load_checkpoint
from model import ModelConfig, Transformer
from training.metrics import flops_per_token
from test_train_speed import counted_flops_per_token


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in metrics(out_dir) if "train_loss" in r}


@pytest.mark.parametrize("attention", ["mha", "gqa", "mqa", "mla"])
def test_few_steps_per_variant(attention, corpus, data_cache, tmp_path):
    out = tmp_path / attention
    cfg = compose_config(tiny_overrides(corpus, data_cache, out) + [f"attention={attention}", "train.max_steps=8",
                                                                    "train.lr=3e-3", "train.peak_tflops=0.001"])
    summary = train.run(cfg)
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 9))
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[8] < losses[1] - 0.3, f"loss did not go down: {losses}"
    evals = [r for r in metrics(out) if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6, 8]
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert 0 < r["val_bpb"] < r["val_loss"] / math.log(2)  # more than one byte per token
        assert {"tokens", "elapsed_s"} <= set(r)
    assert summary["final_val_loss"] == evals[-1]["val_loss"]
    ckpt = load_checkpoint(out)
    assert ckpt.config["model"]["attention"] == attention
    # MFU: tokens/s x the FLOPs torch's counter counts per token / the peak given (1 GFLOP/s)
    flops = counted_flops_per_token(ModelConfig(**{**ckpt.config["model"], "max_seq_len": cfg.train.seq_len}))
    for r in metrics(out):
        if "train_loss" in r:
            assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / 1e9)
    assert (out / "checkpoints" / "latest").resolve().name == "step_0000008"


class Crash(Exception):
    pass


def crash_after_save(monkeypatch, at_step: int):
    """Make the checkpoint of `at_step` raise Crash right after it is written, as a killed run would;
    returns the real save_checkpoint, to put back."""
    real_save = trainer.save_checkpoint

    def save_then_crash(root, step, *args, **kw):
        path = real_save(root, step, *args, **kw)
        if step == at_step:
            raise Crash
        return path

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_crash)
    return real_save


@pytest.mark.parametrize("optimizer", ["muon", pytest.param("adamw", marks=pytest.mark.slow)])  # the default, and the other
def test_resume_is_exact(optimizer, corpus, data_cache, tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    base = tiny_overrides(corpus, data_cache, straight) + ["train.grad_accum=2", f"train.optimizer={optimizer}"]
    train.run(compose_config(base))

    real_save = crash_after_save(monkeypatch, 3)  # then resume to step 6
    with pytest.raises(Crash):
        train.run(compose_config(base + [f"out_dir={resumed}"]))
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    train.run(compose_config(base + [f"out_dir={resumed}", "train.resume=true"]))

    assert train_losses(resumed) == train_losses(straight)  # bitwise: same floats
    vals = lambda d: [(r["step"], r["val_loss"]) for r in metrics(d) if "val_loss" in r]  # noqa: E731
    assert vals(resumed) == vals(straight)
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    for k in a.model_state:
        assert torch.equal(a.model_state[k], b.model_state[k]), k
    # Resuming with the other optimizer would start its state from nothing: refused.
    other = "adamw" if optimizer == "muon" else "muon"
    with pytest.raises(CheckpointError, match=f"train.optimizer={optimizer}, now {other}"):
        train.run(compose_config(base + [f"out_dir={resumed}", "train.resume=true", "train.max_steps=9",
                                         f"train.optimizer={other}"]))


def test_checkpoint_contents_and_best(corpus, data_cache, tmp_path):
    out = tmp_path / "run"
    train.run(compose_config(tiny_overrides(corpus, data_cache, out) + ["model.tie_embeddings=true"]))
    root = out / "checkpoints"
    evals = {r["step"]: r["val_loss"] for r in metrics(out) if "val_loss" in r}
    best = min(evals, key=evals.get)  # the lowest evaluation of the run's own log
    assert best == 6  # (with these settings; the 6-step run improves to the end)
    assert sorted(p.name for p in root.iterdir()) == ["best", "latest", "step_0000006"]
    assert os.readlink(root / "best") == os.readlink(root / "latest") == "step_0000006"
    ckpt = load_checkpoint(root / "latest")
    assert {p.name for p in ckpt.dir.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json",
                                                   "trainer_state.pt"}
    state = ckpt.trainer_state()  # weights_only load: no pickled code
    assert state["step"] == 6 and "data_position" not in state  # the batch is a function of the step
    assert {"python", "numpy", "torch"} <= set(state["rng"])
    assert torch.equal(ckpt.model_state["lm_head.weight"], ckpt.model_state["embed.weight"])
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())


def test_nan_loss_stops_and_keeps_checkpoint(corpus, data_cache, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    real_forward = trainer.Transformer.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, **kw):
        logits, loss = real_forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 5:  # step 5 of 6: after the step-3 checkpoint
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(trainer.Transformer, "forward", forward)
    with pytest.raises(trainer.TrainingError, match="loss is nan at step 4.*step_0000003"):
        train.run(compose_config(tiny_overrides(corpus, data_cache, out)))
    assert load_checkpoint(out).trainer_state()["step"] == 3


def read_wandb_records(path: Path):
    """Records of a .wandb file: a 7-byte header, then LevelDB-log style 32 KiB blocks of chunks
    (crc32 4 bytes, length 2, type 1: full, first, middle, last). Written here so the test does not
    depend on wandb's internal reader."""
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        chunk = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield pending
            pending = b""


def test_wandb_offline_run_holds_metrics(corpus, data_cache, tmp_path, monkeypatch):
    wandb_dir = tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    train.run(compose_config(tiny_overrides(corpus, data_cache, out) + ["wandb.mode=offline", "wandb.group=g1"]))
    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    from wandb.proto import wandb_internal_pb2

    history, config_seen, summary = [], False, {}
    for data in read_wandb_records(next(runs[0].glob("*.wandb"))):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            row.setdefault("_step", rec.history.step.num)
            history.append(row)
        elif kind in ("config", "run"):  # the config passed to wandb.init arrives in the run record
            updates = rec.config.update if kind == "config" else rec.run.config.update
            config_seen = config_seen or any(i.key == "model" and "attention" in json.loads(i.value_json)
                                             for i in updates)
        elif kind == "summary":
            summary.update({(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in rec.summary.update})
    assert config_seen, "resolved config was not logged"
    logged = {h["_step"]: h for h in history}
    for r in metrics(out):
        row = logged[r["step"]]
        for key in ("train_loss", "mfu", "val_loss", "val_bpb"):
            if key in r:
                assert row[key] == pytest.approx(r[key])
    assert summary["final_step"] == 6 and "final_val_loss" in summary and summary["params"] > 0


# ---- bad input: a one-line error on stderr, exit code 2, nothing written or lost -----------------

def run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    with tempfile.TemporaryDirectory() as cwd:  # a default run folder (runs/...) would land there, not in the repo
        return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True,
                              text=True, env=env, timeout=300)


def assert_one_line_error(proc, pattern):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert pattern in lines[0], lines[0]


@pytest.mark.slow  # one train.py process per bad input: ~35 s
def test_cli_bad_data_inputs(corpus, data_cache, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    bad_utf8 = tmp_path / "latin1"
    bad_utf8.mkdir()
    (bad_utf8 / "b.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    common = [a for a in tiny_overrides(corpus, data_cache, tmp_path / "o") if not a.startswith("data.path")]
    cases = [
        ([f"data.path={tmp_path / 'missing'}"], "does not exist"),
        ([f"data.path={empty}"], "empty"),
        ([f"data.path={bad_utf8}"], "UTF-8"),
        ([f"data.path={corpus}", "model.dim=30"], "model.dim (30) must be divisible by model.n_heads (4)"),
        ([f"data.path={corpus}", "train.seq_len=100"], "train.seq_len (100) exceeds model.max_seq_len"),
    ]
    for extra, pattern in cases:
        assert_one_line_error(run_cli(*common, *extra), pattern)
    assert not any((tmp_path / "o").iterdir())  # nothing was written (Hydra only created the folder)


@pytest.mark.slow  # about 18 s, like its twin for auto below: make test is at its 10-minute budget
def test_compile_without_a_compiler_is_one_line_error(corpus, data_cache, tmp_path):
    """train.compile=true where Inductor cannot compile (here: no C++ compiler, and an empty Inductor
    cache, so nothing compiled earlier is loaded): one line naming both fixes, not a traceback."""
    env = {**os.environ, "CXX": "no-such-compiler", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    # attention.backend=sdpa: without a compiler our CPU attention kernel falls back too (and warns)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_overrides(corpus, data_cache, tmp_path / "run"),
                           "train.compile=true", "attention.backend=sdpa"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert_one_line_error(proc, "install a C++ compiler (g++, or set CXX), or set train.compile=false")


def test_compile_auto_compiles_long_cpu_runs_only():
    """train.compile=auto (README, options): make train's command, about 7 minutes eager on this project's CPU
    (peak 156.5 GFLOP/s), stays eager and ten times its steps compile; never on a GPU, under torchrun or with an
    unknown peak; train.max_minutes bounds the run; true and false are obeyed."""
    cfg = compose_config([])
    model_cfg = ModelConfig(**{**OmegaConf.to_container(cfg.model, resolve=True), "vocab_size": cfg.data.vocab_size})
    fpt = flops_per_token(Transformer(model_cfg), cfg.train.seq_len)

    def compiles(*overrides, device="cpu", distributed=False, peak=156.5e9):
        return plan.compiles(compose_config(list(overrides)), torch.device(device), distributed, fpt, peak)

    assert not compiles()
    assert compiles("train.max_steps=4000")
    assert not compiles("train.max_steps=4000", "train.max_minutes=5")
    assert not compiles("train.max_steps=4000", device="cuda")
    assert not compiles("train.max_steps=4000", distributed=True)
    assert not compiles("train.max_steps=4000", peak=None)
    assert compiles("train.compile=true") and not compiles("train.max_steps=4000", "train.compile=false")


@pytest.mark.slow  # about 25 s: the compilation gets as far as the C++ compiler before it fails
def test_compile_auto_without_a_compiler_trains_eagerly(corpus, data_cache, tmp_path):
    """train.compile=auto (the default) where Inductor cannot compile: one warning, then the eager run, the
    same losses as train.compile=false's, bitwise. (A peak of 1 MFLOP/s makes auto judge the tiny run long.)"""
    env = {**os.environ, "CXX": "no-such-compiler", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    # attention.backend=sdpa: without a compiler our CPU attention kernel falls back too (and warns)
    slow = ["train.peak_tflops=0.000001", "attention.backend=sdpa"]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_overrides(corpus, data_cache, tmp_path / "auto"),
                           *slow], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("UserWarning: train.compile=auto: Inductor cannot compile here") == 1, proc.stderr
    assert "training eagerly" in proc.stderr and "Traceback" not in proc.stderr
    train.run(compose_config(tiny_overrides(corpus, data_cache, tmp_path / "eager") + slow + ["train.compile=false"]))
    assert train_losses(tmp_path / "auto") == train_losses(tmp_path / "eager")


@pytest.mark.slow  # three start-ups of train.py, about 25 s: make test is at its 10-minute budget
def test_cli_unknown_names_fail_clearly(tmp_path):
    for arg, pattern in [("attention=foo", "Could not find 'attention/foo'"), ("model=huge", "Could not find 'model/huge'"),
                         ("train.max_step=3", "Key 'max_step' not in 'TrainConfig'")]:
        proc = run_cli(arg, f"out_dir={tmp_path}")
        assert proc.returncode != 0 and pattern in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_cli_resume_errors_keep_checkpoint(corpus, data_cache, tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides(corpus, data_cache, out)
    assert_one_line_error(run_cli(*args, "train.resume=true"), "no checkpoint")
    train.run(compose_config(args))
    weights = load_checkpoint(out).dir / "model.safetensors"
    # An incompatible config is refused.
    assert_one_line_error(run_cli(*args, "train.resume=true", "model.n_layers=3"), "model.n_layers: 2 -> 3")
    # A corrupt checkpoint is reported, and left as it was.
    weights.write_bytes(weights.read_bytes()[:100])
    before = {p.name: p.read_bytes() for p in weights.parent.iterdir()}
    assert_one_line_error(run_cli(*args, "train.resume=true", "train.max_steps=9"), "corrupt")
    assert {p.name: p.read_bytes() for p in weights.parent.iterdir()} == before
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(out)


def test_val_split_must_give_every_process_a_window():
    """evaluate() splits each eval batch's rows across processes: a split with fewer windows than
    processes is refused at start-up, with the fix in the message."""
    from types import SimpleNamespace

    import numpy as np

    from data import DataError

    from data import eval_batches

    cfg = SimpleNamespace(train=SimpleNamespace(seq_len=10, batch_size=4))
    tokens = np.arange(25, dtype=np.uint16)  # 2 windows of 10 tokens
    trainer.check_val_split(eval_batches(tokens, 10, 4, 1), cfg, world_size=2)
    with pytest.raises(DataError, match="holds 2 windows .* fewer than the 3 processes; lower train.seq_len"):
        trainer.check_val_split(eval_batches(tokens, 10, 4, 1), cfg, world_size=3)


# ---- a time budget: the schedule fitted to train.max_minutes ---------------------------------------------

STEP_S, EVAL_S, SAVE_S = 1.0, 3.0, 0.5  # what the fake clock charges for a step, an evaluation and a save


@pytest.fixture
def fake_clock(monkeypatch):
    """The trainer's clock, advanced by a fixed charge for each training step, evaluation and save (inside
    the evaluation and the save, where the trainer times them): no figure depends on the machine's speed."""
    clock = SimpleNamespace(now=1000.0)
    clock.time = lambda: clock.now
    monkeypatch.setattr(trainer, "time", clock)

    def charging(seconds, fn):
        def charged(*args, **kwargs):
            result = fn(*args, **kwargs)
            clock.now += seconds
            return result
        return charged

    monkeypatch.setattr(trainer.Trainer, "train_step", charging(STEP_S, trainer.Trainer.train_step))
    monkeypatch.setattr(trainer, "bits_per_byte", charging(EVAL_S, trainer.bits_per_byte))  # once an evaluation
    monkeypatch.setattr(trainer, "save_checkpoint", charging(SAVE_S, trainer.save_checkpoint))
    return clock


def logged_lrs(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in metrics(out_dir) if "lr" in r}


BUDGET_S, WARMUP, LR = 33, 10, 3e-3


def budget_overrides(corpus, data_cache, out_dir) -> list[str]:
    """A 33-second budget on the fake clock; the step budget far beyond it, as for a time-budgeted run."""
    return tiny_overrides(corpus, data_cache, out_dir) + [
        "train.max_steps=100000", f"train.max_minutes={BUDGET_S / 60}", f"train.warmup_steps={WARMUP}",
        "train.eval_every=10", "train.save_every=15", f"train.lr={LR}"]


def test_time_budget_fits_the_schedule(corpus, data_cache, tmp_path, fake_clock):
    """train.max_minutes: the decay ends inside the budget, at the step the fit chose, and the run is then the
    step-budgeted run of that many steps, bitwise; train.fit_schedule=false keeps the old behaviour (the
    schedule spans max_steps: stopped by the clock near the peak LR)."""
    out = tmp_path / "fitted"
    start = fake_clock.now
    summary = train.run(compose_config(budget_overrides(corpus, data_cache, out)))
    used = fake_clock.now - start
    fitted = load_checkpoint(out).trainer_state()["schedule_steps"]
    assert summary["stopped_by"] is None and summary["final_step"] == fitted == summary["schedule_steps"]
    # Inside the budget, final evaluation and save included, and the next step (with its evaluation and save)
    # would not have fitted: the fit counts evaluations and saves (each evaluation saved here: val loss improves).
    assert BUDGET_S - (STEP_S + EVAL_S + SAVE_S) < used <= BUDGET_S, used
    # The decay ends at the last step: its LR is the cosine's last, one step short of min_lr (as a step budget's).
    lrs, min_lr = logged_lrs(out), LR * 0.1
    assert lrs[fitted] == pytest.approx(min_lr + (LR - min_lr) * (1 - math.cos(math.pi / (fitted - WARMUP))) / 2)
    assert [r["step"] for r in metrics(out) if "val_loss" in r][:2] == [1, 10]  # timed at step 1, then as asked

    steps = tmp_path / "steps"
    args = [a for a in budget_overrides(corpus, data_cache, steps) if not a.startswith("train.max_")]
    train.run(compose_config(args + [f"train.max_steps={fitted}"]))
    assert train_losses(steps) == train_losses(out) and logged_lrs(steps) == lrs

    old = tmp_path / "old"
    summary = train.run(compose_config(budget_overrides(corpus, data_cache, old) + ["train.fit_schedule=false"]))
    assert summary["stopped_by"] == f"train.max_minutes={BUDGET_S / 60}"
    assert logged_lrs(old)[summary["final_step"]] > 0.99 * LR


def test_resume_of_a_time_budgeted_run_is_exact(corpus, data_cache, tmp_path, monkeypatch, fake_clock):
    """Stopped after the fit (here by a crash after the step-15 save), a time-budgeted run resumes to the same
    fitted schedule and the same losses as the uninterrupted run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.run(compose_config(budget_overrides(corpus, data_cache, straight)))

    real_save = crash_after_save(monkeypatch, 15)
    with pytest.raises(Crash):
        train.run(compose_config(budget_overrides(corpus, data_cache, resumed)))
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    train.run(compose_config(budget_overrides(corpus, data_cache, resumed) + ["train.resume=true"]))

    assert train_losses(resumed) == train_losses(straight) and logged_lrs(resumed) == logged_lrs(straight)
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert a.trainer_state()["step"] == b.trainer_state()["step"] == a.trainer_state()["schedule_steps"]
    for k in a.model_state:
        assert torch.equal(a.model_state[k], b.model_state[k]), k


def simulated_seconds(step: int, last: int, step_s, eval_s, save_s, eval_every: int, save_every: int) -> float:
    """train.py's loop from the fit at `step` to the end at `last`, event by event: each later step, and at each
    step from `step` on, an evaluation at multiples of eval_every and at the last step, then one save if it
    evaluated (as if the evaluation improved) or is a multiple of save_every."""
    seconds = 0.0
    for s in range(step, last + 1):
        seconds += step_s if s > step else 0.0
        evaluates = s % eval_every == 0 or s == last
        seconds += eval_s * evaluates + save_s * (evaluates or s % save_every == 0)
    return seconds


@pytest.mark.parametrize("step, seconds, step_s, eval_s, save_s, eval_every, save_every, max_steps", [
    (50, 300.0, 1.0, 4.0, 0.3, 100, 200, 100000),  # the defaults' shape: evaluations every 100, saves every 200
    (10, 60.0, 1.0, 3.0, 0.5, 10, 25, 100000),     # the tests' budget above
    (10, 60.0, 1.0, 3.0, 0.5, 10, 25, 30),         # max_steps comes first
    (20, 57.0, 0.7, 2.5, 1.5, 20, 20, 1000),       # the fit step evaluates and saves too
    (30, 2.0, 1.0, 3.0, 0.5, 7, 9, 1000),          # not even the last evaluation fits: end now
    (12, 1000.0, 2.3, 0.0, 0.0, 5, 6, 100000),     # free evaluations: steps only
])
def test_steps_that_fit_is_the_longest_run_that_fits(step, seconds, step_s, eval_s, save_s, eval_every, save_every,
                                                     max_steps):
    from training.config import TrainConfig
    from training.optim import steps_that_fit

    cfg = TrainConfig(max_steps=max_steps, eval_every=eval_every, save_every=save_every)
    longest = min(max_steps, step + int(seconds / step_s))  # each step takes step_s at least
    fits = [last for last in range(step, longest + 1)
            if simulated_seconds(step, last, step_s, eval_s, save_s, eval_every, save_every) <= seconds]
    assert steps_that_fit(step, seconds, step_s, eval_s, save_s, cfg) == max(fits, default=step)
