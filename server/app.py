"""The FastAPI app of serve.py: the routes, over one Server (the app's state, app.state.server).

A generation request goes: parse (protocol.py) -> admit (one synchronous check-and-take of the
server's places, so requests arriving together cannot all pass) -> prepare in a worker thread
(the chat template, tokenizing: a long prompt does not hold up the event loop) -> run on the engine
thread (engine/async_engine.py) -> write the answer whole or as server-sent events (openai_format.py).
"""

import asyncio
import time
import uuid
import weakref
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

from engine import RequestTooLarge, SamplingParams
from engine.async_engine import AsyncEngine, EngineStopped
from engine.core import check_prompt

from .chat import render_chat, reply_ends
from .openai_format import Sample, chat_body, chat_chunk, completion_body, completion_chunk, sse, usage
from .protocol import APIError, ChatRequest, CompletionRequest, parse

STATIC = Path(__file__).resolve().parents[1] / "static"
MAX_BODY_BYTES = 4 * 2 ** 20  # serve.py --max-body-bytes: far over any prompt that fits a small model's context


class Server:
    """The app's state: the LLM, its engine thread, the served name and the limits.

    capacity: samples (a request's prompts times its n) running or waiting at once, max_num_seqs +
    max_queue; `admitted` counts those of the requests being answered (event loop only)."""

    def __init__(self, llm, model_name: str, max_queue: int, chat_template: Optional[str],
                 max_body_bytes: int = MAX_BODY_BYTES):
        self.llm, self.model_name, self.max_queue = llm, model_name, max_queue
        self.chat_template, self.max_body_bytes = chat_template, max_body_bytes
        self.chat_stops, self.chat_stop_ids = reply_ends(chat_template, llm.tokenizer)
        self.engine = AsyncEngine(llm.core)
        self.ctx = llm.cfg.max_seq_len
        self.capacity = llm.config.max_num_seqs + max_queue
        self.admitted = 0
        Gauge("smallllm_samples_admitted", "Samples of the requests being answered (at most --max-num-seqs + "
              "--max-queue).", registry=self.engine.metrics.registry).set_function(lambda: self.admitted)
        self.created = int(time.time())

    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist: this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def admit(self, samples: int) -> "Ticket":
        """Take `samples` places or refuse: checked and taken with no await in between."""
        if not self.engine.is_alive():
            raise APIError(503, self.engine.stopped or "the engine is not running")
        if samples > self.capacity:
            raise APIError(400, f"this request asks for {samples} samples (prompts x n) but the server holds at "
                                f"most {self.capacity} at once (--max-num-seqs {self.llm.config.max_num_seqs} + --max-queue "
                                f"{self.max_queue}): lower n or send fewer prompts", param="n")
        if self.admitted + samples > self.capacity:
            raise APIError(429, f"the server is at capacity ({self.admitted} of {self.capacity} samples running or "
                                "waiting: --max-num-seqs + --max-queue): retry later")
        self.admitted += samples
        return Ticket(self, samples)

    def tokenize(self, prompts: list) -> list[list[int]]:
        """Token ids of each prompt (a string or token ids), each checked: a 400 naming the prompt. Runs
        in a worker thread: the tokenizer's encode_batch lets go of the GIL (its encode does not)."""
        texts = [p for p in prompts if isinstance(p, str)]
        if texts and self.llm.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send token ids", param="prompt")
        encoded = iter(self.llm.tokenizer.encode_batch(texts) if texts else ())
        ids = [next(encoded).ids if isinstance(p, str) else p for p in prompts]
        for i, p in enumerate(ids):
            try:
                check_prompt(p, self.ctx, self.llm.cfg.vocab_size, i)
            except ValueError as e:
                raise APIError(400, str(e), param="prompt") from None
        return ids


class Ticket:
    """Places taken by admit(), given back once (when the answer is written, or it failed)."""

    def __init__(self, server: Server, samples: int):
        self.server, self.samples = server, samples

    def release(self) -> None:
        self.server.admitted -= self.samples
        self.samples = 0  # a second call gives back nothing


@dataclass
class Job:
    """A prepared generation: the prompts' ids, their params, the samples being written and the body
    formats (chunk(sample or None, new text), body(samples, prompts))."""
    prompts: list[list[int]]
    params: SamplingParams
    samples: list[Sample]
    chunk: Callable
    body: Callable


def sampling_params(req, max_tokens: int, logprobs: Optional[int], prompt_logprobs: Optional[int] = None):
    return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                          repetition_penalty=req.repetition_penalty, max_new_tokens=max_tokens, stop=req.stops,
                          ignore_eos=req.ignore_eos, seed=req.seed, n=req.n, logprobs=logprobs,
                          prompt_logprobs=prompt_logprobs)


def head(server: Server, prefix: str, kind: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": server.model_name}


# ---- the routes -------------------------------------------------------------------------------------
router = APIRouter()


def state(request: Request) -> Server:
    return request.app.state.server


@router.post("/v1/completions")
async def completions(request: Request):
    server = state(request)
    req = parse(CompletionRequest, await request.body())
    server.check_model(req.model)
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "'max_tokens' must be >= 1 (0 only with echo, to score the prompt)", param="max_tokens")
    return await respond(request, server, req, len(req.prompts), partial(completion_job, server, req))


def completion_job(server: Server, req: CompletionRequest) -> Job:
    prompts, echo, n = req.prompts, req.echo, req.n
    ids = server.tokenize(prompts)
    score_only = echo and req.max_tokens == 0  # the engine generates one token; the Sample drops it
    # echo + logprobs: the prompt's log-probs too (SamplingParams.prompt_logprobs), as evaluation harnesses ask
    params = sampling_params(req, max(req.max_tokens, 1), req.logprobs, req.logprobs if echo else None)
    prefixes = [(p if isinstance(p, str) else server.llm.decode(i)) if echo else "" for p, i in zip(prompts, ids)]
    samples = [Sample(k, server.llm.decode, params.stop, prefixes[k // n], ids[k // n] if echo else (), score_only)
               for k in range(len(ids) * n)]
    h, lp = head(server, "cmpl", "text_completion"), req.logprobs is not None
    return Job(ids, params, samples, partial(completion_chunk, h, lp), partial(completion_body, h, lp))


@router.post("/v1/chat/completions")
async def chat(request: Request):
    server = state(request)
    req = parse(ChatRequest, await request.body())
    server.check_model(req.model)
    return await respond(request, server, req, 1, partial(chat_job, server, req))


def chat_job(server: Server, req: ChatRequest) -> Job:
    messages = [m.model_dump() for m in req.messages]
    ids = server.tokenize([render_chat(messages, server.chat_template)])
    max_tokens = req.max_completion_tokens or req.max_tokens or max(1, server.ctx - len(ids[0]))
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = replace(sampling_params(req, max_tokens, logprobs), stop=req.stops + server.chat_stops,
                     stop_token_ids=server.chat_stop_ids)
    samples = [Sample(k, server.llm.decode, params.stop) for k in range(req.n)]
    h, lp = head(server, "chatcmpl", "chat.completion"), logprobs is not None
    return Job(ids, params, samples, partial(chat_chunk, h, lp), partial(chat_body, h, lp))


@router.get("/v1/models")
async def models(request: Request):
    server = state(request)
    return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                        "owned_by": "small-llm", "max_model_len": server.ctx}]}


@router.get("/health")
async def health(request: Request):
    engine = state(request).engine
    if not engine.is_alive():
        raise APIError(503, engine.stopped or "the engine is not running")
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: Request):
    return Response(generate_latest(state(request).engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/")
async def playground():
    return FileResponse(STATIC / "index.html")


# ---- answering --------------------------------------------------------------------------------------
async def respond(request: Request, server: Server, req, num_prompts: int, prepare: Callable[[], Job]):
    """Admit the request's samples, prepare it off the event loop, then answer it whole or streamed.
    The places are given back when the answer is written (a stream: when it ends)."""
    ticket = server.admit(num_prompts * req.n)
    streaming = False
    try:
        job = await asyncio.to_thread(prepare)
        if not req.stream:
            return await whole_answer(request, server, job)
        answer = await stream(server, job, req.include_usage, ticket)
        streaming = True
        return answer
    finally:
        if not streaming:
            ticket.release()


def as_api_error(e: Exception) -> APIError:
    """What an exception out of a generation tells the client."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, RequestTooLarge):
        return APIError(400, str(e))
    if isinstance(e, EngineStopped):
        return APIError(503, str(e))
    return APIError(500, f"generation failed: {type(e).__name__}: {e}")


async def whole_answer(request: Request, server: Server, job: Job) -> Response:
    n = job.params.n

    async def collect():
        async for i, up in merged(server, job.prompts, job.params):
            job.samples[i * n + up.sample_index].add(up)
        return job.body(job.samples, job.prompts)

    try:
        answer = await unless_disconnected(request, collect())
    except Exception as e:
        raise as_api_error(e) from None
    # None: nobody is there to read a response (499, nginx's "client closed request", for the log)
    return JSONResponse(answer) if answer is not None else Response(status_code=499)


async def stream(server: Server, job: Job, include_usage: bool, ticket: Ticket) -> StreamingResponse:
    """Server-sent events; the first update (or the error of a request the engine refused) comes before
    the 200. An error after it (the engine failed, or stopped: SIGTERM's deadline) is the last event."""
    n = job.params.n
    updates = merged(server, job.prompts, job.params)
    try:
        first = await anext(updates, None)
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
                s = job.samples[i * n + up.sample_index]
                piece = s.add(up)
                if piece or up.finish_reason is not None or up.logprobs is not None:
                    yield sse(job.chunk(s, piece))
            if include_usage:
                yield sse({**job.chunk(None, ""), "usage": usage(job.prompts, job.samples)})
            yield "data: [DONE]\n\n"
        except Exception as e:
            yield sse(as_api_error(e).body())
        finally:
            ticket.release()
            await updates.aclose()  # a client gone: abort the requests, free their blocks

    body = events()
    weakref.finalize(body, ticket.release)  # a client gone before the first event: body's finally never runs
    return StreamingResponse(body, media_type="text/event-stream")


async def merged(server: Server, prompts: list[list[int]], params):
    """(prompt index, update) of every prompt's request, as they come; all aborted if the consumer stops."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, ids):
        try:
            async for up in server.engine.generate(ids, params):
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


async def unless_disconnected(request: Request, work):
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
        task.cancel()  # no-op once it is done
        await asyncio.gather(task, watch, return_exceptions=True)
    return None if task.cancelled() else task.result()


# ---- the app ----------------------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: a body over max_bytes gets a 413 without being read whole: at once when its
    Content-Length says so, else (a chunked body) as soon as the bytes read pass the limit. (uvicorn
    discards the rest of a body once the response is sent, so the client still reads the 413.)"""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"the request body is over {self.max_bytes} bytes (serve.py --max-body-bytes)")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and int(length) > self.max_bytes:  # uvicorn has checked it is a number
            return await JSONResponse(too_large.body(), 413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, counted, send)


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        server.engine.close()  # after uvicorn drained the connections (SIGTERM)

    app = FastAPI(title="small-llm", lifespan=lifespan)
    app.state.server = server
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, max_bytes=server.max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)  # FastAPI's own: an unknown path, a wrong method
    async def http_error(request, e: HTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)  # a bug: a JSON 500 (the traceback goes to the log)
    async def server_error(request, e: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    return app
