"""Serving benchmark: requests with Poisson arrivals at several rates, against one at a time.

    python scripts/bench_serve.py --ckpt runs/a                       # starts serve.py on a free port
    python scripts/bench_serve.py --url http://127.0.0.1:8000 --rates 1,4,16 --num-requests 64

The same requests (mixed prompt and output lengths, drawn with --seed; ignore_eos so every request
writes exactly its output length) are sent
  - one at a time (the next when the previous finished): the baseline without batching;
  - at each rate r (requests/s), with exponential gaps of mean 1/r between arrivals, all streamed.
For each run: output tokens per second (over the time from the first send to the last token), time
to first token and inter-token latency (time between two streamed chunks of a request), p50 and p99.
"""

import argparse
import asyncio
import json
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the king queen lord lady sword crown night day love death speak hear thou art my good sweet fair "
         "noble heart eyes blood time life world hand heaven").split()


@dataclass
class Result:
    sent: float
    first: float = 0.0
    chunks: list = field(default_factory=list)  # arrival times of the streamed chunks
    tokens: int = 0


def make_requests(n: int, seed: int, prompt_words: tuple, output_tokens: tuple) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(*prompt_words))),
             "max_tokens": rng.randint(*output_tokens), "temperature": 0.8, "seed": i, "ignore_eos": True,
             "stream": True, "stream_options": {"include_usage": True}} for i in range(n)]


async def send(client: httpx.AsyncClient, body: dict) -> Result:
    r = Result(time.perf_counter())
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"the server answered {resp.status_code}: {await resp.aread()}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                r.tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"]:
                r.chunks.append(time.perf_counter())
    r.first = r.chunks[0] if r.chunks else r.sent
    return r


async def one_at_a_time(client, requests) -> list[Result]:
    return [await send(client, body) for body in requests]


async def poisson(client, requests, rate: float, seed: int) -> list[Result]:
    rng = random.Random(seed)
    tasks = []
    for body in requests:
        tasks.append(asyncio.create_task(send(client, body)))
        await asyncio.sleep(rng.expovariate(rate))
    return await asyncio.gather(*tasks)


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else (xs[0] if xs else 0.0)


def summarize(name: str, results: list[Result]) -> dict:
    start = min(r.sent for r in results)
    end = max(r.chunks[-1] if r.chunks else r.sent for r in results)
    ttft = [r.first - r.sent for r in results]
    itl = [b - a for r in results for a, b in zip(r.chunks, r.chunks[1:])]
    tokens = sum(r.tokens for r in results)
    return {"run": name, "requests": len(results), "output_tokens": tokens,
            "tokens_per_s": round(tokens / (end - start), 1), "ttft_p50_ms": round(1e3 * pct(ttft, 50), 1),
            "ttft_p99_ms": round(1e3 * pct(ttft, 99), 1), "itl_p50_ms": round(1e3 * pct(itl, 50), 1),
            "itl_p99_ms": round(1e3 * pct(itl, 99), 1)}


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


class LocalServer:
    """serve.py in a subprocess on a free port, for --ckpt."""

    def __init__(self, ckpt: str, extra: list[str]):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--ckpt", ckpt, "--port", "0", *extra],
                                     cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            if "Uvicorn running on" in line:
                self.url = line.split("running on ")[1].split()[0]
                break
        else:
            raise SystemExit("error: serve.py did not start (run it alone to see why)")
        # Keep reading its log (one line per request), or the full pipe would block the server.
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


async def bench(url: str, args) -> list[dict]:
    requests = make_requests(args.num_requests, args.seed, args.prompt_words, args.output_tokens)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=httpx.Limits(max_connections=None)) as client:
        await send(client, {**requests[0], "max_tokens": 2})  # warm-up
        rows = [summarize("one at a time", await one_at_a_time(client, requests))]
        for rate in args.rates:
            rows.append(summarize(f"poisson {rate:g}/s", await poisson(client, requests, rate, args.seed)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--ckpt", help="start serve.py on this checkpoint (on a free port)")
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--serve-args", default="", help="extra serve.py arguments with --ckpt, e.g. '--compile'")
    p.add_argument("--rates", default="1,4,16", help="request rates (requests/s), comma-separated")
    p.add_argument("--num-requests", type=int, default=32, help="requests per run")
    p.add_argument("--prompt-words", default="4,64", help="prompt length range in words: min,max")
    p.add_argument("--output-tokens", default="16,128", help="output length range in tokens: min,max")
    p.add_argument("--seed", type=int, default=0, help="seeds the request mix and the arrival times")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = p.parse_args(argv)
    try:
        args.rates = [float(r) for r in args.rates.split(",")]
        args.prompt_words = tuple(int(x) for x in args.prompt_words.split(","))
        args.output_tokens = tuple(int(x) for x in args.output_tokens.split(","))
        if any(r <= 0 for r in args.rates) or args.num_requests < 1 or len(args.prompt_words) != 2 \
                or len(args.output_tokens) != 2 or min(*args.prompt_words, *args.output_tokens) < 1:
            raise ValueError
    except ValueError:
        print("error: --rates must be positive numbers, --num-requests >= 1, and the ranges two integers "
              ">= 1 like 4,64 (see --help)", file=sys.stderr)
        return 2
    server = LocalServer(args.ckpt, args.serve_args.split()) if args.ckpt else None
    try:
        rows = asyncio.run(bench(server.url if server else args.url, args))
    except (RuntimeError, httpx.HTTPError) as e:  # a refused request, an unreachable server
        print(f"error: {e} (lower --prompt-words/--output-tokens, or check --url)", file=sys.stderr)
        return 2
    finally:
        if server:
            server.stop()
    print(json.dumps(rows) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
