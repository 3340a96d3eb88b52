"""Short causal depthwise convolution (the GDN front conv): plain reference, one sequence at a time.

y[t, c] = act(bias[c] + sum_j weight[c, j] * x_ext[t - W + j, c]), j = 0..W (tap W = current token),
where x_ext before a sequence's first token is its conv state (last raw inputs) or zeros.

Shape legend: T packed tokens, C channels, W taps before the current one (weight [C, W + 1]),
P state columns kept per slot (P >= W; the last W are read), S slots in the pool, N sequences.
"""
import torch
import torch.nn.functional as F


def activate(y, activation):
    assert activation in (None, "silu"), f"unsupported activation {activation!r}"
    return F.silu(y) if activation == "silu" else y


def sequence_bounds(num_tokens, cu_seqlens):
    """[(start, end)] per sequence; one sequence of all tokens without cu_seqlens."""
    if cu_seqlens is None:
        return [(0, num_tokens)]
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def naive_causal_conv1d_fn(x, weight, bias=None, activation="silu", cu_seqlens=None, conv_states=None,
                           state_indices=None, has_initial_state=None):
    """Reference of `kernels.causal_conv1d_fn` (x [T, C], weight [C, W + 1], conv_states [S, C, P]
    updated in place) -> y [T, C]. Computed in weight dtype like HF."""
    T, C = x.shape
    P = conv_states.shape[-1] if conv_states is not None else weight.shape[1] - 1
    y = torch.empty_like(x)
    for n, (start, end) in enumerate(sequence_bounds(T, cu_seqlens)):
        slot = n if state_indices is None else int(state_indices[n])
        warm = conv_states is not None and (has_initial_state is None or bool(has_initial_state[n]))
        history_CP = conv_states[slot].to(x.dtype) if warm else x.new_zeros(C, P)
        ext_CX = torch.cat([history_CP, x[start:end].T], dim=1).to(weight.dtype)
        out = F.conv1d(ext_CX[None], weight[:, None, :], bias, groups=C)[0, :, -(end - start):]
        y[start:end] = activate(out, activation).T.to(x.dtype)
        if conv_states is not None:
            conv_states[slot] = ext_CX[:, -P:].to(conv_states.dtype)
    return y


def naive_causal_conv1d_update(x, conv_states, weight, bias=None, activation="silu", state_indices=None):
    """Reference of `kernels.causal_conv1d_update`: x [N, C] one token per sequence, conv_states
    [S, C, P] shifted left and appended in place -> y [N, C]."""
    N, C = x.shape
    slots = range(N) if state_indices is None else state_indices.tolist()
    y = torch.empty_like(x)
    for n, slot in enumerate(slots):
        ext_CX = torch.cat([conv_states[slot].to(weight.dtype), x[n, :, None].to(weight.dtype)], dim=1)
        out = F.conv1d(ext_CX[None], weight[:, None, :], bias, groups=C)[0, :, -1]
        y[n] = activate(out, activation).to(x.dtype)
        conv_states[slot] = ext_CX[:, 1:].to(conv_states.dtype)
    return y
