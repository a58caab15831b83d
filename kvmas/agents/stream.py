"""Token ids to text deltas as they are decoded, such that the deltas add up to exactly the text ``speak``
returns: a suffix that could still become a stop string (or an incomplete UTF-8 character) is held back.

>>> from kvmas.testing import tiny_model
>>> m = tiny_model()
>>> s = TextStream(m, stop=("END",))
>>> ids = m.encode("ab ENDcd")
>>> out = "".join(s.push(i) for i in ids)
>>> out + s.close("ab ") == "ab "
True
"""

from __future__ import annotations

from typing import Sequence


class TextStream:
    """Incremental detokenizer for one row of a ``speak``."""

    def __init__(self, model, stop: Sequence[str] = ()):
        self.model, self.stop = model, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = ""
        self.ended = False

    def push(self, token_id: int) -> str:
        """The new text ``token_id`` makes safe to show ("" while it is held back)."""
        if self.ended:
            return ""
        self.ids.append(token_id)
        text = self.model.decode(self.ids)
        hit = min((text.find(s) for s in self.stop if s in text), default=-1)
        if hit >= 0:
            self.ended = True
            return self._emit(text[:hit])
        safe = text.rstrip("\ufffd")  # a multi-byte character still being decoded
        for s in self.stop:  # a tail that may be the start of a stop string waits
            for k in range(min(len(s) - 1, len(safe)), 0, -1):
                if safe.endswith(s[:k]):
                    safe = safe[:-k]
                    break
        return self._emit(safe)

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.sent) or not upto.startswith(self.sent):
            return ""
        delta, self.sent = upto[len(self.sent):], upto
        return delta

    def close(self, final_text: str) -> str:
        """What is left to send so that everything sent equals ``final_text``."""
        return final_text[len(self.sent):] if final_text.startswith(self.sent) else ""
