"""Fast PyTorch path for the routed experts: assignments sorted by expert, one expert at a time.

The (token, k) assignments held here are sorted by local expert (stable, so each token's
contributions are added in ascending expert order, like HF's loop over experts). Each expert
gathers its rows, runs its two matmuls and adds its weighted rows straight into y, so the
working set is one expert's rows and weights: staging all A rows in [A, D] buffers first was
slower (the gather, the matmul outputs and the scatter each stream 2 * A * D bytes through memory).

The routing weight multiplies the [R, I] hidden before the down projection rather than the
[R, D] output: the same product up to rounding, on a quarter of the elements.

Shape legend: N tokens, D hidden, k experts per token, A assignments held here, E_local experts,
I intermediate size, R rows routed to one expert.
"""
import torch
import torch.nn.functional as F

GROUPED_ROWS_PER_EXPERT = 128  # at most this many rows per expert on average: grouped GEMM calls


def sort_by_expert(topk_ids, expert_offset, num_local):
    """Assignments held here sorted by local expert -> (flat assignment index [A], local expert [A],
    assignments per local expert [E_local])."""
    local_Nk = topk_ids - expert_offset
    held_Nk = (local_Nk >= 0) & (local_Nk < num_local)
    flat_A = held_Nk.flatten().nonzero().squeeze(1)
    local_A = local_Nk.flatten()[flat_A]
    order_A = torch.argsort(local_A, stable=True)
    flat_A, local_A = flat_A[order_A], local_A[order_A]
    return flat_A, local_A, torch.bincount(local_A, minlength=num_local)


def weighted_expert_mlp(x_RD, w_gate_up_2ID, w_down_DI, weight_R):
    """One expert on its rows, each scaled by its routing weight: w * down(silu(gate x) * up x) -> [R, D]."""
    gate_up_R2I = F.linear(x_RD, w_gate_up_2ID)
    I = w_down_DI.shape[1]
    hidden_RI = F.silu(gate_up_R2I[:, :I]).mul_(gate_up_R2I[:, I:]).mul_(weight_R[:, None])
    return F.linear(hidden_RI, w_down_DI)


def experts_looped(x, w_gate_up, w_down, token_A, weight_A, counts_E):
    """One expert at a time on its contiguous slice of the sorted assignments -> y [N, D]."""
    y = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts_E.tolist()):
        rows = slice(start, start + count)
        if count:
            out_RD = weighted_expert_mlp(x.index_select(0, token_A[rows]), w_gate_up[expert], w_down[expert],
                                         weight_A[rows])
            y.index_add_(0, token_A[rows], out_RD)
        start += count
    return y


def experts_grouped(x, w_gate_up, w_down, token_A, weight_A, counts_E):
    """All experts in two grouped GEMM calls (torch's grouped_mm over the sorted assignments) -> y [N, D].
    Same products as `experts_looped`, without a Python step per expert."""
    offs_E = counts_E.cumsum(0).to(torch.int32)
    gate_up_A2I = F.grouped_mm(x.index_select(0, token_A), w_gate_up.transpose(1, 2), offs=offs_E)
    I = w_down.shape[2]
    hidden_AI = F.silu(gate_up_A2I[:, :I]).mul_(gate_up_A2I[:, I:]).mul_(weight_A[:, None])
    out_AD = F.grouped_mm(hidden_AI, w_down.transpose(1, 2), offs=offs_E)
    return torch.zeros_like(x).index_add_(0, token_A, out_AD)


def fused_moe_torch(x, w_gate_up, w_down, topk_weights, topk_ids, expert_offset=0):
    """Same contract as `kernels.fused_moe`: x [N, D] -> y [N, D] in x's dtype.

    Few rows per expert (decode steps): one grouped GEMM per projection, since the per-expert
    loop's fixed cost dominates there; many rows (prefill): the loop, whose plain GEMMs run
    faster than torch's CPU grouped_mm at that size."""
    k = topk_ids.shape[1]
    flat_A, _, counts_E = sort_by_expert(topk_ids, expert_offset, w_gate_up.shape[0])
    token_A = flat_A // k
    weight_A = topk_weights.flatten()[flat_A].to(x.dtype)
    if len(flat_A) == 0:
        return torch.zeros_like(x)
    few_rows = len(flat_A) <= GROUPED_ROWS_PER_EXPERT * w_gate_up.shape[0]
    experts = experts_grouped if few_rows else experts_looped
    return experts(x, w_gate_up, w_down, token_A, weight_A, counts_E)
