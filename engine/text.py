"""Text out of token ids: where a stop string cuts the output, and how much of it is safe to stream.

One matcher for every caller (the engine's stopping rule, generate.py's --stream, serve.py's SSE
streams), so a stop string ends and cuts the text the same way everywhere.
"""

from typing import Optional


def find_stop(text: str, stops: list[str]) -> Optional[int]:
    """Index of the earliest stop string in text (the output is cut there), or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


class TextStream:
    """The new text of one generation, a piece at a time, as its tokens arrive, at a cost per token that
    does not grow with the output (re-decoding the whole output at every token is quadratic).

    push(all output token ids so far) -> the text not yet returned. Only the new tokens are decoded, in
    a window that starts at the previous token returned (a byte-level token alone can be half a
    character; the window's first token gives the decoder its context), as tokenizers' DecodeStream
    and vLLM's incremental detokenizer do; this one works over any decode(ids) -> str, such as
    LLM.decode. It holds back a character split across tokens (the decoder shows U+FFFD until its last
    byte arrives) and the last len(longest stop) - 1 characters, which could still become the start of
    a stop string; finish(final text) returns the rest (the engine's final text is already cut before
    a stop string)."""

    def __init__(self, decode, stops: list[str]):
        self.decode, self.stops = decode, stops
        self.hold = max(map(len, stops), default=1) - 1
        self.prefix = self.read = 0  # ids[prefix:read] decode to the window's text already taken
        self.pending = ""  # decoded, not yet returned: the held-back characters
        self.sent = 0  # characters returned so far
        self.stopped = False  # a stop string was found: nothing more is returned before finish()

    def push(self, token_ids: list[int]) -> str:
        if self.stopped:
            return ""
        before = self.decode(token_ids[self.prefix:self.read])
        text = self.decode(token_ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""  # nothing new yet (a character still split across tokens, or a skipped special token)
        self.pending += text[len(before):]
        self.prefix, self.read = self.read, len(token_ids)
        # A stop string that starts in text already returned would have been found then: the held-back
        # characters are where any new one starts.
        cut = find_stop(self.pending, self.stops)
        self.stopped = cut is not None
        n = max(len(self.pending) - self.hold if cut is None else cut, 0)
        piece, self.pending = self.pending[:n], self.pending[n:]
        self.sent += n
        return piece

    def finish(self, final_text: str) -> str:
        new = final_text[self.sent:]
        self.sent, self.pending = max(self.sent, len(final_text)), ""
        return new
