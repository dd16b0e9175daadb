"""generate.py through a subprocess: --json output, and one-line errors (exit 2) for bad input."""

import json
import os
import re
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
    assert_summary_repeats_the_stats(err, doc["stats"])
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
    # The figures count these requests' tokens only: nothing of the warm-up's.
    assert doc["stats"]["prefill_tokens"] == sum(len(o.prompt_token_ids) for o in api)
    assert doc["stats"]["decode_tokens"] == 2 * 11  # the first token of each comes from the prefill

    code, out, err = finish(samples)
    assert code == 0, err
    doc = json.loads(out)
    assert [r["prompt"] for r in doc["requests"]] == ["To be", "Once upon"]
    for r in doc["requests"]:
        assert set(r) == {"prompt", "samples"} and len(r["samples"]) == 3
        assert all(set(s) == {"token_ids", "text", "finish_reason"} for s in r["samples"])
        assert len({tuple(s["token_ids"]) for s in r["samples"]}) > 1


def assert_summary_repeats_the_stats(stderr: str, stats: dict) -> None:
    """The summary line on stderr gives the --json figures of the same run, and the one-off times apart."""
    line = next(line for line in stderr.splitlines() if " request(s)] " in line)
    m = re.search(r"prefill (\d+) tok/s, decode (\d+) tok/s, .*: load ([\d.]+) s, warm-up ([\d.]+) s$", line)
    assert m, line
    assert [int(m[1]), int(m[2])] == [round(stats["prefill_tokens_per_s"]), round(stats["decode_tokens_per_s"])]
    assert [float(m[3]), float(m[4])] == [stats["load_s"], stats["warmup_s"]]
    assert stats["prefill_tokens_per_s"] > 0 and stats["decode_tokens_per_s"] > 0


def test_the_warmup_changes_nothing_but_the_clock():
    """LLM.warmup (generate.py runs it before the requests it times) leaves torch's RNG and the
    outputs as they were: the same tokens as an LLM that never warmed up, unseeded sampling included."""
    import torch

    from builders import tiny_model
    from engine import LLM, SamplingParams

    model = tiny_model("gqa")
    prompts = [[5, 6, 7] * 7, [9, 8]]  # 21 tokens: more than a block, as the warm-up's longer prompt
    params = SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True, n=2)
    outputs = []
    for warm in (False, True):
        llm = LLM(model=model, device="cpu", block_size=16)
        torch.manual_seed(3)
        if warm:
            assert llm.warmup() > 0
        outputs.append([[s.token_ids for s in o.outputs] for o in llm.generate(prompts, params)])
    assert outputs[0] == outputs[1]


def option_helps(help_text: str) -> dict[str, str]:
    """--help's options, each with its help (wrapped lines joined)."""
    blocks = re.split(r"\n  (?=-)", help_text.split("options:", 1)[1])
    return {b.split()[0].rstrip(","): " ".join(b.split()) for b in blocks if b.strip()}


@pytest.mark.parametrize("script", ["generate.py", "serve.py"])
def test_help_shows_each_default_once(script):
    """Every option states its default at most once, and never as a bare None (the shared parser,
    generate.OneLineErrorParser, adds a default only where the help does not say one)."""
    done = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    helps = option_helps(done.stdout)
    assert "--ckpt" in helps and "--device" in helps
    for option, text in helps.items():
        assert text.lower().count("default") <= 1, text
        assert "(default: None)" not in text and "(default: False)" not in text, text
    assert "(default: 16)" in helps["--block-size"] and "(default: from free memory)" in helps["--num-blocks"]


def test_prompt_files_read_as_utf8_text(tmp_path):
    """A leading byte-order mark is dropped (plain and .jsonl files); a folder, bytes that are not UTF-8
    and a missing file each give their own one-line reason."""
    from generate import InputError, parse_args, read_prompts

    def prompts(name):
        return read_prompts(parse_args(["--ckpt", "x", "--prompt-file", str(tmp_path / name)]))

    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfTo be\nOnce\n")
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf"To be"\n{"prompt": "Once"}\n')
    (tmp_path / "inside.txt").write_text("To\ufeffbe\n")  # inside the text it is text: kept
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "folder").mkdir()
    assert prompts("bom.txt") == prompts("bom.jsonl") == ["To be", "Once"]
    assert prompts("inside.txt") == ["To\ufeffbe"]
    for name, reason in (("folder", "is a folder"), ("latin1.txt", "is not UTF-8 text (byte 0xe9 at offset 3)"),
                         ("missing.txt", "does not exist")):
        with pytest.raises(InputError, match=re.escape(reason)):
            prompts(name)


def test_a_closed_stdout_ends_quietly(run_dir):
    """`generate.py ... | head -c 1`: the reader is gone before the output comes (here the pipe's read
    end is closed before the process starts, so every write fails): no traceback, exit 1 as the
    Python docs advise, streamed or not."""
    procs = []
    for extra in ([], ["--stream"]):
        read, write = os.pipe()
        os.close(read)
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--ckpt", run_dir, "--prompt",
                                       "To be", "--max-new-tokens", "8", "--seed", "1", *extra], cwd=ROOT, env=ENV,
                                      stdout=write, stderr=subprocess.PIPE, text=True))
        os.close(write)
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 1, err
        assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err


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
        # a byte that is not UTF-8 on the command line reaches Python as a lone surrogate
        "prompt not UTF-8": (["--ckpt", run_dir, "--prompt", "To be \udcff"], "prompt 0 is not valid UTF-8 text"),
        "prompt file is a folder": (["--ckpt", run_dir, "--prompt-file", tmp_path], "is a folder"),
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
