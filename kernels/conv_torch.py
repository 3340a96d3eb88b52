"""Fast PyTorch path for the short causal conv: all sequences at once, W + 1 shifted multiply-adds.

Each sequence gets its P history rows (its conv state, or zeros) placed in front of its tokens in
one extended [rows, channels] buffer; the causal taps over that buffer then never mix sequences,
because every output row only reaches W rows back, into its own history.

Shape legend: T packed tokens, C channels, W taps before the current one (weight [C, W + 1]),
P state columns (P >= W), S slots, N sequences, X = T + N * P extended rows.
"""
import torch

from kernels.conv_reference import activate


def extended_layout(cu_seqlens, num_tokens, history, device):
    """Row of every token in the extended buffer [T] and first history row of each sequence [N]."""
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, num_tokens])
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lens_N = cu[1:] - cu[:-1]
    seq_T = torch.repeat_interleave(torch.arange(len(lens_N), device=device), lens_N)
    token_rows_T = torch.arange(num_tokens, device=device) + (seq_T + 1) * history
    hist_start_N = cu[:-1] + torch.arange(len(lens_N), device=device) * history
    return token_rows_T, hist_start_N, lens_N


def history_rows(x, conv_states, slots_N, has_initial_state, num_seqs, width):
    """The P rows in front of each sequence: [N, P, C], its state where it has one, else zeros."""
    if conv_states is None:
        return x.new_zeros(num_seqs, width, x.shape[1])
    hist_NPC = conv_states[slots_N].transpose(1, 2).to(x.dtype)
    if has_initial_state is not None:
        hist_NPC = hist_NPC * has_initial_state.to(device=x.device, dtype=x.dtype)[:, None, None]
    return hist_NPC


def causal_taps(ext_XC, weight_CJ):
    """sum_j weight[:, j] * ext[r - W + j] for every row r >= W of the buffer: [X - W, C].

    Shifted multiply-adds over row slices in the packed [rows, channels] layout: no transposes
    and no copies of the buffer (a conv1d call needs [C, X] and gathers back)."""
    X, W = ext_XC.shape[0], weight_CJ.shape[1] - 1
    out_RC = ext_XC[W:] * weight_CJ[:, W]
    for j in range(W):
        out_RC.addcmul_(ext_XC[j:X - W + j], weight_CJ[:, j])
    return out_RC


def causal_conv1d_fn_torch(x, weight, bias=None, activation="silu", cu_seqlens=None, conv_states=None,
                           state_indices=None, has_initial_state=None):
    """Same contract as `kernels.causal_conv1d_fn`: x [T, C], weight [C, W + 1] -> y [T, C]."""
    T, C = x.shape
    W = weight.shape[1] - 1
    P = conv_states.shape[-1] if conv_states is not None else W
    token_rows_T, hist_start_N, lens_N = extended_layout(cu_seqlens, T, P, x.device)
    N = len(lens_N)
    slots_N = torch.arange(N, device=x.device) if state_indices is None else state_indices.long()
    hist_rows_NP = hist_start_N[:, None] + torch.arange(P, device=x.device)
    ext_XC = torch.empty(T + N * P, C, dtype=weight.dtype, device=x.device)
    ext_XC[token_rows_T] = x.to(weight.dtype)
    hist_NPC = history_rows(x, conv_states, slots_N, has_initial_state, N, P)
    ext_XC[hist_rows_NP.flatten()] = hist_NPC.reshape(N * P, C).to(weight.dtype)
    out_RC = causal_taps(ext_XC, weight)
    if bias is not None:
        out_RC += bias
    y = activate(out_RC[token_rows_T - W], activation).to(x.dtype)
    if conv_states is not None:
        last_rows_NP = hist_rows_NP + lens_N[:, None]
        conv_states[slots_N] = ext_XC[last_rows_NP].transpose(1, 2).to(conv_states.dtype)
    return y


def causal_conv1d_update_torch(x, conv_states, weight, bias=None, activation="silu", state_indices=None):
    """Same contract as `kernels.causal_conv1d_update`: x [N, C], conv_states [S, C, P] -> y [N, C]."""
    N, C = x.shape
    W = weight.shape[1] - 1
    slots_N = torch.arange(N, device=x.device) if state_indices is None else state_indices.long()
    ext_NCX = torch.cat([conv_states[slots_N].to(weight.dtype), x[:, :, None].to(weight.dtype)], dim=2)
    out_NC = (ext_NCX[:, :, -(W + 1):].float() * weight.float()).sum(-1)
    if bias is not None:
        out_NC = out_NC + bias.float()
    conv_states[slots_N] = ext_NCX[:, :, 1:].to(conv_states.dtype)
    return activate(out_NC, activation).to(x.dtype)
