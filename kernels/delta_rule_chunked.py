"""Fast CPU path for the gated delta rule: the chunked (WY / UT-transform) form in batched PyTorch.

Chunks of C tokens start at each sequence's own start. All intra-chunk work (cumulative gate,
beta*K*K^T*decay, the inverse of its unit-lower-triangular system, w/u, the intra-chunk attention)
is one batched op over every chunk of a window; the only loop is the sequential pass over chunk
positions, batched over sequences and heads, and it holds just the state-dependent matmuls.

Per chunk, with gamma the cumulative log gate inside the chunk and S the incoming state [K, V]:
    A = (I + strictly-lower(beta_i k_i.k_j exp(gamma_i - gamma_j)))^-1
    w = A diag(beta exp(gamma)) k,   u = A diag(beta) v
    v' = u - w S,   o = (q exp(gamma)) S + tril(q k^T exp(gamma_i - gamma_j)) v'
    S' = exp(gamma_C) S + (k exp(gamma_C - gamma))^T v'
A padded slot past a sequence's end has g = beta = 0 (qwen35 §4.4): its row of A is the identity,
so its w, u and v' rows are 0 whatever its q, k, v are (they are read from any real token), it
adds nothing to the state, and its own output row is dropped.

The CPU path is memory-bound outside the matmuls, so C = 32 and small windows (intermediates stay
in cache) beat the Triton contract's C = 64 here; results agree within fp32 rounding.

Shape legend:
    T tokens (flat, all rows), N sequences, A sequences active in a window, G chunk positions in a
    window, C chunk size, H key heads, R value heads per key head, HV = H * R value heads,
    K key dim, V value dim, B = A * HV (sequence, value head) pairs.
"""
import torch

from kernels.delta_rule_reference import check_delta_rule_shapes, sequence_spans
from kernels.huge_pages import empty_on_huge_pages

CHUNK = 32
WINDOW_TOKENS = 1024  # tokens' chunks per window: bounds memory, intermediates mostly in cache;
                      # 1.2-1.5x over 256 on demo head sizes (python -m benchmarks.gdn)


def with_zero_row(x):
    """x [T, ...] -> fp32 [T + 1, ...] in one copy; row T is zeros, where padded chunk slots read from."""
    out = torch.empty(x.shape[0] + 1, *x.shape[1:], dtype=torch.float32, device=x.device)
    out[:-1] = x
    out[-1] = 0
    return out


def normalize_scale_(x, scale, use_l2norm):
    """x <- x * scale, l2-normalised first when asked (x * rsqrt(sum x^2 + 1e-6)), in place over the last dim."""
    if not use_l2norm:
        return x.mul_(scale)
    factor = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().add_(1e-6).rsqrt_()
    return x.mul_(factor.mul_(scale) if scale != 1.0 else factor)


def chunk_token_index(starts_N, lens_N, first_chunk, num_chunks, pad_row):
    """Flat token row of every (chunk position, sequence, slot): [G, N, C]; pad_row where past the end."""
    offs_GC = (torch.arange(first_chunk, first_chunk + num_chunks) * CHUNK)[:, None] + torch.arange(CHUNK)
    offs_G1C = offs_GC[:, None, :]
    return torch.where(offs_G1C < lens_N[:, None], starts_N[:, None] + offs_G1C, pad_row)


def scratch(ws, name, shape, device):
    """fp32 buffer `name` of the per-call workspace ws, reused by every window of that shape: fresh
    multi-MB tensors per window would be page-faulted in again each time the allocator trims them."""
    buf = ws.get(name)
    if buf is None or buf.shape != shape:
        buf = ws[name] = empty_on_huge_pages(shape, device=device)
    return buf


def head_index(rows_GAC, Hx):
    """Flat row of every (token row, head) of an [T', Hx, ...] tensor, head-major inside a chunk: [G, A, Hx, C]."""
    return rows_GAC[:, :, None, :] * Hx + torch.arange(Hx, device=rows_GAC.device)[:, None]


def gather_heads(x_TH, index_GAHC, ws=None, name=None):
    """x [T', Hx, ...] -> fp32 [G, A, Hx, C, ...] in one copy (into workspace buffer `name` when x is fp32)."""
    x_flat = x_TH.reshape(x_TH.shape[0] * x_TH.shape[1], -1)
    out = None
    if name is not None and x_TH.dtype == torch.float32:
        out = scratch(ws, name, (index_GAHC.numel(), x_flat.shape[1]), x_TH.device)
    picked = torch.index_select(x_flat, 0, index_GAHC.flatten(), out=out)
    return picked.view(*index_GAHC.shape, *x_TH.shape[2:]).float()


def unit_lower_inverse(system_PCC, out_PCC):
    """(I + strictly-lower(system))^-1 for a batch of C x C matrices (diagonal and above ignored), into
    row-major out. Solved as the transposed upper system, since LAPACK works on column-major matrices."""
    eye_CC = torch.eye(system_PCC.shape[-1], dtype=system_PCC.dtype, device=system_PCC.device)
    torch.linalg.solve_triangular(system_PCC.mT, eye_CC.expand_as(system_PCC), upper=True, unitriangular=True,
                                  out=out_PCC.mT)
    return out_PCC


def intra_chunk(q, k, v, g, beta, ws):
    """Everything that does not depend on the incoming state, batched over chunks.
    q, k [P, H, C, K] (key heads, P = G * A); v [P, H, R, C, V]; g, beta [P, H, R, C].
    Returns (q_dec, w, k_dec [P, H, R, C, K], u [P, H, R, C, V], attn [P, H, R, C, C], gamma_C [P, H, R])."""
    P, H, R, C = g.shape
    K, V, dev = k.shape[-1], v.shape[-1], k.device
    gamma = g.cumsum(-1)
    decay = torch.sub(gamma[..., :, None], gamma[..., None, :], out=scratch(ws, "decay", (P, H, R, C, C), dev))
    decay.exp_().tril_()  # above the diagonal -> 0
    kk = torch.matmul(k, k.transpose(-1, -2), out=scratch(ws, "kk", (P, H, C, C), dev)).unsqueeze(2)  # per key head
    system = torch.mul(kk, decay, out=scratch(ws, "system", (P, H, R, C, C), dev)).mul_(beta[..., :, None])
    A = unit_lower_inverse(system.view(-1, C, C), scratch(ws, "A", (P * H * R, C, C), dev)).view(P, H, R, C, C)
    qk = torch.matmul(q, k.transpose(-1, -2), out=kk.squeeze(2))  # K K^T is used up: its buffer takes Q K^T
    attn = decay.mul_(qk.unsqueeze(2))
    e_gamma = gamma.exp()
    # w = A diag(beta e^gamma) k: the R value heads of a key head stack into one [R*C, C] @ [C, K] product
    A_w = torch.mul(A, (beta * e_gamma)[..., None, :], out=system)
    w = torch.matmul(A_w.view(P, H, R * C, C), k, out=scratch(ws, "w", (P, H, R * C, K), dev))
    u = torch.matmul(A.mul_(beta[..., None, :]), v, out=scratch(ws, "u", (P, H, R, C, V), dev))
    q_dec = torch.mul(q.unsqueeze(2), e_gamma[..., None], out=scratch(ws, "q_dec", (P, H, R, C, K), dev))
    k_dec = torch.mul(k.unsqueeze(2), (gamma[..., -1:] - gamma).exp_()[..., None],
                      out=scratch(ws, "k_dec", (P, H, R, C, K), dev))
    return q_dec, w.view(P, H, R, C, K), k_dec, u, attn, gamma[..., -1]


def state_pass(q_dec, w, k_dec, u, attn, gamma_C, S_BKV, o_GBCV):
    """Sequential pass over the G chunk positions of a window, each batched over the B (sequence,
    value head) pairs; inputs are [G, B, ·] contiguous; u and S are updated in place, o written."""
    G, B, C, V = u.shape
    v_new_GBCV = u  # u - w S, in place
    chunk_decay_GB11 = gamma_C.exp()[..., None, None]
    steps = zip(q_dec.unbind(), w.unbind(), k_dec.transpose(-1, -2).unbind(), v_new_GBCV.unbind(),
                chunk_decay_GB11.unbind(), o_GBCV.unbind())  # per-step views made in one call each
    for q_dec_BCK, w_BCK, k_dec_BKC, v_new_BCV, decay_B11, o_BCV in steps:
        torch.bmm(q_dec_BCK, S_BKV, out=o_BCV)
        v_new_BCV.baddbmm_(w_BCK, S_BKV, alpha=-1.0)
        S_BKV.mul_(decay_B11).baddbmm_(k_dec_BKC, v_new_BCV)
    # the intra-chunk part of the output needs no state: one batched product over all chunks
    o_GBCV.view(G * B, C, V).baddbmm_(attn.view(G * B, C, C), v_new_GBCV.view(G * B, C, V))


def window_inputs(inputs, rows_GAC, pad_row, ws):
    """Chunk layout of one window: q, k [G*A, H, C, K] (scaled, l2-normalised when asked: done here, on
    rows in cache); v [G*A, H, R, C, V]; g, beta [G*A, H, R, C]; all fp32. q, k, v of padded slots read
    the last real token (any finite row will do); g, beta read zeros."""
    q_T, k_T, v_T, g_beta_TH2, scale, use_l2norm = inputs
    G, A, C = rows_GAC.shape
    H, HV, V = q_T.shape[1], v_T.shape[1], v_T.shape[2]
    real_rows_GAC = rows_GAC.clamp(max=pad_row - 1)
    index_GAHC, index_GAVC = head_index(real_rows_GAC, H), head_index(real_rows_GAC, HV)
    q_c = normalize_scale_(gather_heads(q_T, index_GAHC, ws, "q"), scale, use_l2norm).view(G * A, H, C, -1)
    k_c = normalize_scale_(gather_heads(k_T, index_GAHC, ws, "k"), 1.0, use_l2norm).view(G * A, H, C, -1)
    v_c = gather_heads(v_T, index_GAVC, ws, "v").view(G * A, H, -1, C, V)
    g_beta = gather_heads(g_beta_TH2, head_index(rows_GAC, HV)).view(G * A, H, -1, C, 2)
    return q_c, k_c, v_c, g_beta[..., 0], g_beta[..., 1]


def scatter_output(o_flat, o_GBCV, rows_GAC, pad_row):
    """Write one window's o [G, A*HV, C, V] to its token rows of o_flat [(T + 1) * HV, V] (row T: padded slots)."""
    G, A, C = rows_GAC.shape
    HV, V = o_GBCV.shape[1] // A, o_GBCV.shape[-1]
    first, last = int(rows_GAC[0, 0, 0]), int(rows_GAC[-1, -1, -1])
    if A == 1 and last < pad_row and last - first == G * C - 1:  # one unpadded run of rows: a strided copy
        o_TCHV = o_flat.view(-1, HV, V)[first: last + 1].view(G, C, HV, V)
        o_TCHV.copy_(o_GBCV.view(G, HV, C, V).transpose(1, 2))
        return
    index_GAHC = rows_GAC.to(o_flat.device)[:, :, None, :] * HV + torch.arange(HV, device=o_flat.device)[:, None]
    o_flat.index_copy_(0, index_GAHC.flatten(), o_GBCV.view(-1, V))


def chunked_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                             cu_seqlens=None, use_qk_l2norm_in_kernel=False):
    """Same contract as `kernels.chunk_gated_delta_rule` (q, k [B, T, H, K]; v [B, T, HV, V];
    g, beta [B, T, HV]; initial_state [N, HV, K, V] fp32) -> (o [B, T, HV, V], final [N, HV, K, V] | None)."""
    check_delta_rule_shapes(q, k, v, g, beta)
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    scale = K ** -0.5 if scale is None else scale
    # q, k stay at H key heads: each value head's products broadcast over them. Contiguous once
    # here: the model passes strided slices of its conv output, which every window's flat gather
    # would otherwise copy whole.
    q_T, k_T = q.reshape(B * T, H, K).contiguous(), k.reshape(B * T, H, K).contiguous()
    g_beta_TH2 = with_zero_row(torch.stack([g.reshape(B * T, HV).float(), beta.reshape(B * T, HV).float()], -1))
    inputs = (q_T, k_T, v.reshape(B * T, HV, V).contiguous(), g_beta_TH2, scale, use_qk_l2norm_in_kernel)
    spans = sequence_spans(B, T, cu_seqlens)
    starts_N = torch.tensor([b * T + s for b, s, _ in spans], dtype=torch.long)
    lens_N = torch.tensor([e - s for _, s, e in spans], dtype=torch.long)
    N = len(spans)
    state = (torch.zeros(N, HV, K, V, dtype=torch.float32, device=q.device) if initial_state is None
             else initial_state.float().clone())
    o_flat = empty_on_huge_pages(((B * T + 1) * HV, V), device=q.device)  # row B*T: padded slots
    n_chunks_N = (lens_N + CHUNK - 1) // CHUNK
    first, S_BKV, held_A, ws = 0, None, None, {}
    while first < int(n_chunks_N.max()):
        active_A = (n_chunks_N > first).nonzero().squeeze(1)
        A = len(active_A)
        if held_A is None or len(held_A) != A:  # the active set only shrinks: hold its state across windows
            if held_A is not None:
                state[held_A] = S_BKV.view(len(held_A), HV, K, V)
            S_BKV, held_A = state[active_A].view(A * HV, K, V), active_A
        width = max(1, WINDOW_TOKENS // (CHUNK * A))
        rows_GAC = chunk_token_index(starts_N[active_A], lens_N[active_A], first, width, B * T)
        G = rows_GAC.shape[0]
        parts = intra_chunk(*window_inputs(inputs, rows_GAC.to(q.device), B * T, ws), ws)
        parts = [x.view(G, A * HV, *x.shape[3:]) for x in parts]  # [G*A, H, R, ·] -> [G, A*HV, ·] (views)
        o_GBCV = scratch(ws, "o", (G, A * HV, CHUNK, V), q.device)
        state_pass(*parts, S_BKV, o_GBCV)
        scatter_output(o_flat, o_GBCV, rows_GAC, B * T)
        first += width
    if held_A is not None:
        state[held_A] = S_BKV.view(len(held_A), HV, K, V)
    o = o_flat[: B * T * HV].view(B, T, HV, V).to(v.dtype)
    return o, (state if output_final_state else None)
