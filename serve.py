"""An OpenAI-compatible HTTP server on the online engine, with a browser playground.

    python serve.py --ckpt runs/a [--host 127.0.0.1] [--port 8000] [--max-num-seqs 64] [--num-blocks N]
                    [--max-queue 256] [--compile] [--quantize int8] [--served-model-name NAME]

The engine's flags (--device, --block-size, --num-blocks, --max-num-seqs, --quantize, ...) are
EngineConfig's fields (engine/config.py), shared with generate.py.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream": true for server-sent
events), GET /v1/models, GET /health, GET /metrics (Prometheus), GET / (the playground,
static/index.html). The app is server/app.py; the engine runs in its own thread
(engine/async_engine.py); the handlers parse the body (server/protocol.py), enqueue and await updates.

Parameters: prompt (a string, a list of strings, a list of token ids or of such lists), max_tokens
(completions: default 16 as in OpenAI's API; chat: up to the context), temperature, top_p, n, stop,
seed, stream, stream_options.include_usage, logprobs (completions: an int, the alternatives per token;
chat: logprobs true and top_logprobs), echo (completions), and, named as in vLLM, top_k, min_p,
repetition_penalty, ignore_eos. Log-probabilities are those of the model's distribution (before
temperature and filters). Completions with echo and logprobs cover the prompt too (OpenAI's legacy
format: the first prompt token has null log-probs), which is how evaluation harnesses score a text;
max_tokens 0 with echo scores the prompt without generating (the engine's one token is dropped, as
vLLM does). Chat prompts: server/chat.py (the checkpoint's chat template, docs/chat.md, or plain turns).

Limits: a request holds one place per sample (its prompts times n); --max-num-seqs samples run and
--max-queue more wait, and a request that finds no room for all of its samples gets 429 at once (one
that could never fit gets 400). A body over --max-body-bytes gets 413 before it is read whole.

Errors are OpenAI-style JSON bodies {"error": {"message", "type", "param", "code"}}: 400 for invalid
parameters (param names the field), malformed JSON or a prompt longer than the context; 404 for an
unknown model; 413; 429; 503 while shutting down or once the engine stopped (/health says why). A
client that leaves (closes its stream, or its connection while it waits for a whole answer) has its
requests aborted and their KV blocks freed. SIGTERM (or Ctrl-C) stops accepting connections and new
requests, lets those in flight finish for up to --drain-timeout seconds, then ends them (a 503, or an
error event that closes a stream), and exits.
"""

import argparse
import re
import sys
from pathlib import Path

from engine.config import EngineConfig  # torch-free: --help stays fast

DRAIN_GRACE = 10.0  # seconds uvicorn waits past --drain-timeout for the ended requests' last bytes


def default_model_name(ckpt: str) -> str:
    """The run folder's name, with its date folder when train.py's default out_dir made it
    (runs/2026-12-07/16-37-37 -> 2026-12-07_16-37-37); a Hugging Face folder's own name."""
    from checkpoint.hf import is_hf_folder
    from checkpoint.store import resolve_checkpoint

    p = Path(ckpt).expanduser().resolve()
    if not is_hf_folder(p):
        p = resolve_checkpoint(p)  # run/checkpoints/step_N
        if p.parent.name == "checkpoints":
            p = p.parent.parent
    if re.fullmatch(r"\d\d-\d\d-\d\d", p.name) and re.fullmatch(r"\d{4}-\d\d-\d\d", p.parent.name):
        return f"{p.parent.name}_{p.name}"
    return p.name


def parse_args(argv=None) -> argparse.Namespace:
    from generate import OneLineErrorParser

    p = OneLineErrorParser(description="An OpenAI-compatible server for a checkpoint, with a playground at /.")
    p.add_argument("--ckpt", required=True, help="run folder, its checkpoints/ folder, or a checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients pass as 'model' (default: the run folder's name, e.g. 2026-12-07_16-37-37)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="samples waiting beyond max-num-seqs before new requests get 429")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="larger request bodies get 413 (default: 4 MiB)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests get to finish before they are ended")
    EngineConfig.add_cli_args(p, exclude=("use_cache",))  # the online engine runs on the KV cache
    return p.parse_args(argv)


def check_args(args) -> EngineConfig:
    """The engine's options from the flags, once the server's own are checked."""
    from generate import InputError, engine_config

    if args.max_body_bytes is not None and args.max_body_bytes < 1:
        raise InputError(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    for name in ("max_queue", "drain_timeout"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    return engine_config(args)


def load(args, config: EngineConfig):
    """(the app's state, its app) for the command line's checkpoint, engine options and limits."""
    from generate import bad_input

    from checkpoint import load_chat_template
    from engine import LLM
    from server.app import MAX_BODY_BYTES, Server, create_app

    with bad_input():  # a missing or corrupt checkpoint (CheckpointError), an option this machine lacks
        llm = LLM(args.ckpt, config=config)
        template = load_chat_template(args.ckpt)
        name = args.served_model_name or default_model_name(args.ckpt)
    state = Server(llm, name, args.max_queue, template, args.max_body_bytes or MAX_BODY_BYTES)
    return state, create_app(state)


def main(argv=None) -> int:
    from generate import InputError

    args = parse_args(argv)
    try:
        state, app = load(args, check_args(args))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM, Ctrl-C: the engine ends what is left at the deadline
            state.engine.drain(args.drain_timeout)
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                   timeout_graceful_shutdown=args.drain_timeout + DRAIN_GRACE))
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
