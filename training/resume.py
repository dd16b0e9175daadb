"""Where a run starts when it does not start from scratch: a checkpoint to continue (train.resume), checked
for what would make the continuation wrong or inexact, or a checkpoint's model to fine-tune
(train.init_from), whose config and tokenizer the run adopts, with rows for the tokens the data adds."""

from dataclasses import asdict, replace
from types import SimpleNamespace

import torch
from tokenizers import Tokenizer

from checkpoint import CheckpointError, later_checkpoints
from data import DataError

from .errors import TrainConfigError
from .optim import lr_at

# Options that change the numbers a step computes: a resume that changes one is no longer exact.
EXACT_TRAIN_KEYS = ("lr", "min_lr_ratio", "warmup_steps", "schedule", "decay_fraction", "weight_decay", "beta1",
                    "beta2", "grad_clip", "grad_accum")


def check_resume_compatible(saved: dict, current: dict, step: int) -> list[str]:
    """Refuse a resume that would silently train something else (another model, data, batch shape); return
    one note per change that makes it inexact (seed, schedule, adaptive threads) or longer (max_steps)."""
    for section in ("model", "data"):
        diff = sorted(k for k in set(saved[section]) | set(current[section])
                      if saved[section].get(k) != current[section].get(k) and k not in ("num_proc", "cache_dir"))
        if diff:
            details = ", ".join(f"{section}.{k}: {saved[section].get(k)!r} -> {current[section].get(k)!r}" for k in diff)
            raise CheckpointError(f"cannot resume: the checkpoint was trained with a different config ({details}); "
                                  "use the same settings or a new out_dir")
    # Another optimizer has other state (Muon keeps one momentum buffer where AdamW keeps two moments).
    saved_opt = saved["train"].get("optimizer", "adamw")  # checkpoints from before the option: AdamW
    if saved_opt != current["train"]["optimizer"]:
        raise CheckpointError(f"cannot resume: the checkpoint was trained with train.optimizer={saved_opt}, now "
                              f"{current['train']['optimizer']}; resume with train.optimizer={saved_opt}, or start "
                              "from its weights with train.init_from")
    for key in ("batch_size", "seq_len"):
        if saved["train"][key] != current["train"][key]:
            raise CheckpointError(f"cannot resume: train.{key} was {saved['train'][key]}, now {current['train'][key]}; "
                                  "exact resume needs the same value")
    changed = [f"seed: {saved['seed']} -> {current['seed']}"] if saved["seed"] != current["seed"] else []
    changed += [f"train.{k}: {saved['train'][k]} -> {current['train'][k]}" for k in EXACT_TRAIN_KEYS
                if saved["train"].get(k) != current["train"][k]]
    notes = [f"resuming with {', '.join(changed)}: the run is no longer the exact continuation"] if changed else []
    if current["train"].get("adaptive_threads"):  # the thread count can change a sum's last bits
        notes.append("train.adaptive_threads=true: the thread count follows the machine's load, so the continuation "
                     "may differ from an uninterrupted run in the last bits")
    old, new = saved["train"]["max_steps"], current["train"]["max_steps"]
    if old != new:
        # "Train longer" (or shorter): the schedule is recomputed over the new max_steps, from the step reached
        # (wsd stays in its stable phase if it had not begun to decay; cosine moves to the longer curve).
        was, now = (lr_at(step, SimpleNamespace(**c["train"])) for c in (saved, current))
        notes.append(f"train.max_steps {old} -> {new}: the LR schedule now spans {new} steps "
                     f"(LR at step {step}: {was:.3g} -> {now:.3g})")
    return notes


def check_later_checkpoints(cfg, root, step: int) -> None:
    """train.resume=PATH at `step` while out_dir's checkpoints go further: the run's first save would delete them
    (saving keeps the newest), so refuse unless train.discard_later_checkpoints. (With train.resume=true or auto
    the run continues from `latest`: a later folder can only be one its crash left before `latest` moved.)"""
    later = [] if cfg.train.resume in (True, "auto") else later_checkpoints(root, step)
    if later and not cfg.train.discard_later_checkpoints:
        raise CheckpointError(f"train.resume={cfg.train.resume} is at step {step}, but out_dir={cfg.out_dir} holds "
                              f"later checkpoints ({', '.join(later)}) that its first save would delete: resume into "
                              "a new out_dir, or pass train.discard_later_checkpoints=true to delete them")


def adopt_pretrained_config(cfg, pretrained, cli_overrides) -> None:
    """train.init_from: the model is the checkpoint's (its config and tokenizer, set in `cfg`, make_plan's copy);
    a model option on the command line that says otherwise is refused rather than silently ignored."""
    saved = asdict(pretrained.config)
    for arg in cli_overrides:
        key, _, value = arg.lstrip("+~").partition("=")
        field = "attention" if key == "attention" else key[6:] if key.startswith("model.") else None
        if key == "model" or (field and field != "vocab_size" and str(saved.get(field)).lower() != value.lower()):
            raise TrainConfigError(f"{arg} contradicts train.init_from={cfg.train.init_from} (the model comes from "
                                   "the checkpoint, with its config): drop the model option")
    if cfg.data.tokenizer_path not in (None, str(pretrained.tokenizer_path)):
        raise TrainConfigError(f"data.tokenizer_path={cfg.data.tokenizer_path} contradicts train.init_from: the "
                               "data is tokenized with the checkpoint's own tokenizer; drop data.tokenizer_path")
    cfg.model.update(saved)
    cfg.data.tokenizer_path = str(pretrained.tokenizer_path)


def add_new_tokens(pretrained, tokenizer: Tokenizer):
    """train.init_from, when the data's tokenizer adds tokens to the checkpoint's (data=chat adds the chat tokens; a
    tokenizer without <|endoftext|> gets one): the checkpoint with embedding and output rows for them, and their
    names (its config's vocab_size grown to match). A new token's rows start as the mean of the known tokens' rows: an
    average token with an average logit, rather than a random one whose logit could be anything."""
    old = Tokenizer.from_file(str(pretrained.tokenizer_path)).get_vocab(with_added_tokens=True)
    new = tokenizer.get_vocab(with_added_tokens=True)
    vocab = max(pretrained.config.vocab_size, max(new.values()) + 1)
    added = {t: i for t, i in new.items() if t not in old}  # appended: the data loads the checkpoint's tokenizer
    if max(old.values()) >= pretrained.config.vocab_size:
        raise DataError(f"the tokenizer of {pretrained.dir} has ids up to {max(old.values())} but the model only "
                        f"{pretrained.config.vocab_size} rows: the checkpoint is inconsistent")
    if not added:
        return pretrained, []
    state, known = dict(pretrained.state_dict), sorted(old.values())
    for name in ("embed.weight", "lm_head.weight"):
        w = state[name]
        grown = torch.cat([w, w.new_zeros(vocab - len(w), w.shape[1])])
        grown[list(added.values())] = w[known].mean(0)
        state[name] = grown
    if pretrained.config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return replace(pretrained, config=replace(pretrained.config, vocab_size=vocab), state_dict=state), sorted(added)
