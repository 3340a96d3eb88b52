"""Run the model on one scheduled step: pack the new tokens, describe the step, get the hidden
states of the rows that need logits (the sampler applies the lm_head, so a greedy row never
needs its full logits materialised).

Rows that need logits: the last new token of every sequence whose whole token list is now in
the cache (it samples next), and, for a request that asked for prompt logprobs and has not got
them all yet, every prompt row of its chunk.

A step that holds a sequence with images (`seq.mm`) also gets M-RoPE positions for every row
and, when a prompt chunk holds image rows, input embeddings with the vision tokens written in
(`multimodal_inputs`); text-only steps take the plain path.

Legend: T packed new tokens, L rows with logits, H hidden, M vision tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.engine.sequence import Sequence
from model.batch import ForwardBatch, HybridCache


@dataclass
class StepHidden:
    hidden_LH: torch.Tensor                  # final hidden states of the rows with logits
    sample_rows: dict[int, int]              # seq_id -> row of logits_LV to sample from
    prompt_rows: dict[int, tuple[int, int]]  # seq_id -> (first row, first target position)


def wants_prompt_logprobs(seq: Sequence, start: int) -> bool:
    """Prompt logprobs still missing for targets this chunk can score (choice 0 holds them)."""
    done = seq.prompt_logprobs
    P = seq.num_prompt_tokens
    return done is not None and len(done) < P and start < P - 1


def text_positions(start: int, n: int) -> torch.Tensor:
    """[3, n]: a text run's M-RoPE positions, equal on all three streams."""
    return torch.arange(start, start + n).expand(3, -1)


class ModelRunner:
    def __init__(self, model, cache: HybridCache, block_size: int, device: torch.device | str):
        self.model, self.cache = model, cache
        self.block_size, self.device = block_size, torch.device(device)

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]) -> StepHidden:
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
        input_ids_T = torch.tensor(ids, dtype=torch.long, device=self.device)
        positions_3T, embeds_TH = self.multimodal_inputs(scheduled, input_ids_T)
        batch = self.describe(scheduled, rows, positions_3T)
        hidden_LH = self.model.hidden(input_ids_T, batch, self.cache, inputs_embeds_TH=embeds_TH)
        return StepHidden(hidden_LH, sample_rows, prompt_rows)

    def multimodal_inputs(self, scheduled: list[tuple[Sequence, int]], input_ids_T: torch.Tensor
                          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(positions [3, T], embeddings [T, H] or None) when a sequence of the step has images;
        (None, None) otherwise. Encodes a sequence's images at its first chunk with image rows,
        keeps them until its prompt is in the cache (chunks may split an image span)."""
        if all(seq.mm is None for seq, _ in scheduled):
            return None, None
        positions, masks, rows, video_masks, video_rows = [], [], [], [], []
        for seq, n in scheduled:
            start, mm = seq.num_cached_tokens, seq.mm
            positions.append(text_positions(start, n) if mm is None
                             else mm.positions(start, start + n))
            masks.append(torch.zeros(n, dtype=torch.bool) if mm is None
                         else mm.image_mask(start, start + n))
            video_masks.append(torch.zeros(n, dtype=torch.bool) if mm is None
                               else mm.video_mask(start, start + n))
            if mm is not None:
                rows.extend(self.vision_rows(seq, start, start + n))
                video_rows.extend(self.video_rows(seq, start, start + n))
        if not rows and not video_rows:             # decodes / text chunks only
            return torch.cat(positions, dim=1), None
        embeds_TH = self.model.embed(
            input_ids_T, image_embeds_MH=torch.cat(rows) if rows else None,
            image_mask_T=torch.cat(masks),
            video_embeds_MH=torch.cat(video_rows) if video_rows else None,
            video_mask_T=torch.cat(video_masks) if video_rows else None)
        return torch.cat(positions, dim=1), embeds_TH

    def vision_rows(self, seq: Sequence, start: int, end: int) -> list[torch.Tensor]:
        """This chunk's rows of the sequence's image tokens ([] when it has none)."""
        a, b = seq.mm.image_rows(start, end)
        if a < b and seq.vision is None:
            seq.vision = self.model.encode_images(seq.mm.pixel_values, seq.mm.grid_thw)
        chunk = [seq.vision[a:b]] if a < b else []
        if end >= seq.num_prompt_tokens:            # prompt done: the encoder output is spent
            seq.vision = None
        return chunk

    def video_rows(self, seq: Sequence, start: int, end: int) -> list[torch.Tensor]:
        """This chunk's rows of the sequence's video tokens ([] when it has none)."""
        a, b = seq.mm.video_rows(start, end)
        if a < b and seq.video_vision is None:
            seq.video_vision = self.model.encode_videos(seq.mm.pixel_values_videos,
                                                        seq.mm.video_grid_thw)
        chunk = [seq.video_vision[a:b]] if a < b else []
        if end >= seq.num_prompt_tokens:
            seq.video_vision = None
        return chunk

    @torch.inference_mode()
    def run_empty(self) -> None:
        """A forward over zero tokens (T = 0): no cache is touched, no logits come out."""
        batch = ForwardBatch.build([], [], [], [], self.block_size,
                                   positions=torch.zeros(3, 0, dtype=torch.long), logits="none",
                                   device=self.device)
        self.model(torch.zeros(0, dtype=torch.long, device=self.device), batch, self.cache)

    def describe(self, scheduled: list[tuple[Sequence, int]], rows: list[int],
                 positions_3T: torch.Tensor | None = None) -> ForwardBatch:
        batch = ForwardBatch.build(
            query_lens=[n for _, n in scheduled],
            cached_lens=[s.num_cached_tokens for s, _ in scheduled],
            block_tables=[s.block_table for s, _ in scheduled],
            state_slots=[s.state_slot for s, _ in scheduled],
            block_size=self.block_size, positions=positions_3T, logits="none",
            device=self.device)
        batch.logits_indices = torch.tensor(rows, dtype=torch.long, device=self.device)
        return batch
