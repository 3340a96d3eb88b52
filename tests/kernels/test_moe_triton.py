"""Triton routed experts (under TRITON_INTERPRET on CPU) vs the per-token reference."""
import pytest
import torch

import triton  # noqa: E402,F401  (a declared dependency; the tests run it interpreted)
from kernels.moe_reference import fused_moe_reference, moe_route  # noqa: E402
from kernels.moe_triton import fused_moe_triton  # noqa: E402

pytestmark = pytest.mark.usefixtures("interpreted")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("N", [1, 23])
def test_fused_moe_matches_reference(dtype, tol, N, assert_rms_close):
    D, I, E, k = 80, 24, 6, 2  # D, I not multiples of the tiles
    x = torch.randn(N, D, dtype=dtype)
    w_gu, w_down = torch.randn(E, 2 * I, D, dtype=dtype) * 0.2, torch.randn(E, D, I, dtype=dtype) * 0.2
    weights, ids = moe_route(torch.randn(N, E), k)
    y = fused_moe_triton(x, w_gu, w_down, weights, ids)
    assert y.dtype == dtype
    assert_rms_close(y, fused_moe_reference(x, w_gu, w_down, weights, ids), tol, "y")


def test_expert_offset_shard(assert_rms_close):
    N, D, I, E, k = 17, 32, 16, 8, 3
    x = torch.randn(N, D)
    w_gu, w_down = torch.randn(E, 2 * I, D) * 0.2, torch.randn(E, D, I) * 0.2
    weights, ids = moe_route(torch.randn(N, E), k)
    shard = fused_moe_triton(x, w_gu[4:], w_down[4:], weights, ids, expert_offset=4)
    assert_rms_close(shard, fused_moe_reference(x, w_gu[4:], w_down[4:], weights, ids, 4), 1e-5, "shard")
