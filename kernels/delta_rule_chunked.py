"""Fast CPU path for the gated delta rule: the chunked (WY / UT-transform) form in batched PyTorch.

Chunks of C = 64 tokens start at each sequence's own start; the last chunk of a sequence is padded
with q = k = v = 0, g = 0, beta = 0, which changes neither its outputs nor the state (qwen35 §4.4).
All intra-chunk work (cumulative gate, beta*K*K^T*decay, the inverse of its unit-lower-triangular
system, w/u, the intra-chunk attention) is one batched op over every chunk of a window; the only
loop is the sequential pass over chunk positions, batched over sequences and heads, and it holds
just the state-dependent matmuls (two C x K x V products and one K x C x V update per chunk).

Per chunk, with gamma the cumulative log gate inside the chunk and S the incoming state [K, V]:
    A = (I + strictly-lower(beta_i k_i.k_j exp(gamma_i - gamma_j)))^-1
    w = A diag(beta exp(gamma)) k,   u = A diag(beta) v
    v' = u - w S,   o = (q exp(gamma)) S + tril(q k^T exp(gamma_i - gamma_j)) v'
    S' = exp(gamma_C) S + (k exp(gamma_C - gamma))^T v'

Shape legend:
    T tokens (flat, all rows), N sequences, A sequences active in a window, G chunk positions in a
    window, C chunk size (64), H key heads, R value heads per key head, HV = H * R value heads,
    K key dim, V value dim.
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


def unit_lower_inverse(system_BCC):
    """(I + strictly-lower(system))^-1 for a batch of C x C matrices; the diagonal and above are ignored."""
    eye_CC = torch.eye(system_BCC.shape[-1], dtype=system_BCC.dtype, device=system_BCC.device)
    return torch.linalg.solve_triangular(system_BCC, eye_CC.expand_as(system_BCC), upper=False, unitriangular=True)


def intra_chunk(q, k, v, g, beta):
    """Everything that does not depend on the incoming state, batched over chunks.
    q, k [P, H, C, K] (key heads, P = G * A); v [P, H, R, C, V]; g, beta [P, H, R, C].
    Returns (q_dec, w, k_dec [P, H, R, C, K], u [P, H, R, C, V], attn [P, H, R, C, C], gamma_C [P, H, R])."""
    P, H, R, C = g.shape
    gamma = g.cumsum(-1)
    decay = (gamma[..., :, None] - gamma[..., None, :]).exp_().tril_()  # [P, H, R, C, C]; above diag -> 0
    kk = (k @ k.transpose(-1, -2)).unsqueeze(2)  # once per key head, shared by its R value heads
    A = unit_lower_inverse((kk * decay).mul_(beta[..., :, None]).view(-1, C, C)).reshape(P, H, R, C, C)
    attn = decay.mul_((q @ k.transpose(-1, -2)).unsqueeze(2))
    e_gamma = gamma.exp()
    # w = A diag(beta e^gamma) k: the R value heads of a key head stack into one [R*C, C] @ [C, K] product
    w = ((A * (beta * e_gamma)[..., None, :]).reshape(P, H, R * C, C) @ k).view(P, H, R, C, -1)
    u = A.mul_(beta[..., None, :]) @ v
    q_dec = q.unsqueeze(2) * e_gamma[..., None]
    k_dec = k.unsqueeze(2) * (gamma[..., -1:] - gamma).exp_()[..., None]
    return q_dec, w, k_dec, u, attn, gamma[..., -1]


def state_pass(q_dec, w, k_dec, u, attn, gamma_C, S_BKV):
    """Sequential pass over the G chunk positions of a window, each batched over B = A * HV
    (sequence, value head) pairs; inputs are [G, B, ·] contiguous. Returns (o [G, B, C, V], S' [B, K, V])."""
    G, B, C, V = u.shape
    o_GBCV = torch.empty_like(u)
    v_new_GBCV = torch.empty_like(u)
    chunk_decay_GB11 = gamma_C.exp()[..., None, None]
    for c in range(G):
        torch.bmm(q_dec[c], S_BKV, out=o_GBCV[c])
        torch.baddbmm(u[c], w[c], S_BKV, alpha=-1.0, out=v_new_GBCV[c])
        S_BKV = S_BKV.mul_(chunk_decay_GB11[c]).baddbmm_(k_dec[c].transpose(1, 2), v_new_GBCV[c])
    # the intra-chunk part of the output needs no state: one batched product over all chunks
    o_GBCV.view(G * B, C, V).baddbmm_(attn.view(G * B, C, C), v_new_GBCV.view(G * B, C, V))
    return o_GBCV, S_BKV


def gather_chunks(flat, rows_GAC, H):
    """Flat inputs [T + 1, ...] -> chunk layout: q, k [G*A, H, C, K]; v [G*A, H, R, C, V]; g, beta [G*A, H, R, C]."""
    G, A, C = rows_GAC.shape
    q_c, k_c = [x[rows_GAC].view(G * A, C, H, -1).transpose(1, 2).contiguous() for x in flat[:2]]
    v_c = flat[2][rows_GAC].view(G * A, C, H, -1, flat[2].shape[-1]).permute(0, 2, 3, 1, 4).contiguous()
    g_c, b_c = [x[rows_GAC].view(G * A, C, H, -1).permute(0, 2, 3, 1).contiguous() for x in flat[3:]]
    return q_c, k_c, v_c, g_c, b_c


def chunked_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                             cu_seqlens=None, use_qk_l2norm_in_kernel=False):
    """Same contract as `kernels.chunk_gated_delta_rule` (q, k [B, T, H, K]; v [B, T, HV, V];
    g, beta [B, T, HV]; initial_state [N, HV, K, V] fp32) -> (o [B, T, HV, V], final [N, HV, K, V] | None)."""
    check_delta_rule_shapes(q, k, v, g, beta)
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    scale = K ** -0.5 if scale is None else scale
    # q, k stay at H key heads: each value head's products broadcast over them
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
        rows_GAC = chunk_token_index(starts_N[active_A], lens_N[active_A], first, width, B * T).to(q.device)
        G, A = rows_GAC.shape[:2]
        parts = intra_chunk(*gather_chunks(flat, rows_GAC, H))
        parts = [x.reshape(G, A * HV, *x.shape[3:]) for x in parts]  # [G*A, H, R, ·] -> [G, A*HV, ·] (views)
        o_GBCV, S_BKV = state_pass(*parts, state[active_A].view(A * HV, K, V))
        state[active_A] = S_BKV.view(A, HV, K, V)
        o_flat[rows_GAC] = o_GBCV.view(G, A, HV, CHUNK, V).transpose(2, 3)
        first += width
    o = o_flat[: B * T].reshape(B, T, HV, V).to(v.dtype)
    return o, (state if output_final_state else None)
