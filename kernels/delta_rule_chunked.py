"""Fast CPU path for the gated delta rule: the chunked (WY / UT-transform) form in batched PyTorch.

Chunks of C = 64 tokens start at each sequence's own start; the last chunk of a sequence is padded
with q = k = v = 0, g = 0, beta = 0, which changes neither its outputs nor the state (qwen35 §4.4).
All intra-chunk work (cumulative gate, strictly lower beta*K*K^T*decay, its unit-triangular solve,
w/u, the intra-chunk attention) is one batched op over every chunk of a window; the only loop
is the sequential pass over chunk positions, batched over sequences and heads.

Shape legend:
    T tokens (flat, all rows), N sequences, G chunk positions in a window, C chunk size (64),
    HV value heads, K key dim, V value dim.
"""
import torch

from kernels.delta_rule_reference import check_delta_rule_shapes, expand_qk, sequence_spans

CHUNK = 64
WINDOW_TOKENS = 1024  # bounds the intermediate memory: about this many tokens' chunks at a time


def with_zero_row(x):
    """x [T, ...] -> fp32 [T + 1, ...] in one copy; row T is zeros, where padded chunk slots read from."""
    out = torch.empty(x.shape[0] + 1, *x.shape[1:], dtype=torch.float32, device=x.device)
    out[:-1] = x
    out[-1] = 0
    return out


def chunk_token_index(starts_N, lens_N, first_chunk, num_chunks, pad_row):
    """Flat token row of every (chunk position, sequence, slot): [G, N, C]; pad_row where past the end."""
    offs_GC = (torch.arange(first_chunk, first_chunk + num_chunks) * CHUNK)[:, None] + torch.arange(CHUNK)
    offs_G1C = offs_GC[:, None, :]
    return torch.where(offs_G1C < lens_N[:, None], starts_N[:, None] + offs_G1C, pad_row)


def intra_chunk(q, k, v, g, beta):
    """Everything that does not depend on the incoming state, batched over chunks.
    q, k [..., H, 1, C, K] (key heads; broadcast over the R value heads of each); v [..., H, R, C, V];
    g, beta [..., H, R, C]. Returns (q_eff, pu, w, u, k_dec, chunk_decay), each [..., H, R, C, ·], with
    o = q_eff @ S + pu,  v' = u - w @ S,  S' = chunk_decay * S + k_dec^T @ v'."""
    gamma = g.cumsum(-1)
    causal_CC = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).tril()
    diff = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal_CC, float("-inf"))
    decay_CC = diff.exp()
    system = k @ k.transpose(-1, -2) * (beta[..., None] * decay_CC)  # K K^T once per key head
    # (I + strictly-lower(system)) X = rhs; the diagonal is taken as 1 (unitriangular)
    u = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    k_b = k.expand(*beta.shape, k.shape[-1]) * (beta * gamma.exp())[..., None]
    w = torch.linalg.solve_triangular(system, k_b, upper=False, unitriangular=True)
    attn = q @ k.transpose(-1, -2) * decay_CC
    q_eff = q * gamma.exp()[..., None] - attn @ w
    k_dec = k * (gamma[..., -1:] - gamma).exp()[..., None]
    return q_eff, attn @ u, w, u, k_dec, gamma[..., -1].exp()[..., None, None]


def state_pass(parts, state_AHKV):
    """Sequential pass over the G chunk positions of a window; parts are [G, A, HV, C, ·] contiguous."""
    q_eff, pu, w, u, k_dec, chunk_decay = parts
    G, A, HV, C, K = q_eff.shape
    V = u.shape[-1]
    flat = lambda x: x.reshape(A * HV, *x.shape[2:])  # noqa: E731  (views: [A * HV, C, ·])
    out_GAHCV = torch.empty_like(pu)
    S = state_AHKV.reshape(A * HV, K, V)
    for c in range(G):
        torch.baddbmm(flat(pu[c]), flat(q_eff[c]), S, out=out_GAHCV[c].view(A * HV, C, V))
        v_new = torch.baddbmm(flat(u[c]), flat(w[c]), S, alpha=-1.0)
        S = torch.baddbmm(S * flat(chunk_decay[c]), flat(k_dec[c]).transpose(1, 2), v_new)
    return out_GAHCV, S.view(A, HV, K, V)


def chunked_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                             cu_seqlens=None, use_qk_l2norm_in_kernel=False):
    """Same contract as `kernels.chunk_gated_delta_rule` (q, k [B, T, H, K]; v [B, T, HV, V];
    g, beta [B, T, HV]; initial_state [N, HV, K, V] fp32) -> (o [B, T, HV, V], final [N, HV, K, V] | None)."""
    check_delta_rule_shapes(q, k, v, g, beta)
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    scale = K ** -0.5 if scale is None else scale
    # q, k stay at H key heads until gathered into chunks (expanded there, in the same copy)
    q_T, k_T = expand_qk(q.reshape(1, B * T, H, K), k.reshape(1, B * T, H, K), H, scale, use_qk_l2norm_in_kernel)
    flat = [with_zero_row(x.reshape(B * T, *x.shape[2:])) for x in (q_T, k_T, v, g, beta)]
    spans = sequence_spans(B, T, cu_seqlens)
    starts_N = torch.tensor([b * T + s for b, s, _ in spans], dtype=torch.long)
    lens_N = torch.tensor([e - s for _, s, e in spans], dtype=torch.long)
    N = len(spans)
    state = (torch.zeros(N, HV, K, V, dtype=torch.float32, device=q.device) if initial_state is None
             else initial_state.float().clone())
    o_flat = torch.empty(B * T + 1, HV, V, dtype=torch.float32, device=q.device)
    n_chunks_N = (lens_N + CHUNK - 1) // CHUNK
    first = 0
    while first < int(n_chunks_N.max()):
        active_A = (n_chunks_N > first).nonzero().squeeze(1)
        width = max(1, WINDOW_TOKENS // (CHUNK * len(active_A)))
        rows = chunk_token_index(starts_N[active_A], lens_N[active_A], first, width, B * T).to(q.device)
        G, A = rows.shape[:2]
        q_c, k_c = [x[rows].transpose(2, 3).unsqueeze(3).contiguous() for x in flat[:2]]  # [G, A, H, 1, C, K]
        v_c, g_c, b_c = [x[rows].transpose(2, 3).contiguous().unflatten(2, (H, HV // H)) for x in flat[2:]]
        parts = [x.reshape(G, A, HV, *x.shape[4:]) for x in intra_chunk(q_c, k_c, v_c, g_c, b_c)]
        out_GAHCV, state[active_A] = state_pass(parts, state[active_A])
        o_flat[rows] = out_GAHCV.transpose(2, 3)
        first += width
    o = o_flat[: B * T].reshape(B, T, HV, V).to(v.dtype)
    return o, (state if output_final_state else None)
