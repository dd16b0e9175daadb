"""What int8 weight-only quantization costs a trained model: val loss, perplexity, bits/byte, and
greedy agreement with fp32, for fp32, int8 with an fp32 LM head, and int8 throughout.

    python scripts/quant_eval.py outputs/<run>                   # the val split of the run's data config
    python scripts/quant_eval.py outputs/<run> --text book.txt   # or any text file
    python scripts/quant_eval.py outputs/<run> --prompts 16 --tokens 64

Loss: mean next-token cross-entropy over consecutive non-overlapping windows of --seq-len tokens
(the windows train.py evaluates on, every window of the split unless --max-batches). Bits per byte
spread the loss over the split's UTF-8 bytes (as train.py reports it). Greedy agreement: --prompts
windows of 16 val tokens, evenly spaced, each continued --tokens tokens greedily by full recompute
(no KV cache, so the comparison involves nothing but the weights) by fp32 and by the variant;
"identical" counts continuations equal token for token, "agreeing prefix" is the mean number of
tokens before the first difference, over --tokens.
"""

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from checkpoint import CheckpointError, load_checkpoint, load_model  # noqa: E402
from data import DataError, bits_per_byte, eval_batches  # noqa: E402
from engine.quantize import quantize_int8  # noqa: E402
from model import choose_backend  # noqa: E402

PROMPT_TOKENS = 16


@dataclass
class ValText:
    tokens: np.ndarray  # 1-D token ids
    n_bytes: int  # UTF-8 bytes of the text those tokens encode


def val_text(args, tok) -> ValText:
    """--text tokenized with the checkpoint's tokenizer, or the val split of the run's data config."""
    if args.text:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read --text {args.text} ({e.__class__.__name__}); give a UTF-8 text file")
        return ValText(np.array(tok.encode(text).ids, dtype=np.int64), len(text.encode("utf-8")))
    from data import prepare
    from data.config import DataConfig

    data_cfg = load_checkpoint(args.checkpoint).config.get("data") or {}
    if not data_cfg:
        raise DataError(f"checkpoint {args.checkpoint} records no data config; pass --text FILE")
    prepared = prepare(DataConfig(**data_cfg))
    return ValText(np.asarray(prepared.val, dtype=np.int64), prepared.meta["n_val_bytes"])


@torch.inference_mode()
def val_loss(model, val: ValText, seq_len: int, batch_size: int, max_batches) -> float:
    total, count = 0.0, 0
    for x, y in eval_batches(val.tokens, seq_len, batch_size, max_batches):
        logits, _ = model(x)
        total += F.cross_entropy(logits.flatten(0, 1).double(), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count


@torch.inference_mode()
def greedy(model, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    outs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        for _ in range(tokens):
            logits, _ = model(ids[:, -model.cfg.max_seq_len:])
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        outs.append(ids[0, len(prompt):].tolist())
    return outs


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a run, checkpoints/ or checkpoint folder")
    p.add_argument("--text", help="evaluate on this UTF-8 text file instead of the run's val split")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per loss window (<= the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-batches", type=int, default=None, help="default: the whole split")
    p.add_argument("--prompts", type=int, default=8, help="greedy continuations compared per variant")
    p.add_argument("--tokens", type=int, default=32, help="tokens per greedy continuation")
    args = p.parse_args(argv)
    try:
        model, tok, _ = load_model(args.checkpoint, torch.device("cpu"), torch.float32)
        choose_backend("auto", "cpu", torch.float32)  # whole windows through the forward: our C++ attention
        if not 1 <= args.seq_len <= model.cfg.max_seq_len:
            raise DataError(f"--seq-len must be 1..{model.cfg.max_seq_len} (the model's max_seq_len)")
        val = val_text(args, tok)
        if len(val.tokens) < max(args.seq_len, PROMPT_TOKENS) + 1:
            raise DataError(f"the val text has {len(val.tokens)} tokens, too few for --seq-len {args.seq_len}; "
                            "give a longer text or a smaller --seq-len")
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    starts = np.linspace(0, len(val.tokens) - PROMPT_TOKENS, args.prompts).astype(int)
    prompts = [val.tokens[s:s + PROMPT_TOKENS].tolist() for s in starts]
    variants = {"fp32": model, "int8, fp32 head": quantize_int8(model, head=False), "int8": quantize_int8(model)}
    reference = greedy(model, prompts, args.tokens)

    print(f"{args.checkpoint}: {len(val.tokens):,} val tokens, {val.n_bytes:,} bytes; greedy: {args.prompts} "
          f"prompts x {args.tokens} tokens\n")
    print("| model | val loss | perplexity | bits/byte | d bits/byte | greedy identical | agreeing prefix |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for name, m in variants.items():
        loss = val_loss(m, val, args.seq_len, args.batch_size, args.max_batches)
        bpb = bits_per_byte(loss, len(val.tokens), val.n_bytes)  # the split's bytes per token
        base = bpb if base is None else base
        outs = reference if m is model else greedy(m, prompts, args.tokens)
        same = sum(o == r for o, r in zip(outs, reference))
        prefix = sum(agreeing_prefix(o, r) for o, r in zip(outs, reference)) / len(prompts)
        print(f"| {name} | {loss:.4f} | {math.exp(loss):.3f} | {bpb:.4f} | {bpb - base:+.4f} | "
              f"{same}/{len(prompts)} | {prefix:.1f}/{args.tokens} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
