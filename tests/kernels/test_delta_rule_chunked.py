"""The CPU chunked delta rule's own edge cases vs the naive per-token recurrence: several windows of
one sequence (the strided output copy), strong decay (exp overflow above the chunk diagonal must not
leak), and bf16 inputs gathered per window."""
import pytest
import torch

from kernels.delta_rule_chunked import WINDOW_TOKENS, chunked_gated_delta_rule
from kernels.delta_rule_reference import naive_gated_delta_rule


def make_inputs(T, H, HV, K, V, g_scale, dtype=torch.float32):
    q, k = torch.randn(1, T, H, K, dtype=dtype), torch.randn(1, T, H, K, dtype=dtype)
    v = torch.randn(1, T, HV, V, dtype=dtype)
    g = -torch.rand(1, T, HV) * g_scale
    return q, k, v, g, torch.rand(1, T, HV, dtype=dtype)


@pytest.mark.parametrize("T", [2 * WINDOW_TOKENS, 2 * WINDOW_TOKENS + 37])
def test_one_sequence_over_several_windows(T, assert_rms_close):
    q, k, v, g, beta = make_inputs(T, 1, 2, 16, 16, 0.1)
    args = dict(initial_state=torch.randn(1, 2, 16, 16), output_final_state=True, use_qk_l2norm_in_kernel=True)
    o, final = chunked_gated_delta_rule(q, k, v, g, beta, **args)
    o_ref, final_ref = naive_gated_delta_rule(q, k, v, g, beta, **args)
    assert_rms_close(o, o_ref, 1e-5, "o")
    assert_rms_close(final, final_ref, 1e-5, "final state")


def test_strong_decay_stays_finite(assert_rms_close):
    q, k, v, g, beta = make_inputs(100, 1, 2, 16, 16, 40.0)  # exp(gamma_i - gamma_j) overflows for j > i
    o, final = chunked_gated_delta_rule(q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o_ref, final_ref = naive_gated_delta_rule(q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    assert_rms_close(o, o_ref, 1e-5, "o")
    assert_rms_close(final, final_ref, 1e-5, "final state")


def test_bf16_inputs_without_l2norm(assert_rms_close):
    q, k, v, g, beta = make_inputs(300, 2, 4, 16, 16, 0.1, dtype=torch.bfloat16)
    k = k * 0.25  # |k|^2 ~ 1 without the l2 norm, so the recurrence itself stays bounded
    o, final = chunked_gated_delta_rule(q, k, v, g, beta, scale=0.2, output_final_state=True)
    o_ref, final_ref = naive_gated_delta_rule(q, k, v, g, beta, scale=0.2, output_final_state=True)
    assert o.dtype == torch.bfloat16
    assert_rms_close(o, o_ref, 1e-2, "o")
    assert_rms_close(final, final_ref, 1e-5, "final state")
