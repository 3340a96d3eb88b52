"""Fast CPU causal conv vs the one-sequence-at-a-time reference (and HF's torch fallback)."""
import pytest
import torch

from kernels import causal_conv1d_fn, causal_conv1d_update
from kernels.conv_reference import naive_causal_conv1d_fn, naive_causal_conv1d_update


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("use_bias", [False, True])
def test_packed_conv_with_pool_matches_reference(activation, use_bias, assert_rms_close):
    lens, C, W = [1, 5, 2, 9], 24, 3
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    x, weight = torch.randn(sum(lens), C), torch.randn(C, W + 1)
    bias = torch.randn(C) if use_bias else None
    pool = torch.randn(7, C, W)
    slots, warm = torch.tensor([5, 0, 2, 3]), torch.tensor([True, False, True, True])
    ref_pool = pool.clone()
    y = causal_conv1d_fn(x, weight, bias, activation, cu, pool, slots, warm)
    y_ref = naive_causal_conv1d_fn(x, weight, bias, activation, cu, ref_pool, slots, warm)
    assert_rms_close(y, y_ref, 1e-6, "y")
    assert torch.equal(pool, ref_pool)


def test_conv_no_leak_across_sequences():
    x, weight = torch.randn(6, 4), torch.randn(4, 4)
    y_packed = causal_conv1d_fn(x, weight, cu_seqlens=torch.tensor([0, 2, 6]))
    assert torch.allclose(y_packed[2:], causal_conv1d_fn(x[2:], weight), atol=1e-6)


def test_conv_matches_hf_fallback():
    import transformers.models.qwen3_5_moe.modeling_qwen3_5_moe as hf
    x, weight = torch.randn(11, 8, dtype=torch.bfloat16), torch.randn(8, 4, dtype=torch.bfloat16)
    y_hf = hf.causal_conv1d_fn(x.T[None], weight, None, "silu")
    y = causal_conv1d_fn(x, weight)
    assert torch.allclose(y.float(), y_hf[0].T.float(), atol=2e-2, rtol=2e-2)


def test_update_matches_reference(assert_rms_close):
    C, W = 16, 3
    x, weight, bias = torch.randn(3, C), torch.randn(C, W + 1), torch.randn(C)
    pool = torch.randn(6, C, W)
    slots = torch.tensor([4, 0, 2])
    ref_pool = pool.clone()
    y = causal_conv1d_update(x, pool, weight, bias, "silu", slots)
    y_ref = naive_causal_conv1d_update(x, ref_pool, weight, bias, "silu", slots)
    assert_rms_close(y, y_ref, 1e-6, "y")
    assert torch.equal(pool, ref_pool)


@pytest.mark.parametrize("lens,P", [([1, 1, 2], 3), ([2, 3, 1], 6), ([7], 4)])
def test_short_sequences_and_wider_state_match_reference(lens, P, assert_rms_close):
    # sequences shorter than the window read their first outputs (and keep their state) from history
    C, W = 8, 3
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    x, weight, bias = torch.randn(sum(lens), C), torch.randn(C, W + 1), torch.randn(C)
    pool = torch.randn(5, C, P)
    slots, warm = torch.tensor([4, 1, 3][:len(lens)]), torch.tensor([True, False, True][:len(lens)])
    ref_pool = pool.clone()
    y = causal_conv1d_fn(x, weight, bias, "silu", cu, pool, slots, warm)
    y_ref = naive_causal_conv1d_fn(x, weight, bias, "silu", cu, ref_pool, slots, warm)
    assert_rms_close(y, y_ref, 1e-6, "y")
    assert torch.equal(pool, ref_pool)


def test_bfloat16_sums_are_no_rougher_than_a_bfloat16_conv1d():
    # the taps must accumulate in fp32 and round once, as conv1d does; bf16 running sums drift
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(4096, 64, generator=g), torch.randn(64, 4, generator=g)
    exact = naive_causal_conv1d_fn(x, weight, activation=None)
    ours = causal_conv1d_fn(x.bfloat16(), weight.bfloat16(), activation=None).float()
    conv1d = naive_causal_conv1d_fn(x.bfloat16(), weight.bfloat16(), activation=None).float()
    err = lambda y: float((y - exact).pow(2).mean().sqrt())  # noqa: E731
    assert err(ours) <= 1.05 * err(conv1d)


@pytest.mark.parametrize("P", [3, 5])
def test_update_continues_a_prefill_bit_for_bit(P):
    # decode sums the taps in the prefill path's order: a token decoded after a prefill gives the
    # same bits as prefilling it with the rest, and the state ends the same
    C, W, lens = 16, 3, [6, 3, 9]              # decoded tokens past the first W (history-read) rows
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    x, weight, bias = torch.randn(sum(lens) + 3, C), torch.randn(C, W + 1), torch.randn(C)
    slots, warm = torch.tensor([4, 0, 2]), torch.tensor([True, False, True])
    pool = torch.randn(5, C, P)
    whole_pool = pool.clone()
    prefix = torch.cat([x[cu[i] + i:cu[i + 1] + i] for i in range(3)])      # all but each last token
    last = torch.stack([x[cu[i + 1] + i] for i in range(3)])
    causal_conv1d_fn(prefix, weight, bias, "silu", cu, pool, slots, warm)
    y_last = causal_conv1d_update(last, pool, weight, bias, "silu", slots)
    cu_whole = cu + torch.arange(4)
    y_whole = causal_conv1d_fn(x[:cu_whole[-1]], weight, bias, "silu", cu_whole, whole_pool, slots, warm)
    assert torch.equal(y_last, y_whole[cu_whole[1:] - 1])
    assert torch.equal(pool, whole_pool)


def test_update_bfloat16_matches_reference():
    C, W = 16, 3
    x, weight = torch.randn(4, C, dtype=torch.bfloat16), torch.randn(C, W + 1, dtype=torch.bfloat16)
    pool = torch.randn(6, C, W, dtype=torch.bfloat16)
    slots = torch.tensor([5, 1, 0, 3])
    ref_pool = pool.clone()
    y = causal_conv1d_update(x, pool, weight, None, "silu", slots)
    y_ref = naive_causal_conv1d_update(x, ref_pool, weight, None, "silu", slots)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, atol=1e-2, rtol=1e-2)
    assert torch.equal(pool, ref_pool)


@pytest.mark.parametrize("x_dtype,w_dtype,tol", [(torch.float32, torch.float32, 1e-6),
                                                  (torch.bfloat16, torch.bfloat16, 1e-2),
                                                  (torch.float32, torch.bfloat16, 1e-2)])
def test_prefill_across_row_tiles_matches_reference(x_dtype, w_dtype, tol, assert_rms_close):
    # sequences start just before, on and just after the 256-row tile edges, one is a single token
    from kernels.conv_torch import TILE_ROWS
    lens = [TILE_ROWS - 1, 1, 2, TILE_ROWS - 3, 5, 300]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    C, W = 8, 3
    x = torch.randn(sum(lens), C, dtype=x_dtype)
    weight, bias = torch.randn(C, W + 1, dtype=w_dtype), torch.randn(C, dtype=w_dtype)
    pool = torch.randn(8, C, W, dtype=w_dtype)
    slots, warm = torch.tensor([7, 0, 5, 2, 1, 4]), torch.tensor([True, True, False, True, False, True])
    ref_pool = pool.clone()
    y = causal_conv1d_fn(x, weight, bias, "silu", cu, pool, slots, warm)
    y_ref = naive_causal_conv1d_fn(x, weight, bias, "silu", cu, ref_pool, slots, warm)
    assert y.dtype == x_dtype
    assert_rms_close(y, y_ref, tol, "y")
    assert torch.equal(pool, ref_pool)
