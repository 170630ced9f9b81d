"""Stop strings for streamed text: nothing of a stop string ever reaches the client.

Text arrives in pieces that may split a stop string anywhere, so the detector holds back the
longest tail of what it has seen that could still grow into a stop string, and releases it as soon
as it cannot.
"""

from __future__ import annotations


class StopStringDetector:
    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add new text; return what is safe to emit. After a stop string is seen, `stopped` is True
        and the text returned ends right before it; later calls return ""."""
        if self.stopped:
            return ""
        if not self.stop:
            return text
        held = self._held + text
        first = min((i for i in (held.find(s) for s in self.stop) if i >= 0), default=-1)
        if first >= 0:
            self.stopped = True
            self._held = ""
            return held[:first]
        keep = self._longest_partial_suffix(held)
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep]

    def flush(self) -> str:
        """The held-back text, released when generation ends without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:length]):
                    best = length
                    break
        return best
