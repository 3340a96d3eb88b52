"""Gated DeltaNet on CPU, each path vs the implementation it replaced, same inputs, same run: the
decode delta rule (one token per sequence against a slot pool) vs the general per-position path
it bypasses (`recurrent_steps`), the decode conv update and the prefill causal conv vs their
old code (copied below between the `baseline` lines), and the chunked (prefill) delta rule with
its windows of `WINDOW_TOKENS` tokens vs the 256 it had before (same code, the constant set back).

Shapes of the `demo` preset: 4 key heads, 8 value heads, K = V = 32, conv channels 512, conv
kernel 4, fp32. Decode figures are one engine step's worth: the call made once for each of the 6
GDN layers, each layer with its own pools (256 slots; the batch's slots drawn at random, not
contiguous), so the slots come from memory as in the engine. Prefill conv: 8192 packed tokens in
four sequences, one of them a single token, warm states. Chunked delta rule: one layer's call on
a prompt step of the engine benchmark's workload (its first 12 prompts, 6229 tokens), one 8192-token
prompt, and 64 prompts of 128 tokens. The two paths take turns, each figure
the best of `--rounds`, since the machine is shared and noisy.

Run: python -m benchmarks.gdn [--threads 1] [--rounds 7]
"""
from __future__ import annotations

import argparse
import time

import torch

import kernels.delta_rule_chunked as chunked
from kernels.conv_reference import activate
from kernels.conv_torch import (causal_conv1d_fn_torch, causal_conv1d_update_torch, first_rows,
                                history_rows, window_rows)
from kernels.delta_rule_recurrent import recurrent_gated_delta_rule, recurrent_steps

HK, HV, K, V, C, W = 4, 8, 32, 32, 512, 3
LAYERS, SLOTS = 6, 256
BATCHES = (1, 8, 32, 64)
PREFILL_LENS = (3000, 1, 1095, 4096)


# ---- baseline: the conv paths as they were before this benchmark (commit 32acdbb); the decode
# delta rule's baseline is the general per-position path, `recurrent_steps`, still in the kernel ----
def baseline_causal_conv1d_update_torch(x, conv_states, weight, bias=None, activation="silu",
                                        state_indices=None):
    N, C = x.shape
    W = weight.shape[1] - 1
    slots_N = torch.arange(N, device=x.device) if state_indices is None else state_indices.long()
    ext_NCX = torch.cat([conv_states[slots_N].to(weight.dtype), x[:, :, None].to(weight.dtype)], dim=2)
    out_NC = (ext_NCX[:, :, -(W + 1):].float() * weight.float()).sum(-1)
    if bias is not None:
        out_NC = out_NC + bias.float()
    conv_states[slots_N] = ext_NCX[:, :, 1:].to(conv_states.dtype)
    return activate(out_NC, activation).to(x.dtype)


def baseline_taps(x_TC, weight_CJ):
    W = weight_CJ.shape[1] - 1
    out_TC = x_TC.float() * weight_CJ[:, W].float()
    for back in range(1, min(W, x_TC.shape[0] - 1) + 1):
        out_TC[back:].addcmul_(x_TC[:-back], weight_CJ[:, W - back])
    return out_TC


def baseline_causal_conv1d_fn_torch(x, weight, bias=None, activation="silu", cu_seqlens=None,
                                    conv_states=None, state_indices=None, has_initial_state=None):
    T, C = x.shape
    W = weight.shape[1] - 1
    P = conv_states.shape[-1] if conv_states is not None else W
    cu = (torch.tensor([0, T]) if cu_seqlens is None else cu_seqlens).to(device=x.device, dtype=torch.long)
    starts_N, lens_N = cu[:-1], cu[1:] - cu[:-1]
    N = len(lens_N)
    slots_N = torch.arange(N, device=x.device) if state_indices is None else state_indices.long()
    x_TC = x.to(weight.dtype)
    hist_NPC = history_rows(x_TC, conv_states, slots_N, has_initial_state, N, P)
    out_TC = baseline_taps(x_TC, weight)
    i_W = torch.arange(W, device=x.device)
    inside_NW = i_W < lens_N[:, None]
    rows_NW = starts_N[:, None] + i_W
    out_TC[rows_NW[inside_NW]] = first_rows(x_TC, hist_NPC, starts_N, weight)[inside_NW]
    if bias is not None:
        out_TC += bias
    y = activate(out_TC.to(weight.dtype), activation).to(x.dtype)
    if conv_states is not None:
        last_NO = lens_N[:, None] - P + torch.arange(P, device=x.device)
        conv_states[slots_N] = window_rows(x_TC, hist_NPC, starts_N, last_NO).transpose(1, 2).to(
            conv_states.dtype)
    return y
# ---- end of baseline ----


def delta_inputs(N: int, gen: torch.Generator):
    """One decode step's delta rule arguments for each layer: q, k [N, 1, HK, K] and v [N, 1, HV, V]
    as views of one conv output row (as the model passes them), g, beta, a pool and its slots."""
    layers = []
    for _ in range(LAYERS):
        qkv_NC = torch.randn(N, C, generator=gen)
        q, k, v = qkv_NC.split([HK * K, HK * K, HV * V], -1)
        g = -torch.rand(N, 1, HV, generator=gen) * 0.3
        beta = torch.rand(N, 1, HV, generator=gen)
        pool = torch.randn(SLOTS, HV, K, V, generator=gen)
        slots = torch.randperm(SLOTS, generator=gen)[:N]
        layers.append((q.reshape(N, 1, HK, K), k.reshape(N, 1, HK, K), v.reshape(N, 1, HV, V), g, beta,
                       pool, slots))
    return layers


def conv_update_inputs(N: int, gen: torch.Generator):
    return [(torch.randn(N, C, generator=gen), torch.randn(SLOTS, C, W, generator=gen),
             torch.randn(C, W + 1, generator=gen), torch.randperm(SLOTS, generator=gen)[:N])
            for _ in range(LAYERS)]


def delta_step(fn):
    """The delta rule of every layer in one decode step; outputs concatenated (for the diff)."""
    def run(layers):
        return torch.cat([fn(q, k, v, g, beta, initial_state=pool, ssm_state_indices=slots,
                             use_qk_l2norm_in_kernel=True)[0].flatten()
                          for q, k, v, g, beta, pool, slots in layers])
    return run


def conv_update_step(fn):
    def run(layers):
        return torch.cat([fn(x, pool, w, state_indices=slots).flatten() for x, pool, w, slots in layers])
    return run


def timed_ms(fn, arg) -> float:
    start = time.perf_counter()
    fn(arg)
    return (time.perf_counter() - start) * 1e3


def race(label, baseline, new, make_arg, rounds: int):
    """Print one row: the two paths in alternating rounds (each on its own copy of the inputs, the
    pools being updated in place), each one's best, and max |diff| of the first call's outputs."""
    old_arg, new_arg = make_arg(), make_arg()
    diff = (new(new_arg) - baseline(old_arg)).abs().max()
    old_ms = new_ms = float("inf")
    for _ in range(rounds):
        old_ms = min(old_ms, timed_ms(baseline, old_arg))
        new_ms = min(new_ms, timed_ms(new, new_arg))
    print(f"{label:>6} {old_ms:>12.3f} {new_ms:>8.3f} {old_ms / new_ms:>7.2f}x {float(diff):>10.1e}")


def prefill_arg():
    gen = torch.Generator().manual_seed(0)
    cu = torch.tensor([0] + torch.tensor(PREFILL_LENS).cumsum(0).tolist())
    x = torch.randn(int(cu[-1]), C, generator=gen)
    pool = torch.randn(SLOTS, C, W, generator=gen)
    return x, torch.randn(C, W + 1, generator=gen), cu, pool, torch.tensor([7, 100, 3, 42])


def prefill_call(fn):
    def run(arg):
        x, w, cu, pool, slots = arg
        return fn(x, w, None, "silu", cu, pool, slots, torch.ones(len(slots), dtype=torch.bool))
    return run


BASELINE_WINDOW_TOKENS = 256
CHUNKED_CASES = {"12 workload prompts": (896, 540, 505, 934, 553, 426, 827, 668, 433, 264, 56, 127),
                 "one prompt": (8192,), "64 short prompts": (128,) * 64}


def chunked_arg(lens):
    gen = torch.Generator().manual_seed(0)
    T = sum(lens)
    q, k = torch.randn(2, 1, T, HK, K, generator=gen).unbind(0)
    v = torch.randn(1, T, HV, V, generator=gen)
    g, beta = -0.5 * torch.rand(1, T, HV, generator=gen), torch.rand(1, T, HV, generator=gen)
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    return q, k, v, g, beta, 0.1 * torch.randn(len(lens), HV, K, V, generator=gen), cu


def chunked_call(window_tokens):
    def run(arg):
        q, k, v, g, beta, state, cu = arg
        saved, chunked.WINDOW_TOKENS = chunked.WINDOW_TOKENS, window_tokens
        try:
            return chunked.chunked_gated_delta_rule(q, k, v, g, beta, initial_state=state, cu_seqlens=cu,
                                                    use_qk_l2norm_in_kernel=True)[0]
        finally:
            chunked.WINDOW_TOKENS = saved
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = f"{'batch':>6} {'baseline ms':>12} {'new ms':>8} {'speedup':>8} {'max|diff|':>10}"
    print(f"HK={HK} HV={HV} K={K} V={V} C={C} W+1={W + 1} fp32, {args.threads} thread(s), "
          f"best of {args.rounds} alternating rounds")
    with torch.inference_mode():
        print(f"\ndecode delta rule, one step = {LAYERS} layers\n{header}")
        for N in BATCHES:
            race(N, delta_step(recurrent_steps), delta_step(recurrent_gated_delta_rule),
                 lambda: delta_inputs(N, torch.Generator().manual_seed(N)), args.rounds)
        print(f"\ndecode conv update, one step = {LAYERS} layers\n{header}")
        for N in BATCHES:
            race(N, conv_update_step(baseline_causal_conv1d_update_torch),
                 conv_update_step(causal_conv1d_update_torch),
                 lambda: conv_update_inputs(N, torch.Generator().manual_seed(N)), args.rounds)
        print(f"\nprefill causal conv, one call, T = {sum(PREFILL_LENS)} in {len(PREFILL_LENS)} sequences\n"
              f"{header.replace('batch', 'tokens')}")
        race(sum(PREFILL_LENS), prefill_call(baseline_causal_conv1d_fn_torch),
             prefill_call(causal_conv1d_fn_torch), prefill_arg, args.rounds)
        print(f"\nchunked delta rule, one layer, windows of {BASELINE_WINDOW_TOKENS} vs "
              f"{chunked.WINDOW_TOKENS} tokens")
        for label, lens in CHUNKED_CASES.items():
            print(f"{label} ({sum(lens)} tokens)")
            race(sum(lens), chunked_call(BASELINE_WINDOW_TOKENS), chunked_call(chunked.WINDOW_TOKENS),
                 lambda: chunked_arg(lens), args.rounds)


if __name__ == "__main__":
    main()
