"""Evaluate a checkpoint: lm-evaluation-harness tasks on the paged engine, or bits per byte of a text file.

    python eval.py --ckpt runs/a --tasks hellaswag,arc_easy --limit 200
    python eval.py --ckpt runs/a --tasks my_task --include_path my_tasks/ --output_path results.json --wandb
    python eval.py --ckpt exports/a-hf --tasks lambada_openai --batch_size 64
    python eval.py --ckpt runs/a --text notes.txt

--ckpt takes what generate.py takes: a run folder, its checkpoints/ folder, one checkpoint, or a Hugging
Face folder. The task flags are lm_eval's (--tasks, --include_path, --limit, --batch_size, --output_path,
--log_samples; the hyphenated spellings work too). The model is evaluation/harness.py's EngineLM: our
paged engine behind the harness's model interface, scoring what `lm_eval --model hf` scores on the
Hugging Face export (docs/evaluation.md). Results print as lm_eval's table; --output_path writes the
harness's results as JSON (with each request's inputs and scores under "samples" with --log_samples);
--wandb logs them to the checkpoint's own run in Weights & Biases (offline unless WANDB_MODE says
otherwise), or to a new run for a checkpoint outside a run folder.

--text FILE prints the bits per byte of a UTF-8 text file, scored as training scores its validation
split (evaluation/text.py) in windows of --seq_len tokens (default: the run's train.seq_len, or the
model's context for a Hugging Face folder).

Tasks need lm-evaluation-harness (pip install -r requirements-eval.txt); --text does not. Bad input (a
checkpoint that is not one, an unknown task, a task file that does not parse, a missing text file)
prints one line `error: ...` on stderr and exits with 2; nothing is written then.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

from generate import InputError, OneLineErrorParser


def parse_args(argv=None):
    p = OneLineErrorParser(description="Evaluate a checkpoint on lm-evaluation-harness tasks, or a text's bits "
                                       "per byte.")
    p.add_argument("--ckpt", required=True, help="run folder, its checkpoints/ folder, a checkpoint or HF folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--tasks", "-t", help="comma-separated task, group or tag names, or task YAML files")
    what.add_argument("--text", help="a UTF-8 text file: print its bits per byte")
    p.add_argument("--include_path", "--include-path", default=None, help="a folder of task YAML files")
    p.add_argument("--limit", type=float, default=None,
                   help="documents per task (below 1: that fraction of them); for trying things out")
    p.add_argument("--batch_size", "--batch-size", "-b", type=int, default=32,
                   help="sequences the engine runs together (tasks) or windows per forward (--text)")
    p.add_argument("--output_path", "--output-path", "-o", default=None, help="write the results to this JSON file")
    p.add_argument("--log_samples", "--log-samples", action="store_true",
                   help="with --output_path: every request's inputs and scores too")
    p.add_argument("--wandb", action="store_true", help="log task results to Weights & Biases: the checkpoint's own "
                                                        "run if it has one; offline unless WANDB_MODE says otherwise")
    p.add_argument("--seq_len", "--seq-len", type=int, default=None, help="--text: tokens per window")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Everything that can be checked before the model loads, so a bad flag costs nothing."""
    for name in ("batch_size", "seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name} must be >= 1, got {value}")
    if args.limit is not None and args.limit <= 0:
        raise InputError(f"--limit must be positive, got {args.limit:g}")
    if args.log_samples and not args.output_path:
        raise InputError("--log_samples writes into the --output_path file: give one")
    if args.output_path:
        folder = Path(args.output_path).expanduser().resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise InputError(f"--output_path {args.output_path}: the folder {folder} does not exist or is not writable")
    if args.text is not None:
        given = [flag for flag, value in (("--include_path", args.include_path), ("--limit", args.limit),
                                          ("--log_samples", args.log_samples), ("--wandb", args.wandb)) if value]
        if given:
            raise InputError(f"{given[0]} is for --tasks, not --text")
        if not Path(args.text).is_file():
            raise InputError(f"--text {args.text} is not a file")
    elif args.seq_len is not None:
        raise InputError("--seq_len is for --text (tasks use the model's whole context)")


def write_json(path: str, data: dict, default=None) -> None:
    """Atomically: a file that exists is always whole (an earlier one stays until the new one is)."""
    target = Path(path).expanduser()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=default, ensure_ascii=False)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def wandb_run_args(ckpt: str) -> dict:
    """wandb.init arguments: the run that trained our checkpoint (its wandb_run_id, beside metrics.jsonl)
    when there is one, else a new run; offline unless WANDB_MODE says otherwise, as training logs."""
    from checkpoint.hf import is_hf_folder
    from checkpoint.store import resolve_checkpoint

    args = {"project": "small-llm", "mode": os.environ.get("WANDB_MODE", "offline"), "job_type": "eval"}
    run_dir = None if is_hf_folder(ckpt) else resolve_checkpoint(ckpt).parent.parent  # <run>/checkpoints/step_N
    if run_dir is not None and (run_dir / "wandb_run_id").is_file():
        args.update(id=(run_dir / "wandb_run_id").read_text().strip(), resume="allow",
                    dir=os.environ.get("WANDB_DIR", str(run_dir)))
    return args


def log_to_wandb(results: dict, ckpt: str) -> None:
    """The harness's own wandb logging: <task>/<metric> (in the run's summary too), its results table and
    JSON artifact, the samples with --log_samples."""
    import wandb
    from lm_eval.loggers import WandbLogger

    logger = WandbLogger(init_args=wandb_run_args(ckpt))
    logger.post_init(results)
    logger.log_eval_result()
    if "samples" in results:
        logger.log_eval_samples(results["samples"])
    logger.run.finish()
    wandb.teardown()  # an offline run is complete on disk when eval.py returns


def evaluate_tasks(args, device) -> None:
    from evaluation import require_harness

    require_harness("eval.py")
    from lm_eval.utils import handle_non_serializable, make_table

    from engine import LLM
    from evaluation.harness import EngineLM, load_tasks, run_tasks

    try:
        llm = LLM(args.ckpt, device=device, max_num_seqs=args.batch_size)
    except ValueError as e:  # CheckpointError included
        raise InputError(str(e)) from None
    names = [t for t in args.tasks.split(",") if t]
    if not names:
        raise InputError("--tasks names no task (give comma-separated names)")
    manager, tasks = load_tasks(names, args.include_path)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = run_tasks(EngineLM(llm), manager, tasks, limit, log_samples=args.log_samples)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.output_path:
        write_json(args.output_path, results, default=handle_non_serializable)
    if args.wandb:
        log_to_wandb(results, args.ckpt)


def run_seq_len(ckpt: str):
    """train.seq_len of the run that wrote our checkpoint (None for a Hugging Face folder)."""
    from checkpoint.hf import is_hf_folder
    from checkpoint.store import resolve_checkpoint

    if is_hf_folder(ckpt):
        return None
    return json.loads((resolve_checkpoint(ckpt) / "config.json").read_text()).get("train", {}).get("seq_len")


def evaluate_text(args, device) -> None:
    import torch

    from checkpoint import load_model
    from evaluation.text import text_bits_per_byte
    from model import choose_backend

    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read --text {args.text}: {e}") from None
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")  # generate.py's default
    model, tokenizer, _ = load_model(args.ckpt, device, torch.float32)
    choose_backend("auto", device, torch.float32)  # whole windows through the forward: attention as training runs it
    seq_len = args.seq_len or run_seq_len(args.ckpt) or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise InputError(f"--seq_len {seq_len} exceeds the model's context of {model.cfg.max_seq_len} tokens")
    r = text_bits_per_byte(model, tokenizer, text, seq_len, args.batch_size)
    print(f"{args.text}: {r['bits_per_byte']:.4f} bits per byte ({r['loss']:.4f} nats per token over {r['tokens']:,} "
          f"tokens, {r['bytes']:,} bytes, in windows of {r['seq_len']} tokens)")
    if args.output_path:
        write_json(args.output_path, {"text": args.text, **r})


def eval_device(name: str):
    from engine.config import check_device

    try:
        return check_device(name)
    except ValueError as e:
        raise InputError(str(e)) from None


def main(argv=None) -> int:
    args = parse_args(argv)
    from checkpoint import CheckpointError
    from data import DataError
    from evaluation import EvalError

    try:
        check_args(args)
        device = None if args.device == "auto" else eval_device(args.device)
        if args.tasks is not None:
            evaluate_tasks(args, device)
        else:
            evaluate_text(args, device)
    except (InputError, EvalError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
