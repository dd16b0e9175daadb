"""serve.py as users run it: a real uvicorn server on 127.0.0.1 and real clients (openai, httpx).

Every output is compared with the offline LLM.generate of the same request in this process (the
engine's own tests compare that with full recompute)."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from builders import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.usefixtures("one_thread")


class Server:
    """serve.py in a subprocess on a free port (--port 0; the port is read from uvicorn's log)."""

    def __init__(self, ckpt, *args):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--ckpt", str(ckpt), "--port", "0",
                                      *map(str, args)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
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
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def metrics(self) -> dict:
        text = self.http.get("/metrics").text
        return {k: float(v) for k, v in (line.split(" ") for line in text.splitlines() if not line.startswith("#"))}

    def wait_metric(self, name, predicate):
        """Poll /metrics until predicate(value) holds (the engine thread catches up asynchronously)."""
        for _ in range(600):
            value = self.metrics()[name]
            if predicate(value):
                return value
            time.sleep(0.05)
        raise AssertionError(f"{name} stayed at {value}")

    def stop(self):
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("serve") / "run", "gqa")


@pytest.fixture(scope="module")
def server(run_dir):
    s = Server(run_dir, "--max-num-seqs", 32)
    yield s
    s.stop()


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
    assert model == "run"
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
    # Chat with the plain template (this checkpoint has no chat template), not streamed and streamed.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be?"}]
    prompt = "System: Be brief.\n\nUser: To be?\n\nAssistant:"
    ref = offline(llm, prompt, temperature=0, max_new_tokens=10, ignore_eos=True)
    r = c.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(llm.encode(prompt))
    ref = offline(llm, prompt, temperature=1.0, seed=3, max_new_tokens=10, ignore_eos=True)
    stream = c.chat.completions.create(model=model, messages=messages, max_tokens=10, seed=3, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == ref.text


def test_32_concurrent_streams_each_as_alone_and_batched(server, llm):
    from openai import AsyncOpenAI

    prompts = [f"To be, or not {i}" if i % 2 else "Once upon a time " * (1 + i % 5) for i in range(32)]
    refs = [offline(llm, p, temperature=1.0, seed=i, max_new_tokens=8 + i % 9, ignore_eos=True).text
            for i, p in enumerate(prompts)]
    before = server.metrics()

    async def one(c, i):
        stream = await c.completions.create(model="run", prompt=prompts[i], max_tokens=8 + i % 9, seed=i,
                                            stream=True, extra_body={"ignore_eos": True})
        return "".join([ch.choices[0].text async for ch in stream if ch.choices])

    async def all_of_them():
        c = AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        try:
            return await asyncio.gather(*(one(c, i) for i in range(32)))
        finally:
            await c.close()

    assert asyncio.run(all_of_them()) == refs
    after = server.metrics()
    steps = after["smallllm_decode_steps_total"] - before["smallllm_decode_steps_total"]
    tokens = after["smallllm_decode_tokens_total"] - before["smallllm_decode_tokens_total"]
    assert tokens / steps > 2, f"{tokens} decode tokens in {steps} steps: the requests did not share steps"
    assert after["smallllm_requests_finished_total"] - before["smallllm_requests_finished_total"] == 32
    assert after["smallllm_kv_blocks_used"] == 0


def test_client_disconnect_aborts_and_frees_blocks(server):
    aborted = server.metrics()["smallllm_requests_aborted_total"]
    body = {"prompt": "To be", "max_tokens": 250, "stream": True, "ignore_eos": True}
    with server.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        assert server.metrics()["smallllm_kv_blocks_used"] > 0
    # closed after the first event: the server notices, aborts the request, frees its blocks
    server.wait_metric("smallllm_requests_aborted_total", lambda v: v == aborted + 1)
    server.wait_metric("smallllm_kv_blocks_used", lambda v: v == 0)
    assert server.metrics()["smallllm_requests_running"] == 0


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, llm):
    long_prompt = "To be, or not to be " * 60
    assert len(llm.encode(long_prompt)) >= llm.cfg.max_seq_len
    cases = [
        ("/v1/completions", b'{"prompt": "x", "max_tokens": ', 400, None),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_new_tokens"),
        ("/v1/completions", {"prompt": "x", "top_p": 2}, 400, "top_p"),
        ("/v1/completions", {"prompt": "x", "n": 0}, 400, "samples"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", {"prompt": long_prompt}, 400, "context"),
        ("/v1/completions", {"prompt": long_prompt, "stream": True}, 400, "context"),
        ("/v1/completions", {"prompt": 5}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "gpt-4"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ]
    for path, body, status, words in cases:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = server.http.post(path, headers={"Content-Type": "application/json"}, **kw)
        assert r.status_code == status, (body, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if words:
            assert words in err["message"], (body, err)
    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        client(server).completions.create(model="nope", prompt="x")
    r = server.http.post("/v1/completions", json={"prompt": "To be", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == offline(llm, "To be", temperature=0,
                                                                               max_new_tokens=3).text
    assert server.http.get("/health").json() == {"status": "ok"}
    assert server.metrics()["smallllm_kv_blocks_used"] == 0


def test_queue_limit_and_sigterm_drain(run_dir, llm):
    """--max-num-seqs 1 --max-queue 0: a second request while one runs gets 429. SIGTERM while a stream
    is in flight: the stream still completes, then the server exits and stops accepting."""
    s = Server(run_dir, "--max-num-seqs", 1, "--max-queue", 0)
    try:
        body = {"prompt": "Once", "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True}
        with s.http.stream("POST", "/v1/completions", json=body) as r:
            events = (line[6:] for line in r.iter_lines() if line.startswith("data: "))
            text = json.loads(next(events))["choices"][0]["text"]
            busy = s.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
            s.proc.send_signal(signal.SIGTERM)
            for data in events:
                if data == "[DONE]":
                    break
                text += json.loads(data)["choices"][0]["text"]
            else:
                raise AssertionError("the stream ended without [DONE]")
        assert text == offline(llm, "Once", temperature=0, max_new_tokens=200, ignore_eos=True).text
        # uvicorn drains, shuts the app down, then re-raises the signal: the conventional exit for SIGTERM
        assert s.proc.wait(timeout=60) == -signal.SIGTERM
        s.reader.join(timeout=60)
        assert any("Finished server process" in line for line in s.log), "".join(s.log)
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health")
    finally:
        s.stop()


def test_playground_in_headless_chromium(server, llm, tmp_path):
    """The page at /: type a prompt, press Generate, the streamed completion appears (Debian's chromium
    driven by playwright; a screenshot is saved in the test's tmp folder when it fails)."""
    from playwright.sync_api import sync_playwright

    if not Path("/usr/bin/chromium").exists():
        pytest.fail("Chromium is missing: apt-get install -y chromium (.ci/run does it)")
    expect = offline(llm, "Once upon", temperature=0, max_new_tokens=12).text
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        try:
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'run'")
            page.fill("#prompt", "Once upon")
            page.fill("#max_tokens", "12")
            page.fill("#temperature", "0")
            page.click("#generate")
            page.wait_for_function("document.getElementById('gen_stats').textContent.includes('finish: length')")
            page.wait_for_function("document.getElementById('gen_stats').textContent.startsWith('12 tokens')")
            assert page.text_content("#completion") == expect
            assert page.text_content("#error") == ""
            page.wait_for_function("document.getElementById('server_stats').textContent.includes('KV blocks')")
        except Exception:
            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot))
            print(f"screenshot: {shot}")
            raise
        finally:
            browser.close()


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


def test_chat_template_from_tokenizer_config(run_dir, tmp_path):
    """A tokenizer_config.json beside the weights (as Hugging Face exports write it) sets the chat
    prompt; without one the plain template is used."""
    import shutil

    from serve import load_chat_template, render_chat

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
    """In-process: a failing prefill fails only the request in it (a running one finishes intact); a
    failure outside any request (the scheduler) fails those in flight and the engine serves the next."""
    from engine import LLM, SamplingParams
    from engine.async_engine import AsyncEngine

    llm = LLM(run_dir, device="cpu")
    sp = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    ref = llm.generate([[5, 6, 7]], sp)[0].token_ids
    engine = AsyncEngine(llm.core)
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
        tokens = [(await a.__anext__()).token]  # a is running
        llm.runner.run = failing_prefill
        with pytest.raises(RuntimeError, match="prefill failure"):
            async for _ in engine.generate([9, 9], sp):
                pass
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
    snap = engine.metrics.snapshot()
    assert snap["requests_failed"] == 2 and snap["requests_finished"] == 2 and snap["blocks_used"] == 0
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
        out, err = p.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert cases[name][1] in lines[0] and out == "", (name, lines[0])
