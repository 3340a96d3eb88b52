"""What one model step reads: the packed batch description and the hybrid cache it works on.

A step runs N sequences at once, their new tokens packed along one axis (T = total new tokens).
Full-attention layers keep K/V in fixed-size blocks (paged); Gated DeltaNet layers keep one state
slot per sequence (conv window + float32 recurrent state). The caller (the engine's model runner,
or a test) owns the allocation of blocks and slots; the model only reads and writes them.

Legend: N sequences, T packed new tokens, B blocks, P block size (tokens), S state slots,
KVH kv heads, D head dim, C conv channels, W conv window (kernel - 1), HV value heads,
K key head dim, V value head dim.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from model.config import ModelConfig


@dataclass
class ForwardBatch:
    positions: torch.Tensor          # [3, T] int64: M-RoPE streams (T, H, W); equal for text
    cu_seqlens: torch.Tensor         # [N+1] int32: new tokens of sequence i are rows cu[i]:cu[i+1]
    context_lens: torch.Tensor       # [N] int64: tokens in the KV cache after this step
    block_tables: torch.Tensor       # [N, max_blocks] int64: KV block ids per sequence (0-padded)
    slot_mapping: torch.Tensor       # [T] int64: flat KV index (block * P + offset) per new token
    state_slots: torch.Tensor        # [N] int64: GDN state slot per sequence
    has_initial_state: torch.Tensor  # [N] bool: False = start GDN/conv state from zeros
    logits_indices: torch.Tensor | None  # [L] int64 rows that need logits; None = every row
    query_lens: list[int]            # host copy of the per-sequence new-token counts
    context_lens_host: list[int]     # host copy of context_lens

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @functools.cached_property
    def decoding(self) -> list[bool]:
        """Per sequence: adds exactly one token to an existing state (the recurrent fast path)."""
        started = self.has_initial_state.tolist()
        return [q == 1 and s for q, s in zip(self.query_lens, started)]

    @property
    def is_decode(self) -> bool:
        return all(self.decoding)

    @functools.cached_property
    def decode_split(self) -> list[tuple["ForwardBatch", torch.Tensor | slice]]:
        """(sub-batch, its packed rows) for the decoding and the other sequences of a mixed step,
        so recurrent layers run decodes token by token and only prefills in chunks; a step of one
        kind is returned whole."""
        decode = [i for i, d in enumerate(self.decoding) if d]
        if not decode or len(decode) == self.num_seqs:
            return [(self, slice(None))]
        other = [i for i, d in enumerate(self.decoding) if not d]
        return [self.subset(decode), self.subset(other)]

    def newest_token_seqs(self, rows_L: torch.Tensor) -> list[int] | None:
        """The sequence of each packed row in rows_L when every one is its sequence's newest token
        (the last of its new tokens), else None."""
        newest = {end - 1: i for i, end in enumerate(self.cu_seqlens.tolist()[1:])}
        seqs = [newest.get(row) for row in rows_L.tolist()]
        return None if None in seqs else seqs

    def subset(self, seqs: list[int]) -> tuple["ForwardBatch", torch.Tensor]:
        """The step restricted to sequences `seqs` (no logits), and the packed rows they own."""
        cu = self.cu_seqlens.tolist()
        rows = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in seqs]).to(self.slot_mapping.device)
        pick = torch.tensor(seqs, device=self.slot_mapping.device)
        query_lens = [self.query_lens[i] for i in seqs]
        sub_cu = torch.tensor([0] + query_lens, device=self.cu_seqlens.device).cumsum(0)
        return ForwardBatch(
            positions=self.positions[:, rows], cu_seqlens=sub_cu.to(torch.int32),
            context_lens=self.context_lens[pick], block_tables=self.block_tables[pick],
            slot_mapping=self.slot_mapping[rows], state_slots=self.state_slots[pick],
            has_initial_state=self.has_initial_state[pick], logits_indices=None,
            query_lens=query_lens, context_lens_host=[self.context_lens_host[i] for i in seqs]), rows

    @staticmethod
    def build(query_lens: list[int], cached_lens: list[int], block_tables: list[list[int]],
              state_slots: list[int], block_size: int, positions: torch.Tensor | None = None,
              logits: str = "last", device: torch.device | str = "cpu") -> "ForwardBatch":
        """Describe a step. `cached_lens[i]` tokens of sequence i are already in the cache.

        positions: [3, T] for multimodal prompts; default = text positions cached..cached+q-1.
        logits: "last" (one row per sequence), "all" (every row) or "none".
        """
        assert len(query_lens) == len(cached_lens) == len(block_tables) == len(state_slots)
        ctx = [c + q for c, q in zip(cached_lens, query_lens)]
        cu = [0]
        for q in query_lens:
            cu.append(cu[-1] + q)
        slot_mapping = []
        for c, q, table in zip(cached_lens, query_lens, block_tables):
            for p in range(c, c + q):
                slot_mapping.append(table[p // block_size] * block_size + p % block_size)
        if positions is None:
            pos = torch.cat([torch.arange(c, c + q) for c, q in zip(cached_lens, query_lens)])
            positions = pos.unsqueeze(0).expand(3, -1)
        width = max((len(t) for t in block_tables), default=0)
        tables = [t + [0] * (width - len(t)) for t in block_tables]
        logits_indices = {"last": torch.tensor(cu[1:]) - 1, "all": None,
                          "none": torch.zeros(0, dtype=torch.long)}[logits]
        to = dict(device=device)
        return ForwardBatch(
            positions=positions.to(dtype=torch.long, **to),
            cu_seqlens=torch.tensor(cu, dtype=torch.int32, **to),
            context_lens=torch.tensor(ctx, dtype=torch.long, **to),
            block_tables=torch.tensor(tables, dtype=torch.long, **to).reshape(len(tables), width),
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, **to),
            state_slots=torch.tensor(state_slots, dtype=torch.long, **to),
            has_initial_state=torch.tensor([c > 0 for c in cached_lens], dtype=torch.bool, **to),
            logits_indices=None if logits_indices is None else logits_indices.to(**to),
            query_lens=list(query_lens), context_lens_host=ctx)


class HybridCache:
    """Per-layer cache tensors: paged K/V for full-attention layers, state slots for GDN layers.

    kv[i]   = (k [B, P, KVH, D], v [B, P, KVH, D])   in the model dtype
    conv[i] = [S, C, W]                               raw (pre-conv) inputs, model dtype
    ssm[i]  = [S, HV, K, V]                           float32 recurrent state
    """

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, num_slots: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.block_size, self.num_blocks, self.num_slots = block_size, num_blocks, num_slots
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, torch.Tensor] = {}
        for i, kind in enumerate(cfg.layer_types):
            if kind == "full_attention":
                shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
                self.kv[i] = (torch.zeros(shape, dtype=dtype, device=device),
                              torch.zeros(shape, dtype=dtype, device=device))
            else:
                self.conv[i] = torch.zeros(num_slots, cfg.conv_dim, cfg.linear_conv_kernel_dim - 1,
                                           dtype=dtype, device=device)
                self.ssm[i] = torch.zeros(num_slots, cfg.linear_num_value_heads,
                                          cfg.linear_key_head_dim, cfg.linear_value_head_dim,
                                          dtype=torch.float32, device=device)

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """K and V bytes of one block summed over all full-attention layers."""
        per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * _itemsize(dtype)
        return cfg.num_full_attention_layers * block_size * per_token

    @staticmethod
    def bytes_per_slot(cfg: ModelConfig, dtype: torch.dtype) -> int:
        """Conv window + fp32 recurrent state of one sequence, summed over all GDN layers."""
        conv = cfg.conv_dim * (cfg.linear_conv_kernel_dim - 1) * _itemsize(dtype)
        ssm = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
        return cfg.num_linear_attention_layers * (conv + ssm)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
