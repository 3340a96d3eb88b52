"""One generated continuation: its tokens, how many of them sit in the cache, and where.

A sequence owns a list of KV block ids (full-attention layers) and one GDN state slot while it
runs. `num_cached_tokens` counts the tokens whose K/V and recurrent state are already written;
the next step must feed `token_ids[num_cached_tokens:]` (a prompt chunk, or the one token
sampled last step). Preemption by recompute just sets it back to zero.

A sequence whose prompt has images carries its `MultimodalPrompt` (`mm`: M-RoPE positions, which
rows are image rows) and, while its prompt is being prefilled, the vision encoder's output for
it (`vision`, [M, H]); the runner fills `vision` at the first chunk that holds image rows and
drops it once the prompt is in the cache. Recompute after preemption encodes the images again.
"""
from __future__ import annotations

from enum import Enum, auto

import torch

from cluster.engine.detokenizer import Detokenizer
from cluster.engine.sampling_params import SamplingParams
from model.mrope import MultimodalPrompt


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, generator: torch.Generator, detokenizer: Detokenizer,
                 priority: int = 0, arrival: int = 0, mm: MultimodalPrompt | None = None):
        self.seq_id, self.request_id, self.index = seq_id, request_id, index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params, self.generator, self.detokenizer = params, generator, detokenizer
        self.priority, self.arrival = priority, arrival
        self.status = SequenceStatus.WAITING
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        self.state_slot = -1
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict[int, float]] = []
        # position 0 has no logprob; only choice 0 of a request collects them
        wants = params.prompt_logprobs is not None and index == 0
        self.prompt_logprobs: list[dict[int, float] | None] | None = [None] if wants else None
        self.cumulative_logprob = 0.0
        self.num_preemptions = 0
        self.mm = mm
        self.vision: torch.Tensor | None = None         # image tokens [M, H] during prefill
        self.video_vision: torch.Tensor | None = None   # video tokens [M, H] during prefill

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Smaller runs first: priority, then arrival (FCFS), then choice index."""
        return (self.priority, self.arrival, self.seq_id)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncached_tokens(self) -> int:
        return len(self.token_ids) - self.num_cached_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprob: float | None,
                     top_logprobs: dict[int, float] | None) -> None:
        self.token_ids.append(token_id)
        if logprob is not None:
            self.cumulative_logprob += logprob
            self.logprobs.append(top_logprobs)

    def reset_for_recompute(self) -> None:
        """Forget the cache contents; the whole token list (prompt + outputs) is fed again."""
        self.num_cached_tokens = 0
        self.vision = self.video_vision = None
        self.num_preemptions += 1
        self.status = SequenceStatus.WAITING

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.vision = self.video_vision = None
        self.status = SequenceStatus.FINISHED
        self.finish_reason, self.stop_reason = reason, stop_reason
