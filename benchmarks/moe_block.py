"""The whole sparse-MoE block on CPU (router, routed experts, sigmoid-gated shared expert), the
current `model.moe.SparseMoE` vs the implementation it replaced (copied below between the
`baseline` lines), same weights and inputs, same run.

Shapes of the `demo` preset: hidden 256, 32 experts, top-4, expert width 256, shared expert width
256, fp32, 8 MoE layers (200 MB of expert weights, like one engine step). Decode steps of batch
1, 8, 32, 64 and one 8192-token prefill step; each figure is the sum over the 8 layers, the two
paths taking turns and each the best of `--rounds` (the machine is shared and noisy). The
baseline reads its own copy of the weights in the checkpoint's layout, so whatever layout the new
block keeps cannot speed it up.

Run: python -m benchmarks.moe_block [--threads 1] [--rounds 7] [--prefill-rounds 3]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from kernels.moe_reference import moe_route
from kernels.moe_torch import sort_by_expert
from model.moe import SparseMoE

D, E, K, I, SHARED_I, LAYERS = 256, 32, 4, 256, 256, 8
DECODE_BATCHES = (1, 8, 32, 64)
PREFILL_TOKENS = 8192


# ---- baseline: SparseMoE.forward and kernels.moe_torch as they were before this benchmark (32acdbb);
# routing (moe_route) and sort_by_expert are unchanged and called from kernels ----
BASELINE_GROUPED_ROWS_PER_EXPERT = 128


def baseline_weighted_expert_mlp(x_RD, w_gate_up_2ID, w_down_DI, weight_R):
    gate_up_R2I = F.linear(x_RD, w_gate_up_2ID)
    I = w_down_DI.shape[1]
    hidden_RI = F.silu(gate_up_R2I[:, :I]).mul_(gate_up_R2I[:, I:]).mul_(weight_R[:, None])
    return F.linear(hidden_RI, w_down_DI)


def baseline_experts_looped(x, w_gate_up, w_down, token_A, weight_A, counts_E):
    y = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts_E.tolist()):
        rows = slice(start, start + count)
        if count:
            out_RD = baseline_weighted_expert_mlp(x.index_select(0, token_A[rows]), w_gate_up[expert],
                                                  w_down[expert], weight_A[rows])
            y.index_add_(0, token_A[rows], out_RD)
        start += count
    return y


def baseline_experts_grouped(x, w_gate_up, w_down, token_A, weight_A, counts_E):
    offs_E = counts_E.cumsum(0).to(torch.int32)
    gate_up_A2I = F.grouped_mm(x.index_select(0, token_A), w_gate_up.transpose(1, 2), offs=offs_E)
    I = w_down.shape[2]
    hidden_AI = F.silu(gate_up_A2I[:, :I]).mul_(gate_up_A2I[:, I:]).mul_(weight_A[:, None])
    out_AD = F.grouped_mm(hidden_AI, w_down.transpose(1, 2), offs=offs_E)
    return torch.zeros_like(x).index_add_(0, token_A, out_AD)


def baseline_fused_moe_torch(x, w_gate_up, w_down, topk_weights, topk_ids, expert_offset=0):
    k = topk_ids.shape[1]
    flat_A, _, counts_E = sort_by_expert(topk_ids, expert_offset, w_gate_up.shape[0])
    token_A = flat_A // k
    weight_A = topk_weights.flatten()[flat_A].to(x.dtype)
    if len(flat_A) == 0:
        return torch.zeros_like(x)
    few_rows = len(flat_A) <= BASELINE_GROUPED_ROWS_PER_EXPERT * w_gate_up.shape[0]
    experts = baseline_experts_grouped if few_rows else baseline_experts_looped
    return experts(x, w_gate_up, w_down, token_A, weight_A, counts_E)


def baseline_sparse_moe(w, x_TH):
    """SparseMoE.forward on the weights dict `w` (the parameters by name, original layout)."""
    weights_Tk, ids_Tk = moe_route(F.linear(x_TH, w["gate.weight"]), K, True)
    routed_TH = baseline_fused_moe_torch(x_TH, w["experts.gate_up_proj"], w["experts.down_proj"],
                                         weights_Tk, ids_Tk, 0)
    shared_TH = F.linear(F.silu(F.linear(x_TH, w["shared_expert.gate_proj.weight"]))
                         * F.linear(x_TH, w["shared_expert.up_proj.weight"]),
                         w["shared_expert.down_proj.weight"])
    shared_TH = torch.sigmoid(F.linear(x_TH, w["shared_expert_gate.weight"])) * shared_TH
    return routed_TH + shared_TH
# ---- end of baseline ----


def make_layers(seed: int = 0):
    """LAYERS SparseMoE blocks with random weights, and for each a cloned dict of its parameters."""
    torch.manual_seed(seed)
    blocks, copies = [], []
    for _ in range(LAYERS):
        block = SparseMoE(D, E, K, I, SHARED_I, renormalize=True)
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0, 0.06)
        blocks.append(block.eval())
        copies.append({name: p.detach().clone() for name, p in block.named_parameters()})
    return blocks, copies


def timed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def race(label: str, blocks, copies, x_TH, rounds: int):
    """Print one row: the LAYERS blocks on x_TH, both paths in alternating rounds, best of each."""
    def old():
        return [baseline_sparse_moe(w, x_TH) for w in copies]

    def new():
        return [block(x_TH) for block in blocks]

    diff = max(float((a - b).abs().max()) for a, b in zip(new(), old()))
    old_ms = new_ms = float("inf")
    for _ in range(rounds):
        old_ms = min(old_ms, timed_ms(old))
        new_ms = min(new_ms, timed_ms(new))
    print(f"{label:>14} {old_ms:>12.2f} {new_ms:>8.2f} {old_ms / new_ms:>7.2f}x {diff:>10.1e}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prefill-rounds", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    blocks, copies = make_layers()
    print(f"SparseMoE x {LAYERS} layers: D={D} E={E} top-{K} I={I} shared {SHARED_I}, fp32, "
          f"{args.threads} thread(s); ms summed over the layers, best of alternating rounds")
    print(f"{'step':>14} {'baseline ms':>12} {'new ms':>8} {'speedup':>8} {'max|diff|':>10}")
    with torch.inference_mode():
        for N in DECODE_BATCHES:
            race(f"decode {N}", blocks, copies, torch.randn(N, D), args.rounds)
        race(f"prefill {args.prefill_tokens}", blocks, copies, torch.randn(args.prefill_tokens, D),
             args.prefill_rounds)


if __name__ == "__main__":
    main()
