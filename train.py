"""Train a Llama-style model.

    python train.py                                  # tiny model, GQA, the embedded plays, on CPU or GPU
    python train.py attention=mla model=small train.max_steps=2000
    python train.py out_dir=runs/a train.resume=true # continue runs/a exactly where it stopped
    torchrun --nproc_per_node=4 train.py train.parallel=fsdp model=gpt2 data=text data.path=corpus/

Options are documented in training/config.py, model/config.py and data/config.py. The parts of the
loop below (set-up, one step, evaluate, save) are the methods of training/trainer.py.
"""

import shlex
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tqdm import tqdm

from checkpoint import CheckpointError
from data import DataError
from evaluation import EvalError
from model import ConfigError
from training.ablation import register_resolvers
from training.config import check_folder, register_configs
from training.distributed import any_rank, reports_error
from training.errors import TrainConfigError, TrainingError
from training.interrupt import StopOnSignal
from training.plan import make_plan
from training.trainer import Trainer

register_configs()
register_resolvers()  # ${sweep_group:...}, ${matched_ffn_dim:...}, ${matched_kv_lora_rank:...} (conf/experiment/)


def command_line_overrides() -> list[str]:
    """The key=value arguments this run was started with (none when called without Hydra, as in tests)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def shell_command(script: str, args: list[str]) -> str:
    """A command that works when pasted here: this interpreter (.venv/bin/python, not a `python` that may
    lack torch) and the repo's `script`, each relative to the current directory when inside it."""
    def here(path: Path) -> str:
        return str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)

    return shlex.join([here(Path(sys.executable)), here(Path(__file__).resolve().parent / script), *args])


def run(cfg: DictConfig) -> dict:
    plan = make_plan(cfg, command_line_overrides())  # what to do, decided: writes nothing (training/plan.py)
    t = Trainer(plan)  # locks out_dir, then data, model, optimizer; resumed or initialised from a checkpoint
    try:
        with StopOnSignal() as signals:
            summary = loop(t, signals)
    finally:
        t.close()  # releases out_dir, leaves the process group
    if t.info.is_main:
        print(f"checkpoint: {(t.ckpt_root / 'latest').resolve()}")
        if summary["stopped_by"] is not None:
            kept = [a for a in command_line_overrides() if not a.startswith(("train.resume=", "train.overwrite="))]
            keep_out = [] if any(a.startswith("out_dir=") for a in kept) else [f"out_dir={t.out_dir}"]
            args = kept + keep_out + ["train.resume=true"]
            again = shell_command("train.py", args) if not t.info.distributed else \
                shlex.join(["torchrun", f"--nproc_per_node={t.info.world_size}", "train.py", *args])
            print(f"stopped by {summary['stopped_by']} at step {t.progress.step}; resume with:\n  {again}")
        print("try it:     " + shell_command("generate.py", ["--ckpt", str(t.out_dir), *t.generate_args()]))
    return summary


def loop(t: Trainer, signals: StopOnSignal) -> dict:
    """Steps until train.max_steps (or the step a time budget fitted its schedule to), the time budget or
    a signal; returns the summary (`stopped_by`: what ended the run early, None if it reached that step)."""
    c, main = t.cfg.train, t.info.is_main
    if main:
        print(t.describe())
    show_bar = main and c.progress
    bar = tqdm(total=t.max_steps, initial=t.progress.step, desc="train", dynamic_ncols=True, disable=not show_bar)

    last_eval, stopped_by = None, None
    while stopped_by is None and t.progress.step < t.max_steps:  # a stopped run ends after this step's save
        stats = t.train_step()
        step = t.progress.step
        fitted = t.fit_schedule()  # with train.max_minutes: the schedule's length, once, after the warmup
        if fitted and main:
            bar.write(fitted)  # print's line, above the bar if there is one
            bar.total = t.max_steps
        timing = t.times_costs()  # before that fit: this step evaluates and saves, to time both
        if step % c.log_every == 0 or step == t.max_steps:
            record = t.log_step(stats)
            mfu = {"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}
            bar.set_postfix(loss=f"{stats['train_loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}", **mfu)
        bar.update(1)
        # Each rank has its own clock and signals: decide together, or the others would wait forever.
        signalled = any_rank(signals.requested is not None, t.info)
        out_of_time = c.max_minutes is not None and any_rank(t.elapsed() >= c.max_minutes * 60, t.info)
        if signalled or out_of_time:
            stopped_by = (signals.requested or "a signal to another process") if signalled else \
                f"train.max_minutes={c.max_minutes}"
        done = step == t.max_steps or stopped_by is not None
        if step % c.eval_every == 0 or ((done or timing) and not signalled):  # a signal wants out quickly: save only
            last_eval = t.evaluate()
            if show_bar:
                bar.write(f"step {step}: val loss {last_eval['val_loss']:.4f}, bits/byte {last_eval['val_bpb']:.4f}")
        best = last_eval is not None and last_eval["step"] == step and last_eval["improved"]
        if step % c.save_every == 0 or done or best or timing:
            t.save(best=best)

    bar.close()
    summary = {**t.finish(last_eval), "stopped_by": stopped_by}
    if main and last_eval is not None and "sample" in last_eval:
        print(f"\nsample at step {t.progress.step}:\n{last_eval['sample']}\n")
    return summary


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        summary = run(cfg)
    except (ConfigError, TrainConfigError, DataError, CheckpointError, EvalError, TrainingError) as e:
        if reports_error(e):  # under torchrun: an error that every rank raised is printed once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before the first step, or a second Ctrl-C: stop at once
        print("interrupted: stopped without saving; the last checkpoint, if any, is intact", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    if summary["stopped_by"] in ("SIGINT", "SIGTERM"):  # saved, but not finished: say so to the shell
        sys.exit(128 + signal.Signals[summary["stopped_by"]])


def hydra_files_in_out_dir(argv: list[str]) -> list[str]:
    """Hydra creates its run folder before the run starts: when the command line names an out_dir, check
    it and make it that folder, so nothing is created anywhere else."""
    out_dir = next((a.partition("=")[2] for a in argv if a.startswith("out_dir=")), None)
    if out_dir is None or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    try:
        check_folder("out_dir", out_dir)
    except TrainConfigError as e:
        if reports_error(e):  # under torchrun: rank 0
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return argv + [f"hydra.run.dir={out_dir}"]


if __name__ == "__main__":
    sys.argv = hydra_files_in_out_dir(sys.argv)
    main()
