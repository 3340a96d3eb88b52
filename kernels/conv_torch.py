"""Fast PyTorch path for the short causal conv: all sequences at once, W + 1 shifted multiply-adds.

The taps run over the packed rows as if they were one sequence, in the [rows, channels] layout
(no transposes, no copies of x). Only each sequence's first W outputs reach back past its start,
into another sequence; those N * W rows are recomputed from the sequence's own history (its conv
state, or zeros) and written over.

Shape legend: T packed tokens, C channels, W taps before the current one (weight [C, W + 1]),
P state columns (P >= W), S slots, N sequences, O window offsets.
"""
import bisect

import torch
import torch.nn.functional as F

from kernels.conv_reference import activate

TILE_ROWS = 256      # [256, C] fp32 tiles: a few of them stay in L2 for C up to a few thousand


def activate_(y, activation):
    """`activate` in place."""
    return F.silu(y, inplace=True) if activation == "silu" else y


def history_rows(x, conv_states, slots_N, has_initial_state, num_seqs, width):
    """The P rows in front of each sequence: [N, P, C], its state where it has one, else zeros."""
    if conv_states is None:
        return x.new_zeros(num_seqs, width, x.shape[1])
    hist_NPC = conv_states[slots_N].transpose(1, 2).to(x.dtype)
    if has_initial_state is not None:
        hist_NPC = hist_NPC * has_initial_state.to(device=x.device, dtype=x.dtype)[:, None, None]
    return hist_NPC


def window_rows(x_TC, hist_NPC, starts_N, offsets_NO):
    """Each sequence's rows at offsets o from its first token: [N, O, C]; o < 0 reads its history
    (hist[n, P + o]), o >= 0 its tokens."""
    P = hist_NPC.shape[1]
    x_TC = x_TC if x_TC.shape[0] else x_TC.new_zeros(1, x_TC.shape[1])     # T = 0: only history
    token_NO = (starts_N[:, None] + offsets_NO).clamp(0, x_TC.shape[0] - 1)
    hist_NO = (P + offsets_NO).clamp(0, P - 1)
    seq_N1 = torch.arange(len(starts_N), device=x_TC.device)[:, None]
    return torch.where((offsets_NO >= 0)[..., None], x_TC[token_NO], hist_NPC[seq_N1, hist_NO])


def taps_(out_RC, x_TC, w_JC, start):
    """out <- sum_j weight[:, j] * x[t - W + j] for rows t = start .. start + R - 1, as if the packed
    rows were one sequence starting from zeros: W + 1 shifted multiply-adds over row slices (no
    shifted copies), summed in fp32 from the current token back."""
    W, end = len(w_JC) - 1, start + out_RC.shape[0]
    torch.mul(x_TC[start:end], w_JC[W].float(), out=out_RC)     # fp32 sums, one rounding at the end
    for back in range(1, W + 1):
        skip = max(back - start, 0)                          # rows with nothing `back` rows before
        if end > start + skip:
            out_RC[skip:].addcmul_(x_TC[start + skip - back:end - back], w_JC[W - back])
    return out_RC


def first_rows(x_TC, hist_NPC, starts_N, weight_CJ):
    """The outputs of each sequence's first W positions, which reach back into its history:
    [N, W, C] (rows past a short sequence's end are computed but not used)."""
    W = weight_CJ.shape[1] - 1
    offsets_NO = torch.arange(-W, W, device=x_TC.device).expand(len(starts_N), -1)
    win_NOC = window_rows(x_TC, hist_NPC, starts_N, offsets_NO)
    out_NWC = win_NOC[:, :W].float() * weight_CJ[:, 0].float()
    for j in range(1, W + 1):
        out_NWC.addcmul_(win_NOC[:, j:j + W], weight_CJ[:, j])
    return out_NWC


def tiled_conv(x_TC, weight_CJ, bias, activation, rows_M, firsts_MC, out_dtype):
    """y [T, C] = act(taps + bias), the rows rows_M (ascending) taken from firsts_MC instead of the
    taps; TILE_ROWS rows at a time, so each tile's taps, bias and activation pass over data still
    in cache rather than over [T, C] buffers from memory."""
    T, C = x_TC.shape
    y_TC = torch.empty(T, C, dtype=out_dtype, device=x_TC.device)
    in_place = out_dtype == torch.float32 and weight_CJ.dtype == torch.float32
    buf_RC = None if in_place else torch.empty(min(T, TILE_ROWS), C, dtype=torch.float32, device=x_TC.device)
    rows = rows_M.tolist()
    w_JC = weight_CJ.t().contiguous()             # contiguous tap rows: a strided [C] operand is not vectorised
    for start in range(0, T, TILE_ROWS):
        end = min(start + TILE_ROWS, T)
        out_RC = taps_(y_TC[start:end] if in_place else buf_RC[:end - start], x_TC, w_JC, start)
        first, last = bisect.bisect_left(rows, start), bisect.bisect_left(rows, end)
        if last > first:
            out_RC[rows_M[first:last] - start] = firsts_MC[first:last]
        if bias is not None:
            out_RC += bias
        if in_place:
            activate_(out_RC, activation)
        else:
            y_TC[start:end] = activate(out_RC.to(weight_CJ.dtype), activation)
    return y_TC


def causal_conv1d_fn_torch(x, weight, bias=None, activation="silu", cu_seqlens=None, conv_states=None,
                           state_indices=None, has_initial_state=None):
    """Same contract as `kernels.causal_conv1d_fn`: x [T, C], weight [C, W + 1] -> y [T, C]."""
    T, C = x.shape
    W = weight.shape[1] - 1
    P = conv_states.shape[-1] if conv_states is not None else W
    cu = (torch.tensor([0, T]) if cu_seqlens is None else cu_seqlens).to(device=x.device, dtype=torch.long)
    starts_N, lens_N = cu[:-1], cu[1:] - cu[:-1]
    N = len(lens_N)
    slots_N = torch.arange(N, device=x.device) if state_indices is None else state_indices.long()
    x_TC = x.to(weight.dtype)            # inputs in weight dtype, as HF; taps accumulate in fp32
    hist_NPC = history_rows(x_TC, conv_states, slots_N, has_initial_state, N, P)
    i_W = torch.arange(W, device=x.device)
    inside_NW = i_W < lens_N[:, None]                  # positions 0..W-1 that exist
    rows_M = (starts_N[:, None] + i_W)[inside_NW]      # M = their count, in row order
    firsts_MC = first_rows(x_TC, hist_NPC, starts_N, weight)[inside_NW]
    y = tiled_conv(x_TC, weight, bias, activation, rows_M, firsts_MC, x.dtype)
    if conv_states is not None:                        # the last P raw inputs of each sequence
        last_NO = lens_N[:, None] - P + torch.arange(P, device=x.device)
        conv_states[slots_N] = window_rows(x_TC, hist_NPC, starts_N, last_NO).transpose(1, 2).to(
            conv_states.dtype)
    return y


def shifted_state(hist_NCP, x_NC):
    """Each channel's window moved one column left with x appended: [N, C, P]. In the flat
    [N, C * P] view that is one contiguous shifted copy (a channel's first column lands at the end
    of the channel before, where x then overwrites it)."""
    N, C, P = hist_NCP.shape
    new_NCP = torch.empty_like(hist_NCP)
    new_NCP.view(N, C * P)[:, :-1] = hist_NCP.view(N, C * P)[:, 1:]
    new_NCP[:, :, -1] = x_NC
    return new_NCP


def causal_conv1d_update_torch(x, conv_states, weight, bias=None, activation="silu", state_indices=None):
    """Same contract as `kernels.causal_conv1d_update`: x [N, C], conv_states [S, C, P] -> y [N, C].
    The slots are gathered once and written back once (index_select, index_copy_); the taps are
    summed in fp32 in `taps`' order (current token first, then one fused multiply-add per tap
    back), so a decode step gives the same bits as the prefill path would for that window."""
    N, C = x.shape
    P, W = conv_states.shape[-1], weight.shape[1] - 1
    slots_N = torch.arange(N, device=x.device) if state_indices is None else state_indices.long()
    hist_NCP = conv_states.index_select(0, slots_N).to(weight.dtype)
    x_NC = x.to(weight.dtype)
    w_J, hist_P = weight.unbind(1), hist_NCP.unbind(2)     # columns, sliced in one op each
    out_NC = x_NC.float() * w_J[W].float()
    for back in range(1, W + 1):
        out_NC.addcmul_(hist_P[P - back], w_J[W - back])
    if bias is not None:
        out_NC += bias.float()
    conv_states.index_copy_(0, slots_N, shifted_state(hist_NCP, x_NC).to(conv_states.dtype))
    return activate(out_NC, activation).to(x.dtype)
