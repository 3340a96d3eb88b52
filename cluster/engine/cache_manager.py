"""Bookkeeping for the hybrid cache: which KV blocks and GDN state slots are free.

Full-attention layers need K/V for every past token, so a sequence holds ceil(tokens / P) blocks
that grow with it. Gated DeltaNet layers need one fixed-size state (conv window + recurrent
matrix) per sequence, so a running sequence holds exactly one slot, whatever its length. A slot
is handed out without zeroing: the first step of a sequence has `has_initial_state` False and
the model starts from zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

from cluster.engine.sequence import Sequence


@dataclass
class CachePlan:
    num_blocks: int
    block_size: int
    num_slots: int
    bytes_per_block: int
    bytes_per_slot: int

    @property
    def max_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self) -> str:
        kv = self.num_blocks * self.bytes_per_block / 2**20
        gdn = self.num_slots * self.bytes_per_slot / 2**20
        return (f"hybrid cache: {self.num_blocks} KV blocks x {self.block_size} tokens "
                f"({self.max_tokens} tokens, {kv:.1f} MiB) + {self.num_slots} GDN state slots "
                f"({self.bytes_per_slot / 2**10:.0f} KiB each, {gdn:.1f} MiB); "
                f"max concurrent sequences {self.num_slots}")


def plan_capacity(memory_bytes: int, bytes_per_block: int, bytes_per_slot: int,
                  block_size: int, num_slots: int, max_model_len: int) -> CachePlan:
    """Slots first (one per possible running sequence), the rest of the budget as KV blocks."""
    left = memory_bytes - num_slots * bytes_per_slot
    if bytes_per_block == 0:     # no full-attention layers: blocks cost nothing
        num_blocks = num_slots * -(-max_model_len // block_size)
    else:
        num_blocks = max(left, 0) // bytes_per_block
    if left < 0 or num_blocks < 1:
        raise ValueError(f"kv_cache_memory={memory_bytes} bytes is too small: {num_slots} GDN "
                         f"slots need {num_slots * bytes_per_slot} bytes and one KV block "
                         f"{bytes_per_block} more; raise kv_cache_memory or lower max_num_seqs")
    return CachePlan(num_blocks, block_size, num_slots, bytes_per_block, bytes_per_slot)


class CacheManager:
    def __init__(self, num_blocks: int, block_size: int, num_slots: int):
        self.block_size = block_size
        self.num_blocks, self.num_slots = num_blocks, num_slots
        self.free_blocks = list(range(num_blocks - 1, -1, -1))     # pop() hands out low ids first
        self.free_slots = list(range(num_slots - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_cached_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        slot_ok = seq.state_slot >= 0 or self.free_slots
        return bool(slot_ok) and self.blocks_needed(seq, num_new_tokens) <= len(self.free_blocks)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make room for `num_new_tokens` more tokens of `seq` (and give it a slot if needed)."""
        assert self.can_allocate(seq, num_new_tokens)
        if seq.state_slot < 0:
            seq.state_slot = self.free_slots.pop()
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self.free_blocks.pop())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(reversed(seq.block_table))
        seq.block_table = []
        if seq.state_slot >= 0:
            self.free_slots.append(seq.state_slot)
            seq.state_slot = -1
