"""The trainer's parts, each a method that fits on a screen: set-up, one optimizer step, evaluation,
saving a checkpoint. train.py runs the loop over them.

Everything that changes as the run goes lives in `Trainer.progress` (step, best val loss, time
trained): it is what a checkpoint stores beside the weights, the optimizer and the RNG states, and what
a resumed run starts from. Nothing else is carried from step to step, so a resumed run is the
uninterrupted one.
"""

import contextlib
import functools
import math
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from checkpoint import discard_later, load_checkpoint, save_checkpoint
from data import DataError, bits_per_byte, load_prepared, prepare
from data.recall import recall_hits
from engine.threads import ThreadGovernor
from model import Transformer, choose_backend

from .distributed import (fail_together, forward_is_collective, full_state, gradient_sync, init_distributed,
                          load_full_state, mean_across_ranks, shutdown, sum_across_ranks, wrap_model)
from .errors import TrainConfigError, TrainingError
from .metrics import MetricsLogger, flops_per_token
from .optim import build_optimizer, lr_at, steps_that_fit
from .plan import Plan
from .resume import add_new_tokens, check_later_checkpoints, check_resume_compatible
from .rng import capture_rng_state, restore_rng_state
from .run_dir import claim_out_dir, record_config, release_out_dir, replace_run
from .sample import sample_text


def compile_for_training(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """train.compile=true: the model through torch.compile (Inductor), bitwise repeatable on CPU."""
    # Inductor's FX-graph and AOTAutograd caches (on by default) turn the next run's compilation into a load
    # from disk: keep them beside the data cache, where `make clean` and .gitignore know them, unless the user
    # chose a folder. Importing torch._dynamo (model/attention.py does) already wrote torch's default folder,
    # /tmp/torchinductor_<user>, into the variable: that one is replaced too.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(".cache/torchinductor").resolve())
    if device.type == "cpu":
        # Inductor's CPU code for the embedding's backward adds each token's gradient row with atomics, in
        # whatever order the threads arrive: two runs of one command differed in the last bits after one step.
        # In deterministic mode it keeps that scatter-add out of its parallel loops (and repeats bitwise).
        # CPU only: on CUDA the mode also constrains cuBLAS, which would need its own set-up.
        torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.compile(model)


# A time budget fits the schedule at the end of the warmup, and no sooner than this step: the steps before
# it are what it measures (Trainer.fit_schedule).
FIT_AFTER_STEPS = 10


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint's trainer_state.pt and restored on resume."""
    step: int = 0  # optimizer steps done
    best_val_loss: float = math.inf
    elapsed_s: float = 0.0  # training time before this process started (earlier, resumed-from runs)
    schedule_steps: Optional[int] = None  # the LR schedule's length, once a time budget fitted it; else max_steps
    eval_s: float = 0.0  # seconds the last evaluation took, and the last save before this one: the fit counts them
    save_s: float = 0.0


def timed(field: str):
    """Method decorator: the call's seconds go to progress.<field> and to the trainer's paused_s (the time
    outside the training steps, which Trainer.fit_schedule leaves out of a step's)."""
    def decorate(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            started = time.time()
            result = method(self, *args, **kwargs)
            seconds = time.time() - started
            setattr(self.progress, field, seconds)
            self.paused_s += seconds
            return result
        return run
    return decorate


def check_val_split(val_batches, cfg, world_size: int) -> None:
    """Every rank must get a row of the first eval batch (evaluate splits its rows by rank): check at start-up
    rather than at the first eval. val_batches: the evaluation batches (data.val_batches)."""
    x, _ = next(val_batches)
    if len(x) < world_size:
        raise DataError(f"the val split holds {len(x)} windows of train.seq_len={cfg.train.seq_len}, fewer than "
                        f"the {world_size} processes; lower train.seq_len or add data")


class Trainer:
    def __init__(self, plan: Plan):
        """Carry out `plan` (training/plan.py, make_plan): lock out_dir first, then prepare the data, build the
        model and optimizer, and load the state of train.resume's checkpoint or the weights of train.init_from's;
        then record the config in out_dir and open the logger."""
        self.info = init_distributed(plan.device)
        self.device = self.info.device
        self.out_dir = Path(plan.cfg.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.lock = None
        try:
            # Rank 0 locks out_dir before anything else (training/run_dir.py): a second run on it stops here, before
            # it prepares data or builds a model, and a folder holding a run is refused unless resumed or replaced.
            with fail_together(self.info):
                if self.info.is_main:
                    self.lock, self._created = claim_out_dir(self.out_dir, bool(plan.cfg.train.resume),
                                                             plan.cfg.train.overwrite)
            ckpt, pretrained = self._load_inputs(plan)
            self._build_model(plan, ckpt, pretrained)
            with fail_together(self.info):
                if self.info.is_main:
                    self._start_run_files(resumed=ckpt is not None)
                self.logger = MetricsLogger(self.out_dir, self.config_dict, self.cfg.wandb, enabled=self.info.is_main,
                                            resume_step=self.progress.step if self.cfg.train.resume else None)
        except BaseException:
            if self.lock is not None:  # out_dir as it was, and free again for the corrected command
                release_out_dir(self.lock, self._created)
            raise
        self.logger.summary({"params": self.raw_model.num_params(),
                             "kv_bytes_per_token": self.model_cfg.kv_cache_bytes_per_token()})
        self.tokens_per_step = self.cfg.train.batch_size * self.cfg.train.seq_len
        self.started = time.time()
        self.paused_s = 0.0  # seconds this process spent evaluating and saving (see timed)
        # fit_schedule's measurement starts here, (step, elapsed, paused_s), then after this process's first step
        self._first_step, self._measured_from = self.progress.step + 1, (self.progress.step, self.elapsed(), 0.0)
        self._last_log = (self.progress.step, self.started)  # (step, time) of the last logged step
        self.logged_tok_s = []  # tokens/s of each logged step, for the summary

    def _load_inputs(self, plan: Plan):
        """The data, the run's config (the plan's, with the prepared tokenizer's vocabulary), the checkpoint to
        resume, checked against it, and train.eval_tasks: everything that can fail on bad input, checked on every
        rank before the first collective. Returns (checkpoint to resume or None, init_from's checkpoint with rows
        for new tokens or None)."""
        info = self.info
        # An error on any rank is raised on every rank, so none waits forever. Rank 0 builds the token
        # cache while the others wait, then they read it.
        with fail_together(info):
            if info.is_main:
                self.data = prepare(plan.data)
        with fail_together(info):
            if not info.is_main:
                self.data = load_prepared(plan.data_dir)
            pretrained, self.added_tokens = plan.init_from, []
            if pretrained is not None:  # data=chat adds the chat tokens to the checkpoint's tokenizer: rows for them
                pretrained, self.added_tokens = add_new_tokens(pretrained, self.data.tokenizer)
            vocab = self.data.vocab_size if pretrained is None else pretrained.config.vocab_size
            self.cfg = OmegaConf.merge(plan.cfg, {"model": {"vocab_size": vocab}})  # a new config, read-only too
            self.model_cfg = OmegaConf.to_object(self.cfg.model)  # validates: raises ConfigError on inconsistent dims
            # attention.backend's kernel, chosen once for the dtype attention runs in (bf16 under CUDA's autocast,
            # see self.autocast; fp32 elsewhere): a kernel that cannot run stops the run before it starts.
            try:
                choose_backend(self.cfg.attention.backend, self.device,
                               torch.bfloat16 if self.device.type == "cuda" else torch.float32)
            except ValueError as e:
                raise TrainConfigError(str(e)) from None
            self.config_dict = OmegaConf.to_container(self.cfg, resolve=True)
            t = self.cfg.train
            self.batches = self.data.train_batches(t.seq_len, t.batch_size, self.cfg.seed, info.rank, info.world_size)
            check_val_split(self.data.val_batches(t.seq_len, t.batch_size, 1), self.cfg, info.world_size)
            self.eval_tokens, self.eval_bytes = self.data.val_text_size(t.seq_len, t.batch_size, t.eval_batches)
            ckpt = None if plan.resume is None else self._checkpoint_to_resume(plan.resume)
            # train.eval_tasks, loaded once by rank 0, which scores them: (task manager, tasks) or None. A bad task
            # stops the run here (train.py prints its EvalError as one line).
            self.harness_tasks = None
            if t.eval_tasks and info.is_main:
                from evaluation.harness import load_tasks

                self.harness_tasks = load_tasks(list(t.eval_tasks))
        return ckpt, pretrained

    def _checkpoint_to_resume(self, path: Path):
        """The plan's checkpoint to continue from, with its trainer state, refused if resuming it would train
        something else or delete later checkpoints (training/resume.py)."""
        ckpt = load_checkpoint(path)
        self._resume_state = ckpt.trainer_state()
        check_later_checkpoints(self.cfg, self.ckpt_root, self._resume_state["step"])
        notes = check_resume_compatible(ckpt.config, self.config_dict, self._resume_state["step"])
        if self.info.is_main and notes:
            print("note: " + "; ".join(notes))
        return ckpt

    def _build_model(self, plan: Plan, ckpt, pretrained) -> None:
        """The model (random, init_from's weights, or the resumed checkpoint's), wrapped for DDP/FSDP, its
        optimizer, the progress to start from, and the compiled model of the training steps if the plan says so."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.raw_model = Transformer(self.model_cfg, backend=cfg.attention.backend).to(self.device)
        if pretrained is not None and ckpt is None:
            self.raw_model.load_state_dict(pretrained.state_dict)  # before wrapping: FSDP shards what it finds
            if self.info.is_main:
                step = "a Hugging Face folder" if pretrained.step is None else f"step {pretrained.step}"
                print(f"init_from: {pretrained.dir} ({step}): {self.raw_model.num_params() / 1e6:.2f}M parameters, "
                      f"tokenizer {pretrained.tokenizer_path} ({self.data.vocab_size:,} ids)")
                if self.added_tokens:
                    print(f"init_from: new tokens {', '.join(self.added_tokens)}: their embedding and output rows "
                          "start as the mean of the known tokens' rows")
        # For MFU (training/metrics.py): counted before wrapping, as FSDP shards the weights it counts.
        self.flops_per_token = flops_per_token(self.raw_model, cfg.train.seq_len)
        # tokens/s is over all processes
        self.peak_flops = plan.peak_flops * self.info.world_size if plan.peak_flops else None
        self.model = wrap_model(self.raw_model, self.info, cfg.train.parallel)
        self.optimizer = build_optimizer(self.model, cfg.train, self.device.type)
        self.progress = Progress()
        if ckpt is not None:
            state = self._resume_state
            load_full_state(self.model, self.optimizer, ckpt.model_state, state["optimizer"])  # collective under FSDP
            restore_rng_state(state["rng"])
            self.progress = Progress(**{f.name: state[f.name] for f in fields(Progress) if f.name in state})
            if self.info.is_main:
                print(f"resumed from {ckpt.dir} at step {self.progress.step}")
        # The compiled model runs the training steps only: evaluation would compile a second (no-grad) graph,
        # 18 s on make train's model, for the few forward passes of each evaluation.
        self.fwd_model = compile_for_training(self.model, self.device) if plan.compile else self.model
        # train.adaptive_threads (CPU only: training/config.py refuses it on a GPU): see train_step.
        self.threads = ThreadGovernor() if cfg.train.adaptive_threads and self.device.type == "cpu" else None
        # bf16 matmuls are slow on CPU: train in fp32 there.
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if self.device.type == "cuda" \
            else contextlib.nullcontext

    def _start_run_files(self, resumed: bool) -> None:
        """Rank 0, once the run is ready to start: train.overwrite deletes the previous run's files, the config is
        recorded in out_dir (training/run_dir.py), and train.discard_later_checkpoints deletes the checkpoints
        after the resumed step. (train.resume=auto without a checkpoint starts over from step 0 in out_dir.)"""
        t = self.cfg.train
        if t.overwrite:
            replace_run(self.out_dir)
        record_config(self.out_dir, self.cfg)
        if resumed and t.discard_later_checkpoints:
            for name in discard_later(self.ckpt_root, self.progress.step):
                print(f"train.discard_later_checkpoints=true: deleted {self.ckpt_root / name}")

    def elapsed(self) -> float:
        """Seconds of training in this run, resumed-from runs included."""
        return self.progress.elapsed_s + time.time() - self.started

    @property
    def max_steps(self) -> int:
        """Where the run ends: train.max_steps, or the earlier step a time budget fitted the schedule to."""
        return self.progress.schedule_steps or self.cfg.train.max_steps

    @property
    def fit_step(self) -> Optional[int]:
        """The step after which fit_schedule fits the schedule to train.max_minutes: the end of the warmup (the
        LR before it does not depend on the schedule's length), at least FIT_AFTER_STEPS. None: no fit to make
        (no time budget, train.fit_schedule=false, fitted already, or max_steps comes first)."""
        t = self.cfg.train
        step = max(t.warmup_steps, FIT_AFTER_STEPS)
        fits = t.max_minutes is not None and t.fit_schedule and self.progress.schedule_steps is None
        return step if fits and self.progress.step <= step < t.max_steps else None

    def times_costs(self) -> bool:
        """Whether train.py evaluates and saves after this step, to time both for fit_schedule: after this
        process's first step, if it fits the schedule later. (Not before the first step: a save then would
        start the optimizer's state, which torch does with a step of zero gradients, and change the run.)"""
        return self.fit_step is not None and self._first_step == self.progress.step < self.fit_step

    def fit_schedule(self) -> Optional[str]:
        """At fit_step: fix the schedule's length to the steps that fit in what is left of train.max_minutes
        (training/optim.py, steps_that_fit), from the seconds per step measured since this process's first step
        (the first one, which compiles, left out), evaluations and saves excluded, and the last evaluation's and
        save's seconds (see times_costs). Called after every step; returns a line saying what it fitted, or
        None. The length is kept in `progress`: a resumed run keeps it."""
        if self.fit_step is None:
            return None
        step = self.progress.step
        if step == self._first_step and step < self.fit_step:  # it compiles, or warms up: measure from its end
            self._measured_from = (step, self.elapsed(), self.paused_s)
        if step != self.fit_step:
            return None
        since, elapsed_then, paused_then = self._measured_from
        t, now = self.cfg.train, self.elapsed()
        # The same figures on every rank (each has its own clock), so that all fit the same length.
        measured = torch.tensor([(now - elapsed_then - (self.paused_s - paused_then)) / (step - since),
                                 self.progress.eval_s, self.progress.save_s, 60 * t.max_minutes - now],
                                dtype=torch.float64, device=self.device)
        step_s, eval_s, save_s, left = mean_across_ranks(measured, self.info).tolist()
        self.progress.schedule_steps = steps_that_fit(step, left, step_s, eval_s, save_s, t)
        return (f"train.max_minutes={t.max_minutes}: the LR schedule now ends at step {self.max_steps} (steps of "
                f"{step_s:.2f} s, evaluations of {eval_s:.1f} s and saves of {save_s:.1f} s in the {left:.0f} s left)")

    def train_step(self) -> dict:
        """One optimizer step over the global batch of `progress.step`: returns the step's numbers."""
        cfg, step, micro = self.cfg.train, self.progress.step, self.cfg.train.grad_accum
        if self.threads is not None:  # fewer threads while other processes take cores (engine/threads.py)
            self.threads.update()
        lr = lr_at(step, cfg, self.progress.schedule_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.batches.get_batch(step)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        loss_sum = torch.zeros((), device=self.device)
        for i, (xm, ym) in enumerate(zip(x.chunk(micro), y.chunk(micro))):
            # DDP/FSDP: reduce gradients across ranks only on the last micro-batch.
            with gradient_sync(self.model, enabled=i == micro - 1), self.autocast():
                loss = self.loss(xm, ym)
                (loss / micro).backward()
            loss_sum += loss.detach()
        # The global gradient norm, clipped to grad_clip (inf: measured, not clipped). A NaN or inf here
        # would poison the weights even with a finite loss: stop before the optimizer applies it.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or math.inf)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        train_loss = mean_across_ranks(loss_sum / micro, self.info).item()
        self._stop_if_diverged("loss", train_loss)
        self._stop_if_diverged("gradient norm", grad_norm.item())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        return {"train_loss": train_loss, "grad_norm": grad_norm.item(), "lr": lr}

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The model's mean loss on a training (micro-)batch, through the compiled model if train.compile
        made one. Inductor compiles on the first call; where it cannot, train.compile=true stops the run in
        one line and auto goes on eagerly (nothing has run yet: the compilation comes first)."""
        try:
            return self.fwd_model(x, y)[1]
        except torch._dynamo.exc.BackendCompilerFailed as e:
            reason = str(e.inner_exception).strip().splitlines()[0][:200]
            if self.cfg.train.compile is True:
                raise TrainConfigError(f"train.compile=true, but Inductor cannot compile here ({reason}): install "
                                       "a C++ compiler (g++, or set CXX), or set train.compile=false") from None
            warnings.warn(f"train.compile=auto: Inductor cannot compile here ({reason}); training eagerly (a C++ "
                          "compiler, g++ or CXX, makes the steps faster; train.compile=false skips the attempt)")
            torch.use_deterministic_algorithms(False)  # compile_for_training's, for Inductor's code only
            self.fwd_model = self.model
            return self.model(x, y)[1]

    def _stop_if_diverged(self, what: str, value: float) -> None:
        """A non-finite loss, gradient norm or val loss ends the run without saving: the last checkpoint is good."""
        if math.isfinite(value):
            return
        latest = (self.ckpt_root / "latest").resolve() if (self.ckpt_root / "latest").exists() else None
        raise TrainingError(f"{what} is {value} at step {self.progress.step}; stopped without saving "
                            f"({'last good checkpoint: ' + str(latest) if latest else 'no checkpoint was saved'}). "
                            "Lower train.lr or raise train.warmup_steps, then resume")

    @timed("eval_s")
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss (and perplexity, bits per byte, a sample) at the current step; logged.

        The mean is over the same windows whatever the number of processes: each rank scores its share
        of every batch's rows (shares may differ by one row) and the token-weighted sums are added."""
        cfg, info, step = self.cfg, self.info, self.progress.step
        recall = self.data.meta.get("recall")  # data=recall: the answers alone, and the share right (data/recall.py)
        self.model.eval()
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        right = torch.zeros((), dtype=torch.float64, device=self.device)  # data=recall: answers right
        for x, y in self.data.val_batches(cfg.train.seq_len, cfg.train.batch_size, cfg.train.eval_batches):
            count += (y != -1).sum().item()  # the scored targets (data=chat: the replies; data=recall: the answers)
            x, y = x.tensor_split(info.world_size)[info.rank], y.tensor_split(info.world_size)[info.rank]
            x, y = x.to(self.device), y.to(self.device)
            with self.autocast():
                if recall is None:
                    _, loss = self.model(x, y)
                    total += loss.double() * (y != -1).sum()
                else:  # the logits, to score the answers too (recall's vocabulary is small)
                    logits, _ = self.model(x)
                    total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1,
                                             reduction="sum").double()
                    right += recall_hits(logits, y)
        self.model.train()
        val_loss = (sum_across_ranks(total, info) / count).item()
        self._stop_if_diverged("val loss", val_loss)
        record = {"step": step, "tokens": step * self.tokens_per_step, "val_loss": val_loss,
                  "val_ppl": math.exp(min(val_loss, 50)),
                  "val_bpb": bits_per_byte(val_loss, self.eval_tokens, self.eval_bytes),
                  "elapsed_s": self.elapsed()}
        if recall is not None:
            record["val_recall_acc"] = sum_across_ranks(right, info).item() / count
        if self.harness_tasks is not None:  # train.eval_tasks
            from evaluation.harness import task_metrics

            record.update(task_metrics(self.raw_model, self.data.tokenizer, *self.harness_tasks,
                                       cfg.train.eval_tasks_limit, self.device))
        # Under FSDP every forward all-gathers weights: all ranks sample (the same text); rank 0 logs it.
        if cfg.train.sample_tokens > 0 and (info.is_main or forward_is_collective(self.raw_model)):
            text = sample_text(self.raw_model, self.data.tokenizer, self.data.sample_prompt, cfg.train.sample_tokens,
                               self.device, seed=cfg.seed)
            self.logger.log_text("sample", text, step)
            record["sample"] = text
        self.logger.log(record)
        record["improved"] = val_loss < self.progress.best_val_loss
        self.progress.best_val_loss = min(self.progress.best_val_loss, val_loss)
        return record

    @timed("save_s")
    def save(self, best: bool = False) -> None:
        """Checkpoint the current step (collective: every rank takes part; rank 0 writes)."""
        model_state, optim_state = full_state(self.model, self.optimizer)
        with fail_together(self.info):  # the others wait for rank 0's write; if it fails, every rank stops
            if self.info.is_main:
                bad = [name for name, t in model_state.items() if not torch.isfinite(t).all()]
                if bad:  # a last guard: the checks on loss and gradients should have stopped the run before
                    raise TrainingError(f"not saving step {self.progress.step}: non-finite weights in {bad[0]}")
                trainer_state = {"optimizer": optim_state, "rng": capture_rng_state(),
                                 **asdict(self.progress), "elapsed_s": self.elapsed()}
                save_checkpoint(self.ckpt_root, self.progress.step, model_state, trainer_state,
                                       self.config_dict, self.data.tokenizer_path, self.model_cfg.tie_embeddings,
                                       best=best, keep_last=self.cfg.train.keep_checkpoints)

    def log_step(self, stats: dict) -> dict:
        """Log one step's numbers with throughput since the last logged step and the MFU it makes (none
        if the device's peak is unknown: set train.peak_tflops)."""
        now, step = time.time(), self.progress.step
        tok_s = (step - self._last_log[0]) * self.tokens_per_step / max(now - self._last_log[1], 1e-9)
        self._last_log = (step, now)
        self.logged_tok_s.append(tok_s)
        record = {"step": step, "tokens": step * self.tokens_per_step, **stats, "tokens_per_s": tok_s,
                  "elapsed_s": self.elapsed()}
        if self.peak_flops:
            record["mfu"] = tok_s * self.flops_per_token / self.peak_flops
        self.logger.log(record)
        return record

    def describe(self) -> str:
        """Two lines: what is trained and where; how many passes over the training tokens the budget makes."""
        info, cfg = self.info, self.cfg
        where = f" x {info.world_size} ({cfg.train.parallel})" if info.distributed else ""
        dtype, size = ("bfloat16", 2) if self.device.type == "cuda" else ("float32", 4)  # see self.autocast
        compiled = " | torch.compile: the first step compiles" if self.fwd_model is not self.model else ""
        steps, chat = cfg.train.max_steps, self.data.meta.get("format") == "chat"
        # data=chat: a step is batch_size conversations (data/conversations.py)
        unit, per_step = ("conversations", cfg.train.batch_size) if chat else ("tokens", self.tokens_per_step)
        n_train = self.data.meta[f"n_train_{unit}"]
        passes = steps * per_step / n_train
        passes = f"{passes:,.1f}" if passes >= 0.1 else f"{passes:.1g}"
        budget = f" (or train.max_minutes={cfg.train.max_minutes}, if sooner" if cfg.train.max_minutes else ""
        if budget:
            budget += f": the LR schedule is fitted to it after step {self.fit_step})" if self.fit_step else ")"
        return (f"model: {cfg.model.attention}, {self.raw_model.num_params() / 1e6:.2f}M parameters, "
                f"KV cache {self.model_cfg.kv_cache_bytes_per_token(size):,} bytes/token in {dtype} | "
                f"device {self.device}{where}{compiled} | out_dir {self.out_dir}\n"
                f"budget: {steps:,} steps x {per_step:,} {unit} = {passes} "
                f"passes over {n_train:,} training {unit}{budget}")

    def generate_args(self) -> list[str]:
        """generate.py's arguments for the `try it:` line: --chat after data=chat, else a prompt that fits the data
        (the first line of the validation text)."""
        if self.data.meta.get("format") == "chat":
            return ["--chat"]
        text = self.data.tokenizer.decode(self.data.val[:64].tolist(), skip_special_tokens=True)
        line = next((line.strip() for line in text.splitlines() if line.strip()), "")
        return ["--prompt", line[:40] or "The"]

    def close(self) -> None:
        """Release out_dir (another run may use it now) and leave the process group."""
        if self.lock is not None:
            release_out_dir(self.lock)
            self.lock = None
        shutdown(self.info)

    def finish(self, last_eval) -> dict:
        """The run's summary (to wandb and returned); closes the logger."""
        summary = {"final_step": self.progress.step, "schedule_steps": self.max_steps,
                   "params": self.raw_model.num_params(),
                   "kv_bytes_per_token": self.model_cfg.kv_cache_bytes_per_token(), "elapsed_s": self.elapsed()}
        if self.logged_tok_s:  # the median is robust to the steps that also evaluate or save
            summary["train_tokens_per_s"] = statistics.median(self.logged_tok_s)
        if last_eval is not None:
            summary.update(final_val_loss=last_eval["val_loss"], final_val_bpb=last_eval["val_bpb"])
        self.logger.summary(summary)
        self.logger.finish()
        return summary
