"""generate.py --chat under a pseudo-terminal: the conversation is kept from turn to turn, replies stream and end
at the end-of-turn token, exactly as the Python API generates them; a message too long for the context is refused
and one that makes the conversation outgrow it drops the oldest exchange."""

import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from builders import chat_reply, end_reply_early, write_checkpoint
from checkpoint import load_chat_template
from data.chat import end_of_turn_id, prompt_ids
from engine import LLM

ROOT = Path(__file__).resolve().parents[1]
SYSTEM, MAX_NEW = "Be brief.", 12


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny chat checkpoint whose greedy reply to "Hello" ends with <|im_end|> after two tokens."""
    run = write_checkpoint(tmp_path_factory.mktemp("chat") / "run", chat=True, max_seq_len=96)
    end_reply_early(run, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}])
    return run


def read_until(fd: int, marker: str) -> str:
    """Output of the terminal until `marker` appears (an upper bound of 300 s: a hang fails, nothing is timed)."""
    seen = b""
    while marker.encode() not in seen:
        ready, _, _ = select.select([fd], [], [], 300)
        assert ready, f"no {marker!r} in 300 s; so far: {seen!r}"
        seen += os.read(fd, 4096)
    return seen.decode()


def test_chat_in_a_pseudo_terminal(chat_run):
    llm = LLM(chat_run, device="cpu")
    template = load_chat_template(chat_run)
    history = [{"role": "system", "content": SYSTEM}]
    controller, terminal = os.openpty()
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--ckpt", str(chat_run), "--chat",
                             "--system", SYSTEM, "--temperature", "0", "--max-new-tokens", str(MAX_NEW)],
                            stdin=terminal, stdout=terminal, stderr=terminal, cwd=ROOT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(terminal)
    try:
        start = read_until(controller, ">>> ")  # at a terminal, input() writes its prompt to stderr
        assert "chat: the checkpoint's chat template" in start and "error" not in start, start
        for message in ("Hello", "Tell me more."):
            history.append({"role": "user", "content": message})
            reply, ids = chat_reply(llm, chat_run, history, MAX_NEW)
            if message == "Hello":  # the model's end of turn is what stops it, not the token limit
                assert ids[-1] == end_of_turn_id(llm.tokenizer) and len(ids) == 3
            else:  # the reply depends on the turns before: the chat must have kept them
                assert reply != chat_reply(llm, chat_run, [history[0], history[-1]], MAX_NEW)[0]
            os.write(controller, (message + "\n").encode())
            screen = read_until(controller, ">>> ").replace("\r\n", "\n")
            assert screen == f"{message}\n{reply}\n>>> "  # the echo of what was typed, the reply, the next prompt
            history.append({"role": "assistant", "content": reply})
        # A message too long for the context even alone is refused; the conversation goes on as it was.
        message = "more " * 200
        alone = prompt_ids(history[:1] + [{"role": "user", "content": message}], template, llm.tokenizer)
        os.write(controller, (message + "\n").encode())
        assert read_until(controller, ">>> ").replace("\r\n", "\n") == (
            f"{message}\nerror: this message makes a prompt of {len(alone)} tokens, but the model's context is 96: "
            "send a shorter one\n>>> ")
        # A message that makes the conversation outgrow the context: its oldest exchange is left out.
        message = next(m for m in (" ".join(["more"] * n) for n in range(1, 60))
                       if len(prompt_ids(history + [{"role": "user", "content": m}], template, llm.tokenizer)) +
                       MAX_NEW > 96)
        history = history[:1] + history[3:] + [{"role": "user", "content": message}]
        assert len(prompt_ids(history, template, llm.tokenizer)) + MAX_NEW <= 96  # leaving one out is enough
        os.write(controller, (message + "\n").encode())
        assert read_until(controller, ">>> ").replace("\r\n", "\n") == (
            f"{message}\nnote: the conversation outgrew the model's context of 96 tokens: its oldest 2 turns are "
            f"left out\n{chat_reply(llm, chat_run, history, MAX_NEW)[0]}\n>>> ")
        os.write(controller, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=300) == 0
    finally:
        proc.kill()
        os.close(controller)


@pytest.mark.parametrize("args, message", [
    (["--chat", "--prompt", "Hi"], "error: --chat reads its messages from the terminal, one reply at a time: drop "
                                   "--prompt"),
    (["--chat", "--json"], "drop --json"),
    (["--system", "Be brief."], "error: --system is the opening message of a --chat: add --chat"),
])
def test_chat_options_that_do_not_go_together(args, message, capsys):
    import generate

    assert generate.main(["--ckpt", "no-such-run", *args]) == 2  # refused before the checkpoint is read
    assert message in capsys.readouterr().err
