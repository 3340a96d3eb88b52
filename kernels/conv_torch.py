"""Fast PyTorch path for the short causal conv: all sequences at once, W + 1 shifted multiply-adds.

The taps run over the packed rows as if they were one sequence, in the [rows, channels] layout
(no transposes, no copies of x). Only each sequence's first W outputs reach back past its start,
into another sequence; those N * W rows are recomputed from the sequence's own history (its conv
state, or zeros) and written over.

Shape legend: T packed tokens, C channels, W taps before the current one (weight [C, W + 1]),
P state columns (P >= W), S slots, N sequences, O window offsets.
"""
import torch

from kernels.conv_reference import activate


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


def taps(x_TC, weight_CJ):
    """sum_j weight[:, j] * x[t - W + j] for every row, as if the packed rows were one sequence
    starting from zeros: W + 1 shifted multiply-adds over row slices (no shifted copies), summed
    in fp32."""
    W = weight_CJ.shape[1] - 1
    out_TC = x_TC.float() * weight_CJ[:, W].float()          # fp32 sums, one rounding at the end
    for back in range(1, min(W, x_TC.shape[0] - 1) + 1):
        out_TC[back:].addcmul_(x_TC[:-back], weight_CJ[:, W - back])
    return out_TC


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
    out_TC = taps(x_TC, weight)
    i_W = torch.arange(W, device=x.device)
    inside_NW = i_W < lens_N[:, None]                  # positions 0..W-1 that exist
    rows_NW = starts_N[:, None] + i_W
    out_TC[rows_NW[inside_NW]] = first_rows(x_TC, hist_NPC, starts_N, weight)[inside_NW]
    if bias is not None:
        out_TC += bias
    y = activate(out_TC.to(weight.dtype), activation).to(x.dtype)
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
