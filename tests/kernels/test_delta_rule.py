"""Fast CPU delta rule paths vs the naive per-token recurrence (and HF's torch fallback)."""
import pytest
import torch

from kernels import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from kernels.delta_rule_reference import naive_gated_delta_rule


def make_inputs(B, T, H, HV, K, V, dtype=torch.float32):
    q, k = torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype)
    v = torch.randn(B, T, HV, V, dtype=dtype)
    g = -torch.rand(B, T, HV) * 0.3 - 0.01  # log decay <= 0, fp32
    beta = torch.rand(B, T, HV, dtype=dtype)
    return q, k, v, g, beta


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_naive(T, group, with_state, assert_rms_close):
    B, H, K, V = 2, 2, 16, 32
    q, k, v, g, beta = make_inputs(B, T, H, H * group, K, V)
    s0 = torch.randn(B, H * group, K, V) if with_state else None
    args = dict(initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o, final = chunk_gated_delta_rule(q, k, v, g, beta, **args)
    o_ref, final_ref = naive_gated_delta_rule(q, k, v, g, beta, **args)
    assert_rms_close(o, o_ref, 1e-5, "o")
    assert_rms_close(final, final_ref, 1e-5, "final state")


def test_chunked_packed_varlen_matches_naive(assert_rms_close):
    lens = [1, 63, 64, 65, 7]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    q, k, v, g, beta = make_inputs(1, sum(lens), 2, 4, 16, 16)
    s0 = torch.randn(len(lens), 4, 16, 16)
    args = dict(initial_state=s0, output_final_state=True, cu_seqlens=cu, scale=0.3)
    o, final = chunk_gated_delta_rule(q, k, v, g, beta, **args)
    o_ref, final_ref = naive_gated_delta_rule(q, k, v, g, beta, **args)
    assert_rms_close(o, o_ref, 1e-5, "o")
    assert_rms_close(final, final_ref, 1e-5, "final state")


def test_chunked_matches_hf_torch_fallback(assert_rms_close):
    import transformers.models.qwen3_5_moe.modeling_qwen3_5_moe as hf
    q, k, v, g, beta = make_inputs(2, 130, 2, 4, 16, 32, dtype=torch.bfloat16)
    s0 = torch.randn(2, 4, 16, 32)
    args = dict(initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o, final = chunk_gated_delta_rule(q, k, v, g, beta, **args)
    o_hf, final_hf = hf.torch_chunk_gated_delta_rule(q, k, v, g, beta, **args)
    assert o.dtype == torch.bfloat16
    assert_rms_close(o, o_hf, 1e-2, "o")
    assert_rms_close(final, final_hf, 1e-5, "final state")


def test_recurrent_pool_updates_only_its_slots(assert_rms_close):
    lens = [1, 3, 1]
    cu = torch.tensor([0, 1, 4, 5])
    q, k, v, g, beta = make_inputs(1, sum(lens), 2, 4, 16, 16)
    pool = torch.randn(8, 4, 16, 16)
    slots = torch.tensor([6, 1, 3])
    before = pool.clone()
    o, _ = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=pool, cu_seqlens=cu,
                                            ssm_state_indices=slots, use_qk_l2norm_in_kernel=True)
    ref_pool = before.clone()
    o_ref, _ = naive_gated_delta_rule(q, k, v, g, beta, initial_state=ref_pool, cu_seqlens=cu,
                                      ssm_state_indices=slots, use_qk_l2norm_in_kernel=True)
    assert_rms_close(o, o_ref, 1e-5, "o")
    assert_rms_close(pool[slots], ref_pool[slots], 1e-5, "updated slots")
    untouched = torch.tensor([i for i in range(8) if i not in slots.tolist()])
    assert torch.equal(pool[untouched], before[untouched])
    assert not torch.equal(pool[slots], before[slots])


def test_chunked_matches_naive_at_4096_tokens_packed(assert_rms_close):
    lens = [3000, 1, 1095]  # T = 4096 in all, windows and chunk boundaries crossed mid-sequence
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    q, k, v, g, beta = make_inputs(1, sum(lens), 1, 2, 16, 16)
    args = dict(initial_state=torch.randn(3, 2, 16, 16), output_final_state=True, cu_seqlens=cu,
                use_qk_l2norm_in_kernel=True)
    o, final = chunk_gated_delta_rule(q, k, v, g, beta, **args)
    o_ref, final_ref = naive_gated_delta_rule(q, k, v, g, beta, **args)
    assert_rms_close(o, o_ref, 1e-5, "o")
    assert_rms_close(final, final_ref, 1e-5, "final state")


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("l2norm", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_recurrent_decode_matches_naive(group, l2norm, packed):
    # decode proper: one token per sequence, scattered slots of a pool; as B rows of T = 1 or as
    # sequences of one token packed by cu_seqlens
    N, H, K, V = 5, 2, 16, 8
    q, k, v, g, beta = make_inputs(1 if packed else N, N if packed else 1, H, H * group, K, V)
    cu = torch.arange(N + 1) if packed else None
    pool = torch.randn(9, H * group, K, V)
    slots = torch.tensor([7, 0, 4, 8, 2])
    before, ref_pool = pool.clone(), pool.clone()
    args = dict(cu_seqlens=cu, ssm_state_indices=slots, use_qk_l2norm_in_kernel=l2norm, scale=0.7)
    o, final = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=pool, output_final_state=True,
                                                **args)
    o_ref, _ = naive_gated_delta_rule(q, k, v, g, beta, initial_state=ref_pool, **args)
    assert final is pool and o.shape == o_ref.shape
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool, ref_pool, atol=1e-5, rtol=1e-5)
    untouched = torch.tensor([1, 3, 5, 6])
    assert torch.equal(pool[untouched], before[untouched])
    assert not torch.equal(pool[slots], before[slots])


def test_recurrent_decode_bfloat16_inputs_keep_an_fp32_state():
    N, H, HV, K, V = 3, 2, 4, 16, 16
    q, k, v, g, beta = make_inputs(N, 1, H, HV, K, V, dtype=torch.bfloat16)
    pool = torch.randn(6, HV, K, V)
    slots = torch.tensor([5, 1, 3])
    ref_pool = pool.clone()
    args = dict(ssm_state_indices=slots, use_qk_l2norm_in_kernel=True)
    o, final = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=pool, **args)
    o_ref, _ = naive_gated_delta_rule(q, k, v, g, beta, initial_state=ref_pool, **args)
    assert o.dtype == torch.bfloat16 and final is None and pool.dtype == torch.float32
    torch.testing.assert_close(o, o_ref, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(pool, ref_pool, atol=1e-5, rtol=1e-5)


def test_recurrent_decode_over_many_steps_tracks_naive():
    # rounding must not drift: 50 decode steps, each feeding the next through the pool
    N, H, HV, K, V = 4, 1, 2, 16, 16
    pool = torch.randn(6, HV, K, V)
    ref_pool = pool.clone()
    slots = torch.tensor([3, 0, 5, 2])
    for _ in range(50):
        q, k, v, g, beta = make_inputs(N, 1, H, HV, K, V)
        args = dict(ssm_state_indices=slots, use_qk_l2norm_in_kernel=True)
        o, _ = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=pool, **args)
        o_ref, _ = naive_gated_delta_rule(q, k, v, g, beta, initial_state=ref_pool, **args)
        torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool, ref_pool, atol=1e-5, rtol=1e-5)
