"""Stop sequences over streamed text: emit what cannot be the start of a stop string, cut at the first one.

OpenAI's `stop`: generation ends where the text first contains one of the strings, and the returned
text ends before it. Text pieces arrive token by token, so a stop string can span pieces; the matcher
holds back the longest tail that is still a prefix of some stop string and emits the rest.
"""

from __future__ import annotations


class StopMatcher:
    """`push(piece)` → text safe to emit now; `stopped` once a stop string appeared (later pushes emit
    nothing); `flush()` → what was held back, at the end of a generation that did not stop."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.stopped = False
        self._held = ""

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self._held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return text[:cut]
        keep = self._held_tail(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self._held = ("", "") if self.stopped else (self._held, "")
        return held

    def _held_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
