"""An OpenAI-compatible HTTP server on the online engine, with a browser playground.

    python serve.py --ckpt runs/a [--host 127.0.0.1] [--port 8000] [--max-num-seqs 64] [--num-blocks N]
                    [--max-queue 256] [--compile] [--quantize int8] [--model-name NAME]

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream": true for server-sent
events), GET /v1/models, GET /health, GET /metrics (Prometheus text), GET / (the playground,
static/index.html). The engine runs in its own thread (engine/async_engine.py); the handlers here only
turn JSON into SamplingParams, enqueue, and await updates.

Parameters: prompt (a string, a list of strings, a list of token ids or of such lists), max_tokens
(completions: default 16 as in OpenAI's API; chat: up to the context), temperature, top_p, n, stop,
seed, stream, logprobs (completions: an int, the alternatives per token; chat: logprobs true and
top_logprobs), echo (completions), and, named as in vLLM, top_k, min_p, repetition_penalty,
ignore_eos. Log-probabilities are those of the model's distribution (before temperature and filters).
Completions with echo and logprobs cover the prompt too (OpenAI's legacy format: the first prompt
token has null log-probs), which is how evaluation harnesses score a text; max_tokens 0 with echo
scores the prompt without generating (the engine's one token is dropped, as vLLM does).

Chat prompts: the "chat_template" of tokenizer_config.json in the checkpoint folder (Hugging Face
exports have one), rendered with jinja2; else the plain template for base models:
    "System: {content}\n\n" / "User: {content}\n\n" / "Assistant: {content}\n\n" per message, then
    "Assistant:"; a base model may go on to write the next "User:" turn: pass stop ["\nUser:"].

Errors are OpenAI-style JSON bodies {"error": {"message", "type", "param", "code"}}: 400 for invalid
parameters, malformed JSON or a prompt longer than the context; 404 for an unknown model; 429 when
max_num_seqs requests run and --max-queue more wait; 503 while shutting down. A client that leaves
(closes its stream, or its connection while it waits for a whole answer) has its requests aborted and
their KV blocks freed. SIGTERM (or Ctrl-C) stops accepting
connections, lets in-flight requests finish (up to --drain-timeout seconds, then aborts them), and
exits.
"""

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Optional, Union

STATIC = Path(__file__).resolve().parent / "static"


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {404: "not_found_error", 429: "rate_limit_error", 503: "server_error"}.get(self.status,
                                                                                          "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def as_api_error(e: Exception) -> APIError:
    """An APIError as it is; anything else failed inside the engine: a 500 naming it."""
    return e if isinstance(e, APIError) else APIError(500, f"generation failed: {type(e).__name__}: {e}")


PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def plain_chat_prompt(messages: list[dict]) -> str:
    """The documented template for models without a chat template (see the module docstring)."""
    return "".join(f"{PLAIN_ROLES[m['role']]}: {m['content']}\n\n" for m in messages) + "Assistant:"


def load_chat_template(ckpt: str) -> Optional[str]:
    """The chat_template string of a tokenizer_config.json beside the checkpoint's weights, if any."""
    from checkpoint.store import resolve_checkpoint

    for folder in dict.fromkeys([resolve_checkpoint(ckpt), Path(ckpt)]):
        cfg = folder / "tokenizer_config.json"
        if cfg.is_file():
            template = json.loads(cfg.read_text()).get("chat_template")
            if isinstance(template, str):
                return template
    return None


def render_chat(messages: list[dict], template: Optional[str]) -> str:
    """The chat prompt: a Hugging Face chat template (jinja2, sandboxed) or the plain template."""
    if template is None:
        return plain_chat_prompt(messages)
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from data.config import EOT

    def raise_exception(msg):
        raise APIError(400, f"the chat template refused the messages: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, eos_token=EOT,
                                            bos_token="")


# ---- request bodies -----------------------------------------------------------------------------
def _get(body: dict, key: str, kinds, default=None):
    """body[key] if it has one of the JSON types `kinds` (a bool is not an int here), else a 400."""
    value = body.get(key)
    if value is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise APIError(400, f"'{key}' has the wrong type ({type(value).__name__})", param=key)
    return value


def sampling_params(body: dict, max_tokens: int, logprobs: Optional[int], prompt_logprobs: Optional[int] = None):
    from engine import SamplingParams

    stop = _get(body, "stop", (str, list)) or []
    try:
        return SamplingParams(
            temperature=float(_get(body, "temperature", (int, float), 1.0)),
            top_p=float(_get(body, "top_p", (int, float), 1.0)),
            top_k=_get(body, "top_k", int, 0), min_p=float(_get(body, "min_p", (int, float), 0.0)),
            repetition_penalty=float(_get(body, "repetition_penalty", (int, float), 1.0)),
            max_new_tokens=max_tokens, stop=stop, ignore_eos=bool(_get(body, "ignore_eos", bool, False)),
            seed=_get(body, "seed", int), n=_get(body, "n", int, 1), logprobs=logprobs,
            prompt_logprobs=prompt_logprobs)
    except ValueError as e:
        raise APIError(400, str(e)) from None


class Server:
    """The app's state: the LLM, its engine thread, the served name and limits."""

    def __init__(self, llm, model_name: str, max_queue: int, chat_template: Optional[str]):
        from engine.async_engine import AsyncEngine

        self.llm, self.model_name, self.max_queue = llm, model_name, max_queue
        self.chat_template = chat_template
        self.engine = AsyncEngine(llm.core)
        self.ctx = llm.cfg.max_seq_len
        self.created = int(time.time())

    # ---- shared by both endpoints ----
    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist: this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def check_capacity(self, new: int) -> None:
        if not self.engine.is_alive():
            raise APIError(503, "the server is shutting down")
        if self.engine.num_in_flight + new > self.llm.max_num_seqs + self.max_queue:
            raise APIError(429, f"the server is at capacity ({self.llm.max_num_seqs} running and {self.max_queue} "
                                "waiting requests): retry later")

    def encode(self, prompt: Union[str, list[int]], index: int) -> list[int]:
        from engine.core import check_prompt

        ids = self.llm.encode(prompt)
        try:
            check_prompt(ids, self.ctx, self.llm.cfg.vocab_size, index)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        return ids

    def max_tokens(self, body: dict, key: str, prompt_ids: list[list[int]], default: Optional[int]) -> int:
        value = _get(body, key, int, default)
        if value is None:  # up to the context
            return max(1, self.ctx - max(map(len, prompt_ids)))
        return value

    async def run(self, prompt_ids: list[int], params):
        """Updates of one prompt's request (the prompt is already checked): a request that cannot fit
        the KV cache is a 400; any other error failed it inside the engine (see as_api_error)."""
        from engine import RequestTooLarge

        try:
            async for up in self.engine.generate(prompt_ids, params):
                yield up
        except RequestTooLarge as e:
            raise APIError(400, str(e)) from None


class Choice:
    """One sample being written: its token ids, streamed text and logprobs.

    Echo: `prefix` is the prompt's text, written first, and `prompt_ids` its tokens, whose log-probs
    (on the sample's first update, when asked for) come first in `logprobs`. score_only (echo with
    max_tokens 0): the one token the engine generates is dropped, so the choice is the prompt alone."""

    def __init__(self, server: Server, index: int, stops: list[str], prefix: str = "", prompt_ids=(),
                 score_only: bool = False):
        from engine.text import TextStream

        self.server, self.index, self.prefix = server, index, prefix
        self.prompt_ids, self.score_only = prompt_ids, score_only
        self.token_ids: list[int] = []
        self.stream = TextStream(server.llm.decode, stops)
        self.logprobs: list = []  # (token, TokenLogprobs or None, offset of its text in the choice's text)
        self.added = 0  # logprobs[added:] came with the last update (what a streamed chunk carries)
        self.offset = len(prefix)
        self.finish_reason: Optional[str] = None
        self.text = ""

    def add(self, up) -> str:
        """Take one update; returns the new text to stream (the prefix first)."""
        self.added = len(self.logprobs)
        if up.prompt_logprobs is not None:
            at = 0
            for t, lp in zip(self.prompt_ids, up.prompt_logprobs):
                self.logprobs.append((t, lp, at))
                at += len(self.token_text(t))
        if self.score_only:
            self.finish_reason, piece = "length", ""
        else:
            self.token_ids.append(up.token)
            if up.logprobs is not None:
                self.logprobs.append((up.token, up.logprobs, self.offset))
                self.offset += len(self.token_text(up.token))
            if up.finish_reason is None:
                piece = self.stream.push(self.token_ids)
            else:
                self.finish_reason = up.finish_reason
                final = self.server.llm.decode(self.token_ids)
                if up.stop_text_len is not None:
                    final = final[:up.stop_text_len]
                piece = self.stream.finish(final)
        piece, self.prefix = self.prefix + piece, ""
        self.text += piece
        return piece

    def token_text(self, token: int) -> str:
        return self.server.llm.decode([token])

    def completion_logprobs(self, entries) -> dict:
        """OpenAI's legacy format; the first prompt token (echo) has no log-probs: null, as in OpenAI's API."""
        return {"tokens": [self.token_text(t) for t, _, _ in entries],
                "token_logprobs": [None if lp is None else lp.logprob for _, lp, _ in entries],
                "top_logprobs": [None if lp is None else self.top_dict(lp.top) for _, lp, _ in entries],
                "text_offset": [at for _, _, at in entries]}

    def top_dict(self, top) -> dict:
        """{token text: logprob}, most likely first; tokens whose text is the same (bytes of a split
        character all show as U+FFFD) keep the most likely one's value."""
        out = {}
        for t, v in top:
            out.setdefault(self.token_text(t), v)
        return out

    def chat_logprobs(self, entries) -> dict:
        def item(t, v):
            s = self.token_text(t)
            return {"token": s, "logprob": v, "bytes": list(s.encode())}
        return {"content": [{**item(t, lp.logprob), "top_logprobs": [item(a, v) for a, v in lp.top]}
                            for t, lp, _ in entries]}


async def merged(server: Server, prompts: list[list[int]], params):
    """(prompt index, update) of every prompt's request, as they come; all aborted if the consumer stops."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, ids):
        try:
            async for up in server.run(ids, params):
                await q.put((i, up, None))
        except Exception as e:  # handed to the consumer, which raises it
            await q.put((i, None, e))
        finally:
            await q.put((i, None, None))

    tasks = [asyncio.create_task(pump(i, ids)) for i, ids in enumerate(prompts)]
    try:
        left = len(tasks)
        while left:
            i, up, err = await q.get()
            if err is not None:
                raise err
            if up is None:
                left -= 1
                continue
            yield i, up
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def unless_disconnected(request, work):
    """Await `work` (a coroutine) unless the client disconnects first: then cancel it (a merged() inside
    aborts its requests) and return None. After the body is read, the next ASGI message uvicorn delivers
    is http.disconnect: when the client closes the connection, or once the response is sent."""
    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    return None if task.cancelled() else task.result()


def create_app(server: Server):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
    from fastapi.staticfiles import StaticFiles

    @asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        server.engine.close()  # after uvicorn drained the connections (SIGTERM)

    app = FastAPI(title="small-llm", lifespan=lifespan)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, e):
        return JSONResponse(APIError(400, "malformed request").body(), status_code=400)

    async def json_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def usage(prompts, choices) -> dict:
        p, c = sum(map(len, prompts)), sum(len(ch.token_ids) for ch in choices)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def respond(request: Request, body: dict, prompts: list[list[int]], params, choices: list[Choice], chunk,
                      final):
        """Run the prompts; stream chunk(choice, piece) events or return final(choices)."""
        n = params.n
        server.check_capacity(len(prompts))
        if not body.get("stream"):
            async def collect():
                async for i, up in merged(server, prompts, params):
                    choices[i * n + up.sample_index].add(up)
                return final(choices)

            try:
                answer = await unless_disconnected(request, collect())
            except Exception as e:
                raise as_api_error(e) from None
            # None: nobody is there to read a response (499, nginx's "client closed request", for the log)
            return JSONResponse(answer) if answer is not None else Response(status_code=499)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        updates = merged(server, prompts, params)
        try:  # the first update (or the error of a request the engine refused) before the 200
            first = await updates.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as e:
            raise as_api_error(e) from None

        async def all_updates():
            if first is not None:
                yield first
            async for item in updates:
                yield item

        async def events():
            try:
                async for i, up in all_updates():
                    ch = choices[i * n + up.sample_index]
                    piece = ch.add(up)
                    if piece or up.finish_reason is not None or up.logprobs is not None:
                        yield sse(chunk(ch, piece))
                if include_usage:
                    yield sse({**chunk(None, ""), "choices": [], "usage": usage(prompts, choices)})
                yield "data: [DONE]\n\n"
            except Exception as e:  # after the 200: the error goes in the stream
                yield sse(as_api_error(e).body())
            finally:
                await updates.aclose()  # a client gone: abort the requests, free their blocks

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request)
        server.check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or not all(
                isinstance(p, str) or (isinstance(p, list) and all(isinstance(t, int) for t in p)) for p in prompt):
            raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                                "such lists", param="prompt")
        ids = [server.encode(p, i) for i, p in enumerate(prompt)]
        logprobs = _get(body, "logprobs", int)
        echo = bool(_get(body, "echo", bool, False))
        max_tokens = server.max_tokens(body, "max_tokens", ids, 16)
        score_only = echo and max_tokens == 0  # the engine generates one token; Choice drops it
        if max_tokens < 1 and not score_only:
            raise APIError(400, f"'max_tokens' must be >= 1 (0 only with echo, to score the prompt), got {max_tokens}",
                           param="max_tokens")
        # echo + logprobs: the prompt's log-probs too (SamplingParams.prompt_logprobs), as evaluation harnesses ask
        params = sampling_params(body, max(max_tokens, 1), logprobs, logprobs if echo else None)
        prefixes = [(p if isinstance(p, str) else server.llm.decode(i)) if echo else "" for p, i in zip(prompt, ids)]
        choices = [Choice(server, k, params.stop, prefixes[k // params.n], ids[k // params.n] if echo else (),
                          score_only) for k in range(len(ids) * params.n)]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": server.model_name}

        def chunk(ch, piece):
            lp = ch.completion_logprobs(ch.logprobs[ch.added:]) if ch and params.logprobs is not None else None
            return {**head, "choices": [] if ch is None else [
                {"index": ch.index, "text": piece, "logprobs": lp, "finish_reason": ch.finish_reason}]}

        def final(chs):
            return {**head, "choices": [
                {"index": c.index, "text": c.text,
                 "logprobs": c.completion_logprobs(c.logprobs) if params.logprobs is not None else None,
                 "finish_reason": c.finish_reason} for c in chs], "usage": usage(ids, chs)}

        return await respond(request, body, ids, params, choices, chunk, final)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await json_body(request)
        server.check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in PLAIN_ROLES and isinstance(m.get("content"), str)
                for m in messages):
            raise APIError(400, "'messages' must be a non-empty list of {\"role\": system|user|assistant, "
                                "\"content\": string}", param="messages")
        ids = [server.encode(render_chat(messages, server.chat_template), 0)]
        top = _get(body, "top_logprobs", int)
        logprobs = (top or 0) if _get(body, "logprobs", bool, False) else None
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        params = sampling_params(body, server.max_tokens(body, key, ids, None), logprobs)
        choices = [Choice(server, k, params.stop) for k in range(params.n)]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name}
        started = set()

        def chunk(ch, piece):
            if ch is None:
                return head
            delta = {"content": piece}
            if ch.index not in started:
                started.add(ch.index)
                delta["role"] = "assistant"
            lp = ch.chat_logprobs(ch.logprobs[ch.added:]) if logprobs is not None else None
            return {**head, "choices": [{"index": ch.index, "delta": delta, "logprobs": lp,
                                         "finish_reason": ch.finish_reason}]}

        def final(chs):
            return {**head, "object": "chat.completion", "choices": [
                {"index": c.index, "message": {"role": "assistant", "content": c.text},
                 "logprobs": c.chat_logprobs(c.logprobs) if logprobs is not None else None,
                 "finish_reason": c.finish_reason} for c in chs], "usage": usage(ids, chs)}

        return await respond(request, body, ids, params, choices, chunk, final)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "small-llm", "max_model_len": server.ctx}]}

    @app.get("/health")
    async def health():
        if not server.engine.is_alive():
            raise APIError(503, "the engine is not running")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(server.engine.metrics.snapshot()),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def playground():
        return FileResponse(STATIC / "index.html")

    return app


METRICS = [  # (name, type, help, key in the snapshot)
    ("requests_running", "gauge", "Requests being decoded.", "running"),
    ("requests_waiting", "gauge", "Requests waiting for KV blocks or a batch slot.", "waiting"),
    ("kv_blocks_used", "gauge", "KV-cache blocks in use.", "blocks_used"),
    ("kv_blocks_total", "gauge", "KV-cache blocks in the cache.", "blocks_total"),
    ("prefix_cache_query_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.",
     "prefix_query_tokens"),
    ("prefix_cache_hit_tokens_total", "counter", "Prompt tokens found in the prefix cache.", "prefix_hit_tokens"),
    ("prompt_tokens_total", "counter", "Prompt tokens computed by prefill (prefix hits excluded).", "prompt_tokens"),
    ("generation_tokens_total", "counter", "Tokens generated.", "generated_tokens"),
    ("decode_steps_total", "counter", "Decode steps (one forward for every running sequence).", "decode_steps"),
    ("decode_tokens_total", "counter", "Tokens generated by decode steps (over decode_steps: the mean batch).",
     "decode_tokens"),
    ("preemptions_total", "counter", "Sequences preempted for lack of KV blocks.", "preemptions"),
    ("requests_finished_total", "counter", "Requests that finished.", "requests_finished"),
    ("requests_aborted_total", "counter", "Requests aborted (client gone).", "requests_aborted"),
    ("requests_failed_total", "counter", "Requests failed by an engine error.", "requests_failed"),
]


def prometheus_text(snap: dict) -> str:
    """The Prometheus text exposition format, written by hand (no client library needed)."""
    out = []
    for name, kind, help_, key in METRICS:
        out += [f"# HELP smallllm_{name} {help_}", f"# TYPE smallllm_{name} {kind}", f"smallllm_{name} {snap[key]}"]
    q = snap["prefix_query_tokens"]
    out += ["# HELP smallllm_prefix_cache_hit_rate Prefix-cache hits over prompt tokens looked up.",
            "# TYPE smallllm_prefix_cache_hit_rate gauge",
            f"smallllm_prefix_cache_hit_rate {snap['prefix_hit_tokens'] / q if q else 0.0}"]
    for name, help_, h in (("time_to_first_token_seconds", "Time from arrival to the first token.", snap["ttft"]),
                           ("inter_token_latency_seconds", "Time between two tokens of a sample.", snap["itl"])):
        out += [f"# HELP smallllm_{name} {help_}", f"# TYPE smallllm_{name} histogram"]
        out += [f'smallllm_{name}_bucket{{le="{b}"}} {c}' for b, c in zip(h.bounds, h.counts)]
        out += [f'smallllm_{name}_bucket{{le="+Inf"}} {h.n}', f"smallllm_{name}_sum {h.total}",
                f"smallllm_{name}_count {h.n}"]
    return "\n".join(out) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    from generate import OneLineErrorParser

    p = OneLineErrorParser(description="An OpenAI-compatible server for a checkpoint, with a playground at /.")
    p.add_argument("--ckpt", required=True, help="run folder, its checkpoints/ folder, or a checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    p.add_argument("--model-name", default=None, help="the name clients pass as 'model' (default: the folder name)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together at most")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting beyond max-num-seqs before new ones get 429")
    p.add_argument("--num-blocks", type=int, default=None, help="KV budget in blocks (default: from free memory)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="CPU: torch.compile the decode step (see generate.py)")
    p.add_argument("--quantize", choices=["int8"], default=None, help="CPU: int8 weights (see generate.py)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests get to finish before they are aborted")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from generate import InputError, check_device

    args = parse_args(argv)
    try:
        for name in ("max_num_seqs", "block_size", "num_blocks"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if args.max_queue < 0:
            raise InputError(f"--max-queue must be >= 0, got {args.max_queue}")
        import uvicorn

        from checkpoint import CheckpointError
        from engine import LLM

        device = None if args.device == "auto" else check_device(args.device)
        try:
            llm = LLM(args.ckpt, device=device, block_size=args.block_size, num_blocks=args.num_blocks,
                      max_num_seqs=args.max_num_seqs, compile=args.compile, quantize=args.quantize)
            template = load_chat_template(args.ckpt)
        except (CheckpointError, ValueError) as e:
            raise InputError(str(e)) from None
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.model_name or Path(args.ckpt).resolve().name
    app = create_app(Server(llm, name, args.max_queue, template))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=args.drain_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
