"""Train a Llama-style model.

    python train.py                                  # tiny model, GQA, the embedded plays, on CPU or GPU
    python train.py attention=mla model=small train.max_steps=2000
    python train.py out_dir=runs/a train.resume=true # continue runs/a exactly where it stopped
    torchrun --nproc_per_node=4 train.py train.parallel=fsdp model=gpt2 data=text data.path=corpus/

Options are documented in training/config.py, model/config.py and data/config.py.
"""

import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from data import DataError, TokenBatches, bits_per_byte, eval_batches, load_prepared, prepare
from model import ConfigError, ModelConfig, Transformer
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.ablation import register_resolvers
from training.config import register_configs
from training.distributed import (PARALLEL_MODES, any_rank, fail_together, forward_is_collective, full_state,
                                  gradient_sync, init_distributed, load_full_state, mean_across_ranks,
                                  reports_error, shutdown, sum_across_ranks, wrap_model)
from training.metrics import MetricsLogger
from training.optim import build_optimizer, lr_at
from training.rng import capture_rng_state, restore_rng_state
from training.sample import sample_text

register_configs()
register_resolvers()  # ${sweep_group:...}, ${matched_ffn_dim:...} of conf/experiment/attention_ablation*.yaml


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss diverged); the message says what to change."""


def check_train_config(cfg, model_cfg: ModelConfig, world_size: int) -> None:
    t = cfg.train
    per_step = world_size * t.grad_accum
    if t.batch_size % per_step:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by processes x train.grad_accum "
                          f"({world_size} x {t.grad_accum})")
    if t.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({model_cfg.max_seq_len})")
    if t.schedule not in ("cosine", "wsd"):
        raise ConfigError(f"unknown train.schedule '{t.schedule}': choose cosine or wsd")
    if t.parallel not in PARALLEL_MODES:
        raise ConfigError(f"unknown train.parallel '{t.parallel}': choose one of {', '.join(PARALLEL_MODES)}")
    if t.max_steps <= 0 or t.eval_every <= 0 or t.save_every <= 0 or t.log_every <= 0:
        raise ConfigError("train.max_steps, train.eval_every, train.save_every and train.log_every must be positive")
    if cfg.wandb.mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"unknown wandb.mode '{cfg.wandb.mode}': choose offline, online or disabled")


def check_resume_compatible(saved: dict, current: dict) -> None:
    """Resuming with another model or data would silently train something else: refuse."""
    for section in ("model", "data"):
        diff = sorted(k for k in set(saved[section]) | set(current[section])
                      if saved[section].get(k) != current[section].get(k) and k not in ("num_proc", "cache_dir"))
        if diff:
            details = ", ".join(f"{section}.{k}: {saved[section].get(k)!r} -> {current[section].get(k)!r}" for k in diff)
            raise CheckpointError(f"cannot resume: the checkpoint was trained with a different config ({details}); "
                                  "use the same settings or a new out_dir")
    for key in ("batch_size", "seq_len"):
        if saved["train"][key] != current["train"][key]:
            raise CheckpointError(f"cannot resume: train.{key} was {saved['train'][key]}, now {current['train'][key]}; "
                                  "exact resume needs the same value")


def check_val_split(tokens, cfg, world_size: int) -> None:
    """Every rank must get a window of the first eval batch (evaluate splits its rows by rank):
    check at start-up rather than at the first eval."""
    x, _ = next(eval_batches(tokens, cfg.train.seq_len, cfg.train.batch_size, 1))
    if len(x) < world_size:
        raise DataError(f"the val split holds {len(x)} windows of train.seq_len={cfg.train.seq_len}, fewer than "
                        f"the {world_size} processes; lower train.seq_len or add data")


@torch.no_grad()
def evaluate(model, tokens, cfg, dist_info, autocast) -> float:
    """Mean loss over the same windows whatever the number of processes: each rank scores its share
    of every global batch's rows (shares may differ by one row) and the token-weighted sums are added."""
    model.eval()
    rank, world = dist_info.rank, dist_info.world_size
    total, count = torch.zeros((), dtype=torch.float64, device=dist_info.device), 0
    for x, y in eval_batches(tokens, cfg.train.seq_len, cfg.train.batch_size, cfg.train.eval_batches):
        count += y.numel()
        x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
        with autocast():
            _, loss = model(x.to(dist_info.device), y.to(dist_info.device))
        total += loss.double() * y.numel()
    model.train()
    return (sum_across_ranks(total, dist_info) / max(count, 1)).item()


def run(cfg: DictConfig) -> dict:
    info = init_distributed(cfg.train.device)
    device = info.device
    out_dir = Path(cfg.out_dir)
    ckpt_root = out_dir / "checkpoints"

    # Set-up that can fail runs in fail_together blocks (no collectives inside): an error on any rank
    # is raised on every rank, so none waits forever. Rank 0 builds the token cache, the others wait.
    data_cfg = OmegaConf.to_object(cfg.data)
    with fail_together(info):
        if info.is_main:
            data = prepare(data_cfg)
    ckpt = None
    with fail_together(info):
        if not info.is_main:
            data = load_prepared(prepare(data_cfg).dir)
        cfg.model.vocab_size = data.vocab_size
        model_cfg = OmegaConf.to_object(cfg.model)  # validates: raises ConfigError on inconsistent dims
        check_train_config(cfg, model_cfg, info.world_size)
        config_dict = OmegaConf.to_container(cfg, resolve=True)
        batches = TokenBatches(data.train, cfg.train.seq_len, cfg.train.batch_size, cfg.seed, info.rank,
                               info.world_size)
        check_val_split(data.val, cfg, info.world_size)
        if cfg.train.resume:
            if not (ckpt_root / "latest").exists():
                raise CheckpointError(f"train.resume=true but there is no checkpoint in {ckpt_root}: "
                                      "point out_dir at the run to continue, or drop train.resume")
            ckpt = load_checkpoint(ckpt_root / "latest")
            check_resume_compatible(ckpt.config, config_dict)
            state = ckpt.trainer_state()

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    raw_model = Transformer(model_cfg, backend=cfg.attention.backend).to(device)
    model = wrap_model(raw_model, info, cfg.train.parallel)
    optimizer = build_optimizer(model, cfg.train, device.type)
    step, best_val, elapsed_before = 0, math.inf, 0.0

    if ckpt is not None:
        load_full_state(model, optimizer, ckpt.model_state, state["optimizer"])  # collective under FSDP
        restore_rng_state(state["rng"])
        step, best_val, elapsed_before = state["step"], state["best_val_loss"], state["elapsed_s"]
        if info.is_main:
            print(f"resumed from {ckpt.dir} at step {step}")

    fwd_model = torch.compile(model) if cfg.train.compile else model
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext  # bf16 matmuls are slow on CPU: train in fp32 there
    with fail_together(info):
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        logger = MetricsLogger(out_dir, config_dict, cfg.wandb, enabled=info.is_main,
                               resume_step=step if cfg.train.resume else None)
    n_params = raw_model.num_params()
    logger.summary({"params": n_params, "kv_bytes_per_token": model_cfg.kv_cache_bytes_per_token()})
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len

    def save(at_step: int, is_best: bool = False) -> Path:
        model_state, optim_state = full_state(model, optimizer)  # collective: every rank takes part
        path = None
        with fail_together(info):  # the others wait for rank 0's write; if it fails, every rank stops
            if info.is_main:
                trainer_state = {"optimizer": optim_state, "step": at_step, "rng": capture_rng_state(),
                                 "data_position": at_step, "best_val_loss": best_val,
                                 "elapsed_s": elapsed_before + time.time() - start}
                path = save_checkpoint(ckpt_root, at_step, model_state, trainer_state, config_dict,
                                       data.tokenizer_path, model_cfg.tie_embeddings, best=is_best)
        return path

    def run_eval(at_step: int) -> dict:
        nonlocal best_val
        val_loss = evaluate(fwd_model, data.val, cfg, info, autocast)
        record = {"step": at_step, "tokens": at_step * tokens_per_step, "val_loss": val_loss,
                  "val_ppl": math.exp(min(val_loss, 50)),
                  "val_bpb": bits_per_byte(val_loss, data.meta["n_val_tokens"], data.meta["n_val_bytes"]),
                  "elapsed_s": elapsed_before + time.time() - start}
        # Under FSDP every forward all-gathers weights: all ranks sample (the same text); rank 0 logs it.
        if cfg.train.sample_tokens > 0 and (info.is_main or forward_is_collective(raw_model)):
            text = sample_text(raw_model, data.tokenizer, "\n", cfg.train.sample_tokens, device, seed=cfg.seed)
            logger.log_text("sample", text, at_step)
            record["sample"] = text
        logger.log(record)
        improved = val_loss < best_val
        best_val = min(best_val, val_loss)
        record["improved"] = improved
        return record

    start = time.time()
    last_log_time, last_log_step = start, step
    bar = None
    if info.is_main and cfg.train.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.max_steps, initial=step, desc="train", dynamic_ncols=True)
    micro = cfg.train.grad_accum
    last_eval = None
    logged_tok_s = []  # for the summary's train_tokens_per_s (median: robust to the eval/checkpoint steps)
    if info.is_main:
        print(f"model: {cfg.model.attention}, {n_params / 1e6:.2f}M parameters, "
              f"{model_cfg.kv_cache_bytes_per_token()} KV bytes/token (bf16) | device {device}"
              f"{f' x {info.world_size} ({cfg.train.parallel})' if info.distributed else ''} | "
              f"{data.meta['n_train_tokens']:,} train tokens | out_dir {out_dir}")

    while step < cfg.train.max_steps:
        lr = lr_at(step, cfg.train)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = batches.get_batch(step)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss_sum = torch.zeros((), device=device)
        for i, (xm, ym) in enumerate(zip(x.chunk(micro), y.chunk(micro))):
            # DDP/FSDP: reduce gradients across ranks only on the last micro-batch.
            sync = gradient_sync(model, enabled=i == micro - 1)
            with sync, autocast():
                _, loss = fwd_model(xm, ym)
                (loss / micro).backward()
            loss_sum += loss.detach()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        train_loss = mean_across_ranks(loss_sum / micro, info).item()
        if not math.isfinite(train_loss):
            latest = (ckpt_root / "latest").resolve() if (ckpt_root / "latest").exists() else None
            raise TrainingError(f"loss is {train_loss} at step {step}; stopped without saving "
                                f"({'last good checkpoint: ' + str(latest) if latest else 'no checkpoint was saved'}). "
                                "Lower train.lr or raise train.warmup_steps, then resume")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        elapsed = time.time() - start
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            now = time.time()
            tok_s = (step - last_log_step) * tokens_per_step / max(now - last_log_time, 1e-9)
            last_log_time, last_log_step = now, step
            logged_tok_s.append(tok_s)
            logger.log({"step": step, "tokens": step * tokens_per_step, "train_loss": train_loss, "lr": lr,
                        "tokens_per_s": tok_s, "elapsed_s": elapsed_before + elapsed})
            if bar is not None:
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}")
        if bar is not None:
            bar.update(1)
        # Each rank has its own clock: stop together, or the others would wait for it forever.
        out_of_time = cfg.train.max_minutes is not None and any_rank(elapsed >= cfg.train.max_minutes * 60, info)
        done = step == cfg.train.max_steps or out_of_time
        if step % cfg.train.eval_every == 0 or done:
            last_eval = run_eval(step)
            if bar is not None:
                bar.write(f"step {step}: val loss {last_eval['val_loss']:.4f}, bits/byte {last_eval['val_bpb']:.4f}")
        if step % cfg.train.save_every == 0 or done:
            improved = last_eval is not None and last_eval["step"] == step and last_eval["improved"]
            save(step, is_best=improved)
        if out_of_time:
            if info.is_main:
                print(f"\nstopping at step {step}: train.max_minutes={cfg.train.max_minutes} reached")
            break

    if bar is not None:
        bar.close()
    summary = {"final_step": step, "params": n_params, "kv_bytes_per_token": model_cfg.kv_cache_bytes_per_token(),
               "elapsed_s": elapsed_before + time.time() - start}
    if logged_tok_s:
        summary["train_tokens_per_s"] = statistics.median(logged_tok_s)
    if last_eval is not None:
        summary.update(final_val_loss=last_eval["val_loss"], final_val_bpb=last_eval["val_bpb"])
    logger.summary(summary)
    logger.finish()
    if info.is_main:
        if last_eval is not None and "sample" in last_eval:
            print(f"\nsample at step {step}:\n{last_eval['sample']}\n")
        print(f"checkpoint: {(ckpt_root / 'latest').resolve()}")
        print(f"try it:     python generate.py --ckpt {out_dir} --prompt '**ROMEO**'")
    shutdown(info)
    return summary


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        if reports_error(e):  # under torchrun: an error that every rank raised is printed once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
