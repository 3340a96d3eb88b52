"""Public sparse-MoE ops: routing and the routed experts (grouped by expert).

Shape legend: N tokens, D hidden, E experts, E_local experts held here, I intermediate, k top-k.
"""
from kernels.moe_reference import moe_route  # noqa: F401  (re-exported; routing is tiny, plain torch)
from kernels.moe_torch import fused_moe_torch
from kernels.moe_triton import fused_moe_triton


def fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids, expert_offset=0):
    """Routed experts: y[n] = sum_k w[n, k] * down_e(silu(gate_e x[n]) * up_e x[n]).

    x [N, D]; w_gate_up [E_local, 2I, D] (rows 0..I-1 gate, I..2I-1 up; used as x @ W[e].T);
    w_down [E_local, D, I]; topk_weights [N, k] (fp32); topk_ids [N, k] global expert ids:
    local index = id - expert_offset, ids outside [expert_offset, expert_offset + E_local) add
    nothing (expert parallelism). Returns y [N, D] in x's dtype; the weighted sum is accumulated
    in x's dtype with the weights cast to it first, like HF (the CPU path scales each expert's
    hidden by the weight before the down projection, so its roundings differ from HF's slightly).
    """
    if x.is_cuda:
        return fused_moe_triton(x, w_gate_up, w_down, topk_weights, topk_ids, expert_offset)
    return fused_moe_torch(x, w_gate_up, w_down, topk_weights, topk_ids, expert_offset)
