"""Train a Llama-style model.

    python train.py                                  # tiny model, GQA, the embedded plays, on CPU or GPU
    python train.py attention=mla model=small train.max_steps=2000
    python train.py out_dir=runs/a train.resume=true # continue runs/a exactly where it stopped
    torchrun --nproc_per_node=4 train.py train.parallel=fsdp model=gpt2 data=text data.path=corpus/

Options are documented in training/config.py, model/config.py and data/config.py. The parts of the
loop below (set-up, one step, evaluate, save) are the methods of training/trainer.py.
"""

import sys

import hydra
from omegaconf import DictConfig

from checkpoint import CheckpointError
from data import DataError
from model import ConfigError
from training.ablation import register_resolvers
from training.config import register_configs
from training.distributed import any_rank, reports_error, shutdown
from training.errors import TrainConfigError, TrainingError
from training.trainer import Trainer

register_configs()
register_resolvers()  # ${sweep_group:...}, ${matched_ffn_dim:...} of conf/experiment/attention_ablation*.yaml


def run(cfg: DictConfig) -> dict:
    t = Trainer(cfg)  # data, model, optimizer; resumed from out_dir's latest checkpoint if train.resume
    c, main = cfg.train, t.info.is_main
    if main:
        print(t.describe())
    bar = None
    if main and c.progress:
        from tqdm import tqdm

        bar = tqdm(total=c.max_steps, initial=t.progress.step, desc="train", dynamic_ncols=True)

    last_eval = None
    while t.progress.step < c.max_steps:
        stats = t.train_step()
        step = t.progress.step
        if step % c.log_every == 0 or step == c.max_steps:
            record = t.log_step(stats)
            if bar is not None:
                bar.set_postfix(loss=f"{stats['train_loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
        if bar is not None:
            bar.update(1)
        # Each rank has its own clock: stop together, or the others would wait for it forever.
        out_of_time = c.max_minutes is not None and any_rank(t.elapsed() >= c.max_minutes * 60, t.info)
        done = step == c.max_steps or out_of_time
        if step % c.eval_every == 0 or done:
            last_eval = t.evaluate()
            if bar is not None:
                bar.write(f"step {step}: val loss {last_eval['val_loss']:.4f}, bits/byte {last_eval['val_bpb']:.4f}")
        if step % c.save_every == 0 or done:
            t.save(best=last_eval is not None and last_eval["step"] == step and last_eval["improved"])
        if out_of_time:
            if main:
                print(f"\nstopping at step {step}: train.max_minutes={c.max_minutes} reached")
            break

    if bar is not None:
        bar.close()
    summary = t.finish(last_eval)
    if main:
        if last_eval is not None and "sample" in last_eval:
            print(f"\nsample at step {t.progress.step}:\n{last_eval['sample']}\n")
        print(f"checkpoint: {(t.ckpt_root / 'latest').resolve()}")
        print(f"try it:     python generate.py --ckpt {t.out_dir} --prompt '**ROMEO**'")
    shutdown(t.info)
    return summary


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ConfigError, TrainConfigError, DataError, CheckpointError, TrainingError) as e:
        if reports_error(e):  # under torchrun: an error that every rank raised is printed once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
