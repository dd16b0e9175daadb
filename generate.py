"""Generate text from a trained checkpoint, with a paged KV cache and continuous batching.

    python generate.py --ckpt runs/a --prompt "To be, or not to be"
    python generate.py --ckpt runs/a --prompt-file prompts.txt --temperature 0.8 --top-p 0.95 --json
    python generate.py --ckpt runs/a/checkpoints/step_0001000 --prompt "ROMEO:" --num-samples 4 --seed 1
    python generate.py --ckpt runs/a --prompt "Once" --stream
    python generate.py --ckpt runs/a --prompt "Once" --temperature 0 --no-cache   # the slow reference

--ckpt takes a run folder (out_dir), its checkpoints/ folder, or one checkpoint folder. Without a
prompt, generation starts from a single newline. --prompt-file holds one prompt per line (empty lines
skipped), or, for a .jsonl file, one JSON string or {"prompt": ...} object per line.

Every request is seeded with --seed (sample i of a request with (seed, i)): its output depends only on
its prompt, settings and seed, not on the other requests batched with it. A prompt must be shorter
than the model's context (model.max_seq_len); if prompt + --max-new-tokens does not fit, generation
stops at the context limit (finish_reason "length") and a note says so on stderr.

--json prints one object on stdout:
    {"requests": [{"prompt", "token_ids", "text", "finish_reason"}, ...], "stats": {...}}
and with --num-samples N > 1 each request is {"prompt", "samples": [{"token_ids", "text",
"finish_reason"}, ...]}. Bad input (missing or corrupt checkpoint, a prompt too long for the context,
invalid sampling values, an empty prompt) prints one line `error: ...` on stderr and exits with 2.
"""

import argparse
import json
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other bad-input error (argparse adds the usage)
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description="Generate text from a checkpoint (paged KV cache, continuous batching).")
    p.add_argument("--ckpt", required=True, help="run folder, its checkpoints/ folder, or a checkpoint folder")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    p.add_argument("--prompt-file", default=None, help="one prompt per line, or a .jsonl file")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (they share the prompt's KV)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--num-blocks", type=int, default=None, help="KV budget in blocks (default: from free memory)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt, one sample)")
    p.add_argument("--no-cache", action="store_true", help="decode by full recompute (the slow reference)")
    p.add_argument("--compile", action="store_true",
                   help="CPU: torch.compile the decode step (a one-off 10-60 s compilation; faster decoding "
                        "for long or many generations; needs a C++ compiler)")
    p.add_argument("--json", action="store_true", help="print one JSON object with outputs and stats")
    return p.parse_args(argv)


class InputError(ValueError):
    """Bad command-line input: reported as one line, exit code 2."""


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise InputError(f"--prompt-file '{args.prompt_file}' does not exist")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read --prompt-file '{args.prompt_file}': {e}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{args.prompt_file}:{n}: not valid JSON ({e.msg})") from None
                if isinstance(item, dict):
                    item = item.get("prompt")
                if not isinstance(item, str):
                    raise InputError(f"{args.prompt_file}:{n}: expected a JSON string or an object with a "
                                     "string \"prompt\"")
                prompts.append(item)
            else:
                prompts.append(line)
        if not prompts:
            raise InputError(f"--prompt-file '{args.prompt_file}' has no prompts")
    return prompts if prompts else ["\n"]


def check_args(args) -> None:
    if args.block_size < 1:
        raise InputError(f"--block-size must be >= 1, got {args.block_size}")
    if args.num_blocks is not None and args.num_blocks < 1:
        raise InputError(f"--num-blocks must be >= 1, got {args.num_blocks}")
    if args.num_samples < 1:
        raise InputError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.stream and args.json:
        raise InputError("--stream and --json do not go together")
    if args.compile and args.no_cache:
        raise InputError("--compile compiles the cached decode step: drop --no-cache")


def check_device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown --device '{name}': use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise InputError(f"--device {name}: only cpu and cuda are supported")
    return device


def run(args) -> int:
    check_args(args)
    prompts = read_prompts(args)
    if args.stream and (len(prompts) > 1 or args.num_samples > 1):
        raise InputError("--stream prints one generation: give a single prompt and --num-samples 1")

    import torch

    from engine import LLM, RequestTooLarge, SamplingParams  # imported late: --help stays fast
    from checkpoint import CheckpointError

    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                                stop=args.stop, ignore_eos=args.ignore_eos, seed=args.seed, n=args.num_samples)
    except ValueError as e:
        raise InputError(str(e)) from None
    device = None if args.device == "auto" else check_device(args.device)
    if args.compile and (device.type == "cuda" if device is not None else torch.cuda.is_available()):
        raise InputError("--compile is for CPU decoding (CUDA decodes with the Triton paged kernel): "
                         "drop it or add --device cpu")
    try:
        llm = LLM(args.ckpt, device=device, block_size=args.block_size, num_blocks=args.num_blocks,
                  use_cache=not args.no_cache, compile=args.compile)
    except CheckpointError as e:
        raise InputError(str(e)) from None

    ctx = llm.cfg.max_seq_len
    prompt_ids = []
    for i, text in enumerate(prompts):
        ids = llm.encode(text)
        if not ids:
            raise InputError(f"prompt {i} is empty")
        if len(ids) >= ctx:
            raise InputError(f"prompt {i} has {len(ids)} tokens but the model's context is {ctx} tokens "
                             f"(at most {ctx - 1} prompt tokens leave room for one new token)")
        if len(ids) + params.max_new_tokens > ctx:
            print(f"note: prompt {i} has {len(ids)} tokens: generation stops at the model's context of {ctx} "
                  f"tokens (at most {ctx - len(ids)} new tokens)", file=sys.stderr)
        prompt_ids.append(ids)

    on_token = None
    if args.stream:
        on_token = _Streamer(llm, prompts[0], params.stop)
    try:
        outs = llm.generate(prompt_ids, params, on_token=on_token)
    except RequestTooLarge as e:
        raise InputError(str(e)) from None
    if args.stream:
        on_token.finish(outs[0].text)

    stats = llm.stats
    stats_d = {
        "prefill_tokens_per_s": round(stats.prefill_tokens_per_s, 2),
        "decode_tokens_per_s": round(stats.decode_tokens_per_s, 2),
        "blocks_used": stats.blocks_used_peak,
        "blocks_total": stats.num_blocks,
        "block_size": stats.block_size,
        "kv_bytes_per_token": stats.kv_bytes_per_token,
        "kv_bytes_per_token_full_kv": stats.kv_bytes_per_token_full_kv,
        "prefix_hit_rate": round(stats.prefix_hit_rate, 4),
        "preemptions": stats.preemptions,
        "kv_memory_utilization": round(stats.kv_memory_utilization, 4),
        "cow_copies": stats.cow_copies,
        "prefill_tokens": stats.prefill_tokens,
        "decode_tokens": stats.decode_tokens,
        "cache": not args.no_cache,
    }
    if args.json:
        requests = []
        for text, out in zip(prompts, outs):
            samples = [{"token_ids": s.token_ids, "text": s.text, "finish_reason": s.finish_reason} for s in out.outputs]
            requests.append({"prompt": text, **samples[0]} if args.num_samples == 1 else
                            {"prompt": text, "samples": samples})
        print(json.dumps({"requests": requests, "stats": stats_d}, ensure_ascii=False))
        return 0
    if not args.stream:
        many = len(outs) > 1 or args.num_samples > 1
        for text, out in zip(prompts, outs):
            for s in out.outputs:
                if many:
                    print(f"--- prompt {out.request_index}" + (f", sample {s.index}" if args.num_samples > 1 else "")
                          + f" ({s.finish_reason}) ---")
                print(text + s.text)
    print(f"[{len(outs)} request(s)] prefill {stats_d['prefill_tokens_per_s']:.0f} tok/s, decode "
          f"{stats_d['decode_tokens_per_s']:.0f} tok/s, blocks {stats.blocks_used_peak}/{stats.num_blocks}, "
          f"{stats.kv_bytes_per_token} KV bytes/token, prefix hits {stats.prefix_hit_rate:.0%}, "
          f"preemptions {stats.preemptions}", file=sys.stderr)
    return 0


class _Streamer:
    """Prints the new text of a single generation as tokens arrive. Holds back a character split
    across tokens, and the last characters that could still become a stop string."""

    def __init__(self, llm, prompt: str, stops: list[str]):
        self.llm, self.printed, self.stops = llm, 0, stops
        self.hold = max(map(len, stops), default=1) - 1
        sys.stdout.write(prompt)
        sys.stdout.flush()

    def __call__(self, request_index: int, sample_index: int, token_ids: list[int]) -> None:
        text = self.llm.decode(token_ids)
        if text.endswith("\ufffd"):
            return
        found = [text.find(s) for s in self.stops if s in text]
        self._write(text[:min(found)] if found else text[:len(text) - self.hold])

    def _write(self, text: str) -> None:
        if len(text) > self.printed:
            sys.stdout.write(text[self.printed:])
            sys.stdout.flush()
            self.printed = len(text)

    def finish(self, final_text: str) -> None:
        """final_text: the finished output (cut before a stop string)."""
        self._write(final_text)
        sys.stdout.write("\n")
        sys.stdout.flush()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
