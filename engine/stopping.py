"""Stop strings over a stream of text pieces.

Text that could be the beginning of a stop string is held back until the next pieces settle it: either the
stop string completes (generation ends, the stop string and anything after it are never sent) or it turns out
to be ordinary text and is released.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop: list[str]) -> None:
        self.stop = [s for s in stop if s]
        self.pending = ""  # text received but not yet released

    def push(self, piece: str) -> tuple[str, bool]:
        """Feed new text; return (text safe to send now, whether a stop string was hit)."""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            released, self.pending = self.pending[: min(hits)], ""
            return released, True
        held = self._longest_partial_match()
        released = self.pending[: len(self.pending) - held]
        self.pending = self.pending[len(released) :]
        return released, False

    def flush(self) -> str:
        released, self.pending = self.pending, ""
        return released

    def _longest_partial_match(self) -> int:
        """Length of the longest suffix of pending text that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stop:
            for length in range(min(len(s) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(s[:length]):
                    longest = length
                    break
        return longest
