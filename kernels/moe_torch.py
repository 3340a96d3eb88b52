"""Fast PyTorch path for the routed experts: tokens sorted by expert, one matmul per active expert.

The (token, k) assignments held here are sorted by local expert (stable, so each token's
contributions are added in ascending expert order, like HF's loop over experts), each expert runs
once on its contiguous slice, and the weighted outputs are added back to token order.

Shape legend: N tokens, D hidden, k experts per token, A assignments held here, E_local experts,
I intermediate size.
"""
import torch

from kernels.moe_reference import expert_mlp


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


def fused_moe_torch(x, w_gate_up, w_down, topk_weights, topk_ids, expert_offset=0):
    """Same contract as `kernels.fused_moe`: x [N, D] -> y [N, D] in x's dtype."""
    N, D = x.shape
    k = topk_ids.shape[1]
    flat_A, _, counts_E = sort_by_expert(topk_ids, expert_offset, w_gate_up.shape[0])
    token_A = flat_A // k
    x_AD = x[token_A]
    out_AD = torch.empty_like(x_AD)
    start = 0
    for expert, count in enumerate(counts_E.tolist()):
        if count:
            out_AD[start:start + count] = expert_mlp(x_AD[start:start + count], w_gate_up[expert], w_down[expert])
            start += count
    weights_A = topk_weights.flatten()[flat_A].to(x.dtype)
    y = torch.zeros_like(x)
    y.index_add_(0, token_A, out_AD * weights_A[:, None])
    return y
