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
    """The new text of one generation, a piece at a time, as its tokens arrive.

    push(all output token ids) -> the text not yet returned. It holds back a character split across
    tokens (the decoder shows U+FFFD until its last byte arrives) and the last len(longest stop) - 1
    characters, which could still become the start of a stop string; finish(final text) returns the
    rest (the engine's final text is already cut before a stop string)."""

    def __init__(self, decode, stops: list[str]):
        self.decode, self.stops, self.sent = decode, stops, 0
        self.hold = max(map(len, stops), default=1) - 1

    def push(self, token_ids: list[int]) -> str:
        text = self.decode(token_ids)
        if text.endswith("\ufffd"):
            return ""
        cut = find_stop(text, self.stops)
        return self._take(text[:cut] if cut is not None else text[:len(text) - self.hold])

    def finish(self, final_text: str) -> str:
        return self._take(final_text)

    def _take(self, text: str) -> str:
        new = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return new
