"""The chat format: ChatML, two special tokens marking turns, one Jinja template for every tool.

    <|im_start|>system\nYou answer briefly.<|im_end|>\n
    <|im_start|>user\nWhat is 2 + 3?<|im_end|>\n
    <|im_start|>assistant\n5<|im_end|>\n

A prompt for a reply ends with "<|im_start|>assistant\n"; the model writes the reply and <|im_end|>, the end of
its turn, where generation stops. ChatML because llama.cpp, Ollama and transformers know it by name: the template
saved with a checkpoint (CHAT_TEMPLATE) is what the Hugging Face export's tokenizer_config.json and the GGUF file
carry, and what serve.py renders.

Training (render_conversation) tokenizes each turn's "role\\ncontent" as one piece, exactly as a tokenizer does
the rendered template (the special tokens split the text into those pieces), so the ids are the ones
transformers' apply_chat_template gives (tests/test_chat.py). One difference, on purpose: a message containing
the text "<|im_end|>" keeps it as plain text here, so a conversation cannot forge a turn boundary; rendered
through the template and tokenized, it becomes the special token.

The targets of supervised fine-tuning are the assistant's tokens and its <|im_end|>: the mask marks every token
that ends inside an assistant reply, plus that turn's <|im_end|>. Everything else (system and user turns, the
role headers, the newlines between turns) is context only.
"""

from typing import Optional

from tokenizers import Tokenizer

from .errors import DataError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TOKENS = (IM_START, IM_END)
ROLES = ("system", "user", "assistant")
TEMPLATE_FILE = "tokenizer_config.json"  # holds "chat_template", beside tokenizer.json (as in a Hugging Face folder)

# Hugging Face's chat-template Jinja (transformers, llama-cpp-python and serve.py render it the same way).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# For a model without a chat template (a base model): plain text turns. It has no end-of-turn token: a base model
# may go on to write the next turn, so its callers stop at "\nUser:".
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ message['role'].capitalize() + ': ' + message['content'] + '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
PLAIN_STOP = "\nUser:"


def add_chat_tokens(tok: Tokenizer) -> list[str]:
    """Add the turn tokens a tokenizer lacks, as special tokens (they get the next free ids); returns those added."""
    missing = [t for t in CHAT_TOKENS if tok.token_to_id(t) is None]
    tok.add_special_tokens(missing)
    return missing


def end_of_turn_id(tok: Tokenizer) -> Optional[int]:
    """The id of <|im_end|>, if the tokenizer has the chat tokens."""
    return tok.token_to_id(IM_END)


def check_messages(messages, where: str) -> list[dict]:
    """A conversation in OpenAI's format, checked: a list of {"role": system|user|assistant, "content": str}
    with at least one assistant message (the turns a model learns from). DataError naming `where` otherwise."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {i} must be an object with \"role\" and \"content\"")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has the unknown role {m['role']!r}; use system, user or "
                            "assistant (tool and function turns are not supported)")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i} has content of type {type(m['content']).__name__}; it must be "
                            "a string (join the text parts)")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message, so nothing to learn from; add one "
                        "or leave the conversation out")
    return messages


def render_conversation(messages: list[dict], tok: Tokenizer) -> tuple[list[int], list[bool]]:
    """(token ids of the rendered conversation, whether each is a training target): the assistant's reply tokens
    and its <|im_end|>. `tok` must have the chat tokens and encode_special_tokens=True (message text is text)."""
    start, end = tok.token_to_id(IM_START), tok.token_to_id(IM_END)
    newline = tok.encode("\n", add_special_tokens=False).ids
    ids, mask = [], []
    for m in messages:
        head = m["role"] + "\n"
        piece = tok.encode(head + m["content"], add_special_tokens=False)
        reply = m["role"] == "assistant"
        ids += [start, *piece.ids, end, *newline]
        # A token ending past the header holds reply text (with content that starts with spaces, the first such
        # token may also hold the header's newline: "\n " is one pre-token).
        mask += [False, *(reply and stop > len(head) for _, stop in piece.offsets), reply] + [False] * len(newline)
    return ids, mask


def render_prompt(messages: list[dict], template: str) -> str:
    """The text of a chat prompt: `template` (a Hugging Face chat template) rendered in a sandbox, as
    transformers does, with the generation prompt. ValueError with the template's own message if it refuses."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from .config import EOT

    def raise_exception(message):
        raise ValueError(f"the chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, eos_token=EOT,
                                                bos_token="")
    except TemplateError as e:
        raise ValueError(f"the chat template failed: {e}") from None


def prompt_ids(messages: list[dict], template: Optional[str], tok: Tokenizer) -> list[int]:
    """The token ids of a chat prompt: `template` (PLAIN_CHAT_TEMPLATE if None) rendered and tokenized as
    transformers' apply_chat_template does (special tokens in the text are special)."""
    text = render_prompt(messages, PLAIN_CHAT_TEMPLATE if template is None else template)
    return tok.encode(text, add_special_tokens=False).ids
