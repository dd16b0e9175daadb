"""serve.py's limits and failure paths, with a real server on 127.0.0.1 (uvicorn in a thread with the
engine's steps gated, or serve.py itself) and real clients (httpx, raw sockets). As in test_serve.py,
the engine is held where an outcome would otherwise depend on which thread is faster, and every wait
is only an upper bound on something that must happen."""

import asyncio
import http.client
import json
import signal
import socket
import threading

import httpx
import pytest

from builders import write_checkpoint
from test_serve import InProcess, Server, until

pytestmark = pytest.mark.usefixtures("one_thread")

BODY = {"prompt": "To be", "max_tokens": 2, "ignore_eos": True}
# logprobs: every token is an event (a token's text alone may be held back: half a character)
STREAM = {**BODY, "max_tokens": 50, "stream": True, "logprobs": 0}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("limits") / "run", "gqa")


@pytest.fixture(scope="module")
def small(run_dir):
    """4 running and 8 waiting samples (12 places), bodies up to 4096 bytes."""
    s = InProcess(run_dir, max_num_seqs=4, max_queue=8, max_body_bytes=4096)
    yield s
    s.stop()


def settle(s: InProcess, *waves: list[dict]):
    """With the engine held, send each wave of single-prompt bodies at once, the next once each request
    before it is refused or handed to the engine; then return the statuses answered by then (None: in
    flight), open the engine, and return every response."""
    async def scenario():
        async with httpx.AsyncClient(base_url=s.url, timeout=300) as c:
            tasks = []
            for wave in waves:
                tasks += [asyncio.create_task(c.post("/v1/completions", json=b)) for b in wave]
                while sum(t.done() for t in tasks) + s.app.engine.num_in_flight < len(tasks):
                    await asyncio.sleep(0.01)  # bounded by wait_for below
            early = [t.result().status_code if t.done() else None for t in tasks]
            s.gate.open()
            return early, await asyncio.gather(*tasks)

    s.gate.hold()
    try:
        return asyncio.run(asyncio.wait_for(scenario(), 300))
    finally:
        s.gate.open()


def test_simultaneous_requests_are_admitted_up_to_max_num_seqs_plus_max_queue(small):
    """31 requests at once: exactly 4 + 8 get in, the 19 others get 429 at once (the check and the count
    it reads are one synchronous step: before, all 31 passed a check whose counter rose later)."""
    early, responses = settle(small, [BODY] * 31)
    assert sorted(early, key=str) == [429] * 19 + [None] * 12
    assert sorted(r.status_code for r in responses) == [200] * 12 + [429] * 19
    busy = next(r for r in responses if r.status_code == 429).json()["error"]
    assert busy["type"] == "rate_limit_error" and "capacity" in busy["message"]
    assert all(len(r.json()["choices"]) == 1 for r in responses if r.status_code == 200)
    assert small.metrics()["smallllm_samples_admitted"] == 0


def test_n_counts_as_n_samples_and_is_capped(small):
    """Requests with n=5 and n=5 take 10 of the 12 places: then n=3 is refused and n=2 gets in. An n (or
    prompts x n) that could never fit is a 400 naming the cap."""
    for body in ({**BODY, "n": 100000}, {**BODY, "n": 13}, {**BODY, "prompt": ["a"] * 7, "n": 2}):
        r = small.http.post("/v1/completions", json=body)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "n" and "at most 12" in err["message"], r.text
    r = small.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "n": 13})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    early, responses = settle(small, [{**BODY, "n": 5}] * 2, [{**BODY, "n": 3}], [{**BODY, "n": 2}])
    assert early == [None, None, 429, None]
    assert [r.status_code for r in responses] == [200, 200, 429, 200]
    assert [len(r.json()["choices"]) for r in responses if r.status_code == 200] == [5, 5, 2]


def raw_response(url: str, request: bytes, *more: bytes) -> tuple[int, dict]:
    """Send request bytes on a socket (never the rest of the body they announce) and read the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        for part in (request, *more):
            sock.sendall(part)
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        return answer.status, json.loads(answer.read())


def test_oversized_bodies_get_413_before_they_are_read(small):
    """A Content-Length over the limit: 413 with none of the body sent. A chunked body: 413 once the
    chunks pass the limit, its end never sent. Either way the server had not read the body whole
    (it could not: the client never sent it), and goes on serving."""
    head = b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    status, body = raw_response(small.url, head + b"Content-Length: 10000000\r\n\r\n")
    assert status == 413 and "4096 bytes" in body["error"]["message"] and "--max-body-bytes" in body["error"]["message"]
    chunk = b"1000\r\n" + b" " * 0x1000 + b"\r\n"  # 4096 bytes a chunk: the second one passes the limit
    status, body = raw_response(small.url, head + b"Transfer-Encoding: chunked\r\n\r\n", chunk, chunk)
    assert status == 413, body
    padded = json.dumps({**BODY, "user": "x" * 3900}).encode()  # under the limit: served
    assert len(padded) <= 4096 and small.http.post("/v1/completions", content=padded).status_code == 200


class HeldTokenizer:
    """The LLM's tokenizer, with encode_batch held until the test lets it go."""

    def __init__(self, real):
        self.real, self.entered, self.release = real, threading.Event(), threading.Event()

    def encode_batch(self, texts):
        self.entered.set()
        self.release.wait(120)
        return self.real.encode_batch(texts)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_tokenizing_does_not_hold_up_the_event_loop(small):
    """While a prompt is being tokenized (held here; a 10 MB prompt took 10 s) /health answers: the
    server tokenizes in a worker thread, with the tokenizer's encode_batch, which lets go of the GIL
    (its encode does not: a thread calling it would still stop the event loop)."""
    real = small.app.llm.tokenizer
    small.app.llm.tokenizer = held = HeldTokenizer(real)
    answers = []
    sender = threading.Thread(target=lambda: answers.append(httpx.post(small.url + "/v1/completions", json=BODY,
                                                                       timeout=300)))
    try:
        sender.start()
        assert held.entered.wait(300), "the prompt was never tokenized"
        assert small.http.get("/health", timeout=60).json() == {"status": "ok"}
    finally:
        held.release.set()
        sender.join(300)
        small.app.llm.tokenizer = real
    assert answers[0].status_code == 200


def stream_events(response):
    return (line[6:] for line in response.iter_lines() if line.startswith("data: "))


def inject(s: InProcess, where: str) -> None:
    """Make the engine thread's own code raise (not the forward of one request, which fails it alone)."""
    def boom(*args):
        raise RuntimeError(f"injected failure in {where}")

    engine, core = s.app.engine, s.app.llm.core
    if where == "fail":  # a step that raises, then the clean-up of its requests raises too
        s.app.llm.runner.run = boom
        core.fail = boom
    else:
        setattr(engine, where, boom)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # its traceback: the log
@pytest.mark.parametrize("where", ["_deliver", "_drain_inbox", "fail"])
def test_a_dead_engine_thread_answers_every_open_request(run_dir, where):
    """One stream running (its first event read) and one request waiting, then the engine thread's own
    code raises: the stream ends with an error event, the waiting request gets a JSON 503, /health says
    why with a 503, and a new request gets a 503: nothing waits forever."""
    s = InProcess(run_dir, max_num_seqs=1)
    s.gate.hold()
    answers = []
    try:
        s.gate.allow(1)  # the stream's prefill: its first token
        with s.http.stream("POST", "/v1/completions", json=STREAM) as r:
            events = stream_events(r)
            assert "choices" in json.loads(next(events))
            waiting = threading.Thread(target=lambda: answers.append(
                httpx.post(s.url + "/v1/completions", json=BODY, timeout=300)))
            waiting.start()
            until(lambda: s.app.engine.num_in_flight == 2, "the second request to reach the engine")
            inject(s, where)
            s.gate.open()
            rest = list(events)
        waiting.join(300)
        assert "[DONE]" not in rest and "the engine stopped" in json.loads(rest[-1])["error"]["message"]
        assert answers[0].status_code == 503 and f"injected failure in {where}" in answers[0].json()["error"]["message"]
        health = s.http.get("/health")
        assert health.status_code == 503 and "restart the server" in health.json()["error"]["message"]
        assert s.http.post("/v1/completions", json=BODY).status_code == 503
    finally:
        s.stop()


def test_sigterm_drain_timeout_answers_queued_requests_and_ends_streams(run_dir):
    """serve.py (gated: the engine stays held after the stream's first token) with --drain-timeout 1: on
    SIGTERM, past the deadline the running stream ends with an error event and the waiting request gets
    a 503; then the process exits as SIGTERM asks. Also --served-model-name and --max-body-bytes."""
    s = Server(run_dir, "--max-num-seqs", 1, "--max-queue", 4, "--drain-timeout", 1, "--served-model-name", "custom",
               "--max-body-bytes", 2048, gated=True)
    answers = []
    try:
        assert s.http.get("/v1/models").json()["data"][0]["id"] == "custom"
        assert s.http.post("/v1/completions", json={**BODY, "user": "x" * 2048}).status_code == 413
        s.proc.stdin.write("x")  # one step: the stream's prefill
        s.proc.stdin.flush()
        with s.http.stream("POST", "/v1/completions", json={**STREAM, "model": "custom"}) as r:
            events = stream_events(r)
            assert "choices" in json.loads(next(events))
            waiting = threading.Thread(target=lambda: answers.append(
                httpx.post(s.url + "/v1/completions", json=BODY, timeout=300)))
            waiting.start()
            until(lambda: s.metrics()["smallllm_samples_admitted"] == 2, "the second request to be admitted")
            s.proc.send_signal(signal.SIGTERM)
            rest = list(events)
        waiting.join(300)
        assert "[DONE]" not in rest and "--drain-timeout 1 s" in json.loads(rest[-1])["error"]["message"]
        assert answers[0].status_code == 503 and answers[0].json()["error"]["type"] == "server_error"
        s.proc.stdin.close()  # the engine may finish its held step and stop
        assert s.proc.wait(timeout=300) == -signal.SIGTERM
    finally:
        s.stop()
