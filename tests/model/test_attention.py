"""Paged attention (decode and prefill) against a float64 reference that reads each sequence's
context position by position from its block table and applies a full causal softmax.

Awkward context lengths (1, P - 1, P, P + 1, multiples of P, long), block tables that are shuffled
and 0-padded, GQA with NH/KVH = 2 and 4, float32 and bfloat16 caches.

Legend: N sequences, T packed new tokens, B cache blocks, P block size, NH query heads,
KVH kv heads, D head dim, S context length.
"""
from __future__ import annotations

import pytest
import torch

import model.attention as attention
from model.attention import (bmm_decode_attention, decode_attention, decode_groups,
                             padded_decode_attention, padding_bias, prefill_attention)
from model.batch import ForwardBatch

P, D, B = 16, 32, 160
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}   # bf16: one rounding of outputs |o| < 2
DECODE_LENS = [1, 15, 16, 17, 32, 33, 5, 48, 200, 2, 64, 129, 16, 31, 1, 90, 47, 250, 3, 80]


def paged(lens: list[int], kvh: int, dtype, seed: int = 0):
    """Random K/V caches [B, P, KVH, D] and block tables: each sequence gets its blocks from one
    shuffled pool, so no table is contiguous and every row ends in 0-padding."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(B, P, kvh, D, generator=gen).to(dtype)
    v_cache = torch.randn(B, P, kvh, D, generator=gen).to(dtype)
    pool = torch.randperm(B, generator=gen).tolist()
    tables = []
    for n in lens:
        need = -(-n // P)
        tables.append(pool[:need])
        pool = pool[need:]
    return k_cache, v_cache, tables


def reference(q_QND, k_cache, v_cache, table: list[int], S: int) -> torch.Tensor:
    """Queries are context positions S-Q..S-1; each attends to positions 0..itself, float64."""
    Q, NH, _ = q_QND.shape
    k_SKD = torch.stack([k_cache[table[p // P], p % P] for p in range(S)]).double()
    v_SKD = torch.stack([v_cache[table[p // P], p % P] for p in range(S)]).double()
    G = NH // k_SKD.shape[1]
    k_SND, v_SND = k_SKD.repeat_interleave(G, dim=1), v_SKD.repeat_interleave(G, dim=1)
    scores_NQS = torch.einsum("qnd,snd->nqs", q_QND.double(), k_SND) / D ** 0.5
    future_QS = torch.arange(S)[None, :] > torch.arange(S - Q, S)[:, None]
    probs_NQS = torch.softmax(scores_NQS.masked_fill(future_QS, float("-inf")), dim=-1)
    return torch.einsum("nqs,snd->qnd", probs_NQS, v_SND)


def decode_case(lens, nh, kvh, dtype):
    k_cache, v_cache, tables = paged(lens, kvh, dtype)
    batch = ForwardBatch.build([1] * len(lens), [n - 1 for n in lens], tables,
                               list(range(len(lens))), P)
    q_NND = torch.randn(len(lens), nh, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    want_NND = torch.stack([reference(q_NND[i, None], k_cache, v_cache, t, n)[0]
                            for i, (t, n) in enumerate(zip(tables, lens))])
    return q_NND, k_cache, v_cache, batch, want_NND


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh,kvh", [(4, 2), (8, 2), (2, 1)])
@pytest.mark.parametrize("group_tokens", [2048, 64])
def test_decode_attention(monkeypatch, dtype, nh, kvh, group_tokens):
    """20 sequences: more than DECODE_GROUP, and at 64 tokens one group per long sequence."""
    monkeypatch.setattr(attention, "DECODE_GROUP_TOKENS", group_tokens)
    q_NND, k_cache, v_cache, batch, want_NND = decode_case(DECODE_LENS, nh, kvh, dtype)
    got_NND = decode_attention(q_NND, k_cache, v_cache, batch)
    assert got_NND.dtype == dtype
    torch.testing.assert_close(got_NND.double(), want_NND, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["bmm", "sdpa"])
def test_padded_decode_attention_one_group(dtype, path):
    """Both per-group paths (CPU bmm, SDPA off CPU), all sequences padded to the longest."""
    q_NND, k_cache, v_cache, batch, want_NND = decode_case(DECODE_LENS, 4, 2, dtype)
    tables_NW, S = batch.block_tables, max(DECODE_LENS)
    if path == "bmm":
        bias_NX = padding_bias(batch.context_lens, tables_NW.shape[1] * P, 2)
        got_NND = bmm_decode_attention(q_NND, k_cache, v_cache, tables_NW, bias_NX, S)
    else:
        got_NND = padded_decode_attention(q_NND, k_cache, v_cache, tables_NW, batch.context_lens, S)
    torch.testing.assert_close(got_NND.double(), want_NND, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("max_tokens", [None, 1, 64, 2048])
def test_decode_groups_cover_sorted_sequences_within_limits(max_tokens):
    lens = sorted(DECODE_LENS)
    groups = decode_groups(lens, max_tokens)
    assert [a for a, _ in groups] == [0] + [b for _, b in groups[:-1]]
    assert groups[0][0] == 0 and groups[-1][1] == len(lens)
    for a, b in groups:
        assert 0 < b - a <= attention.DECODE_GROUP
        if max_tokens is not None and b - a > 1:
            assert (b - a) * lens[b - 1] <= max_tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh,kvh", [(4, 2), (8, 2)])
def test_prefill_attention(dtype, nh, kvh):
    """Fresh prompts, prompt chunks after a cached prefix, and single decode tokens in one step."""
    query_lens = [17, 5, 16, 1, 40, 1, 3]
    cached_lens = [0, 16, 33, 64, 0, 0, 14]
    lens = [q + c for q, c in zip(query_lens, cached_lens)]
    k_cache, v_cache, tables = paged(lens, kvh, dtype)
    batch = ForwardBatch.build(query_lens, cached_lens, tables, list(range(len(lens))), P)
    k_TKD = k_cache.view(-1, kvh, D)[batch.slot_mapping]     # the new tokens' K/V, as forward
    v_TKD = v_cache.view(-1, kvh, D)[batch.slot_mapping]     # writes them before attending
    q_TND = torch.randn(sum(query_lens), nh, D, generator=torch.Generator().manual_seed(2)).to(dtype)
    got_TND = prefill_attention(q_TND, k_TKD, v_TKD, k_cache, v_cache, batch)
    cu = batch.cu_seqlens.tolist()
    want_TND = torch.cat([reference(q_TND[cu[i]:cu[i + 1]], k_cache, v_cache, tables[i], lens[i])
                          for i in range(len(lens))])
    torch.testing.assert_close(got_TND.double(), want_TND, atol=TOL[dtype], rtol=0)
