"""What the engine hands back per request (vLLM's names and fields).

Text and token ids are cumulative; `delta_text` / `delta_token_ids` hold only what is new since
the previous output of the same request (what a streaming server sends).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None          # only when logprobs were requested (as vLLM V1)
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None          # "stop" | "length" | "abort" | None (running)
    stop_reason: int | str | None = None      # the stop string or stop token id that ended it
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, float] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
