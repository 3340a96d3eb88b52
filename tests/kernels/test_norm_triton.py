"""Triton RMSNorms (under TRITON_INTERPRET on CPU) vs the references."""
import pytest
import torch

import triton  # noqa: E402,F401  (a declared dependency; the tests run it interpreted)
from kernels.norm import gated_rms_norm_reference, rms_norm_reference  # noqa: E402
from kernels.norm_triton import rms_norm_triton  # noqa: E402

pytestmark = pytest.mark.usefixtures("interpreted")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_norms_match_reference(dtype, tol, assert_rms_close):
    x, z = torch.randn(3, 5, 48, dtype=dtype) * 2, torch.randn(3, 5, 48, dtype=dtype)
    w0, w1 = (torch.randn(48) * 0.3).to(dtype), (1 + torch.randn(48) * 0.3).to(dtype)
    assert_rms_close(rms_norm_triton(x, w0, 1e-6), rms_norm_reference(x, w0, 1e-6), tol, "rms_norm")
    assert_rms_close(rms_norm_triton(x, w1, 1e-6, z), gated_rms_norm_reference(x, z, w1, 1e-6), tol, "gated")
