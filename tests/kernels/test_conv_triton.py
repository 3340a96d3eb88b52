"""Triton causal conv (under TRITON_INTERPRET on CPU) vs the one-sequence-at-a-time reference."""
import pytest
import torch

import triton  # noqa: E402,F401  (a declared dependency; the tests run it interpreted)
from kernels.conv_reference import naive_causal_conv1d_fn, naive_causal_conv1d_update  # noqa: E402
from kernels.conv_triton import causal_conv1d_fn_triton, causal_conv1d_update_triton  # noqa: E402

pytestmark = pytest.mark.usefixtures("interpreted")
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens,with_pool", [([1, 5, 2, 20], True), ([37], False), ([1, 1, 3], True)])
def test_prefill_matches_reference(dtype, lens, with_pool, assert_rms_close):
    C, W = 40, 3
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    x, weight, bias = torch.randn(sum(lens), C, dtype=dtype), torch.randn(C, W + 1, dtype=dtype), torch.randn(C, dtype=dtype)
    pool = torch.randn(8, C, W, dtype=dtype) if with_pool else None
    slots = torch.tensor([6, 0, 3, 5][: len(lens)])
    warm = torch.tensor([True, False, True, True][: len(lens)])
    ref_pool = pool.clone() if with_pool else None
    y = causal_conv1d_fn_triton(x, weight, bias, "silu", cu, pool, slots if with_pool else None, warm if with_pool else None)
    y_ref = naive_causal_conv1d_fn(x, weight, bias, "silu", cu, ref_pool, slots if with_pool else None,
                                   warm if with_pool else None)
    assert_rms_close(y, y_ref, TOL[dtype], "y")
    if with_pool:
        assert torch.equal(pool, ref_pool)  # raw inputs are copied, and untouched slots stay bit-identical


def test_prefill_without_activation_or_bias(assert_rms_close):
    x, weight = torch.randn(9, 16), torch.randn(16, 4)
    cu = torch.tensor([0, 4, 9])
    assert_rms_close(causal_conv1d_fn_triton(x, weight, None, None, cu), naive_causal_conv1d_fn(x, weight, None, None, cu), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_matches_reference(dtype, assert_rms_close):
    C, W = 48, 3
    x, weight, bias = torch.randn(3, C, dtype=dtype), torch.randn(C, W + 1, dtype=dtype), torch.randn(C, dtype=dtype)
    pool = torch.randn(7, C, W, dtype=dtype)
    slots = torch.tensor([5, 0, 2])
    ref_pool = pool.clone()
    y = causal_conv1d_update_triton(x, pool, weight, bias, "silu", slots)
    y_ref = naive_causal_conv1d_update(x, ref_pool, weight, bias, "silu", slots)
    assert_rms_close(y, y_ref, TOL[dtype], "y")
    assert torch.equal(pool, ref_pool)
