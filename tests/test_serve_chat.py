"""Chat with a fine-tuned checkpoint through serve.py: /v1/chat/completions renders the checkpoint's chat template
and ends a reply at <|im_end|>, and the playground's Chat tab holds a conversation (headless Chromium). Every reply
is compared with the API's greedy reply to the same conversation (builders.chat_reply)."""

import pytest

from builders import chat_reply, end_reply_early, write_checkpoint
from checkpoint import load_chat_template
from data.chat import prompt_ids
from engine import LLM
from test_serve import Server, browser_page, client

pytestmark = pytest.mark.usefixtures("one_thread")
SYSTEM = {"role": "system", "content": "Be brief."}
HELLO = {"role": "user", "content": "Hello"}


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny chat checkpoint (served as "run") whose greedy reply to HELLO ends with <|im_end|> after two tokens."""
    run = write_checkpoint(tmp_path_factory.mktemp("serve_chat") / "run", chat=True, max_seq_len=96)
    end_reply_early(run, [SYSTEM, HELLO])
    return run


@pytest.fixture(scope="module")
def served(chat_run):
    s = Server(chat_run, "--max-num-seqs", 4)
    yield s
    s.stop()


def test_chat_completions_use_the_checkpoint_template(chat_run, served):
    llm = LLM(chat_run, device="cpu")
    reply, ids = chat_reply(llm, chat_run, [SYSTEM, HELLO], 12)
    assert len(ids) == 3 and llm.decode(ids[-1:]) == ""  # two tokens, then <|im_end|>, which prints nothing
    c = client(served)
    r = c.chat.completions.create(model="run", messages=[SYSTEM, HELLO], temperature=0, max_tokens=12)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (reply, "stop")
    prompt = prompt_ids([SYSTEM, HELLO], load_chat_template(chat_run), llm.tokenizer)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 3)
    chunks = list(c.chat.completions.create(model="run", messages=[SYSTEM, HELLO], temperature=0, max_tokens=12,
                                            stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == reply
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"


def test_playground_chat_in_headless_chromium(chat_run, served, tmp_path):
    """The Chat tab: a system message, two turns (the second reply depends on the first turn, so the page must
    send the whole conversation), each reply streamed into its own box; New chat empties the conversation."""
    llm = LLM(chat_run, device="cpu")
    first, _ = chat_reply(llm, chat_run, [SYSTEM, HELLO], 12)
    more = {"role": "user", "content": "Tell me more."}
    second, _ = chat_reply(llm, chat_run, [SYSTEM, HELLO, {"role": "assistant", "content": first}, more], 12)
    assert second != chat_reply(llm, chat_run, [SYSTEM, more], 12)[0]  # it depends on the first turn
    replies = "Array.from(document.querySelectorAll('.turn.assistant .content')).map(e => e.textContent)"
    with browser_page(tmp_path / "playground_chat.png") as page:
        page.goto(served.url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'run'")
        page.click("#mode_chat")
        page.fill("#system", SYSTEM["content"])
        page.fill("#max_tokens", "12")
        page.fill("#temperature", "0")
        for n, message in enumerate((HELLO["content"], more["content"]), 1):
            page.fill("#message", message)
            page.press("#message", "Enter")
            page.wait_for_function(f"document.querySelectorAll('.turn').length === {2 * n} && "
                                   "!document.getElementById('generate').disabled")
            if n == 1:  # the first reply ended at <|im_end|>
                assert "finish: stop" in page.text_content("#gen_stats")
        assert page.evaluate(replies) == [first, second]
        assert page.text_content("#error") == ""
        page.click("#new_chat")
        assert page.evaluate("document.querySelectorAll('.turn').length") == 0
