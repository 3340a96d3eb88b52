"""Split a Qwen3.5 completion into `reasoning_content` (inside <think>…</think>) and `content`.

With thinking on, the chat template ends the prompt with "<think>\n", so the model's text
starts inside the reasoning and `</think>` ends it; a model that never closes the block spent
every token reasoning. With thinking off the template already closed the block, so everything
is content. A leading "<think>" the model writes itself is dropped either way.
"""
from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def split_reasoning(text: str, thinking: bool) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole completion."""
    if not thinking:
        return None, text
    body = text.removeprefix(OPEN)
    if CLOSE not in body:
        return body.strip("\n") or None, ""
    reasoning, content = body.split(CLOSE, 1)
    return reasoning.strip("\n") or None, content.lstrip("\n")


def held_back(text: str, marker: str) -> int:
    """How many trailing characters of `text` could be the start of `marker` (wait for more)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ReasoningStream:
    """The streaming form of `split_reasoning`: feed text deltas, get (reasoning, content) deltas.

    Text that could be the start of a marker is held back until the next delta decides it, and
    the newlines around the markers are dropped as in the whole-text split.
    """

    def __init__(self, thinking: bool):
        self.in_reasoning = thinking
        self.pending = ""
        self.started = False          # anything emitted in the current part yet
        self.opening = thinking       # a leading <think> may still come

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        text = self.pending + delta
        if self.opening:
            if not final and len(text) < len(OPEN) and OPEN.startswith(text):
                self.pending = text
                return "", ""
            text, self.opening = text.removeprefix(OPEN), False
        if not self.in_reasoning:
            self.pending = ""
            return "", self.emit(text)
        if CLOSE in text:
            reasoning, content = text.split(CLOSE, 1)
            out = self.emit(reasoning.rstrip("\n"))
            self.in_reasoning, self.started, self.pending = False, False, ""
            return out, self.emit(content)
        if final:
            self.pending = ""
            return self.emit(text.rstrip("\n")), ""
        marker = held_back(text, CLOSE)
        before = text[:len(text) - marker]
        keep = marker + len(before) - len(before.rstrip("\n"))
        self.pending = text[len(text) - keep:] if keep else ""
        return self.emit(text[:len(text) - keep]), ""

    def emit(self, text: str) -> str:
        """Drop the newlines that open a part (the template's and the model's "\n" after a tag)."""
        if not self.started:
            text = text.lstrip("\n")
            self.started = bool(text)
        return text
