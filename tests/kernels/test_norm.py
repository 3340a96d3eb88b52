"""Norms vs HF's Qwen3_5MoeRMSNorm / Qwen3_5MoeRMSNormGated modules."""
import pytest
import torch

from kernels import gated_rms_norm, rms_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_match_hf(dtype):
    import transformers.models.qwen3_5_moe.modeling_qwen3_5_moe as hf
    x, z = torch.randn(5, 3, 32, dtype=dtype) * 3, torch.randn(5, 3, 32, dtype=dtype)
    norm, gated = hf.Qwen3_5MoeRMSNorm(32, eps=1e-6).to(dtype), hf.Qwen3_5MoeRMSNormGated(32, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(0, 0.5)
        gated.weight.normal_(1, 0.5)
        assert torch.equal(rms_norm(x, norm.weight, 1e-6), norm(x))
        assert torch.equal(gated_rms_norm(x, z, gated.weight, 1e-6), gated(x, z))


def test_fp32_norm_is_the_reference_bit_for_bit():
    from kernels.norm import rms_norm_fp32, rms_norm_reference
    x, w = torch.randn(300, 8, 32) * 3, torch.randn(32)
    x_before = x.clone()
    assert torch.equal(rms_norm_fp32(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    assert torch.equal(x, x_before)                 # the input is not written


def test_fp32_gated_norm_is_the_reference_bit_for_bit():
    from kernels.norm import gated_rms_norm_fp32, gated_rms_norm_reference
    x, z, w = torch.randn(300, 8, 32) * 3, torch.randn(300, 8, 32), torch.randn(32)
    x_before = x.clone()
    assert torch.equal(gated_rms_norm_fp32(x, z, w, 1e-6), gated_rms_norm_reference(x, z, w, 1e-6))
    assert torch.equal(x, x_before)                 # the input is not written
