"""generate.py through a subprocess: --json output, and one-line errors (exit 2) for bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def start(*args):
    return subprocess.Popen([sys.executable, str(ROOT / "generate.py"), *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p, timeout=120):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from builders import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("cli") / "run", "gqa", max_seq_len=64)


def test_json_output_matches_the_api(run_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "To be"}) + "\n\n" + json.dumps("Once upon") + "\n")
    greedy = start("--ckpt", run_dir, "--prompt", "To be", "--prompt", "ROMEO:", "--temperature", 0,
                   "--max-new-tokens", 12, "--ignore-eos", "--json", "--block-size", 4)
    samples = start("--ckpt", run_dir / "checkpoints", "--prompt-file", prompts, "--num-samples", 3,
                    "--temperature", 1.0, "--top-p", 0.9, "--max-new-tokens", 8, "--seed", 5, "--json",
                    "--ignore-eos")
    code, out, err = finish(greedy)
    assert code == 0, err
    doc = json.loads(out)
    assert [r["prompt"] for r in doc["requests"]] == ["To be", "ROMEO:"]
    for r in doc["requests"]:
        assert set(r) == {"prompt", "token_ids", "text", "finish_reason"}
        assert len(r["token_ids"]) == 12 and r["finish_reason"] == "length" and isinstance(r["text"], str)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "blocks_used", "blocks_total", "kv_bytes_per_token",
                "prefix_hit_rate", "preemptions"):
        assert key in doc["stats"], key
    assert doc["stats"]["kv_bytes_per_token"] == 2 * 2 * 16 * 2 * 4  # K+V x 2 kv heads x 16 dims x 2 layers x fp32
    assert doc["stats"]["kv_dtype"] == "fp32"
    # The same tokens as the Python API.
    from engine import LLM, SamplingParams

    api = LLM(run_dir, device="cpu").generate(["To be", "ROMEO:"], SamplingParams(temperature=0, max_new_tokens=12,
                                                                                 ignore_eos=True))
    assert [r["token_ids"] for r in doc["requests"]] == [o.token_ids for o in api]
    assert [r["text"] for r in doc["requests"]] == [o.text for o in api]

    code, out, err = finish(samples)
    assert code == 0, err
    doc = json.loads(out)
    assert [r["prompt"] for r in doc["requests"]] == ["To be", "Once upon"]
    for r in doc["requests"]:
        assert set(r) == {"prompt", "samples"} and len(r["samples"]) == 3
        assert all(set(s) == {"token_ids", "text", "finish_reason"} for s in r["samples"])
        assert len({tuple(s["token_ids"]) for s in r["samples"]}) > 1


@pytest.mark.slow  # five generate.py processes, about 18 s: make test is at its 10-minute budget
def test_seeds_per_request_batch_invariant_and_printed(run_dir):
    """Identical prompts get different samples; a request's output depends on --seed and its position
    only (not on the other prompts); without --seed the drawn seed is printed and repeats the run."""
    common = ["--ckpt", run_dir, "--temperature", 1.0, "--max-new-tokens", 10, "--ignore-eos", "--json"]
    same = start(*common, "--prompt", "To be", "--prompt", "To be", "--seed", 5)
    other = start(*common, "--prompt", "Once", "--prompt", "To be", "--seed", 5)
    drawn = start(*common, "--prompt", "To be")
    helped = start("--ckpt", run_dir, "--help")
    runs = {}
    for name, p in (("same", same), ("other", other), ("drawn", drawn), ("help", helped)):
        code, out, err = finish(p)
        assert code == 0, err
        runs[name] = (out, err)
    a, b = (r["token_ids"] for r in json.loads(runs["same"][0])["requests"])
    assert a != b
    assert json.loads(runs["other"][0])["requests"][1]["token_ids"] == b
    doc = json.loads(runs["drawn"][0])
    assert f"seed {doc['seed']}" in runs["drawn"][1]
    code, out, err = finish(start(*common, "--prompt", "To be", "--seed", doc["seed"]))
    assert code == 0 and json.loads(out)["requests"] == doc["requests"]
    help_text = " ".join(runs["help"][0].split())
    assert "(default: 128)" in help_text and "drawn at random and printed" in help_text


@pytest.mark.slow  # one process per bad command line: ~40 s
def test_bad_input_gives_one_line_errors(run_dir, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (corrupt / f).write_bytes((run_dir / "checkpoints" / "latest" / f).read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    cases = {
        "missing checkpoint": (["--ckpt", tmp_path / "nope"], "does not exist"),
        "corrupt checkpoint": (["--ckpt", corrupt], "corrupt"),
        "prompt too long": (["--ckpt", run_dir, "--prompt", "To be, or not to be " * 20], "context"),
        "bad top-p": (["--ckpt", run_dir, "--top-p", "0"], "top_p"),
        "bad temperature": (["--ckpt", run_dir, "--temperature", "-1"], "temperature"),
        "empty prompt": (["--ckpt", run_dir, "--prompt", ""], "empty"),
        "too few blocks": (["--ckpt", run_dir, "--num-blocks", "1", "--block-size", "4", "--max-new-tokens", "8"],
                           "KV blocks"),
        "compile without cache": (["--ckpt", run_dir, "--compile", "--no-cache"], "--no-cache"),
    }
    import torch

    if not torch.cuda.is_available():
        cases["no CUDA"] = (["--ckpt", run_dir, "--device", "cuda"], "CUDA is not available")
    procs = {name: start(*args) for name, (args, _) in cases.items()}
    for name, p in procs.items():
        code, out, err = finish(p)
        lines = err.strip().splitlines()
        assert code == 2, (name, code, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert cases[name][1] in lines[0], (name, lines[0])
        assert "Traceback" not in err and out == ""
