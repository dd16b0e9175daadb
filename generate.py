"""Generate text from a trained checkpoint, with a paged KV cache and continuous batching.

    python generate.py --ckpt runs/a --prompt "To be, or not to be"
    python generate.py --ckpt runs/a --prompt-file prompts.txt --temperature 0.8 --top-p 0.95 --json
    python generate.py --ckpt runs/a/checkpoints/step_0001000 --prompt "ROMEO:" --num-samples 4 --seed 1
    python generate.py --ckpt runs/a --prompt "Once" --stream
    python generate.py --ckpt runs/a --prompt "Once" --temperature 0 --no-cache   # the slow reference
    python generate.py --ckpt runs/sft --chat --system "Answer briefly."            # chat in the terminal

--ckpt takes a run folder (out_dir), its checkpoints/ folder, or one checkpoint folder. Without a
prompt, generation starts from a single newline. --prompt-file holds one prompt per line (empty lines
skipped), or, for a .jsonl file, one JSON string or {"prompt": ...} object per line.

Seeds: request r is seeded with request_seed(--seed, r) and its sample i with (that seed, i), so
identical prompts give different samples while a request's output still depends only on its prompt,
settings, --seed and position, not on the other requests batched with it. Without --seed a seed is
drawn and printed on stderr (and in --json) so a run can be repeated. A prompt must be shorter
than the model's context (model.max_seq_len); if prompt + --max-new-tokens does not fit, generation
stops at the context limit (finish_reason "length") and a note says so on stderr.

--json prints one object on stdout:
    {"requests": [{"prompt", "token_ids", "text", "finish_reason"}, ...], "seed": N, "stats": {...}}
and with --num-samples N > 1 each request is {"prompt", "samples": [{"token_ids", "text",
"finish_reason"}, ...]}. A summary line on stderr repeats the stats' figures. Their tokens/s are those
of the generation steps alone: loading (the checkpoint; the C++ kernels, built on first use) and a
warm-up (a few throwaway steps that pay first-call costs, and --compile's compilation) are timed
apart, as stats "load_s" and "warmup_s", so a short request's figures do not depend on whether it was
the first run. Bad input (missing or corrupt checkpoint, a prompt too long for the context, invalid
sampling values, an empty prompt, a prompt that is not UTF-8, a --prompt-file that cannot be read)
prints one line `error: ...` on stderr and exits with 2; a --prompt-file's leading UTF-8 byte-order
mark is dropped. If stdout's reader goes away (`generate.py ... | head -c 100`), it stops quietly
with exit code 1.

--chat: a conversation at the terminal (chat()). Each message you type is sent with the conversation so
far, rendered by the checkpoint's chat template (docs/chat.md; a model without one gets plain
"User:"/"Assistant:" turns and stops at "\nUser:"); the reply streams and ends at the end-of-turn token.
When the conversation no longer fits the context with room for --max-new-tokens, its oldest turns are
left out (a note says so; --system stays); a message that cannot fit even alone is refused and the chat
goes on. /reset starts a new conversation; Ctrl-C stops a reply (the message is taken back); Ctrl-D or
Ctrl-C at the prompt ends the chat.
"""

import argparse
import json
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from itertools import count
from pathlib import Path

from engine.config import EngineConfig  # torch-free: --help stays fast


class OneDefaultFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help unless the help already says its default, or there is
    none worth printing (None: unset; a switch such as --compile or --no-cache: off unless given)."""

    def _get_help_string(self, action):
        if action.default is None or action.nargs == 0 or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class OneLineErrorParser(argparse.ArgumentParser):
    """Errors in one line; --help shows each default once."""

    def __init__(self, **kw):
        super().__init__(formatter_class=OneDefaultFormatter, **kw)

    def error(self, message):  # one line, like every other bad-input error (argparse adds the usage)
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineErrorParser(description="Generate text from a checkpoint (paged KV cache, continuous batching).")
    p.add_argument("--ckpt", required=True, help="run folder, its checkpoints/ folder, or a checkpoint folder")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several; default: a newline)")
    p.add_argument("--prompt-file", default=None, help="one prompt per line, or a .jsonl file")
    p.add_argument("--max-new-tokens", type=int, default=128, help="at most this many new tokens per sample")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--seed", type=int, default=None,
                   help="request r uses a seed derived from (seed, r) (default: one is drawn at random and printed)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (they share the prompt's KV)")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt, one sample)")
    p.add_argument("--json", action="store_true", help="print one JSON object with outputs and stats")
    p.add_argument("--chat", action="store_true", help="chat at the terminal with the checkpoint's chat template")
    p.add_argument("--system", default=None, help="--chat: a system message that opens the conversation")
    EngineConfig.add_cli_args(p)
    return p.parse_args(argv)


class InputError(ValueError):
    """Bad command-line input: reported as one line, exit code 2."""


@contextmanager
def bad_input(kind=ValueError):
    """A `kind` raised inside (the one-line ValueErrors of the engine and the checkpoint loader) as an
    InputError."""
    try:
        yield
    except kind as e:
        raise InputError(str(e)) from None


def read_prompt_file(name: str) -> list[str]:
    """The lines of --prompt-file. A leading UTF-8 byte-order mark (some Windows editors write one) is
    dropped: it marks the encoding, it is not text anyone typed, and kept it would become the first
    prompt's first tokens (and make json.loads refuse a .jsonl file's first line)."""
    try:
        return Path(name).read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise InputError(f"--prompt-file '{name}' does not exist") from None
    except IsADirectoryError:
        raise InputError(f"--prompt-file '{name}' is a folder: give a file with one prompt per line") from None
    except UnicodeDecodeError as e:
        raise InputError(f"--prompt-file '{name}' is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                         f"{e.start}): save it as UTF-8") from None
    except OSError as e:
        raise InputError(f"cannot read --prompt-file '{name}': {e.strerror}") from None


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        for n, line in enumerate(read_prompt_file(args.prompt_file), 1):
            if not line.strip():
                continue
            if Path(args.prompt_file).suffix == ".jsonl":
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


def check_args(args) -> EngineConfig:
    """The engine's options from the flags, once everything that can be checked without loading is."""
    if args.num_samples < 1:
        raise InputError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.stream and args.json:
        raise InputError("--stream and --json do not go together")
    return engine_config(args)


def engine_config(args) -> EngineConfig:
    """EngineConfig.from_cli_args, its ValueError as a one-line InputError (generate.py, serve.py)."""
    with bad_input():
        return EngineConfig.from_cli_args(args)


def sampling_params(args, n_prompts: int):
    """(the run's seed, one SamplingParams per prompt): request r is seeded with request_seed(seed, r)."""
    from engine import SamplingParams  # imported late: --help stays fast
    from engine.sampler import request_seed

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 31)
    with bad_input():
        return seed, [SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                     min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                     max_new_tokens=args.max_new_tokens, stop=args.stop or [],
                                     ignore_eos=args.ignore_eos, seed=request_seed(seed, r), n=args.num_samples)
                      for r in range(n_prompts)]


def load_llm(args, config: EngineConfig):
    """The LLM for the command line, and the seconds its loading took (the checkpoint, and the C++
    kernels: built on first use, loaded on every run)."""
    from engine import LLM

    t0 = time.perf_counter()
    with bad_input():  # a missing or corrupt checkpoint (CheckpointError), an option this machine lacks
        llm = LLM(args.ckpt, config=config)
    return llm, time.perf_counter() - t0


def run(args) -> int:
    config = check_args(args)
    prompts = read_prompts(args)
    if args.stream and (len(prompts) > 1 or args.num_samples > 1):
        raise InputError("--stream prints one generation: give a single prompt and --num-samples 1")
    from engine import RequestTooLarge
    from engine.text import TextStream

    seed, params = sampling_params(args, len(prompts))
    llm, load_s = load_llm(args, config)
    with bad_input():
        prompt_ids = llm.encode_prompts(prompts)
    ctx = llm.cfg.max_seq_len
    for i, ids in enumerate(prompt_ids):
        if len(ids) + args.max_new_tokens > ctx:
            print(f"note: prompt {i} has {len(ids)} tokens: generation stops at the model's context of {ctx} "
                  f"tokens (at most {ctx - len(ids)} new tokens)", file=sys.stderr)
    warmup_s = llm.warmup(max_batch=len(prompts) * args.num_samples)  # kept out of the figures below

    on_token = None
    if args.stream:
        stream = TextStream(llm.decode, params[0].stop)
        _write(prompts[0])
        on_token = lambda i, j, token_ids: _write(stream.push(token_ids))  # noqa: E731
    with bad_input(RequestTooLarge):
        outs = llm.generate(prompt_ids, params, on_token=on_token)
    if args.stream:
        _write(stream.finish(outs[0].text) + "\n")
    if args.seed is None:  # said after the run: a bad-input error stays one line
        print(f"seed {seed} (pass --seed {seed} to repeat this run)", file=sys.stderr)
    stats = stats_dict(llm.stats, args, load_s, warmup_s)
    print_outputs(args, prompts, outs, seed, stats)
    print(f"[{len(outs)} request(s)] prefill {stats['prefill_tokens_per_s']:.0f} tok/s, decode "
          f"{stats['decode_tokens_per_s']:.0f} tok/s, blocks {stats['blocks_used']}/{stats['blocks_total']}, "
          f"{stats['kv_bytes_per_token']} KV bytes/token ({stats['kv_dtype']}), prefix hits "
          f"{stats['prefix_hit_rate']:.0%}, preemptions {stats['preemptions']}; once per run, not in those "
          f"figures: load {stats['load_s']:.2f} s, warm-up {stats['warmup_s']:.2f} s", file=sys.stderr)
    return 0


# The figures of GenerationStats.to_dict() that --json prints, in this order; blocks_used and blocks_total are
# its blocks_used_peak and num_blocks.
STATS_KEYS = ("prefill_tokens_per_s", "decode_tokens_per_s", "blocks_used", "blocks_total", "block_size",
              "kv_bytes_per_token", "kv_dtype", "kv_bytes_per_token_full_kv", "prefix_hit_rate", "preemptions",
              "kv_memory_utilization", "cow_copies", "prefill_tokens", "decode_tokens")


def stats_dict(stats, args, load_s: float, warmup_s: float) -> dict:
    """The figures --json prints and the summary line on stderr repeats. Tokens/s are the generation
    steps' alone: loading (checkpoint, kernels) and the warm-up (first-call costs, --compile's
    compilation) are timed apart."""
    d = {**stats.to_dict(), "blocks_used": stats.blocks_used_peak, "blocks_total": stats.num_blocks}
    return {**{k: d[k] for k in STATS_KEYS}, "cache": args.use_cache, "load_s": round(load_s, 2),
            "warmup_s": round(warmup_s, 2)}


def print_outputs(args, prompts, outs, seed: int, stats: dict) -> None:
    """stdout: one JSON object (--json), the texts (nothing more with --stream: already printed)."""
    if args.json:
        requests = []
        for text, out in zip(prompts, outs):
            samples = [{"token_ids": s.token_ids, "text": s.text, "finish_reason": s.finish_reason} for s in out.outputs]
            requests.append({"prompt": text, **samples[0]} if args.num_samples == 1 else
                            {"prompt": text, "samples": samples})
        print(json.dumps({"requests": requests, "seed": seed, "stats": stats}, ensure_ascii=False))
    elif not args.stream:
        many = len(outs) > 1 or args.num_samples > 1
        for text, out in zip(prompts, outs):
            for s in out.outputs:
                if many:
                    print(f"--- prompt {out.request_index}" + (f", sample {s.index}" if args.num_samples > 1 else "")
                          + f" ({s.finish_reason}) ---")
                print(text + s.text)


def _write(text: str) -> None:
    print(text, end="", flush=True)


def check_chat_args(args) -> None:
    """--chat reads its messages at the terminal and answers one at a time; --system belongs to it."""
    given = (("--prompt", args.prompt), ("--prompt-file", args.prompt_file), ("--json", args.json),
             ("--num-samples", args.num_samples > 1), ("--no-cache", not args.use_cache))
    clash = [name for name, on in given if on]
    if args.chat and clash:
        raise InputError(f"--chat reads its messages from the terminal, one reply at a time: drop {clash[0]}")
    if args.system is not None and not args.chat:
        raise InputError("--system is the opening message of a --chat: add --chat, or put it in the prompt")


def chat(args) -> int:
    """--chat: read a message, stream the reply, keep both; until end of input (see the module docstring)."""
    from checkpoint import load_chat_template
    from server.chat import reply_ends  # where serve.py's chat replies end too

    seed, (params,) = sampling_params(args, 1)
    llm, _ = load_llm(args, engine_config(args))
    template = load_chat_template(args.ckpt)
    stops, stop_ids = reply_ends(template, llm.tokenizer)
    params = replace(params, stop=params.stop + stops, stop_token_ids=stop_ids)
    llm.warmup(max_batch=1)
    how = "the checkpoint's chat template" if template else "no chat template: plain User:/Assistant: turns"
    print(f"chat: {how}, seed {seed}; /reset starts over, Ctrl-D ends", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = []
    for turn in count():
        try:
            text = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text.strip() == "/reset":
            history = []
            continue
        if text.strip():
            history = chat_turn(llm, params, template, system, history + [{"role": "user", "content": text}], seed,
                                turn)


def chat_turn(llm, params, template, system: list, history: list, seed: int, turn: int) -> list:
    """Reply to the last message of `history`, streamed; the history to go on with (with the reply; without the
    turns left out to fit the context; without the message if it was refused or the reply stopped)."""
    from data.chat import prompt_ids
    from engine.sampler import request_seed
    from engine.text import TextStream

    ctx, kept = llm.cfg.max_seq_len, history
    ids = prompt_ids(system + kept, template, llm.tokenizer)
    while len(ids) + params.max_new_tokens > ctx and len(kept) > 1:
        kept = kept[2:]  # the oldest exchange: a message and its reply
        ids = prompt_ids(system + kept, template, llm.tokenizer)
    if len(ids) >= ctx:
        print(f"error: this message makes a prompt of {len(ids)} tokens, but the model's context is {ctx}: send a "
              "shorter one", file=sys.stderr)
        return history[:-1]
    if kept is not history:
        print(f"note: the conversation outgrew the model's context of {ctx} tokens: its oldest "
              f"{len(history) - len(kept)} turns are left out", file=sys.stderr)
        history = kept
    stream = TextStream(llm.decode, params.stop)
    try:
        out = llm.generate([ids], replace(params, seed=request_seed(seed, turn), max_new_tokens=min(
            params.max_new_tokens, ctx - len(ids))), on_token=lambda i, j, t: _write(stream.push(t)))[0]
    except KeyboardInterrupt:
        print("\n(stopped)", file=sys.stderr)
        return history[:-1]
    _write(stream.finish(out.text) + "\n")
    if out.finish_reason == "length":
        print(f"(the reply stopped at {len(out.token_ids)} tokens: --max-new-tokens or the context)", file=sys.stderr)
    reply = out.text if template else out.text.strip()  # plain turns put their own space after "Assistant:"
    return history + [{"role": "assistant", "content": reply}]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_chat_args(args)
        code = chat(args) if args.chat else run(args)
        sys.stdout.flush()  # a reader that went away shows here, inside the try, not at exit
        return code
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # stdout's reader closed it (`generate.py ... | head -c 1`): stop quietly, as the Python docs
        # advise (library/signal.html, "Note on SIGPIPE"): point stdout at /dev/null so the flush at
        # exit has nowhere to fail, and exit 1 like Python on EPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
