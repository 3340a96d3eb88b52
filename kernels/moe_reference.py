"""Sparse MoE: routing and the plain per-token reference of the routed experts.

Shape legend: N tokens, D hidden size, E_local experts held here, I expert intermediate size,
k experts per token, E all experts.
"""
import torch
import torch.nn.functional as F


def moe_route(router_logits, top_k, renormalize=True):
    """router_logits [N, E] -> (topk_weights [N, k] fp32, topk_ids [N, k] int64):
    fp32 softmax over experts, top-k, renormalised to sum 1 when `renormalize`."""
    probs_NE = torch.softmax(router_logits.float(), dim=-1)
    weights_Nk, ids_Nk = torch.topk(probs_NE, top_k, dim=-1)
    if renormalize:
        weights_Nk = weights_Nk / weights_Nk.sum(dim=-1, keepdim=True)
    return weights_Nk, ids_Nk.long()


def expert_mlp(x_RD, w_gate_up_2ID, w_down_DI):
    """One expert on rows x [R, D]: down(silu(gate x) * up x) -> [R, D]."""
    gate_RI, up_RI = (x_RD @ w_gate_up_2ID.T).chunk(2, dim=-1)
    return (F.silu(gate_RI) * up_RI) @ w_down_DI.T


def fused_moe_reference(x, w_gate_up, w_down, topk_weights, topk_ids, expert_offset=0):
    """Per-token loop: y[n] = sum_k w[n, k] * expert_{id}(x[n]) over the ids held here
    (local index = id - expert_offset). x [N, D]; w_gate_up [E_local, 2I, D]; w_down [E_local, D, I];
    topk_weights [N, k]; topk_ids [N, k] -> y [N, D] in x's dtype, accumulated in x's dtype."""
    E_local = w_gate_up.shape[0]
    y = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for weight, expert in zip(topk_weights[n].tolist(), topk_ids[n].tolist()):
            local = expert - expert_offset
            if 0 <= local < E_local:
                out_1D = expert_mlp(x[n:n + 1], w_gate_up[local], w_down[local])
                y[n] += (out_1D[0] * torch.tensor(weight, dtype=torch.float32).to(x.dtype)).to(x.dtype)
    return y
