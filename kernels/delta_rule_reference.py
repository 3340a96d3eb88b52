"""Plain PyTorch reference for the gated delta rule: the per-token recurrence, the test oracle.

Semantics (qwen35-architecture.md §4.3 step 7), per sequence and value head, state S [K, V] fp32:
    S <- exp(g_t) * S;  u_t = beta_t * (v_t - S^T k_t);  S <- S + k_t u_t^T;  o_t = S^T q_t
(decay before the read; the output reads the updated state).

Shape legend:
    B batch rows, T tokens per row (packed tokens when cu_seqlens is given, B = 1),
    H key heads, HV value heads (a multiple of H), K key dim, V value dim,
    N sequences, S slots in a state pool.
"""
import torch


def expand_qk(q_BTHK, k_BTHK, num_v_heads, scale, use_l2norm):
    """fp32 q, k with key heads repeated to value heads (v head h reads key head h // (HV/H)),
    optionally l2-normalised (x * rsqrt(sum x^2 + 1e-6)); q scaled. Returns two [B, T, HV, K]."""
    q, k = q_BTHK.float(), k_BTHK.float()
    if use_l2norm:
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    group = num_v_heads // q.shape[2]
    if group != 1:
        q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    return q * scale, k


def sequence_spans(batch, seq_len, cu_seqlens):
    """[(row, start, end)] for each sequence: B rows of T tokens, or packed along T by cu_seqlens."""
    if cu_seqlens is None:
        return [(b, 0, seq_len) for b in range(batch)]
    assert batch == 1, "cu_seqlens needs B == 1 (sequences packed along T)"
    bounds = cu_seqlens.tolist()
    return [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def check_delta_rule_shapes(q, k, v, g, beta):
    B, T, H, K = q.shape
    HV = v.shape[2]
    assert k.shape == q.shape and v.shape[:2] == (B, T), (q.shape, k.shape, v.shape)
    assert HV % H == 0, f"value heads {HV} must be a multiple of key heads {H}"
    assert g.shape == (B, T, HV) and beta.shape == (B, T, HV), (g.shape, beta.shape)


def naive_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, ssm_state_indices=None, use_qk_l2norm_in_kernel=False):
    """The per-token recurrence, one sequence and one token at a time (fp32). Same contract as
    `fused_recurrent_gated_delta_rule`: q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV];
    initial_state [N, HV, K, V] (or a pool [S, HV, K, V] read/updated in place at rows
    ssm_state_indices [N]); returns (o [B, T, HV, V] in v's dtype, final_state [N, HV, K, V] or None)."""
    check_delta_rule_shapes(q, k, v, g, beta)
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    scale = K ** -0.5 if scale is None else scale
    q_BTHK, k_BTHK = expand_qk(q, k, HV, scale, use_qk_l2norm_in_kernel)
    v_BTHV, g_BTH, beta_BTH = v.float(), g.float(), beta.float()
    spans = sequence_spans(B, T, cu_seqlens)
    o_BTHV = torch.zeros(B, T, HV, V, dtype=torch.float32, device=v.device)
    finals = []
    for n, (b, start, end) in enumerate(spans):
        slot = n if ssm_state_indices is None else int(ssm_state_indices[n])
        if initial_state is None:
            S_HKV = torch.zeros(HV, K, V, dtype=torch.float32, device=v.device)
        else:
            S_HKV = initial_state[slot].float().clone()
        for t in range(start, end):
            S_HKV = S_HKV * g_BTH[b, t].exp()[:, None, None]
            read_HV = torch.einsum("hkv,hk->hv", S_HKV, k_BTHK[b, t])
            u_HV = beta_BTH[b, t][:, None] * (v_BTHV[b, t] - read_HV)
            S_HKV = S_HKV + k_BTHK[b, t][:, :, None] * u_HV[:, None, :]
            o_BTHV[b, t] = torch.einsum("hkv,hk->hv", S_HKV, q_BTHK[b, t])
        finals.append(S_HKV)
        if ssm_state_indices is not None:
            initial_state[slot] = S_HKV.to(initial_state.dtype)
    final = torch.stack(finals) if output_final_state and finals else None
    if output_final_state and ssm_state_indices is not None:
        final = initial_state
    return o_BTHV.to(v.dtype), final
