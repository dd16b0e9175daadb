"""OpenAI's response bodies: a Sample collects one sample's tokens as the engine's updates arrive; plain
functions turn samples into completion and chat bodies, streamed chunks and log-probabilities."""

import json
from typing import Callable, Optional

from engine.text import TextStream


class Sample:
    """One sample being written: its token ids, its text (streamed a piece at a time) and its log-prob
    entries (token, TokenLogprobs or None, offset of its text in the sample's text).

    Echo: `prefix` is the prompt's text, written first, and `prompt_ids` its tokens, whose log-probs
    (on the sample's first update, when asked for) come first in the entries. score_only (echo with
    max_tokens 0): the one token the engine generates is dropped, so the sample is the prompt alone."""

    def __init__(self, index: int, decode: Callable, stops: list[str], prefix: str = "", prompt_ids=(),
                 score_only: bool = False):
        self.index, self.decode, self.prefix = index, decode, prefix
        self.prompt_ids, self.score_only = prompt_ids, score_only
        self.token_ids: list[int] = []
        self.stream = TextStream(decode, stops)
        self.entries: list = []
        self.added = 0  # entries[added:] came with the last update (what a streamed chunk carries)
        self.offset = len(prefix)
        self.finish_reason: Optional[str] = None
        self.pieces: list[str] = []
        self.started = False  # a chat stream has sent this sample's first chunk (the one with the role)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def token_text(self, token: int) -> str:
        return self.decode([token])

    def add(self, up) -> str:
        """Take one update (engine/async_engine.py's Update); returns the new text (the prefix first)."""
        self.added = len(self.entries)
        if up.prompt_logprobs is not None:
            at = 0
            for t, lp in zip(self.prompt_ids, up.prompt_logprobs):
                self.entries.append((t, lp, at))
                at += len(self.token_text(t))
        if self.score_only:
            self.finish_reason, piece = "length", ""
        else:
            self.token_ids.append(up.token)
            if up.logprobs is not None:
                self.entries.append((up.token, up.logprobs, self.offset))
                self.offset += len(self.token_text(up.token))
            if up.finish_reason is None:
                piece = self.stream.push(self.token_ids)
            else:  # the whole text once, cut where the engine found a stop string
                self.finish_reason = up.finish_reason
                piece = self.stream.finish(self.decode(self.token_ids)[:up.stop_text_len])
        piece, self.prefix = self.prefix + piece, ""
        self.pieces.append(piece)
        return piece


def sse(obj) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompts: list[list[int]], samples: list[Sample]) -> dict:
    p, c = sum(map(len, prompts)), sum(len(s.token_ids) for s in samples)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# ---- log-probabilities -----------------------------------------------------------------------------
def completion_logprobs(s: Sample, entries) -> dict:
    """OpenAI's legacy format; the first prompt token (echo) has no log-probs: null, as in OpenAI's API."""
    return {"tokens": [s.token_text(t) for t, _, _ in entries],
            "token_logprobs": [None if lp is None else lp.logprob for _, lp, _ in entries],
            "top_logprobs": [None if lp is None else top_dict(s, lp.top) for _, lp, _ in entries],
            "text_offset": [at for _, _, at in entries]}


def top_dict(s: Sample, top) -> dict:
    """{token text: logprob}, most likely first; tokens whose text is the same (bytes of a split
    character all show as U+FFFD) keep the most likely one's value."""
    out = {}
    for t, v in top:
        out.setdefault(s.token_text(t), v)
    return out


def chat_logprobs(s: Sample, entries) -> dict:
    def item(t, v):
        text = s.token_text(t)
        return {"token": text, "logprob": v, "bytes": list(text.encode())}
    return {"content": [{**item(t, lp.logprob), "top_logprobs": [item(a, v) for a, v in lp.top]}
                        for t, lp, _ in entries]}


# ---- bodies: `head` holds id, object, created, model -----------------------------------------------
def completion_chunk(head: dict, logprobs: bool, s: Optional[Sample], piece: str) -> dict:
    """A streamed chunk with one sample's new text; s None: the usage chunk's head (no choices)."""
    if s is None:
        return {**head, "choices": []}
    lp = completion_logprobs(s, s.entries[s.added:]) if logprobs else None
    return {**head, "choices": [{"index": s.index, "text": piece, "logprobs": lp, "finish_reason": s.finish_reason}]}


def completion_body(head: dict, logprobs: bool, samples: list[Sample], prompts: list[list[int]]) -> dict:
    return {**head, "choices": [
        {"index": s.index, "text": s.text, "logprobs": completion_logprobs(s, s.entries) if logprobs else None,
         "finish_reason": s.finish_reason} for s in samples], "usage": usage(prompts, samples)}


def chat_chunk(head: dict, logprobs: bool, s: Optional[Sample], piece: str) -> dict:
    """As completion_chunk; a sample's first chunk carries the role."""
    head = {**head, "object": "chat.completion.chunk"}
    if s is None:
        return {**head, "choices": []}
    delta = {"content": piece} if s.started else {"role": "assistant", "content": piece}
    s.started = True
    lp = chat_logprobs(s, s.entries[s.added:]) if logprobs else None
    return {**head, "choices": [{"index": s.index, "delta": delta, "logprobs": lp, "finish_reason": s.finish_reason}]}


def chat_body(head: dict, logprobs: bool, samples: list[Sample], prompts: list[list[int]]) -> dict:
    return {**head, "object": "chat.completion", "choices": [
        {"index": s.index, "message": {"role": "assistant", "content": s.text},
         "logprobs": chat_logprobs(s, s.entries) if logprobs else None, "finish_reason": s.finish_reason}
        for s in samples], "usage": usage(prompts, samples)}
