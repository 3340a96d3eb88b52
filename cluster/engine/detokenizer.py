"""Incremental detokenization with stop strings.

Byte-level BPE splits multi-byte characters across tokens, so text is decoded from a short
window of ids (`prefix_offset:`) and only the part that grew past the window's previous text is
taken, and only once it no longer ends in U+FFFD (an incomplete character). Stop strings may
span tokens; the text is searched after each token, and a streaming reader is held back by the
longest stop string minus one character so a stop string never appears and then vanishes.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool,
                 stop: list[str], include_stop: bool, context: int = 6):
        self.tokenizer, self.skip_special = tokenizer, skip_special_tokens
        self.stop, self.include_stop = stop, include_stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        # a few prompt tokens as left context, so a token that continues a character still decodes
        self.ids = list(prompt_token_ids[-context:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.emitted = 0          # characters of `text` handed out to a streaming reader

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one generated token; returns the stop string it completed, if any."""
        self.ids.append(token_id)
        delta = self._decode_delta()
        if not delta:
            return None
        start = max(0, len(self.text) - self.hold)
        self.text += delta
        return self._find_stop(start) if check_stop else None

    def flush(self) -> None:
        """At the end of generation: whatever is still pending (possibly U+FFFD) becomes text."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix):
            self.text += full[len(prefix):]
        self.prefix_offset = self.read_offset = len(self.ids)

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out, minus a tail that might still turn into a stop string."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.hold)
        out, self.emitted = self.text[self.emitted:end], end
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def _decode_delta(self) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def _find_stop(self, start: int) -> str | None:
        """Search text[start:] (the new part plus the held-back tail) for the earliest stop."""
        best = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[:i + len(s)] if self.include_stop else self.text[:i]
        return s
