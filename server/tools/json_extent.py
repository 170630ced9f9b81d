"""Where a JSON object or array ends, found without decoding it: the text may still be arriving, and decoding
is left to `json` (which also rejects what this skims over, like mismatched brackets)."""

from __future__ import annotations

import re

_STRUCTURAL = re.compile(r'["\[\]{}]')  # outside strings, only quotes and brackets matter
_IN_STRING = re.compile(r'["\\]')  # inside one, only its closing quote, and escapes that hide a quote


class ContainerScan:
    """Finds the end of the object or array that starts at `start` (a bracket) in text that grows between calls.
    Each call reads on from where the last one stopped, so a long value costs linear time however finely it
    arrives."""

    def __init__(self, start: int):
        self.start = start
        self._at = start
        self._depth = 0
        self._in_string = False

    def end(self, text: str) -> int | None:
        """The index just past the value in `text` (the text of the last call, and maybe more), or None if it has
        not ended yet."""
        at = self._at
        while True:
            if self._in_string:
                found = _IN_STRING.search(text, at)
                if found is None:
                    at = len(text)
                    break
                if found.group() == '"':
                    self._in_string = False
                    at = found.end()
                elif found.end() < len(text):
                    at = found.end() + 1  # past the character the backslash escapes
                else:
                    at = found.start()  # the escaped character has not arrived: read the backslash again
                    break
            else:
                found = _STRUCTURAL.search(text, at)
                if found is None:
                    at = len(text)
                    break
                at = found.end()
                if found.group() == '"':
                    self._in_string = True
                else:
                    self._depth += 1 if found.group() in "[{" else -1
                    if self._depth == 0:
                        return at
        self._at = at
        return None
