"""Paged attention on CPU, each path vs the implementation it replaced (copied below between the
`baseline` lines), same inputs, same run: decode_attention, and prefill_attention on a mixed
step (one-token decodes beside a prompt chunk after a cached prefix).

Shapes of one full-attention layer of the `demo` preset: 4 query heads, 2 kv heads, head dim 64,
block size 16, fp32. Batch 1, 8, 32, 64 with context lengths drawn from 32..1100 (seeded), each
sequence's blocks scattered over the cache. The two paths take turns, each figure the best of
`--rounds`, since the machine is shared and noisy. `--cold` evicts the CPU caches before every
call (the engine runs the other layers between two attention calls); by default the K/V blocks
may still be cached from the previous call, which favours neither side.

Run: python -m benchmarks.attention [--threads 1] [--rounds 7] [--cold]
"""
from __future__ import annotations

import argparse
import random
import time
import types

import torch
import torch.nn.functional as F

from model.attention import causal_attention, decode_attention, prefill_attention
from model.batch import ForwardBatch

NH, KVH, D, P = 4, 2, 64, 16
BATCHES = (1, 8, 32, 64)


# ---- baseline: decode attention as it was before this benchmark (commit 149c57e) ----
BASELINE_GROUP = 16


def baseline_decode_attention(q_NND, k_cache, v_cache, batch) -> torch.Tensor:
    lens = batch.context_lens_host
    order = sorted(range(len(lens)), key=lens.__getitem__)
    out_NND = torch.empty_like(q_NND)
    for g in range(0, len(order), BASELINE_GROUP):
        members = order[g:g + BASELINE_GROUP]
        idx = torch.tensor(members, device=q_NND.device)
        out_NND[idx] = baseline_padded_decode_attention(
            q_NND[idx], k_cache, v_cache, batch.block_tables[idx], batch.context_lens[idx],
            lens[members[-1]])
    return out_NND


def baseline_padded_decode_attention(q_NND, k_cache, v_cache, tables_NB, context_lens_N, S):
    P = k_cache.shape[1]
    tables_NB = tables_NB[:, : (S + P - 1) // P]
    k = k_cache[tables_NB].flatten(1, 2)[:, :S].transpose(1, 2)              # [N, KVH, S, D]
    v = v_cache[tables_NB].flatten(1, 2)[:, :S].transpose(1, 2)
    valid_NS = torch.arange(S, device=q_NND.device)[None, :] < context_lens_N[:, None]
    q = q_NND[:, :, None, :]                                                # [N, NH, 1, D]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=valid_NS[:, None, None, :],
                                       enable_gqa=True)
    return o[:, :, 0, :]


def baseline_gather_context(cache_BPKD, table, length):
    P = cache_BPKD.shape[1]
    blocks = table[: (length + P - 1) // P]
    return cache_BPKD[blocks].flatten(0, 1)[:length]


def baseline_prefill_attention(q_TND, k_TKD, v_TKD, k_cache, v_cache, batch):
    out_TND = torch.empty_like(q_TND)
    cu = batch.cu_seqlens.tolist()
    for i, (q_len, ctx) in enumerate(zip(batch.query_lens, batch.context_lens_host)):
        s, e = cu[i], cu[i + 1]
        if q_len == ctx:
            k_SKD, v_SKD = k_TKD[s:e], v_TKD[s:e]
        else:
            k_SKD = baseline_gather_context(k_cache, batch.block_tables[i], ctx)
            v_SKD = baseline_gather_context(v_cache, batch.block_tables[i], ctx)
        out_TND[s:e] = causal_attention(q_TND[s:e], k_SKD, v_SKD)
    return out_TND
# ---- end of baseline ----


def decode_inputs(N: int, num_blocks: int, seed: int = 0):
    """q [N, NH, D], K/V caches [num_blocks, P, KVH, D], and the batch fields decode reads."""
    rng = random.Random(seed)
    lens = [rng.randint(32, 1100) for _ in range(N)]
    pool = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    width = max(-(-n // P) for n in lens)
    tables = torch.zeros(N, width, dtype=torch.long)
    for i, n in enumerate(lens):
        tables[i, : -(-n // P)] = torch.tensor(pool[: -(-n // P)])
        pool = pool[-(-n // P):]
    batch = types.SimpleNamespace(context_lens_host=lens, context_lens=torch.tensor(lens),
                                  block_tables=tables)
    k_cache, v_cache = torch.randn(2, num_blocks, P, KVH, D).unbind(0)
    return torch.randn(N, NH, D), k_cache, v_cache, batch


def mixed_inputs(num_decode: int, num_blocks: int, seed: int = 0):
    """A step through prefill_attention: `num_decode` one-token decodes (contexts 32..1100) and a
    256-token prompt chunk after 512 cached tokens; q [T, NH, D], new K/V, caches, batch."""
    rng = random.Random(seed)
    query_lens = [1] * num_decode + [256]
    cached_lens = [rng.randint(31, 1099) for _ in range(num_decode)] + [512]
    pool = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables = []
    for n in (q + c for q, c in zip(query_lens, cached_lens)):
        tables.append(pool[: -(-n // P)])
        pool = pool[-(-n // P):]
    batch = ForwardBatch.build(query_lens, cached_lens, tables, list(range(len(tables))), P)
    k_cache, v_cache = torch.randn(2, num_blocks, P, KVH, D).unbind(0)
    k_TKD = k_cache.view(-1, KVH, D)[batch.slot_mapping]
    v_TKD = v_cache.view(-1, KVH, D)[batch.slot_mapping]
    return torch.randn(len(batch.slot_mapping), NH, D), k_TKD, v_TKD, k_cache, v_cache, batch


def best_ms(fn, args, evict) -> float:
    """One call in ms; `evict` runs (untimed) before it."""
    evict()
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1e3


def race(N: int, baseline, new, inputs, rounds: int, evict):
    """Print one row: the two paths in alternating rounds, each one's best, and max |diff|."""
    diff = (new(*inputs) - baseline(*inputs)).abs().max()
    old_ms = new_ms = float("inf")
    for _ in range(rounds):
        old_ms = min(old_ms, best_ms(baseline, inputs, evict))
        new_ms = min(new_ms, best_ms(new, inputs, evict))
    print(f"{N:>5} {old_ms:>12.2f} {new_ms:>8.2f} {old_ms / new_ms:>7.2f}x {float(diff):>10.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cold", action="store_true", help="evict CPU caches before each call")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scratch = torch.zeros(512 << 20 >> 2) if args.cold else None                # 512 MiB

    def evict():
        if scratch is not None:
            scratch.add_(1)

    num_blocks = 8192   # 128 MiB for K and for V: more than the 64 x 1100-token batch uses
    header = f"{'batch':>5} {'baseline ms':>12} {'new ms':>8} {'speedup':>8} {'max|diff|':>10}"
    print(f"NH={NH} KVH={KVH} D={D} P={P} fp32, contexts 32..1100, {args.threads} thread(s), "
          f"best of {args.rounds} alternating rounds"
          f"{', caches evicted before each call' if args.cold else ''}")
    with torch.inference_mode():
        print(f"\ndecode_attention\n{header}")
        for N in BATCHES:
            race(N, baseline_decode_attention, decode_attention, decode_inputs(N, num_blocks, seed=N),
                 args.rounds, evict)
        print(f"\nprefill_attention, mixed step: N-1 decodes + a 256-token chunk after 512 cached\n"
              f"{header}")
        for N in BATCHES[1:]:
            race(N, baseline_prefill_attention, prefill_attention,
                 mixed_inputs(N - 1, num_blocks, seed=N), args.rounds, evict)


if __name__ == "__main__":
    main()
