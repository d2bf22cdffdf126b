"""An answer's text redacted as it streams, with a bounded look-behind.

A finding can arrive split across chunks (a card number over three token events), so the
last LOOK_BEHIND characters of what has arrived are held back: they reach the caller only
once at least that much more text has come after them, or when the answer ends. Any
finding no longer than LOOK_BEHIND characters is therefore seen whole before any of it is
passed on; a longer one (an e-mail address of more than 64 characters, a PEM body) may be
passed on in part. The text is inspected once per LOOK_BEHIND characters (a window of at
most three times that), not once per token: the caller receives the answer in pieces of
about LOOK_BEHIND characters, a window's worth later than it was generated.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

from charter.inspection.detect import Detector, InspectionUnavailableError

LOOK_BEHIND = 64  # characters held back: the longest finding always seen whole


class StreamRedactor:
    """One stream of text (one choice of an answer): feed() each piece as it arrives and
    pass on what it gives back; finish() at the end gives the rest. `counts`: what was
    replaced, by type."""

    def __init__(self, detector: Detector, types: Collection[str], *,
                 look_behind: int = LOOK_BEHIND) -> None:
        self.detector, self.types, self.look_behind = detector, tuple(types), look_behind
        self.counts: Counter[str] = Counter()
        self._held = ""

    def feed(self, text: str) -> str:
        self._held += text
        if len(self._held) < 2 * self.look_behind:
            return ""
        return self._release(final=False)

    def finish(self) -> str:
        return self._release(final=True) if self._held else ""

    def whole(self, text: str) -> str:
        """`text` redacted at once (not counted: the stream counted it as it passed)."""
        return self._redact(text)[0]

    def _redact(self, text: str) -> tuple[str, dict[str, int]]:
        """InspectionUnavailableError, whatever broke: the stream cannot go on."""
        try:
            return self.detector.redact(text, self.types)
        except Exception as exc:
            raise InspectionUnavailableError(f"{type(exc).__name__}: {exc}") from exc

    def _release(self, *, final: bool) -> str:
        text, found = self._redact(self._held)
        self.counts.update(found)
        cut = len(text) if final else len(text) - self.look_behind
        out, self._held = text[:cut], text[cut:]
        return out
