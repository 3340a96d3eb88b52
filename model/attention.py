"""Gated full attention over a paged KV cache.

q_proj emits, per head, the query and an output gate side by side ([q_h | gate_h]); q and k are
RMS-normalised per head before partial RoPE; GQA; the attention output is multiplied by
sigmoid(gate) before o_proj. New K/V are written into their cache blocks first, then each query
attends to its sequence's whole context read back from the blocks.

Legend: T packed new tokens, N sequences, H hidden, NH query heads, KVH kv heads, G = NH/KVH
query heads per kv head, D head dim, B cache blocks, P block size, W blocks in a block table row,
S context length of one sequence, X = S*KVH score columns of every kv head, Q query chunk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.batch import ForwardBatch
from model.norm import RMSNorm
from model.rotary import RotaryEmbedding

QUERY_CHUNK = 1024          # long prompts attend in query chunks, so no T x T score matrix is built
DECODE_GROUP = 16           # at most this many decoding sequences per padded attention call
DECODE_GROUP_TOKENS = 2048  # CPU: padded context positions per group (n x S), so the group's
                            # gathered K/V (1 KiB a position at KVH 2, D 64, fp32) is still in
                            # cache when the two matmuls read it: ~2x faster than 16-sequence
                            # groups at batch 32-64 (benchmarks/attention.py)


class GatedAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, num_heads * head_dim * 2, bias=False)
        self.k_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

    def forward(self, x_TH, cos_TR, sin_TR, batch: ForwardBatch, kv_cache,
                keep_L: torch.Tensor | None = None) -> torch.Tensor:
        """-> [T, H], or only the rows keep_L [L, H]. K/V of every row go into the cache either
        way; when each kept row is its sequence's newest token (the rows that give logits) the
        queries, attention and o_proj run for those rows alone, each over its whole context."""
        T, KVH, D = x_TH.shape[0], self.num_kv_heads, self.head_dim
        k_TKD = self.k_proj(x_TH).view(T, KVH, D)
        v_TKD = self.v_proj(x_TH).view(T, KVH, D)
        k_TKD = RotaryEmbedding.apply(self.k_norm(k_TKD), cos_TR, sin_TR)
        k_cache, v_cache = kv_cache
        k_cache.view(-1, KVH, D)[batch.slot_mapping] = k_TKD
        v_cache.view(-1, KVH, D)[batch.slot_mapping] = v_TKD
        newest = None if keep_L is None or batch.is_decode else batch.newest_token_seqs(keep_L)
        if newest is not None:
            q_LND, gate_LX = self.queries(x_TH[keep_L], cos_TR[keep_L], sin_TR[keep_L])
            if newest:                          # else no row is kept: nothing to attend
                q_LND = decode_attention(q_LND, k_cache, v_cache, batch.subset(newest)[0])
            return self.o_proj(q_LND.flatten(1) * gate_LX)
        q_TND, gate_TX = self.queries(x_TH, cos_TR, sin_TR)
        if batch.is_decode:
            o_TND = decode_attention(q_TND, k_cache, v_cache, batch)
        else:
            o_TND = prefill_attention(q_TND, k_TKD, v_TKD, k_cache, v_cache, batch)
        o_TH = self.o_proj(o_TND.flatten(1) * gate_TX)
        return o_TH if keep_L is None else o_TH[keep_L]

    def queries(self, x_TH, cos_TR, sin_TR) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised, rotated queries [T, NH, D], the sigmoid output gate [T, NH*D])."""
        T, NH, D = x_TH.shape[0], self.num_heads, self.head_dim
        q_TN2D = self.q_proj(x_TH).view(T, NH, 2 * D)
        q_TND = RotaryEmbedding.apply(self.q_norm(q_TN2D[..., :D]), cos_TR, sin_TR)
        return q_TND, torch.sigmoid(q_TN2D[..., D:].reshape(T, NH * D))


def gather_blocks(cache_BPKD: torch.Tensor, tables_NW: torch.Tensor) -> torch.Tensor:
    """The cache blocks that the rows of `tables_NW` name, [N, W*P, KVH, D]. index_select, not
    `cache_BPKD[tables_NW]`: on CPU advanced indexing copies element by element, ~3x slower."""
    N, W = tables_NW.shape
    blocks = cache_BPKD.index_select(0, tables_NW.reshape(-1))              # [N*W, P, KVH, D]
    return blocks.view(N, W * cache_BPKD.shape[1], *cache_BPKD.shape[2:])


def gather_context(cache_BPKD: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first `length` cached positions, [S, KVH, D]."""
    P = cache_BPKD.shape[1]
    return gather_blocks(cache_BPKD, table[None, : (length + P - 1) // P])[0, :length]


def prefill_attention(q_TND, k_TKD, v_TKD, k_cache, v_cache, batch: ForwardBatch):
    """Causal attention for sequences whose new tokens sit at the end of their context."""
    out_TND = torch.empty_like(q_TND)
    cu = batch.cu_seqlens.tolist()
    for i, (q_len, ctx) in enumerate(zip(batch.query_lens, batch.context_lens_host)):
        s, e = cu[i], cu[i + 1]
        if q_len == ctx:   # nothing cached: attend to the fresh K/V directly
            k_SKD, v_SKD = k_TKD[s:e], v_TKD[s:e]
        else:
            k_SKD = gather_context(k_cache, batch.block_tables[i], ctx)
            v_SKD = gather_context(v_cache, batch.block_tables[i], ctx)
        out_TND[s:e] = causal_attention(q_TND[s:e], k_SKD, v_SKD)
    return out_TND


def causal_attention(q_QND, k_SKD, v_SKD) -> torch.Tensor:
    """Queries are the last Q of the S context positions; query chunks bound the score memory."""
    Q, S = q_QND.shape[0], k_SKD.shape[0]
    k, v = k_SKD.transpose(0, 1)[None], v_SKD.transpose(0, 1)[None]       # [1, KVH, S, D]
    out = []
    for start in range(0, Q, QUERY_CHUNK):
        q = q_QND[start:start + QUERY_CHUNK].transpose(0, 1)[None]        # [1, NH, Qc, D]
        first = S - Q + start                                             # context pos of row 0
        if first == 0 and q.shape[2] == S:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            end = first + q.shape[2]
            rows = torch.arange(first, end, device=q.device)[:, None]
            mask = torch.arange(end, device=q.device)[None, :] <= rows       # [Qc, end]
            o = F.scaled_dot_product_attention(q, k[:, :, :end], v[:, :, :end], attn_mask=mask,
                                               enable_gqa=True)
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


def decode_attention(q_NND, k_cache, v_cache, batch: ForwardBatch) -> torch.Tensor:
    """One query per sequence over its whole context. Sequences go in groups of similar context
    length (sorted), each group padded only to its own longest: padding every sequence to the
    step's longest context gathered and scored up to ~2x the keys in a mixed-length batch."""
    lens = batch.context_lens_host
    if not lens:                                   # an expert-parallel rank's empty step
        return torch.empty_like(q_NND)
    order = sorted(range(len(lens)), key=lens.__getitem__)
    sorted_lens = [lens[i] for i in order]
    order_N = torch.tensor(order, device=q_NND.device)
    q_NND = q_NND.index_select(0, order_N)
    tables_NW = batch.block_tables.index_select(0, order_N)
    context_lens_N = batch.context_lens.index_select(0, order_N)
    if q_NND.device.type == "cpu":
        P, KVH = k_cache.shape[1], k_cache.shape[2]
        bias_NX = padding_bias(context_lens_N, tables_NW.shape[1] * P, KVH)
        outs = [bmm_decode_attention(q_NND[a:b], k_cache, v_cache, tables_NW[a:b], bias_NX[a:b],
                                     sorted_lens[b - 1])
                for a, b in decode_groups(sorted_lens, DECODE_GROUP_TOKENS)]
    else:
        outs = [padded_decode_attention(q_NND[a:b], k_cache, v_cache, tables_NW[a:b],
                                        context_lens_N[a:b], sorted_lens[b - 1])
                for a, b in decode_groups(sorted_lens, None)]
    return torch.empty_like(q_NND).index_copy_(0, order_N, torch.cat(outs))


def decode_groups(sorted_lens: list[int], max_tokens: int | None) -> list[tuple[int, int]]:
    """[a, b) ranges over sequences sorted by context length: at most DECODE_GROUP sequences,
    and (when `max_tokens` is set) at most max_tokens padded positions unless one sequence alone
    has more."""
    groups, start = [], 0
    for end in range(1, len(sorted_lens) + 1):
        full = end - start == DECODE_GROUP or end == len(sorted_lens)
        if not full and max_tokens is not None:
            full = (end + 1 - start) * sorted_lens[end] > max_tokens
        if full:
            groups.append((start, end))
            start = end
    return groups


def padded_decode_attention(q_NND, k_cache, v_cache, tables_NW, context_lens_N, S: int) -> torch.Tensor:
    """Sequences padded to S context positions, the padding masked out; SDPA picks the device's
    fused kernel (the path off CPU)."""
    P = k_cache.shape[1]
    tables_NW = tables_NW[:, : (S + P - 1) // P]
    k = gather_blocks(k_cache, tables_NW)[:, :S].transpose(1, 2)            # [N, KVH, S, D]
    v = gather_blocks(v_cache, tables_NW)[:, :S].transpose(1, 2)
    valid_NS = torch.arange(S, device=q_NND.device)[None, :] < context_lens_N[:, None]
    q = q_NND[:, :, None, :]                                                # [N, NH, 1, D]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=valid_NS[:, None, None, :],
                                       enable_gqa=True)
    return o[:, :, 0, :]


def padding_bias(context_lens_N: torch.Tensor, S: int, KVH: int) -> torch.Tensor:
    """[N, X] float32: 0 where column x's position x // KVH is in the sequence's context, -inf
    after; laid out like the scores of bmm_decode_attention, built once a step, sliced per group."""
    pad_NS = torch.arange(S, device=context_lens_N.device)[None, :] >= context_lens_N[:, None]
    bias_NS = torch.zeros(pad_NS.shape, device=pad_NS.device).masked_fill_(pad_NS, float("-inf"))
    return bias_NS.repeat_interleave(KVH, dim=1)


def bmm_decode_attention(q_NND, k_cache, v_cache, tables_NW, bias_NX, S: int) -> torch.Tensor:
    """padded_decode_attention as two plain batched matmuls, the CPU path. Each query head scores
    the keys of every kv head (KVH x the flops) so both matmuls read the gathered blocks as they
    lie, [N, S*KVH, D], with no per-head copy; the G = NH/KVH heads' own kv head is the diagonal.
    One baddbmm scales and masks (bias_NX from padding_bias). fp32 arithmetic whatever the cache
    dtype (bf16 scores would round the softmax)."""
    N, NH, D = q_NND.shape
    P, KVH = k_cache.shape[1], k_cache.shape[2]
    G, W = NH // KVH, (S + P - 1) // P
    k = gather_blocks(k_cache, tables_NW[:, :W]).float().view(N, W * P * KVH, D)
    v = gather_blocks(v_cache, tables_NW[:, :W]).float().view(N, W * P, KVH * D)
    bias_N1X = bias_NX[:, None, : W * P * KVH].expand(N, NH, W * P * KVH)
    s = torch.baddbmm(bias_N1X, q_NND.float(), k.transpose(1, 2), alpha=D ** -0.5)  # [N, NH, X]
    s_NKGS = s.view(N, KVH, G, W * P, KVH).diagonal(dim1=1, dim2=4).permute(0, 3, 1, 2)
    p = torch.softmax(s_NKGS, dim=-1)
    o = torch.bmm(p.reshape(N, NH, W * P), v)                               # [N, NH, KVH*D]
    o_NGDK = o.view(N, KVH, G, KVH, D).diagonal(dim1=1, dim2=3)
    return o_NGDK.permute(0, 3, 1, 2).reshape(N, NH, D).to(q_NND.dtype)
