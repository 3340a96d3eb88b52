"""Triton routed experts: tokens permuted by expert, grouped GEMMs, weighted combine.

1. Permutation (torch, on device): the (token, k) assignments held here are sorted by local
   expert and each expert's group is padded to BM rows, so every BM-row block belongs to one
   expert (`block_expert`); padding rows carry the sentinel assignment A = N * k.
2. `gate_up_kernel`: per (row block, I block): gather the block's token rows of x, one GEMM
   against the expert's gate rows and one against its up rows, fused SiLU-GLU -> h [A_pad, I].
3. `down_kernel`: per (row block, D block): h @ W_down[e]^T, times the routing weight (cast to x's
   dtype first, like HF), stored at the assignment's own row of out [N * k, D].
4. Combine: out viewed [N, k, D] summed over k (unheld assignments stay zero).

Shape legend: N tokens, D hidden, k top-k, A assignments held here, A_pad padded, E_local
experts here, I intermediate; BM, BN, BK tiles.
"""
import torch
import triton
import triton.language as tl

from kernels.moe_torch import sort_by_expert


@triton.jit
def gate_up_kernel(x_ptr, w_ptr, h_ptr, rows_ptr, block_expert_ptr, D, I, num_assign, top_k,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_F32: tl.constexpr):
    block, nb = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    offs_m = block * BM + tl.arange(0, BM)
    assign = tl.load(rows_ptr + offs_m)
    valid = assign < num_assign
    token = (assign // top_k).to(tl.int64)
    offs_n = nb * BN + tl.arange(0, BN)
    nmask = offs_n < I
    gate = tl.zeros([BM, BN], dtype=tl.float32)
    up = tl.zeros([BM, BN], dtype=tl.float32)
    w_rows = w_ptr + expert * (2 * I) * D
    for k0 in range(0, D, BK):
        offs_k = k0 + tl.arange(0, BK)
        kmask = offs_k < D
        x = tl.load(x_ptr + token[:, None] * D + offs_k[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & nmask[None, :]
        w_gate = tl.load(w_rows + offs_n[None, :] * D + offs_k[:, None], mask=wmask, other=0.0)
        w_up = tl.load(w_rows + (I + offs_n[None, :]) * D + offs_k[:, None], mask=wmask, other=0.0)
        if DOT_F32:
            x, w_gate, w_up = x.to(tl.float32), w_gate.to(tl.float32), w_up.to(tl.float32)
        gate = tl.dot(x, w_gate, gate)
        up = tl.dot(x, w_up, up)
    # HF rounds each linear's output to the model dtype before the activation
    gate = gate.to(h_ptr.dtype.element_ty).to(tl.float32)
    up = up.to(h_ptr.dtype.element_ty).to(tl.float32)
    h = (gate * tl.sigmoid(gate)).to(h_ptr.dtype.element_ty).to(tl.float32) * up  # fp32 product, then rounded
    tl.store(h_ptr + offs_m[:, None].to(tl.int64) * I + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=nmask[None, :])


@triton.jit
def down_kernel(h_ptr, w_ptr, out_ptr, weight_ptr, rows_ptr, block_expert_ptr, D, I, num_assign,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_F32: tl.constexpr):
    block, nb = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    offs_m = block * BM + tl.arange(0, BM)
    assign = tl.load(rows_ptr + offs_m)
    valid = assign < num_assign
    offs_n = nb * BN + tl.arange(0, BN)
    nmask = offs_n < D
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    w_rows = w_ptr + expert * D * I
    for k0 in range(0, I, BK):
        offs_k = k0 + tl.arange(0, BK)
        kmask = offs_k < I
        h = tl.load(h_ptr + offs_m[:, None].to(tl.int64) * I + offs_k[None, :], mask=kmask[None, :], other=0.0)
        w = tl.load(w_rows + offs_n[None, :] * I + offs_k[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        if DOT_F32:
            h, w = h.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(h, w, acc)
    route_w = tl.load(weight_ptr + assign, mask=valid, other=0.0).to(out_ptr.dtype.element_ty).to(tl.float32)
    y = acc.to(out_ptr.dtype.element_ty).to(tl.float32) * route_w[:, None]
    tl.store(out_ptr + assign[:, None].to(tl.int64) * D + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
             mask=valid[:, None] & nmask[None, :])


def permute_by_expert(topk_ids, expert_offset, num_local, block_m):
    """-> (assignment of each padded sorted row [A_pad] (sentinel N * k for padding),
    local expert of each BM-row block [A_pad / BM])."""
    flat_A, local_A, counts_E = sort_by_expert(topk_ids, expert_offset, num_local)
    padded_E = (counts_E + block_m - 1) // block_m * block_m
    padded_start_E = torch.cumsum(padded_E, 0) - padded_E
    start_E = torch.cumsum(counts_E, 0) - counts_E
    dest_A = padded_start_E[local_A] + torch.arange(len(local_A), device=topk_ids.device) - start_E[local_A]
    rows = torch.full((int(padded_E.sum()),), topk_ids.numel(), dtype=torch.int64, device=topk_ids.device)
    rows[dest_A] = flat_A
    block_expert = torch.repeat_interleave(torch.arange(num_local, device=topk_ids.device), padded_E // block_m)
    return rows, block_expert


def fused_moe_triton(x, w_gate_up, w_down, topk_weights, topk_ids, expert_offset=0):
    """Triton `kernels.fused_moe` (same contract)."""
    N, D = x.shape
    E_local, two_i, _ = w_gate_up.shape
    I, k = two_i // 2, topk_ids.shape[1]
    BM = 16 if N * k <= 64 * E_local else 64
    rows, block_expert = permute_by_expert(topk_ids, expert_offset, E_local, BM)
    out = torch.zeros(N * k, D, device=x.device, dtype=x.dtype)
    if len(rows):
        x, w_gate_up, w_down = x.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
        h = torch.empty(len(rows), I, device=x.device, dtype=x.dtype)
        BN, BK = 64, 64
        # Triton's CPU interpreter (tests) has no bf16 matmul: operands go to fp32 there, which is
        # what a bf16 tensor-core dot with fp32 accumulation computes anyway
        dot_f32 = not x.is_cuda
        gate_up_kernel[(len(block_expert), triton.cdiv(I, BN))](x, w_gate_up, h, rows, block_expert, D, I,
                                                                N * k, k, BM, BN, BK, dot_f32)
        down_kernel[(len(block_expert), triton.cdiv(D, BN))](h, w_down, out, topk_weights.contiguous().float(),
                                                             rows, block_expert, D, I, N * k, BM, BN, BK, dot_f32)
    return out.view(N, k, D).sum(1)
