"""Every command in README.md runs as printed.

The README's fenced `bash` blocks are read in order, comments dropped and backslash continuations
joined; each command must have an entry in COMMANDS, which says how the test runs it: as printed
with smaller budgets (a replaced `key=value` or `--flag value`), or not at all, with the reason. They
run in a copy of the repository (so `runs/a` and `exports/` are the test's), with this interpreter as
`python`; the `python` blocks run too. A command that fails, or a README command without an entry (or
an entry the README no longer has), fails the suite.
"""

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = {"train.max_steps": "2", "train.eval_every": "2", "train.eval_batches": "1"}

# README command (as printed) -> how the test runs it: a dict of replaced or added options, or a
# string, the reason it is not run.
COMMANDS = {
    "make train": {"ARGS": " ".join(f"{k}={v}" for k, v in TINY_TRAIN.items())},
    "make test": "the suite this test belongs to",
    "source .venv/bin/activate": "each command below runs with this test's interpreter as `python`",
    "python train.py attention=mla train.max_steps=200": TINY_TRAIN,
    "python train.py data=text data.path=docs train.max_minutes=1": TINY_TRAIN,
    "python train.py out_dir=runs/a train.max_steps=100": TINY_TRAIN,
    "python train.py out_dir=runs/a train.max_steps=200 train.resume=true": {**TINY_TRAIN, "train.max_steps": "4"},
    "python train.py --help": {},
    "python generate.py --ckpt runs/a --prompt **ROMEO** --max-new-tokens 64 --temperature 0.8 --top-p 0.95": {},
    "python generate.py --ckpt runs/a --prompt **HAMLET** --num-samples 4 --seed 1 --json": {},
    "python generate.py --ckpt runs/a --prompt **HAMLET** --quantize int8": {"--max-new-tokens": "8"},
    "python serve.py --ckpt runs/a --port 8000": "started in the background by the test for the curl below",
    "curl http://127.0.0.1:8000/v1/completions -H Content-Type: application/json "
    '-d {"prompt": "ROMEO:", "max_tokens": 32, "temperature": 0.8}': {},
    "python export.py --ckpt runs/a --format hf --out exports/a-hf": {},
    "python export.py --ckpt runs/a --format gguf --out exports/a.gguf --outtype q8_0": {},
    "python generate.py --ckpt exports/a-hf --prompt **ROMEO** --max-new-tokens 16": {},
    "python -m scripts.chat_skill data --out chat_skill": {},
    "python train.py +experiment=sft train.init_from=runs/a data=chat data.path=chat_skill/train.jsonl "
    "out_dir=runs/sft": TINY_TRAIN,
    "pip install -r requirements-eval.txt": "make test installs it (requirements-dev.txt)",
    "python eval.py --ckpt runs/a --text README.md": {},
    "python train.py -m +experiment=attention_ablation": {"train.max_steps": "2", "train.eval_every": "2",
                                                          "hydra.sweep.dir": "multirun/ablation",
                                                          "seed": "1337", "data": "shakespeare"},  # 4 runs
    "python -m scripts.ablation_report multirun/<date>/<time>": {"multirun/<date>/<time>": "multirun/ablation"},
    "torchrun --standalone --nproc_per_node=2 train.py out_dir=runs/ddp train.max_steps=100": TINY_TRAIN,
    "make test-slow": "the suite this test belongs to",
    "python -m pytest tests/test_model.py -q": {},
}


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)


def readme_commands() -> list[list[str]]:
    """Each command of the bash blocks as its arguments (shell quoting and comments removed)."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if args := shlex.split(line, comments=True):
                commands.append(args)
    return commands


def with_changes(args: list[str], changes: dict) -> list[str]:
    """`key=value` and `--flag value` arguments replaced (or added), placeholders substituted."""
    out, changes = list(args), dict(changes)
    for i, a in enumerate(out):
        key = a.split("=", 1)[0]
        if "=" in a and key in changes:
            out[i] = f"{key}={changes.pop(key)}"
        elif a in changes and a.startswith("--"):
            out[i + 1] = changes.pop(a)
        elif a in changes:
            out[i] = changes.pop(a)
    for key, value in changes.items():
        out += [key, value] if key.startswith("--") else [f"{key}={value}"]
    return out


def test_every_readme_command_has_an_entry():
    printed = [" ".join(c) for c in readme_commands()]
    assert [c for c in printed if c not in COMMANDS] == [], "a README command without an entry in COMMANDS"
    assert sorted(set(COMMANDS) - set(printed)) == [], "an entry for a command the README no longer has"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_of_the_repo(dest: Path) -> Path:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in tracked.stdout.splitlines():
        if (ROOT / name).exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def run(args: list[str], cwd: Path, env: dict, timeout: float = 600) -> None:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{shlex.join(args)} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def wait_for_health(port: int, server: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + 300  # a bound, not a speed expectation: the engine builds its kernels first
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stderr.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("serve.py did not answer /health")


@pytest.mark.slow
def test_readme_commands_run_as_printed(tmp_path):
    repo = copy_of_the_repo(tmp_path / "repo")
    venv = Path(sys.prefix)
    env = {**os.environ, "WANDB_MODE": "offline", "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    port, server = free_port(), None
    try:
        for args in readme_commands():
            how = COMMANDS[" ".join(args)]
            if args[:2] == ["python", "serve.py"]:
                server = subprocess.Popen([sys.executable, *with_changes(args[1:], {"--port": str(port)})],
                                          cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                wait_for_health(port, server)
            if isinstance(how, str):
                continue
            if args[:2] == ["make", "train"]:
                args = [*args, f"VENV={venv}", f"ARGS={how['ARGS']}"]
            else:
                args = [a.replace(":8000", f":{port}") for a in with_changes(args, how)]
            if args[0] == "python":
                args[0] = sys.executable
            run(args, repo, env)
        for code in readme_blocks("python"):
            run([sys.executable, "-c", code], repo, env)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
