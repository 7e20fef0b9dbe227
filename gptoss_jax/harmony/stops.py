"""Stop strings on a text stream: the text that could still be the start of a stop string is held back until
the next piece decides, so a stop string never reaches the stream.

`StopStrings` is the one hold-back: the engine's `TextStream` (token bytes -> released text) and the
server's parsers (the text of the final answer, raw completions) all push their text through it.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopStrings:
    """Holds back the tail of a text stream that may start a stop string; reports the first full match.

    `push(text)` returns the text safe to emit now (all of it when there are no stop strings). Once a stop
    string is complete, `push` returns the text before it, `matched` names it (the earliest match; of
    matches starting at the same character, the first in sorted order) and every later push returns "".
    `flush()` releases the held tail when the stream ends without a match.
    """

    def __init__(self, stops: Iterable[str] | None):
        self.stops = tuple(s for s in (stops or ()) if s)
        self.held = ""
        self.matched: str | None = None

    @property
    def hit(self) -> bool:
        return self.matched is not None

    def push(self, text: str) -> str:
        if self.hit:
            return ""
        if not self.stops:
            return text
        buf = self.held + text
        hits = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            cut, self.matched = min(hits)
            self.held = ""
            return buf[:cut]
        keep = 0  # the longest suffix of buf that is a proper prefix of a stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
