"""Fast CPU path for decode: the per-token recurrence, batched over sequences and heads.

Each step advances every sequence by one of its tokens; sequences shorter than the longest read a
zero row with g = 0 and beta = 0, which leaves their state exactly unchanged. With
ssm_state_indices the states are rows of a pool, gathered once and written back once (in place),
so untouched slots are never written.

Decode proper (one token for every sequence, a slot pool) skips the step machinery: the few
batched ops of one step over [N * HV, K, V], the state gathered with index_select and written back
with index_copy_. At decode sizes a step costs little more than those two copies of the slots.

Shape legend: T tokens (flat), N sequences, L longest sequence, HV value heads, K key dim, V value dim.
"""
import torch

from kernels.delta_rule_chunked import with_zero_row
from kernels.delta_rule_reference import check_delta_rule_shapes, expand_qk, sequence_spans


def step_rows(spans, seq_len):
    """Flat token row of each sequence's i-th token: [L, N], pad = total tokens (the zero row)."""
    starts_N = torch.tensor([b * seq_len + s for b, s, _ in spans], dtype=torch.long)
    lens_N = torch.tensor([e - s for _, s, e in spans], dtype=torch.long)
    steps_L = torch.arange(int(lens_N.max()) if len(spans) else 0)[:, None]
    pad = len(spans) and spans[-1][0] * seq_len + seq_len
    return torch.where(steps_L < lens_N, starts_N + steps_L, pad)


def one_token_each(B, T, cu_seqlens):
    """Every sequence has exactly one token: B rows of one token, or T packed sequences of one."""
    if cu_seqlens is None:
        return T == 1
    return B == 1 and len(cu_seqlens) == T + 1 and bool((cu_seqlens.diff() == 1).all())


def decode_qk(q, k, num_v_heads, scale, use_l2norm):
    """fp32 q, k of one token per sequence, as `expand_qk` computes them (l2norm, head repeat,
    q scaled), each [N * HV, K]; q and k share every op through one stacked [2, N, H, K] copy."""
    qk_2NHK = torch.stack((q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]))).float()
    if use_l2norm:
        qk_2NHK = qk_2NHK * (qk_2NHK * qk_2NHK).sum(-1, keepdim=True).add_(1e-6).rsqrt_()
    group = num_v_heads // q.shape[2]
    if group != 1:
        qk_2NHK = qk_2NHK.repeat_interleave(group, dim=2)
    qk_2NHK[0] *= scale
    return qk_2NHK.reshape(2, -1, qk_2NHK.shape[-1]).unbind(0)


def decode_step(q, k, v, g, beta, scale, pool, slots_N, use_l2norm):
    """One token per sequence against the pool rows slots_N, updated in place: o [N, HV, V] fp32.
    The reference's ops in its order: decay, read, delta write, output from the updated state."""
    N, HV, V = slots_N.shape[0], v.shape[-2], v.shape[-1]
    q_XK, k_XK = decode_qk(q, k, HV, scale, use_l2norm)          # X = N * HV rows
    S_NHKV = pool.index_select(0, slots_N).float()               # our own copy of the slots
    S_NHKV.mul_(g.reshape(N, HV, 1, 1).float().exp())
    flat_XKV = S_NHKV.view(N * HV, *S_NHKV.shape[2:])
    read_X1V = torch.bmm(k_XK[:, None], flat_XKV)
    u_X1V = (v.reshape(N * HV, 1, V).float() - read_X1V).mul_(beta.reshape(N * HV, 1, 1).float())
    flat_XKV.baddbmm_(k_XK[:, :, None], u_X1V)
    o_X1V = torch.bmm(q_XK[:, None], flat_XKV)
    pool.index_copy_(0, slots_N, S_NHKV.to(pool.dtype))
    return o_X1V.view(N, HV, V)


def recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None, ssm_state_indices=None, use_qk_l2norm_in_kernel=False):
    """Same contract as `kernels.fused_recurrent_gated_delta_rule`."""
    check_delta_rule_shapes(q, k, v, g, beta)
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    scale = K ** -0.5 if scale is None else scale
    if ssm_state_indices is not None and one_token_each(B, T, cu_seqlens):
        o_NHV = decode_step(q, k, v, g, beta, scale, initial_state, ssm_state_indices.long(),
                            use_qk_l2norm_in_kernel)
        return o_NHV.to(v.dtype).view(B, T, HV, V), (initial_state if output_final_state else None)
    return recurrent_steps(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                           ssm_state_indices, use_qk_l2norm_in_kernel)


def recurrent_steps(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                    cu_seqlens=None, ssm_state_indices=None, use_qk_l2norm_in_kernel=False):
    """The general path of `recurrent_gated_delta_rule`, any number of tokens per sequence: one
    step of batched ops per token position."""
    check_delta_rule_shapes(q, k, v, g, beta)
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    scale = K ** -0.5 if scale is None else scale
    q4, k4 = expand_qk(q, k, HV, scale, use_qk_l2norm_in_kernel)
    q_T, k_T, v_T, g_T, b_T = [with_zero_row(x.reshape(B * T, *x.shape[2:]).float()) for x in (q4, k4, v, g, beta)]
    spans = sequence_spans(B, T, cu_seqlens)
    rows_LN = step_rows(spans, T).to(q.device)
    N = len(spans)
    if initial_state is None:
        S_NHKV = torch.zeros(N, HV, K, V, dtype=torch.float32, device=q.device)
    elif ssm_state_indices is None:
        S_NHKV = initial_state.float().clone(memory_format=torch.contiguous_format)
    else:
        S_NHKV = initial_state[ssm_state_indices].float().contiguous()
    o_T = torch.zeros(B * T + 1, HV, V, dtype=torch.float32, device=q.device)
    flat_S = S_NHKV.view(N * HV, K, V)          # S_NHKV is this call's own copy: updated in place
    for rows_N in rows_LN:
        S_NHKV.mul_(g_T[rows_N].exp()[..., None, None])
        k_NHK = k_T[rows_N]
        read_NHV = (k_NHK.unsqueeze(-2) @ S_NHKV).squeeze(-2)
        u_NHV = b_T[rows_N][..., None] * (v_T[rows_N] - read_NHV)
        flat_S.baddbmm_(k_NHK.reshape(N * HV, K, 1), u_NHV.reshape(N * HV, 1, V))
        o_T[rows_N] = (q_T[rows_N].unsqueeze(-2) @ S_NHKV).squeeze(-2)
    o = o_T[: B * T].reshape(B, T, HV, V).to(v.dtype)
    if ssm_state_indices is not None:
        initial_state[ssm_state_indices] = S_NHKV.to(initial_state.dtype)
        return o, (initial_state if output_final_state else None)
    return o, (S_NHKV if output_final_state else None)
