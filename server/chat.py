"""Chat prompts: the "chat_template" of tokenizer_config.json in the checkpoint folder (Hugging Face
exports have one), rendered with jinja2; else the plain template for base models:
    "System: {content}\n\n" / "User: {content}\n\n" / "Assistant: {content}\n\n" per message, then
    "Assistant:"; a base model may go on to write the next "User:" turn: pass stop ["\nUser:"].
"""

import json
from pathlib import Path
from typing import Optional

from .protocol import APIError

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def plain_chat_prompt(messages: list[dict]) -> str:
    return "".join(f"{PLAIN_ROLES[m['role']]}: {m['content']}\n\n" for m in messages) + "Assistant:"


def load_chat_template(ckpt: str) -> Optional[str]:
    """The chat_template string of a tokenizer_config.json beside the checkpoint's weights, if any."""
    from checkpoint.hf import is_hf_folder
    from checkpoint.store import resolve_checkpoint

    # a Hugging Face folder is its own checkpoint folder (resolve_checkpoint knows ours only)
    folders = [Path(ckpt)] if is_hf_folder(ckpt) else [resolve_checkpoint(ckpt), Path(ckpt)]
    for folder in dict.fromkeys(folders):
        cfg = folder / "tokenizer_config.json"
        if cfg.is_file():
            template = json.loads(cfg.read_text()).get("chat_template")
            if isinstance(template, str):
                return template
    return None


def render_chat(messages: list[dict], template: Optional[str]) -> str:
    """The chat prompt: a Hugging Face chat template (jinja2, sandboxed) or the plain template."""
    if template is None:
        return plain_chat_prompt(messages)
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from data.config import EOT

    def raise_exception(msg):
        raise APIError(400, f"the chat template refused the messages: {msg}", param="messages")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, eos_token=EOT,
                                            bos_token="")
