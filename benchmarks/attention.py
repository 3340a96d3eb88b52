"""Decode attention over the paged KV cache on CPU: model.attention.decode_attention vs the
implementation it replaced (copied below as `baseline_decode_attention`), same inputs, same run.

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

from model.attention import decode_attention

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


def best_ms(fn, args, rounds: int, evict) -> float:
    """Best of `rounds` calls, in ms; `evict` runs (untimed) before each."""
    best = float("inf")
    for _ in range(rounds):
        evict()
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


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
    print(f"decode attention, NH={NH} KVH={KVH} D={D} P={P} fp32, contexts 32..1100, "
          f"{args.threads} thread(s), best of {args.rounds} alternating rounds"
          f"{', caches evicted before each call' if args.cold else ''}")
    print(f"{'batch':>5} {'baseline ms':>12} {'new ms':>8} {'speedup':>8} {'max|diff|':>10}")
    with torch.inference_mode():
        for N in BATCHES:
            inputs = decode_inputs(N, num_blocks, seed=N)
            diff = (decode_attention(*inputs) - baseline_decode_attention(*inputs)).abs().max()
            old = new = float("inf")
            for _ in range(args.rounds):
                old = min(old, best_ms(baseline_decode_attention, inputs, 1, evict))
                new = min(new, best_ms(decode_attention, inputs, 1, evict))
            print(f"{N:>5} {old:>12.2f} {new:>8.2f} {old / new:>7.2f}x {float(diff):>10.1e}")


if __name__ == "__main__":
    main()
