"""Per-request sampling settings, named as vLLM names them (users already know these).

Validated once, at construction, so a bad request fails before the engine does any work.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class SamplingError(ValueError):
    """A sampling setting out of range; the message names the field and the allowed range."""


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16            # None: up to max_model_len
    min_tokens: int = 0
    temperature: float = 1.0               # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                         # 0 or -1 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None            # top-k logprobs per generated token (+ the chosen one)
    prompt_logprobs: int | None = None     # top-k per prompt token (+ the actual one)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        def need(ok: bool, name: str, rule: str):
            if not ok:
                raise SamplingError(f"{name} {rule}, got {getattr(self, name)!r}")
        need(_is_int(self.n) and self.n >= 1, "n", "must be an integer >= 1")
        need(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
             "max_tokens", "must be an integer >= 1 or None")
        need(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "must be >= 0")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             f"must be <= max_tokens={self.max_tokens}")
        need(_is_num(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0")
        need(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(_is_int(self.top_k) and self.top_k >= 0, "top_k", "must be -1, 0 (off) or >= 1")
        need(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            need(_is_num(getattr(self, name)) and -2 <= getattr(self, name) <= 2, name,
                 "must be in [-2, 2]")
        need(_is_num(self.repetition_penalty) and self.repetition_penalty > 0,
             "repetition_penalty", "must be > 0")
        need(self.seed is None or _is_int(self.seed), "seed", "must be an integer or None")
        need(all(isinstance(s, str) and s for s in self.stop), "stop",
             "must be non-empty strings")
        need(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
             "must be non-negative integers")
        for name in ("logprobs", "prompt_logprobs"):
            need(getattr(self, name) is None or (_is_int(getattr(self, name))
                                                 and getattr(self, name) >= 0), name,
                 "must be an integer >= 0 or None")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x
