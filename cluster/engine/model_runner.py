"""Run the model on one scheduled step: pack the new tokens, describe the step, get logits.

Rows that need logits: the last new token of every sequence whose whole token list is now in
the cache (it samples next), and, for a request that asked for prompt logprobs and has not got
them all yet, every prompt row of its chunk.

Legend: T packed new tokens, L rows with logits, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.engine.sequence import Sequence
from model.batch import ForwardBatch, HybridCache


@dataclass
class StepLogits:
    logits_LV: torch.Tensor
    sample_rows: dict[int, int]              # seq_id -> row of logits_LV to sample from
    prompt_rows: dict[int, tuple[int, int]]  # seq_id -> (first row, first target position)


def wants_prompt_logprobs(seq: Sequence, start: int) -> bool:
    """Prompt logprobs still missing for targets this chunk can score (choice 0 holds them)."""
    done = seq.prompt_logprobs
    P = seq.num_prompt_tokens
    return done is not None and len(done) < P and start < P - 1


class ModelRunner:
    def __init__(self, model, cache: HybridCache, block_size: int, device: torch.device | str):
        self.model, self.cache = model, cache
        self.block_size, self.device = block_size, torch.device(device)

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]) -> StepLogits:
        ids, rows, sample_rows, prompt_rows, offset = [], [], {}, {}, 0
        for seq, n in scheduled:
            start = seq.num_cached_tokens
            ids.extend(seq.token_ids[start:start + n])
            if wants_prompt_logprobs(seq, start):
                prompt_rows[seq.seq_id] = (len(rows), start + 1)
                rows.extend(range(offset, offset + min(n, seq.num_prompt_tokens - 1 - start)))
            if start + n == seq.num_tokens:
                sample_rows[seq.seq_id] = len(rows)
                rows.append(offset + n - 1)
            offset += n
        batch = self.describe(scheduled, rows)
        input_ids_T = torch.tensor(ids, dtype=torch.long, device=self.device)
        logits_LV = self.model(input_ids_T, batch, self.cache)
        return StepLogits(logits_LV, sample_rows, prompt_rows)

    @torch.inference_mode()
    def run_empty(self) -> None:
        """A forward over zero tokens (T = 0): no cache is touched, no logits come out."""
        batch = ForwardBatch.build([], [], [], [], self.block_size,
                                   positions=torch.zeros(3, 0, dtype=torch.long), logits="none",
                                   device=self.device)
        self.model(torch.zeros(0, dtype=torch.long, device=self.device), batch, self.cache)

    def describe(self, scheduled: list[tuple[Sequence, int]], rows: list[int]) -> ForwardBatch:
        batch = ForwardBatch.build(
            query_lens=[n for _, n in scheduled],
            cached_lens=[s.num_cached_tokens for s, _ in scheduled],
            block_tables=[s.block_table for s, _ in scheduled],
            state_slots=[s.state_slot for s, _ in scheduled],
            block_size=self.block_size, logits="none", device=self.device)
        batch.logits_indices = torch.tensor(rows, dtype=torch.long, device=self.device)
        return batch
