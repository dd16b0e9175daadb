"""serve.py as users run it: a real uvicorn server on 127.0.0.1 and real clients (openai, httpx).

Every output is compared with the offline LLM.generate of the same request in this process (the
engine's own tests compare that with full recompute). No outcome depends on the machine's speed: where
it would hang on which thread is faster (requests overlapping, a client leaving mid-request, SIGTERM
mid-stream), the test holds the engine's steps with a StepGate (tests/gated_serve.py), and every wait
is only an upper bound on something that must happen."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from builders import write_checkpoint
from gated_serve import StepGate

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.usefixtures("one_thread")
RUN_NAME = "2026-12-07_16-37-37"


def until(condition, what: str, bound: float = 300.0):
    """Wait for something that must happen (another thread or process catches up). The bound only turns
    a hang into a failure; nothing races it."""
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what} after {bound:.0f} s")
        time.sleep(0.01)


class Running:
    """What the tests do with a running server at self.url (self.http is an httpx client on it)."""

    def metrics(self) -> dict:
        text = self.http.get("/metrics").text
        return {k: float(v) for k, v in (line.split(" ") for line in text.splitlines() if not line.startswith("#"))}


class Server(Running):
    """serve.py in a subprocess on a free port (--port 0; the port is read from uvicorn's log). gated:
    run through tests/gated_serve.py, whose engine takes one step per byte written to self.proc.stdin
    (and all of them once it is closed)."""

    def __init__(self, ckpt, *args, gated=False):
        script = ROOT / "tests" / "gated_serve.py" if gated else ROOT / "serve.py"
        self.proc = subprocess.Popen([sys.executable, str(script), "--ckpt", str(ckpt), "--port", "0",
                                      *map(str, args)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, stdin=subprocess.PIPE if gated else None, text=True)
        self.log = []
        for line in self.proc.stderr:
            self.log.append(line)
            if "Uvicorn running on" in line:
                self.url = line.split("running on ")[1].split()[0]
                break
        else:
            raise RuntimeError("serve.py did not start:\n" + "".join(self.log))
        self.reader = threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True)
        self.reader.start()
        self.http = httpx.Client(base_url=self.url, timeout=300)

    def stop(self):
        self.http.close()
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()  # open the gate: a held engine would keep SIGTERM's drain waiting
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=300)


class InProcess(Running):
    """serve.py's app (create_app) under uvicorn in a thread of this process, on a free port, with its
    engine's steps behind a StepGate the test holds and opens (self.gate), and the app's state at hand
    (self.app.engine.num_in_flight: requests the handlers have handed to the engine thread). `limits`:
    the app state's max_body_bytes."""

    def __init__(self, ckpt, max_num_seqs: int, max_queue: int = 256, **limits):
        import socket

        import uvicorn

        from engine import LLM
        from server.app import Server as AppState, create_app

        llm = LLM(ckpt, device="cpu", max_num_seqs=max_num_seqs)
        self.gate = StepGate(llm.core)
        self.gate.open()
        self.app = AppState(llm, "run", max_queue=max_queue, chat_template=None, **limits)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(create_app(self.app), log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        until(lambda: self.uvicorn.started or not self.thread.is_alive(), "uvicorn to start")
        assert self.uvicorn.started, "uvicorn did not start"
        self.http = httpx.Client(base_url=self.url, timeout=300)

    def stop(self):
        self.http.close()
        self.gate.open()
        self.uvicorn.should_exit = True
        self.thread.join()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder where train.py's default out_dir puts one (runs/<date>/<time>): served by serve.py as
    2026-12-07_16-37-37 (RUN_NAME) unless --served-model-name says otherwise."""
    return write_checkpoint(tmp_path_factory.mktemp("serve") / "runs" / "2026-12-07" / "16-37-37", "gqa")


@pytest.fixture(scope="module")
def server(run_dir):
    s = Server(run_dir, "--max-num-seqs", 32)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def inproc(run_dir):
    s = InProcess(run_dir, max_num_seqs=32)
    yield s
    s.stop()


@pytest.fixture
def gate(inproc):
    """The in-process server's engine held at its next step for this test (opened again after it)."""
    inproc.gate.hold()
    yield inproc.gate
    inproc.gate.open()


@pytest.fixture(scope="module")
def llm(run_dir):
    from engine import LLM

    return LLM(run_dir, device="cpu")


def offline(llm, prompt, **kw):
    from engine import SamplingParams

    return llm.generate([prompt], SamplingParams(**kw))[0]


def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_completions_and_chat_match_offline_generate(server, llm):
    c = client(server)
    model = c.models.list().data[0].id
    assert model == RUN_NAME
    # Greedy, two prompts, not streamed; usage counts and finish reasons.
    r = c.completions.create(model=model, prompt=["To be, or not", "Once upon"], max_tokens=12, temperature=0,
                             extra_body={"ignore_eos": True})
    for i, p in enumerate(["To be, or not", "Once upon"]):
        ref = offline(llm, p, temperature=0, max_new_tokens=12, ignore_eos=True)
        assert r.choices[i].text == ref.text and r.choices[i].finish_reason == "length"
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens == sum(len(llm.encode(p)) for p in
                                                                            ["To be, or not", "Once upon"])
    # Seeded sampling, streamed, with n=2, top_k / min_p / repetition_penalty and a stop string.
    kw = dict(temperature=0.9, top_p=0.95, seed=7, n=2, max_new_tokens=20, ignore_eos=True, top_k=50, min_p=0.02,
              repetition_penalty=1.1)
    ref = offline(llm, "ROMEO:", **kw)
    stop = ref.outputs[1].text[6:8]
    ref_stop = offline(llm, "ROMEO:", **kw, stop=[stop])
    for stops, expect in ((None, ref), ([stop], ref_stop)):
        stream = c.completions.create(model=model, prompt="ROMEO:", max_tokens=20, temperature=0.9, top_p=0.95,
                                      seed=7, n=2, stream=True, stop=stops,
                                      extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.02,
                                                  "repetition_penalty": 1.1})
        texts, reasons = ["", ""], [None, None]
        for chunk in stream:
            for ch in chunk.choices:
                texts[ch.index] += ch.text
                reasons[ch.index] = ch.finish_reason or reasons[ch.index]
        assert texts == [o.text for o in expect.outputs]
        assert reasons == [o.finish_reason for o in expect.outputs]
    assert ref_stop.outputs[1].finish_reason == "stop"
    # echo, and logprobs against log-softmax of the offline logits.
    r = c.completions.create(model=model, prompt="To be", max_tokens=6, temperature=0, echo=True)
    greedy = offline(llm, "To be", temperature=0, max_new_tokens=6, return_logits=True)
    assert r.choices[0].text == "To be" + greedy.text
    r = c.completions.create(model=model, prompt="To be", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ref_lp = greedy.outputs[0].logits.double().log_softmax(-1)
    for k, tok in enumerate(greedy.token_ids):
        assert abs(lp.token_logprobs[k] - ref_lp[k, tok].item()) < 1e-4
        assert len(lp.top_logprobs[k]) <= 3 and max(lp.top_logprobs[k].values()) == pytest.approx(
            ref_lp[k].max().item(), abs=1e-4)
    # Chat with the plain template (this checkpoint has no chat template): replies end at "\nUser:".
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be?"}]
    prompt = "System: Be brief.\n\nUser: To be?\n\nAssistant:"
    ref = offline(llm, prompt, temperature=0, max_new_tokens=10, ignore_eos=True, stop=["\nUser:"])
    r = c.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(llm.encode(prompt))
    ref = offline(llm, prompt, temperature=1.0, seed=3, max_new_tokens=10, ignore_eos=True, stop=["\nUser:"])
    stream = c.chat.completions.create(model=model, messages=messages, max_tokens=10, seed=3, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == ref.text


def test_long_streams_write_what_offline_generate_writes(server, llm):
    """Two 240-token samples of the random model (byte tokens that split characters or never make one),
    streamed: each sample's text is offline LLM.generate's, piece by piece."""
    kw = dict(temperature=1.0, seed=11, n=2, max_new_tokens=240, ignore_eos=True)
    ref = offline(llm, "ROMEO:", **kw)
    assert sum("\ufffd" in llm.decode([t]) for t in ref.outputs[0].token_ids) > 10  # split characters
    body = {"prompt": "ROMEO:", "max_tokens": 240, "temperature": 1.0, "seed": 11, "n": 2, "ignore_eos": True,
            "stream": True}
    texts = ["", ""]
    with server.http.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    texts[ch["index"]] += ch["text"]
    assert texts == [o.text for o in ref.outputs]


def test_32_concurrent_streams_each_as_alone_and_batched(inproc, gate, llm):
    """32 streams at once: each gets what it gets alone (its seed), and they are decoded together. The
    engine is held until all 32 requests reached it, so they share decode steps by construction: at
    most the longest request's count (16 tokens: a prefill and 15 decode steps)."""
    from openai import AsyncOpenAI

    prompts = [f"To be, or not {i}" if i % 2 else "Once upon a time " * (1 + i % 5) for i in range(32)]
    refs = [offline(llm, p, temperature=1.0, seed=i, max_new_tokens=8 + i % 9, ignore_eos=True).text
            for i, p in enumerate(prompts)]
    before = inproc.metrics()

    async def one(c, i):
        stream = await c.completions.create(model="run", prompt=prompts[i], max_tokens=8 + i % 9, seed=i,
                                            stream=True, extra_body={"ignore_eos": True})
        return "".join([ch.choices[0].text async for ch in stream if ch.choices])

    async def all_of_them():
        c = AsyncOpenAI(base_url=inproc.url + "/v1", api_key="unused", max_retries=0)
        try:
            streams = [asyncio.create_task(one(c, i)) for i in range(32)]
            while inproc.app.engine.num_in_flight < 32:  # bounded by wait_for below
                await asyncio.sleep(0.01)
            gate.open()
            return await asyncio.gather(*streams)
        finally:
            await c.close()

    assert asyncio.run(asyncio.wait_for(all_of_them(), 300)) == refs
    after = inproc.metrics()
    steps = after["smallllm_decode_steps_total"] - before["smallllm_decode_steps_total"]
    tokens = after["smallllm_decode_tokens_total"] - before["smallllm_decode_tokens_total"]
    assert steps <= 15, f"{tokens} decode tokens in {steps} steps: the requests did not share steps"
    assert tokens == sum(8 + i % 9 - 1 for i in range(32))
    assert after["smallllm_requests_finished_total"] - before["smallllm_requests_finished_total"] == 32
    assert after["smallllm_kv_blocks_used"] == 0


def test_client_disconnect_aborts_and_frees_blocks(inproc, gate):
    """A client that closes its stream after the first event, while the engine is held before the
    request's second step: the server notices, aborts the request (at most 2 of its 250 tokens made),
    frees its blocks."""
    before = inproc.metrics()
    # logprobs: every token is an event (a token's text alone may be held back: half a character)
    body = {"prompt": "To be", "max_tokens": 250, "stream": True, "ignore_eos": True, "logprobs": 0}
    gate.allow(1)  # the prefill: the first token, the 200 and the first event
    with inproc.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        assert inproc.metrics()["smallllm_kv_blocks_used"] > 0
    assert_aborted_and_freed(inproc, gate, before)


def assert_aborted_and_freed(inproc, gate, before: dict) -> None:
    """The client of the one request in flight (its prefill done, the engine held) has just left."""
    until(lambda: inproc.app.engine.num_in_flight == 0, "the server to notice the disconnect")
    # The handler queued the abort in the same synchronous stretch that left num_in_flight at 0, so a
    # round trip through the server's event loop proves it is in the engine's inbox before its next step.
    assert inproc.http.get("/health").status_code == 200
    gate.open()  # the held step runs (unless the engine took the abort first), then the abort
    until(lambda: any(inproc.metrics()[f"smallllm_requests_{k}_total"] > before[f"smallllm_requests_{k}_total"]
                      for k in ("aborted", "finished")), "the request to end")
    after = inproc.metrics()
    assert after["smallllm_requests_aborted_total"] == before["smallllm_requests_aborted_total"] + 1
    # the prefill's token and at most the held step's (the engine may have taken the abort before it)
    assert after["smallllm_generation_tokens_total"] - before["smallllm_generation_tokens_total"] <= 2
    assert after["smallllm_kv_blocks_used"] == 0 and after["smallllm_requests_running"] == 0


def test_client_gone_before_a_whole_answer_aborts_and_frees_blocks(inproc, gate):
    """A non-streamed request (nothing is written to its client until the answer is whole) whose client
    closes the connection after the prefill, the engine held: the server notices all the same."""
    import socket

    before = inproc.metrics()
    body = json.dumps({"prompt": "To be", "max_tokens": 250, "ignore_eos": True}).encode()
    host, port = inproc.url.removeprefix("http://").split(":")
    gate.allow(1)  # the prefill
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        until(lambda: inproc.metrics()["smallllm_generation_tokens_total"] >
              before["smallllm_generation_tokens_total"], "the prefill")
    assert_aborted_and_freed(inproc, gate, before)


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, llm):
    """Each bad body is a 400 (not a 500, not accepted) in OpenAI's shape, `param` naming the field."""
    long_prompt = "To be, or not to be " * 60
    assert len(llm.encode(long_prompt)) >= llm.cfg.max_seq_len
    chat = "/v1/chat/completions"
    cases = [  # (path, body: JSON or raw bytes, status, param, words in the message)
        ("/v1/completions", b'{"prompt": "x", "max_tokens": ', 400, None, "not a valid JSON"),
        ("/v1/completions", b'{"prompt": "\\ud800"}', 400, None, "Invalid JSON"),  # a lone surrogate
        ("/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None, "recursion"),
        ("/v1/completions", b'{"prompt": "x", "temperature": Infinity}', 400, "temperature", "finite"),
        ("/v1/completions", b'{"prompt": "x", "top_p": NaN}', 400, "top_p", "finite"),
        ("/v1/completions", b'[{"prompt": "x"}]', 400, None, "object"),
        ("/v1/completions", {"prompt": "x", "stream_options": 5, "stream": True}, 400, "stream_options", None),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": "yes"}, "stream": True}, 400,
         "stream_options", "include_usage"),
        ("/v1/completions", {"prompt": "x", "stream": "no"}, 400, "stream", "boolean"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens", "'max_tokens'"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "0 only with echo"),
        ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 21}, 400, "logprobs", "'logprobs'"),
        ("/v1/completions", {"prompt": "x", "top_p": 2}, 400, "top_p", "top_p"),
        ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n", "'n'"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", "temperature"),
        ("/v1/completions", {"prompt": "x", "temperature": "0.5"}, 400, "temperature", "temperature"),
        ("/v1/completions", {"prompt": "x", "seed": 1.5}, 400, "seed", "integer"),
        ("/v1/completions", {"prompt": "x", "stop": ["a", ""]}, 400, "stop", "stop"),
        ("/v1/completions", {"prompt": long_prompt}, 400, "prompt", "context"),
        ("/v1/completions", {"prompt": long_prompt, "stream": True}, 400, "prompt", "context"),
        ("/v1/completions", {"prompt": 5}, 400, "prompt", "prompt"),
        ("/v1/completions", {"prompt": []}, 400, "prompt", "prompt"),
        ("/v1/completions", {"prompt": [5, 100000]}, 400, "prompt", "vocabulary"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model", "gpt-4"),
        (chat, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages", "messages.0.role"),
        (chat, {"messages": []}, 400, "messages", "messages"),
        (chat, b'{"messages": [{"role": "user", "content": "\\udc00"}]}', 400, None, "Invalid JSON"),
        (chat, {"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, 400, "logprobs", "boolean"),
        (chat, {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400,
         "max_completion_tokens", None),
    ]
    for path, body, status, param, words in cases:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = server.http.post(path, headers={"Content-Type": "application/json"}, **kw)
        assert r.status_code == status, (body[:100], r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["param"] == param and err["type"] == ("invalid_request_error" if status == 400 else
                                                         "not_found_error"), (body[:100], err)
        if words:
            assert words in err["message"], (body[:100], err)
    # Null is the default, as in OpenAI's API; unknown fields are ignored.
    r = server.http.post("/v1/completions", json={"prompt": "To be", "max_tokens": 2, "temperature": None,
                                                  "stop": None, "presence_penalty": 0})
    assert r.status_code == 200, r.text
    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        client(server).completions.create(model="nope", prompt="x")
    r = server.http.post("/v1/completions", json={"prompt": "To be", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == offline(llm, "To be", temperature=0,
                                                                               max_new_tokens=3).text
    assert server.http.get("/health").json() == {"status": "ok"}
    assert server.metrics()["smallllm_kv_blocks_used"] == 0


def test_queue_limit_and_sigterm_drain(run_dir, llm):
    """The real command (tests/gated_serve.py: serve.py with the engine's steps fed from stdin), with
    --max-num-seqs 1 --max-queue 0: a second request while one runs gets 429. SIGTERM while a stream is
    in flight (the engine is held after its first token): the server stops accepting connections, the
    stream still completes once the engine goes on, then the server exits."""
    s = Server(run_dir, "--max-num-seqs", 1, "--max-queue", 0, "--drain-timeout", 600, gated=True)
    try:
        body = {"prompt": "Once", "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True,
                "logprobs": 0}  # every token is an event (a token's text alone may be held back)
        s.proc.stdin.write("x")  # one step: the prefill, whose token is the first event
        s.proc.stdin.flush()
        with s.http.stream("POST", "/v1/completions", json=body) as r:
            events = (line[6:] for line in r.iter_lines() if line.startswith("data: "))
            text = json.loads(next(events))["choices"][0]["text"]
            busy = s.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
            s.proc.send_signal(signal.SIGTERM)

            def refused():
                try:
                    httpx.get(s.url + "/health", timeout=300)
                except httpx.ConnectError:
                    return True
                except httpx.TransportError:  # accepted just before the listening socket closed, then dropped
                    pass
                return False

            until(refused, "the server to stop accepting connections")
            s.proc.stdin.close()  # the engine runs freely: the stream completes
            for data in events:
                if data == "[DONE]":
                    break
                text += json.loads(data)["choices"][0]["text"]
            else:
                raise AssertionError("the stream ended without [DONE]")
        assert text == offline(llm, "Once", temperature=0, max_new_tokens=200, ignore_eos=True).text
        # uvicorn drains, shuts the app down, then re-raises the signal: the conventional exit for SIGTERM
        assert s.proc.wait(timeout=300) == -signal.SIGTERM
        s.reader.join(timeout=300)
        assert any("Finished server process" in line for line in s.log), "".join(s.log)
    finally:
        s.stop()


@contextmanager
def browser_page(shot: Path):
    """A page of Debian's headless Chromium (driven by playwright), every wait on it bounded by 300 s (an upper
    bound on what must happen, not a race); a screenshot is saved at `shot` when the test fails."""
    from playwright.sync_api import sync_playwright

    if not Path("/usr/bin/chromium").exists():
        pytest.fail("Chromium is missing: apt-get install -y chromium (.ci/run does it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"], timeout=300_000)
        page = browser.new_page()
        page.set_default_timeout(300_000)
        try:
            yield page
        except Exception:
            page.screenshot(path=str(shot))
            print(f"screenshot: {shot}")
            raise
        finally:
            browser.close()


def test_playground_in_headless_chromium(server, llm, tmp_path):
    """The page at /: type a prompt, press Generate, the streamed completion appears (Debian's chromium
    driven by playwright; a screenshot is saved in the test's tmp folder when it fails)."""
    expect = offline(llm, "Once upon", temperature=0, max_new_tokens=12).text
    with browser_page(tmp_path / "playground.png") as page:
        page.goto(server.url + "/")
        page.wait_for_function(f"document.getElementById('model').textContent === '{RUN_NAME}'")
        page.fill("#prompt", "Once upon")
        page.fill("#max_tokens", "12")
        page.fill("#temperature", "0")
        page.click("#generate")
        page.wait_for_function("document.getElementById('gen_stats').textContent.includes('finish: length')")
        page.wait_for_function("document.getElementById('gen_stats').textContent.startsWith('12 tokens')")
        assert page.text_content("#completion") == expect
        assert page.text_content("#error") == ""
        page.wait_for_function("document.getElementById('server_stats').textContent.includes('KV blocks')")


def test_bench_serve_runs_end_to_end(server):
    """scripts/bench_serve.py against the running server: every request writes its full output length
    in every run (figures themselves are not checked: they depend on the machine)."""
    from scripts.bench_serve import make_requests

    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_serve.py"), "--url", server.url, "--json",
                          "--num-requests", "6", "--rates", "50,200", "--output-tokens", "4,12", "--prompt-words", "2,20",
                          "--seed", "3"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    expect = sum(r["max_tokens"] for r in make_requests(6, 3, (2, 20), (4, 12)))
    assert [r["run"] for r in rows] == ["one at a time", "poisson 50/s", "poisson 200/s"]
    assert all(r["requests"] == 6 and r["output_tokens"] == expect and r["tokens_per_s"] > 0 for r in rows)


def test_default_served_model_name(run_dir, tmp_path):
    """The name clients pass as 'model' without --served-model-name: the run folder's, from any folder
    of the run; a Hugging Face folder's own name. (The served name itself: test_completions_... and
    test_serve_limits.py's --served-model-name.)"""
    from checkpoint.hf import write_hf_folder
    from checkpoint.load import load_pretrained
    from checkpoint import load_chat_template
    from serve import default_model_name

    ckpt = (run_dir / "checkpoints" / "latest").resolve()
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "latest", ckpt):
        assert default_model_name(str(folder)) == RUN_NAME, folder
    plain = write_checkpoint(tmp_path / "shakespeare", "gqa")
    assert default_model_name(str(plain / "checkpoints")) == "shakespeare"
    p = load_pretrained(run_dir)
    hf = tmp_path / "exports" / "tiny-hf"  # sharded: no model.safetensors, which our checkpoints have
    write_hf_folder(hf, p.config, p.state_dict, p.tokenizer_path, p.eos_id, max_shard_bytes=40_000)
    assert default_model_name(str(hf)) == "tiny-hf" and load_chat_template(str(hf)) is None


def test_chat_template_from_tokenizer_config(run_dir, tmp_path):
    """A tokenizer_config.json beside the weights (as Hugging Face exports write it) sets the chat
    prompt; without one the plain template is used."""
    import shutil

    from checkpoint import load_chat_template
    from server.chat import render_chat

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert load_chat_template(str(run_dir)) is None
    assert render_chat(messages, None) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, symlinks=True)
    template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    ckpt = (run / "checkpoints" / "latest").resolve()
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    found = load_chat_template(str(run))
    assert found == template
    assert render_chat(messages, found) == \
        "<|system|>Be brief.<|endoftext|><|user|>Hi<|endoftext|><|assistant|>"


def test_engine_thread_fails_one_request_and_keeps_serving(run_dir):
    """In-process: a failing prefill fails only the request in it (one running, held mid-request by the
    gate until the failing one is queued, finishes intact); a failure outside any request (the
    scheduler) fails those in flight and the engine serves the next."""
    from engine import LLM, SamplingParams
    from engine.async_engine import AsyncEngine

    llm = LLM(run_dir, device="cpu")
    sp = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    ref = llm.generate([[5, 6, 7]], sp)[0].token_ids
    engine = AsyncEngine(llm.core)
    gate = StepGate(llm.core)
    real_run, real_schedule = llm.runner.run, llm.core.scheduler.schedule

    def failing_prefill(seqs, is_prefill):
        if is_prefill:
            raise RuntimeError("injected prefill failure")
        return real_run(seqs, is_prefill)

    def failing_schedule():
        llm.core.scheduler.schedule = real_schedule  # once
        raise RuntimeError("injected scheduler failure")

    async def scenario():
        a = engine.generate([5, 6, 7], sp)
        gate.allow(1)
        tokens = [(await a.__anext__()).token]  # a is running; the engine is held before its next step
        llm.runner.run = failing_prefill
        b = asyncio.create_task(engine.generate([9, 9], sp).__anext__())
        while engine.num_in_flight < 2:  # b is in the engine's inbox (bounded by wait_for below)
            await asyncio.sleep(0.01)
        gate.open()
        with pytest.raises(RuntimeError, match="prefill failure"):
            await b
        llm.runner.run = real_run
        tokens += [up.token async for up in a]
        assert tokens == ref
        llm.core.scheduler.schedule = failing_schedule
        with pytest.raises(RuntimeError, match="scheduler failure"):
            async for _ in engine.generate([5, 6, 7], sp):
                pass
        return [up.token async for up in engine.generate([5, 6, 7], sp)]

    engine.start()
    try:
        assert asyncio.run(asyncio.wait_for(scenario(), 300)) == ref  # a dead engine thread: a failure, not a hang
    finally:
        engine.close()
    m = engine.metrics
    value = m.registry.get_sample_value  # a figure as /metrics shows it
    assert value("smallllm_requests_failed_total") == 2 and value("smallllm_requests_finished_total") == 2
    assert m.gauges["blocks_used"] == 0
    assert llm.block_manager.num_used_blocks == 0


def test_bad_command_lines_give_one_line_errors(tmp_path):
    cases = {"missing checkpoint": (["--ckpt", tmp_path / "nope"], "does not exist"),
             "no batch": (["--ckpt", tmp_path, "--max-num-seqs", 0], "--max-num-seqs"),
             "bad queue": (["--ckpt", tmp_path, "--max-queue", -1], "--max-queue"),
             "bad port": (["--ckpt", tmp_path, "--port", "x"], "--port")}
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "serve.py"), *map(str, args)], cwd=ROOT, env=ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, _) in cases.items()}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)  # an upper bound: python and torch start
        lines = err.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert cases[name][1] in lines[0] and out == "", (name, lines[0])
