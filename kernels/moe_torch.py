"""Fast PyTorch path for the routed experts: assignments sorted by expert, one expert at a time.

The (token, k) assignments held here are sorted by local expert (stable, so each token's
contributions are added in ascending expert order, like HF's loop over experts). Few rows per
expert (decode): both projections of all experts in one grouped GEMM each, or plain GEMMs for
just the experts that have rows when few do (a decode step is bound by reading the weights of
the experts touched, so either way reads only those). Many rows (prefill): one expert at a
time, its rows gathered and its matmuls written into buffers reused across the experts (SiLU in
place on the gate half), its weighted rows added straight into y, so the working set is one
expert's rows and weights: staging all A rows in [A, D] buffers first was slower (the gather,
the matmul outputs and the scatter each stream 2 * A * D bytes through memory).

The routing weight multiplies the [R, I] hidden before the down projection rather than the
[R, D] output: the same product up to rounding, on a quarter of the elements (Qwen widths).

Every weight layout works; the expert GEMMs run fastest on weights stored transposed
(`w_gate_up.transpose(1, 2)` and `w_down.transpose(1, 2)` contiguous: see
`model.moe.Experts.store_by_column`), which torch's grouped_mm reads 5-15% faster.

Shape legend: N tokens, D hidden, k experts per token, A assignments held here, E_local experts,
I intermediate size, R rows routed to one expert.
"""
from itertools import accumulate

import torch
import torch.nn.functional as F

GROUPED_ROWS_PER_EXPERT = 128  # at most this many rows per expert on average: grouped GEMM calls


def sort_by_expert(topk_ids, expert_offset, num_local):
    """Assignments held here sorted by local expert -> (flat assignment index [A], local expert [A],
    assignments per local expert [E_local]). (The Triton path's; the CPU path uses `order_by_expert`.)"""
    local_Nk = topk_ids - expert_offset
    held_Nk = (local_Nk >= 0) & (local_Nk < num_local)
    flat_A = held_Nk.flatten().nonzero().squeeze(1)
    local_A = local_Nk.flatten()[flat_A]
    order_A = torch.argsort(local_A, stable=True)
    flat_A, local_A = flat_A[order_A], local_A[order_A]
    return flat_A, local_A, torch.bincount(local_A, minlength=num_local)


def order_by_expert(topk_ids, expert_offset, num_local):
    """-> (flat (token, k) assignment indices [N * k] sorted by local expert, stably, the ones held
    here first; assignments per local expert [E_local]). Same order as `sort_by_expert` in fewer
    ops: ids held by another expert-parallel rank get the key E_local, so they sort last and fall
    outside the counts."""
    key_A = topk_ids.flatten() - expert_offset
    if expert_offset:
        key_A.masked_fill_(key_A < 0, num_local)
    key_A.clamp_(max=num_local)
    order_A = torch.argsort(key_A, stable=True)
    return order_A, torch.bincount(key_A, minlength=num_local + 1)[:num_local]


def silu_mul_weight_(gate_up_R2I, weight_R):
    """w * silu(gate) * up -> [R, I], computed in place over the gate half (a strided view)."""
    I = gate_up_R2I.shape[1] // 2
    hidden_RI = F.silu(gate_up_R2I[:, :I], inplace=True)
    return hidden_RI.mul_(gate_up_R2I[:, I:]).mul_(weight_R[:, None])


def spans(counts):
    """(local expert, first row, end row) of each expert that has rows, over the sorted assignments."""
    end = 0
    for expert, count in enumerate(counts):
        end += count
        if count:
            yield expert, end - count, end


def experts_looped(x, w_gate_up, w_down, token_A, weight_A, counts):
    """One expert at a time on its contiguous slice of the sorted assignments (`counts` per local
    expert, a list), each step through the same buffers -> y [N, D]."""
    D, I2, R_max = x.shape[1], w_gate_up.shape[1], max(counts)
    x_buf, gate_up_buf, out_buf = x.new_empty(R_max, D), x.new_empty(R_max, I2), x.new_empty(R_max, D)
    w_gate_up_ED2I, w_down_EID = w_gate_up.transpose(1, 2), w_down.transpose(1, 2)
    y = torch.zeros_like(x)
    for expert, start, end in spans(counts):
        token_R, count = token_A[start:end], end - start
        x_RD = torch.index_select(x, 0, token_R, out=x_buf[:count])
        gate_up_R2I = torch.mm(x_RD, w_gate_up_ED2I[expert], out=gate_up_buf[:count])
        hidden_RI = silu_mul_weight_(gate_up_R2I, weight_A[start:end])
        y.index_add_(0, token_R, torch.mm(hidden_RI, w_down_EID[expert], out=out_buf[:count]))
    return y


def experts_touched(x, w_gate_up, w_down, token_A, weight_A, counts):
    """Gather, activation and scatter over all assignments at once, two plain GEMMs per expert
    that has rows -> y [N, D]. Few experts touched (a decode step of a few tokens): cheaper than
    grouped_mm, whose CPU fallback takes a dozen microseconds for every group, empty or not."""
    A, touched = len(token_A), list(spans(counts))
    w_gate_up_ED2I, w_down_EID = w_gate_up.transpose(1, 2), w_down.transpose(1, 2)
    x_AD = x.index_select(0, token_A)
    gate_up_A2I = x.new_empty(A, w_gate_up.shape[1])
    for expert, start, end in touched:
        torch.mm(x_AD[start:end], w_gate_up_ED2I[expert], out=gate_up_A2I[start:end])
    hidden_AI, out_AD = silu_mul_weight_(gate_up_A2I, weight_A), x.new_empty(A, x.shape[1])
    for expert, start, end in touched:
        torch.mm(hidden_AI[start:end], w_down_EID[expert], out=out_AD[start:end])
    return torch.zeros_like(x).index_add_(0, token_A, out_AD)


def experts_grouped(x, w_gate_up, w_down, token_A, weight_A, counts):
    """All experts in two grouped GEMM calls (torch's grouped_mm over the sorted assignments) -> y [N, D].
    Same products as `experts_looped`, without a Python step per expert."""
    offs_E = torch.tensor(list(accumulate(counts)), dtype=torch.int32)
    gate_up_A2I = F.grouped_mm(x.index_select(0, token_A), w_gate_up.transpose(1, 2), offs=offs_E)
    out_AD = F.grouped_mm(silu_mul_weight_(gate_up_A2I, weight_A), w_down.transpose(1, 2), offs=offs_E)
    return torch.zeros_like(x).index_add_(0, token_A, out_AD)


@torch.no_grad()
def fused_moe_torch(x, w_gate_up, w_down, topk_weights, topk_ids, expert_offset=0):
    """Same contract as `kernels.fused_moe`: x [N, D] -> y [N, D] in x's dtype, a fresh tensor.

    Many rows per expert (prefill): one expert at a time, whose plain GEMMs run faster than
    torch's CPU grouped_mm at that size; few (decode): one grouped GEMM per projection, or plain
    GEMMs for just the experts that have rows when they are at most half of them."""
    k, E_local = topk_ids.shape[1], w_gate_up.shape[0]
    order_A, counts_E = order_by_expert(topk_ids, expert_offset, E_local)
    counts = counts_E.tolist()
    A = sum(counts)
    if A == 0:
        return torch.zeros_like(x)
    order_A = order_A[:A]
    token_A = order_A // k
    weight_A = topk_weights.flatten().index_select(0, order_A).to(x.dtype)
    if A > GROUPED_ROWS_PER_EXPERT * E_local:
        experts = experts_looped
    elif 2 * (E_local - counts.count(0)) <= E_local:
        experts = experts_touched
    else:
        experts = experts_grouped
    return experts(x, w_gate_up, w_down, token_A, weight_A, counts)
