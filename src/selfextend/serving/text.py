"""Turning generated token ids into text as they come: whole characters only, cut at the first stop string."""

from __future__ import annotations


class Detokenizer:
    """Text deltas of a growing token sequence. Text that could still become a stop string is held back
    until it cannot, so no part of a stop string is ever sent (OpenAI's `stop` excludes it)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False  # a stop string was generated

    def push(self, token: int) -> str:
        """Add one token; return the text that is now safe to send."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # a character split across tokens: wait for the rest
        self.text = text
        cut = self._first_stop(max(0, self.sent - self._hold))
        if cut is not None:
            self.stopped, self.text = True, text[:cut]
            return self._take(len(self.text))
        return self._take(len(text) - self._hold)

    def finish(self) -> str:
        """The text still held back, once generation has ended."""
        return self._take(len(self.text))

    def _first_stop(self, start: int) -> int | None:
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:upto], upto
        return delta
