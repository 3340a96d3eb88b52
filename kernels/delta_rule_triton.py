"""Triton gated delta rule: chunked prefill (WY / UT-transform form, chunk 64) and recurrent decode.

Chunked, two launches:
  1. `chunk_wy_kernel`, one program per (chunk, value head): in-chunk cumulative gate gamma,
     A = strictly-lower(beta * K K^T * exp(gamma_i - gamma_j)), (I + A)^-1 by blocked substitution,
     w = (I + A)^-1 (beta e^gamma K), u = (I + A)^-1 (beta V); w, u stored token-major in fp32.
  2. `chunk_state_kernel`, one program per (sequence, value head, V block): the sequential pass over
     the sequence's chunks holding the state block in registers: v' = u - w S,
     o = (e^gamma Q) S + (Q K^T * decay) v', S <- e^gamma_last S + (e^(gamma_last - gamma) K)^T v'.
Decode: `recurrent_kernel`, one program per (sequence, value head, V block), token by token,
reading/writing its state (optionally a pool row chosen by ssm_state_indices) in place.

Shape legend: T flat tokens (B * T rows, or packed), N sequences, NC chunks, H key heads,
HV value heads, K key dim, V value dim, S pool slots; BT chunk (64), BK >= K, BV a V block.
"""
import torch
import triton
import triton.language as tl

CHUNK = 64


@triton.jit
def load_qk_rows(ptr, rows, row_mask, head, offs_k, H: tl.constexpr, K: tl.constexpr, L2NORM: tl.constexpr):
    """[BT, BK] fp32 tile of q or k for one key head, optionally l2-normalised per row."""
    mask = row_mask[:, None] & (offs_k[None, :] < K)
    x = tl.load(ptr + rows[:, None] * (H * K) + head * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    if L2NORM:
        x = x * tl.rsqrt(tl.sum(x * x, axis=1) + 1e-6)[:, None]
    return x


@triton.jit
def invert_unit_lower(a, offs_t, BT: tl.constexpr):
    """(I + a)^-1 for a strictly lower [BT, BT]: forward substitution inside the four diagonal
    blocks of BT/4 rows at once (row r of every block per step), then the blocks are joined:
    with Xd the block-diagonal inverse and M = Xd a_off (block-nilpotent, M^4 = 0),
    (I + a)^-1 = (I - M)(I + M^2) Xd, the block forward substitution written as three products."""
    BB: tl.constexpr = BT // 4
    same_block = (offs_t[:, None] // BB) == (offs_t[None, :] // BB)
    a_diag = tl.where(same_block, a, 0.0)
    eye = tl.where(offs_t[:, None] == offs_t[None, :], 1.0, 0.0)
    inv = eye
    for r in range(1, BB):
        step_rows = (offs_t % BB) == r
        update = eye - tl.dot(tl.where(step_rows[:, None], a_diag, 0.0), inv, input_precision="ieee")
        inv = tl.where(step_rows[:, None], update, inv)
    m = tl.dot(inv, tl.where(same_block, 0.0, a), input_precision="ieee")
    m2 = tl.dot(m, m, input_precision="ieee")
    return tl.dot(eye - m, tl.dot(eye + m2, inv, input_precision="ieee"), input_precision="ieee")


@triton.jit
def chunk_wy_kernel(k_ptr, v_ptr, g_ptr, beta_ptr, chunk_start_ptr, chunk_end_ptr, w_ptr, u_ptr,
                    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, L2NORM: tl.constexpr):
    chunk, hv = tl.program_id(0), tl.program_id(1)
    start, end = tl.load(chunk_start_ptr + chunk), tl.load(chunk_end_ptr + chunk)
    offs_t, offs_k, offs_v = tl.arange(0, BT), tl.arange(0, BK), tl.arange(0, BV)
    rows = start.to(tl.int64) + offs_t
    row_mask = rows < end
    k = load_qk_rows(k_ptr, rows, row_mask, hv // (HV // H), offs_k, H, K, L2NORM)
    vmask = row_mask[:, None] & (offs_v[None, :] < V)
    v = tl.load(v_ptr + rows[:, None] * (HV * V) + hv * V + offs_v[None, :], mask=vmask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows * HV + hv, mask=row_mask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + rows * HV + hv, mask=row_mask, other=0.0).to(tl.float32)
    gamma = tl.cumsum(g, axis=0)
    strictly_lower = offs_t[:, None] > offs_t[None, :]
    decay = tl.exp(tl.where(strictly_lower, gamma[:, None] - gamma[None, :], 0.0))
    a = tl.dot(k * beta[:, None], tl.trans(k), input_precision="ieee")
    a = tl.where(strictly_lower, a * decay, 0.0)
    inv = invert_unit_lower(a, offs_t, BT)
    w = tl.dot(inv, k * (beta * tl.exp(gamma))[:, None], input_precision="ieee")
    u = tl.dot(inv, v * beta[:, None], input_precision="ieee")
    kmask = row_mask[:, None] & (offs_k[None, :] < K)
    tl.store(w_ptr + rows[:, None] * (HV * K) + hv * K + offs_k[None, :], w, mask=kmask)
    tl.store(u_ptr + rows[:, None] * (HV * V) + hv * V + offs_v[None, :], u, mask=vmask)


@triton.jit
def chunk_state_kernel(q_ptr, k_ptr, g_ptr, w_ptr, u_ptr, cu_ptr, h0_ptr, ht_ptr, o_ptr, scale,
                       H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                       BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, L2NORM: tl.constexpr,
                       USE_H0: tl.constexpr, STORE_HT: tl.constexpr):
    seq, hv, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos = tl.load(cu_ptr + seq).to(tl.int64), tl.load(cu_ptr + seq + 1).to(tl.int64)
    offs_t, offs_k = tl.arange(0, BT), tl.arange(0, BK)
    offs_v = vb * BV + tl.arange(0, BV)
    state_mask = (offs_k[:, None] < K) & (offs_v[None, :] < V)
    state_offs = (seq * HV + hv) * K * V + offs_k[:, None] * V + offs_v[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        state = tl.load(h0_ptr + state_offs, mask=state_mask, other=0.0).to(tl.float32)
    causal = offs_t[:, None] >= offs_t[None, :]
    for start in range(bos, eos, BT):
        rows = start + offs_t
        row_mask = rows < eos
        q = load_qk_rows(q_ptr, rows, row_mask, hv // (HV // H), offs_k, H, K, L2NORM) * scale
        k = load_qk_rows(k_ptr, rows, row_mask, hv // (HV // H), offs_k, H, K, L2NORM)
        kmask = row_mask[:, None] & (offs_k[None, :] < K)
        vmask = row_mask[:, None] & (offs_v[None, :] < V)
        w = tl.load(w_ptr + rows[:, None] * (HV * K) + hv * K + offs_k[None, :], mask=kmask, other=0.0)
        u = tl.load(u_ptr + rows[:, None] * (HV * V) + hv * V + offs_v[None, :], mask=vmask, other=0.0)
        gamma = tl.cumsum(tl.load(g_ptr + rows * HV + hv, mask=row_mask, other=0.0).to(tl.float32), axis=0)
        gamma_last = tl.sum(tl.where(offs_t == BT - 1, gamma, 0.0), axis=0)
        v_new = u - tl.dot(w, state, input_precision="ieee")
        attn = tl.dot(q, tl.trans(k), input_precision="ieee")
        attn = tl.where(causal, attn * tl.exp(tl.where(causal, gamma[:, None] - gamma[None, :], 0.0)), 0.0)
        o = tl.dot(q * tl.exp(gamma)[:, None], state, input_precision="ieee")
        o += tl.dot(attn, v_new, input_precision="ieee")
        tl.store(o_ptr + rows[:, None] * (HV * V) + hv * V + offs_v[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=vmask)
        k_dec = k * tl.exp(gamma_last - gamma)[:, None]
        state = state * tl.exp(gamma_last) + tl.dot(tl.trans(k_dec), v_new, input_precision="ieee")
    if STORE_HT:
        tl.store(ht_ptr + state_offs, state, mask=state_mask)


@triton.jit
def recurrent_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, cu_ptr, slot_ptr, h0_ptr, ht_ptr, o_ptr, scale,
                     H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, L2NORM: tl.constexpr,
                     USE_H0: tl.constexpr, USE_SLOTS: tl.constexpr, STORE_HT: tl.constexpr):
    seq, hv, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos = tl.load(cu_ptr + seq).to(tl.int64), tl.load(cu_ptr + seq + 1).to(tl.int64)
    slot = seq.to(tl.int64)
    if USE_SLOTS:
        slot = tl.load(slot_ptr + seq).to(tl.int64)
    head = hv // (HV // H)
    offs_k = tl.arange(0, BK)
    offs_v = vb * BV + tl.arange(0, BV)
    kmask, vmask = offs_k < K, offs_v < V
    state_mask = kmask[:, None] & vmask[None, :]
    state_tile = offs_k[:, None] * V + offs_v[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        state = tl.load(h0_ptr + (slot * HV + hv) * K * V + state_tile, mask=state_mask, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        q = tl.load(q_ptr + (t * H + head) * K + offs_k, mask=kmask, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + (t * H + head) * K + offs_k, mask=kmask, other=0.0).to(tl.float32)
        if L2NORM:
            q = q * tl.rsqrt(tl.sum(q * q, axis=0) + 1e-6)
            k = k * tl.rsqrt(tl.sum(k * k, axis=0) + 1e-6)
        v = tl.load(v_ptr + (t * HV + hv) * V + offs_v, mask=vmask, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + t * HV + hv).to(tl.float32)
        state = state * tl.exp(tl.load(g_ptr + t * HV + hv).to(tl.float32))
        u = beta * (v - tl.sum(state * k[:, None], axis=0))
        state = state + k[:, None] * u[None, :]
        o = tl.sum(state * (q * scale)[:, None], axis=0)
        tl.store(o_ptr + (t * HV + hv) * V + offs_v, o.to(o_ptr.dtype.element_ty), mask=vmask)
    if USE_SLOTS:
        tl.store(h0_ptr + (slot * HV + hv) * K * V + state_tile, state, mask=state_mask)
    elif STORE_HT:
        tl.store(ht_ptr + (seq * HV + hv) * K * V + state_tile, state, mask=state_mask)


def flat_cu_seqlens(B, T, cu_seqlens, device):
    """Sequence bounds over the flat token rows: [N + 1] int32."""
    if cu_seqlens is None:
        return torch.arange(B + 1, device=device, dtype=torch.int32) * T
    assert B == 1, "cu_seqlens needs B == 1 (sequences packed along T)"
    return cu_seqlens.to(device=device, dtype=torch.int32)


def chunk_table(cu_N1):
    """Start and end token of every chunk of every sequence: two [NC] int32."""
    lens_N = (cu_N1[1:] - cu_N1[:-1]).long()
    n_chunks_N = (lens_N + CHUNK - 1) // CHUNK
    seq_C = torch.repeat_interleave(torch.arange(len(lens_N), device=cu_N1.device), n_chunks_N)
    first_C = torch.cumsum(n_chunks_N, 0) - n_chunks_N
    local_C = torch.arange(len(seq_C), device=cu_N1.device) - first_C[seq_C]
    starts_C = cu_N1[:-1].long()[seq_C] + local_C * CHUNK
    return starts_C.to(torch.int32).contiguous(), cu_N1[1:].long()[seq_C].to(torch.int32).contiguous()


def flat_inputs(q, k, v, g, beta):
    B, T = q.shape[:2]
    return [x.reshape(B * T, *x.shape[2:]).contiguous() for x in (q, k, v, g, beta)]


def chunk_gated_delta_rule_triton(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                  cu_seqlens=None, use_qk_l2norm_in_kernel=False):
    """Triton `kernels.chunk_gated_delta_rule` (same contract)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    scale = K ** -0.5 if scale is None else scale
    qf, kf, vf, gf, bf = flat_inputs(q, k, v, g, beta)
    cu = flat_cu_seqlens(B, T, cu_seqlens, q.device)
    N = len(cu) - 1
    starts_C, ends_C = chunk_table(cu)
    BK, BV = max(16, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(V))
    w = torch.empty(B * T, HV, K, device=q.device, dtype=torch.float32)
    u = torch.empty(B * T, HV, V, device=q.device, dtype=torch.float32)
    if len(starts_C):
        chunk_wy_kernel[(len(starts_C), HV)](kf, vf, gf, bf, starts_C, ends_C, w, u, H, HV, K, V,
                                             CHUNK, BK, BV, use_qk_l2norm_in_kernel)
    o = torch.empty(B * T, HV, V, device=q.device, dtype=v.dtype)
    final = torch.empty(N, HV, K, V, device=q.device, dtype=torch.float32) if output_final_state else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    BVS = min(BV, 64)
    chunk_state_kernel[(N, HV, triton.cdiv(V, BVS))](qf, kf, gf, w, u, cu, h0, final, o, scale, H, HV, K, V,
                                                     CHUNK, BK, BVS, use_qk_l2norm_in_kernel,
                                                     h0 is not None, output_final_state)
    return o.reshape(B, T, HV, V), final


def fused_recurrent_gated_delta_rule_triton(q, k, v, g, beta, scale=None, initial_state=None,
                                            output_final_state=False, cu_seqlens=None, ssm_state_indices=None,
                                            use_qk_l2norm_in_kernel=False):
    """Triton `kernels.fused_recurrent_gated_delta_rule` (same contract; pool rows updated in place)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    scale = K ** -0.5 if scale is None else scale
    qf, kf, vf, gf, bf = flat_inputs(q, k, v, g, beta)
    cu = flat_cu_seqlens(B, T, cu_seqlens, q.device)
    N = len(cu) - 1
    use_slots = ssm_state_indices is not None
    assert not use_slots or (initial_state is not None and initial_state.is_contiguous()
                             and initial_state.dtype == torch.float32), "the state pool must be contiguous fp32"
    h0 = initial_state if use_slots or initial_state is None else initial_state.contiguous()
    final = (torch.empty(N, HV, K, V, device=q.device, dtype=torch.float32)
             if output_final_state and not use_slots else None)
    o = torch.empty(B * T, HV, V, device=q.device, dtype=v.dtype)
    BK, BV = triton.next_power_of_2(K), min(32, triton.next_power_of_2(V))
    recurrent_kernel[(N, HV, triton.cdiv(V, BV))](qf, kf, vf, gf, bf, cu, ssm_state_indices, h0, final, o, scale,
                                                  H, HV, K, V, BK, BV, use_qk_l2norm_in_kernel,
                                                  h0 is not None, use_slots, output_final_state)
    if use_slots:
        final = initial_state if output_final_state else None
    return o.reshape(B, T, HV, V), final
