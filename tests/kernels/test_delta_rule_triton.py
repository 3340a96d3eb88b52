"""Triton gated delta rule (under TRITON_INTERPRET on CPU) vs the naive per-token recurrence.

Small head dims keep the interpreter fast; the cases together cover T in {1, 63, 64, 65, 200},
HV/H in {1, 2, 4}, with and without initial state, fp32 and bf16, packed batches with a length-1
sequence, and pool decode with non-contiguous slots."""
import pytest
import torch

import triton  # noqa: E402,F401  (a declared dependency; the tests run it interpreted)
from kernels.delta_rule_reference import naive_gated_delta_rule  # noqa: E402
from kernels.delta_rule_triton import (  # noqa: E402
    chunk_gated_delta_rule_triton, fused_recurrent_gated_delta_rule_triton)

pytestmark = pytest.mark.usefixtures("interpreted")
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def make_inputs(B, T, H, HV, K=16, V=32, dtype=torch.float32):
    q, k = torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype)
    v = torch.randn(B, T, HV, V, dtype=dtype)
    g = -torch.rand(B, T, HV) * 0.3 - 0.01
    return q, k, v, g, torch.rand(B, T, HV, dtype=dtype)


def cu_of(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())


@pytest.mark.parametrize("B,T,H,group,with_state,dtype", [
    (2, 1, 2, 1, False, torch.float32),
    (1, 63, 1, 2, True, torch.float32),
    (1, 64, 1, 4, False, torch.bfloat16),
    (2, 65, 2, 1, True, torch.bfloat16),
    (1, 200, 1, 4, True, torch.float32),
])
def test_chunk_matches_naive(B, T, H, group, with_state, dtype, assert_rms_close):
    q, k, v, g, beta = make_inputs(B, T, H, H * group, dtype=dtype)
    s0 = torch.randn(B, H * group, 16, 32) if with_state else None
    args = dict(initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o, final = chunk_gated_delta_rule_triton(q, k, v, g, beta, **args)
    o_ref, final_ref = naive_gated_delta_rule(q, k, v, g, beta, **args)
    assert o.dtype == dtype
    assert_rms_close(o, o_ref, TOL[dtype], "o")
    assert_rms_close(final, final_ref, 1e-4, "final state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_packed_varlen_matches_naive(dtype, assert_rms_close):
    lens = [1, 63, 65, 7]
    q, k, v, g, beta = make_inputs(1, sum(lens), 2, 4, dtype=dtype)
    args = dict(initial_state=torch.randn(4, 4, 16, 32), output_final_state=True, cu_seqlens=cu_of(lens))
    o, final = chunk_gated_delta_rule_triton(q, k, v, g, beta, scale=0.2, **args)
    o_ref, final_ref = naive_gated_delta_rule(q, k, v, g, beta, scale=0.2, **args)
    assert_rms_close(o, o_ref, TOL[dtype], "o")
    assert_rms_close(final, final_ref, 1e-4, "final state")


def test_chunk_without_final_state_returns_none():
    q, k, v, g, beta = make_inputs(1, 5, 1, 1)
    assert chunk_gated_delta_rule_triton(q, k, v, g, beta)[1] is None


@pytest.mark.parametrize("packed", [True, False])
def test_recurrent_pool_decode(packed, assert_rms_close):
    slots = torch.tensor([7, 2, 4])
    if packed:  # several tokens for one sequence
        lens = [1, 2, 1]
        q, k, v, g, beta = make_inputs(1, 4, 2, 4)
        extra = dict(cu_seqlens=cu_of(lens))
    else:
        q, k, v, g, beta = make_inputs(3, 1, 1, 2)
        extra = {}
    pool = torch.randn(9, v.shape[2], 16, 32)
    before = pool.clone()
    args = dict(ssm_state_indices=slots, use_qk_l2norm_in_kernel=True, output_final_state=True, **extra)
    o, final = fused_recurrent_gated_delta_rule_triton(q, k, v, g, beta, initial_state=pool, **args)
    ref_pool = before.clone()
    o_ref, _ = naive_gated_delta_rule(q, k, v, g, beta, initial_state=ref_pool, **args)
    assert final is pool
    assert_rms_close(o, o_ref, 1e-4, "o")
    assert_rms_close(pool[slots], ref_pool[slots], 1e-5, "updated slots")
    untouched = torch.tensor([i for i in range(9) if i not in slots.tolist()])
    assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.parametrize("with_state", [False, True])
def test_recurrent_initial_and_final_state(with_state, assert_rms_close):
    q, k, v, g, beta = make_inputs(2, 3, 1, 2, dtype=torch.bfloat16)
    s0 = torch.randn(2, 2, 16, 32) if with_state else None
    args = dict(initial_state=s0, output_final_state=True)
    o, final = fused_recurrent_gated_delta_rule_triton(q, k, v, g, beta, **args)
    o_ref, final_ref = naive_gated_delta_rule(q, k, v, g, beta, **args)
    assert_rms_close(o, o_ref, 1e-2, "o")
    assert_rms_close(final, final_ref, 1e-4, "final state")
