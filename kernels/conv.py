"""Public short causal depthwise conv ops (prefill over packed sequences, decode with a state pool).

Shape legend: T packed tokens, C channels, W taps before the current one (weight [C, W + 1],
tap W = the current token), P state columns per slot (P >= W, normally W), S slots, N sequences.
"""
from kernels.conv_torch import causal_conv1d_fn_torch, causal_conv1d_update_torch
from kernels.conv_triton import causal_conv1d_fn_triton, causal_conv1d_update_triton


def causal_conv1d_fn(x, weight, bias=None, activation="silu", cu_seqlens=None, conv_states=None,
                     state_indices=None, has_initial_state=None):
    """Causal conv per sequence, no leakage across cu_seqlens boundaries.

    x [T, C]; weight [C, W + 1]; bias [C] or None; activation "silu" or None; cu_seqlens [N + 1];
    conv_states [S, C, P] pool of the last raw inputs: if has_initial_state[i] (bool [N]; all True
    when None) sequence i starts from conv_states[state_indices[i]] (state_indices [N], default
    arange(N)), else zeros; afterwards that row holds the sequence's last P raw inputs (left-padded
    with the old state / zeros for short sequences), in place. Returns y [T, C] in x's dtype.
    """
    if x.is_cuda:
        return causal_conv1d_fn_triton(x, weight, bias, activation, cu_seqlens, conv_states, state_indices,
                                       has_initial_state)
    return causal_conv1d_fn_torch(x, weight, bias, activation, cu_seqlens, conv_states, state_indices,
                                  has_initial_state)


def causal_conv1d_update(x, conv_states, weight, bias=None, activation="silu", state_indices=None):
    """One new token per sequence: x [N, C]; conv_states [S, C, P] shifted left with x appended,
    in place, at rows state_indices [N] (default arange(N)). Returns y [N, C] in x's dtype."""
    if x.is_cuda:
        return causal_conv1d_update_triton(x, conv_states, weight, bias, activation, state_indices)
    return causal_conv1d_update_torch(x, conv_states, weight, bias, activation, state_indices)
