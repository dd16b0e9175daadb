"""Chat prompts: the checkpoint's chat template (checkpoint.load_chat_template: every data=chat checkpoint
has one, docs/chat.md, and so have Hugging Face chat models), rendered as transformers renders it; else plain
turns for base models (data/chat.py's PLAIN_CHAT_TEMPLATE):
    "System: {content}\n\n" / "User: {content}\n\n" / "Assistant: {content}\n\n" per message, then "Assistant:".
A reply ends at the end-of-turn token of the template (our chat models' <|im_end|>), or with plain turns at
"\nUser:", where a base model would go on to write the user's next turn.
"""

from typing import Optional

from data.chat import PLAIN_CHAT_TEMPLATE, PLAIN_STOP, end_of_turn_id, render_prompt

from .protocol import APIError


def render_chat(messages: list[dict], template: Optional[str]) -> str:
    try:
        return render_prompt(messages, PLAIN_CHAT_TEMPLATE if template is None else template)
    except ValueError as e:  # the template refused the messages (raise_exception) or failed
        raise APIError(400, str(e), param="messages") from None


def reply_ends(template: Optional[str], tokenizer) -> tuple[list[str], list[int]]:
    """(stop strings, stop token ids) that end every chat reply, besides the request's own."""
    if template is None:
        return [PLAIN_STOP], []
    end = end_of_turn_id(tokenizer) if tokenizer is not None else None
    return [], [] if end is None else [end]
